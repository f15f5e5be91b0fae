"""Iteration-time models for the simulator: the protocol it needs and two physically based implementations.

The simulator times every engine step (one forward pass of a continuous batch) with an
:class:`IterationTimeModel`: ``predict_ms(tp, num_prefill_seqs, prefill_tokens, prefill_attention_pairs,
num_decode_seqs, decode_context_tokens)`` plus the engine's KV-cache capacity ``kv_cache_tokens(tp)``. The fitted
latency models of ``nitsum_opt.models`` (``PerformanceModel``) satisfy this protocol; until a fitted model is
available for a model × GPU, :class:`RooflineIterationModel` is the documented fallback.

**Roofline** (per GPU of a TP group; ``T`` = tokens through the GEMMs = prefill tokens + decode sequences)::

    t = overhead_ms + per_seq_ms · seqs
      + max(2·P·T/tp / (F·e_gemm),  W/tp / (B·e_mem))        dense layers + LM head: compute- or weight-bound
      + 4·pairs·d_head·(H/tp)·L / (F·e_attn)                  prefill attention (causal pairs, compute-bound)
      + ctx · kv_bytes_per_token/tp / (B·e_mem)               decode attention (KV read, memory-bound)
      + 2·L · (lat_ar + 2(tp−1)/tp · T·h·bytes / (N·e_ar))   two ring all-reduces per layer (0 at TP 1)

with ``P`` the parameters, ``W`` their bytes, ``F`` peak dense BF16 FLOP/s, ``B`` HBM bandwidth, ``N`` NVLink
bandwidth per direction. For a fixed batch the time is *affine* in ``decode_context_tokens`` (the simulator's
fast-forward of decode-only stretches relies on that; see :mod:`nitsum_opt.sim.engine`).

:class:`ConstantStepModel` (every step takes the same time) is the known-answer model of queueing tests (M/D/1).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from pydantic import Field

from nitsum_opt.models.spec import SUPPORTED_TP, Frozen, ModelSpec

GIB = 1024**3


@runtime_checkable
class IterationTimeModel(Protocol):
    """What the simulator needs from a latency model (``nitsum_opt.models.PerformanceModel`` satisfies it)."""

    def predict_ms(
        self,
        tp: int,
        num_prefill_seqs: int,
        prefill_tokens: int,
        prefill_attention_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """Mean time of one engine step in ms for this batch composition at TP ``tp``."""
        ...

    def kv_cache_tokens(self, tp: int) -> int:
        """KV-cache capacity of one engine of TP ``tp``, in tokens."""
        ...


def model_tps(model: IterationTimeModel) -> tuple[int, ...]:
    """TP degrees ``model`` can time (a fitted model covers the profiled ones; the roofline every supported one)."""
    return tuple(int(tp) for tp in getattr(model, "tps", SUPPORTED_TP))


class GpuSpec(Frozen):
    """Datasheet numbers of one GPU and the efficiencies a serving engine reaches on it."""

    name: str = "H200"
    """GPU model."""
    peak_bf16_tflops: float = Field(default=989.0, gt=0)
    """Dense BF16 tensor-core peak, TFLOP/s (H200 SXM datasheet: 989 dense, 1,979 with sparsity)."""
    hbm_tb_s: float = Field(default=4.8, gt=0)
    """HBM bandwidth, TB/s (H200 SXM: 4.8 TB/s HBM3e)."""
    memory_gib: float = Field(default=140.4, gt=0)
    """Usable memory per GPU in GiB (141 GB nominal; 140.4 GiB as torch reports it)."""
    nvlink_gb_s: float = Field(default=450.0, gt=0)
    """NVLink bandwidth per direction, GB/s (H200 SXM: 900 GB/s bidirectional)."""
    gemm_efficiency: float = Field(default=0.7, gt=0, le=1)
    """Fraction of peak FLOP/s large GEMMs reach."""
    attention_efficiency: float = Field(default=0.5, gt=0, le=1)
    """Fraction of peak FLOP/s prefill attention (FlashAttention) reaches."""
    memory_efficiency: float = Field(default=0.8, gt=0, le=1)
    """Fraction of HBM bandwidth weight and KV streaming reach."""
    allreduce_efficiency: float = Field(default=0.7, gt=0, le=1)
    """Fraction of NVLink bandwidth a ring all-reduce reaches (NCCL bus bandwidth)."""
    allreduce_latency_us: float = Field(default=8.0, ge=0)
    """Fixed latency of one all-reduce (vLLM custom all-reduce at small messages), µs."""
    step_overhead_ms: float = Field(default=1.5, ge=0)
    """Fixed cost of one engine step (scheduling, launches, sampling setup), ms."""
    per_seq_overhead_ms: float = Field(default=0.005, ge=0)
    """Per-sequence cost of one step (sampling, metadata), ms."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Share of GPU memory the engine may use (vLLM ``gpu_memory_utilization``)."""
    memory_reserve_gib: float = Field(default=3.0, ge=0)
    """Per-GPU memory for activations, CUDA graphs and NCCL buffers, GiB."""


H200 = GpuSpec()
"""NVIDIA H200 SXM (141 GB HBM3e)."""


