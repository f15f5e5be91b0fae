"""The design matrix of the mean iteration-time model (:mod:`.latency`): its columns, their names and the
parameters they are built from (roofline knots, eager knots, the engine's two thresholds of
:mod:`.step_regime`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .features import ArchitectureConstants, FloatArray, allreduce_message_bytes
from .step_regime import (
    VLLM_CUSTOM_ALLREDUCE_MAX_BYTES,
    VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE,
    cuda_graph_capture_sizes,
    padded_tokens,
)

DEFAULT_KNOTS_TOKENS: tuple[int, ...] = (0, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_EAGER_KNOTS_TOKENS: tuple[int, ...] = (1024, 2048, 4096)
#: Largest CUDA-graph size accepted (the capture sizes are materialised for padding).
MAX_CUDA_GRAPH_TOKENS = 1 << 20


@dataclass(frozen=True)
class Basis:
    """What the design matrix is built from: roofline knots, eager knots and the engine's two thresholds."""

    roofline_knots_tokens: tuple[int, ...] = DEFAULT_KNOTS_TOKENS
    """Ridges ``τ`` of the GEMM rooflines ``(2P/tp)·max(T_g, τ)``, tokens (0 = the pure-compute term)."""
    eager_knots_tokens: tuple[int, ...] = DEFAULT_EAGER_KNOTS_TOKENS
    """Knots ``σ`` of the eager-floor reverse hinges ``[eager]·max(0, σ − T)``, tokens."""
    cuda_graph_max_tokens: int = VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE
    """Largest CUDA-graph capture size of the engine, tokens (more tokens: an eager step; 0: graphs off)."""
    custom_allreduce_max_bytes: int = VLLM_CUSTOM_ALLREDUCE_MAX_BYTES
    """Custom all-reduce limit: messages of at least this many bytes go to NCCL."""

    def names(self) -> list[str]:
        """Names of the design-matrix columns."""
        return (
            ["const"]
            + [f"gemm_roofline_{int(k)}" for k in self.roofline_knots_tokens]
            + ["attn_prefill_flops", "kv_read_bytes", "num_prefill_seqs", "num_decode_seqs"]
            + ["has_prefill", "has_decode", "eager_step"]
            + [f"eager_underlap_{int(k)}" for k in self.eager_knots_tokens]
            + ["allreduce_nccl_bytes"]
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad parameter."""
        for name, knots in (("roofline", self.roofline_knots_tokens), ("eager", self.eager_knots_tokens)):
            if any(k < 0 for k in knots) or len(set(knots)) != len(knots):
                raise ValueError(f"{name}_knots_tokens={knots} must be distinct and >= 0")
        if not 0 <= self.cuda_graph_max_tokens <= MAX_CUDA_GRAPH_TOKENS or self.custom_allreduce_max_bytes < 0:
            raise ValueError(
                f"cuda_graph_max_tokens={self.cuda_graph_max_tokens} must be in [0, {MAX_CUDA_GRAPH_TOKENS}] and "
                f"custom_allreduce_max_bytes={self.custom_allreduce_max_bytes} >= 0"
            )


def basis_names(basis: Basis) -> list[str]:
    """Names of the design-matrix columns of ``basis``."""
    return basis.names()


def design_matrix(consts: ArchitectureConstants, comp: FloatArray, basis: Basis) -> FloatArray:
    """Design matrix (rows of ``comp``; columns :func:`basis_names`)."""
    tp, n_pre, pre_tok, pairs, n_dec, dec_ctx = (comp[:, i] for i in range(6))
    tokens = pre_tok + n_dec
    eager = tokens > basis.cuda_graph_max_tokens
    graph_tokens = padded_tokens(tokens, cuda_graph_capture_sizes(basis.cuda_graph_max_tokens))
    gemm_scale = 2.0 * consts.layer_linear_params / tp
    message = allreduce_message_bytes(consts, tokens)
    nccl = (tp > 1) & (message >= basis.custom_allreduce_max_bytes)
    cols = [np.ones_like(tp)]
    cols += [gemm_scale * np.maximum(graph_tokens, float(k)) for k in basis.roofline_knots_tokens]
    cols += [
        4.0 * pairs * consts.head_dim * consts.q_heads_per_gpu(tp) * consts.num_layers,
        dec_ctx * consts.kv_bytes_per_token_per_gpu(tp),
        n_pre,
        n_dec,
        (n_pre > 0).astype(float),
        (n_dec > 0).astype(float),
        eager.astype(float),
    ]
    cols += [np.where(eager, np.maximum(0.0, float(k) - tokens), 0.0) for k in basis.eager_knots_tokens]
    cols.append(np.where(nccl, 2.0 * consts.num_layers * message, 0.0))
    return np.column_stack(cols)
