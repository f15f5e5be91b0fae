"""How vLLM runs one engine step: with or without CUDA graphs, and which all-reduce carries its activations.

Two thresholds of vLLM 0.26 change the cost of a step discontinuously, and the latency model needs both
(read from vLLM 0.26.0's source and confirmed by the H200 profiling logs in
``benchmarks/gpu/logs/h200-2026-11-22-parts.tgz``):

* **CUDA graphs up to ``max_cudagraph_capture_size`` tokens.** With the default ``cudagraph_mode``
  ``FULL_AND_PIECEWISE``, a step of at most that many tokens replays a captured graph (a full graph for
  decode-only steps, piecewise graphs with eager attention for steps that contain a prefill), after padding its
  token count up to the next capture size. A larger step runs the compiled model *without* graphs: every kernel
  is launched from Python, so a mid-size step costs at least the CPU time of those launches (the "eager floor"
  the H200 profiles show at ~1–2.5k tokens, where TP4 is no faster than TP2). vLLM's default is
  ``max_cudagraph_capture_size = min(2 · max_num_seqs, 512)``, capped by ``max_num_batched_tokens``, and the
  capture sizes are ``[1, 2, 4] + range(8, 256, 8) + range(256, max + 1, 16)``
  (``VllmConfig._set_cudagraph_sizes``). The profiled engines logged exactly these 51 sizes (1…512).
* **Custom all-reduce below 8 MiB.** At TP > 1 the two all-reduces per layer use vLLM's custom (P2P/NVLink)
  all-reduce when the message is smaller than its buffer, ``CustomAllreduce(max_size=8 MiB)``; larger messages
  fall back to NCCL (``CudaCommunicator.all_reduce``). With symmetric memory the limit would rise (64 MiB at
  TP2, 32 MiB at TP4 on SM 9.0), but the profiled H200 engines logged ``symmetric memory multicast operations
  are not supported`` and dispatched ``['CUSTOM', 'PYNCCL']`` only, so 8 MiB holds. A message carries
  ``tokens · hidden · dtype_bytes``: Llama-3.1-8B crosses it at 1,024 tokens, Qwen2.5-14B at 820.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

#: vLLM 0.26's upper bound of the default ``max_cudagraph_capture_size``.
VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE = 512
#: vLLM 0.26's ``CustomAllreduce`` buffer (messages of at least this many bytes go to NCCL).
VLLM_CUSTOM_ALLREDUCE_MAX_BYTES = 8 * 1024 * 1024


def cuda_graph_capture_sizes(max_tokens: int) -> tuple[int, ...]:
    """vLLM's default CUDA-graph capture sizes up to ``max_tokens`` (empty when graphs are off)."""
    if max_tokens < 1:
        return ()
    sizes = [s for s in (1, 2, 4) if s <= max_tokens]
    sizes += list(range(8, min(max_tokens + 1, 256), 8))
    sizes += list(range(256, max_tokens + 1, 16))
    return tuple(sorted(set(sizes)))


def padded_tokens(tokens: npt.ArrayLike, sizes: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """Token counts a graph-captured step really runs: each count rounded up to the next capture size; counts
    above the largest size (eager steps) are returned unchanged."""
    t = np.asarray(tokens, dtype=float)
    if not sizes:
        return t.copy()
    caps = np.asarray(sizes, dtype=float)
    idx = np.searchsorted(caps, t, side="left")
    inside = idx < len(caps)
    out = t.copy()
    out[inside] = caps[idx[inside]]
    return out


def padded_token_count(tokens: int, sizes: tuple[int, ...]) -> int:
    """Scalar :func:`padded_tokens` (pure Python, for the simulator's inner loop)."""
    i = bisect_left(sizes, tokens)
    return sizes[i] if i < len(sizes) else tokens


@dataclass(frozen=True)
class StepRegimeLimits:
    """The two engine thresholds the latency model needs (see the module docstring)."""

    cuda_graph_max_tokens: int = VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE
    """Steps with more tokens run without CUDA graphs (0: graphs off, every step eager)."""
    custom_allreduce_max_bytes: int = VLLM_CUSTOM_ALLREDUCE_MAX_BYTES
    """All-reduce messages of at least this many bytes go to NCCL (0: NCCL only)."""

    @classmethod
    def from_engine_args(cls, engine_args: Mapping[str, Any]) -> StepRegimeLimits:
        """Thresholds of an engine built with ``engine_args`` under vLLM 0.26's defaults.

        Honours ``enforce_eager``, ``max_num_seqs``, ``max_num_batched_tokens``,
        ``disable_custom_all_reduce`` and ``compilation_config.max_cudagraph_capture_size`` when present;
        anything else keeps vLLM's defaults (an empty mapping gives 512 tokens and 8 MiB).
        """
        if engine_args.get("enforce_eager"):
            graph_max = 0
        else:
            compilation = engine_args.get("compilation_config") or {}
            explicit = compilation.get("max_cudagraph_capture_size") if isinstance(compilation, Mapping) else None
            if explicit is not None:
                graph_max = int(explicit)
            else:
                seqs = engine_args.get("max_num_seqs")
                graph_max = VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE if seqs is None else min(2 * int(seqs), 512)
            budget = engine_args.get("max_num_batched_tokens")
            if budget is not None:
                graph_max = min(graph_max, int(budget))
        ar_max = 0 if engine_args.get("disable_custom_all_reduce") else VLLM_CUSTOM_ALLREDUCE_MAX_BYTES
        return cls(cuda_graph_max_tokens=graph_max, custom_allreduce_max_bytes=ar_max)