class RooflineIterationModel:
    """Physically based step time of ``model`` on ``gpu`` (see the module docstring); the documented fallback
    when no fitted latency model exists for the pair."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec = H200) -> None:
        self.model = model
        self.gpu = gpu
        h = model.hidden_size
        self._params = float(model.param_count)
        self._weight_bytes = float(model.weight_bytes)
        self._flops_per_s = gpu.peak_bf16_tflops * 1e12
        self._gemm_rate = self._flops_per_s * gpu.gemm_efficiency
        self._attn_rate = self._flops_per_s * gpu.attention_efficiency
        self._mem_rate = gpu.hbm_tb_s * 1e12 * gpu.memory_efficiency
        self._ar_rate = gpu.nvlink_gb_s * 1e9 * gpu.allreduce_efficiency
        self._attn_flops_per_pair = 4.0 * model.head_dim * model.num_attention_heads * model.num_layers
        self._ar_bytes_per_token = float(h * model.dtype_bytes)
        self._num_ar = 2 * model.num_layers

    def kv_bytes_per_token_per_gpu(self, tp: int) -> float:
        """KV bytes of one token on one GPU (KV heads are replicated when TP exceeds their number)."""
        m = self.model
        heads = max(1, m.num_kv_heads // tp) if tp <= m.num_kv_heads else 1
        return 2.0 * m.num_layers * heads * m.head_dim * m.dtype_bytes

    def predict_ms(
        self,
        tp: int,
        num_prefill_seqs: int,
        prefill_tokens: int,
        prefill_attention_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """Step time in ms (see the module docstring)."""
        tokens = prefill_tokens + num_decode_seqs
        gemm_s = max(2.0 * self._params * tokens / tp / self._gemm_rate, self._weight_bytes / tp / self._mem_rate)
        attn_s = prefill_attention_pairs * self._attn_flops_per_pair / tp / self._attn_rate
        kv_s = decode_context_tokens * self.kv_bytes_per_token_per_gpu(tp) / self._mem_rate
        ar_s = 0.0
        if tp > 1:
            per_ar = self.gpu.allreduce_latency_us * 1e-6 + 2.0 * (tp - 1) / tp * tokens * self._ar_bytes_per_token / (
                self._ar_rate
            )
            ar_s = self._num_ar * per_ar
        seqs = num_prefill_seqs + num_decode_seqs
        overhead_ms = self.gpu.step_overhead_ms + self.gpu.per_seq_overhead_ms * seqs
        return overhead_ms + 1000.0 * (gemm_s + attn_s + kv_s + ar_s)

    def predict_batch_ms(self, composition: np.ndarray, validate: bool = True) -> np.ndarray:
        """:meth:`predict_ms` of every row of a composition matrix (columns ``tp, num_prefill_seqs, prefill_tokens,
        prefill_attention_pairs, num_decode_seqs, decode_context_tokens``), vectorised, for capacity builders."""
        rows = np.atleast_2d(np.asarray(composition, dtype=float))
        if validate and (rows.shape[1] != 6 or not np.all(np.isfinite(rows)) or (rows < 0).any()):
            raise ValueError(f"composition must be finite, non-negative and have 6 columns; got shape {rows.shape}")
        tp, n_pre, tok_pre, pairs, n_dec, ctx = (rows[:, i] for i in range(6))
        m, g = self.model, self.gpu
        tokens = tok_pre + n_dec
        gemm_s = np.maximum(
            2.0 * self._params * tokens / tp / self._gemm_rate, self._weight_bytes / tp / self._mem_rate
        )
        attn_s = pairs * self._attn_flops_per_pair / tp / self._attn_rate
        heads = np.where(tp <= m.num_kv_heads, np.maximum(1, m.num_kv_heads // tp), 1)
        kv_s = ctx * 2.0 * m.num_layers * heads * m.head_dim * m.dtype_bytes / self._mem_rate
        per_ar = g.allreduce_latency_us * 1e-6 + 2.0 * (tp - 1) / tp * tokens * self._ar_bytes_per_token / self._ar_rate
        ar_s = np.where(tp > 1, self._num_ar * per_ar, 0.0)
        overhead_ms = g.step_overhead_ms + g.per_seq_overhead_ms * (n_pre + n_dec)
        return overhead_ms + 1000.0 * (gemm_s + attn_s + kv_s + ar_s)

    def kv_cache_tokens(self, tp: int) -> int:
        """vLLM's sizing: ``utilization · memory − weights/tp − reserve`` per GPU, over KV bytes per token per GPU."""
        g = self.gpu
        free = g.memory_gib * GIB * g.gpu_memory_utilization - self._weight_bytes / tp - g.memory_reserve_gib * GIB
        per_token = self.kv_bytes_per_token_per_gpu(tp)
        if free <= per_token:
            raise ValueError(
                f"{self.model.name} at tp={tp} does not fit on {g.name}: {self._weight_bytes / tp / GIB:.1f} GiB of "
                f"weights per GPU leave no KV cache; use a larger TP"
            )
        return int(free // per_token)


class ConstantStepModel:
    """Every step takes ``step_ms`` whatever the batch: the known-answer model of queueing checks (M/D/1)."""

    def __init__(self, step_ms: float, kv_tokens: int = 1_000_000) -> None:
        if not step_ms > 0:
            raise ValueError(f"step_ms={step_ms} must be > 0")
        self.step_ms = float(step_ms)
        self.kv_tokens = int(kv_tokens)

    def predict_ms(
        self,
        tp: int,
        num_prefill_seqs: int,
        prefill_tokens: int,
        prefill_attention_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """``step_ms``."""
        return self.step_ms

    def kv_cache_tokens(self, tp: int) -> int:
        """``kv_tokens`` at every TP."""
        return self.kv_tokens
