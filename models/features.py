"""Physically motivated per-iteration features of one engine step, from a model spec, a TP degree and a batch
composition (vectorised with numpy over rows).

A *composition* is the six numbers the profile schema records for a step (``COMPOSITION_COLUMNS``): the TP
degree, the prefill part (sequences, new tokens, causal attention pairs) and the decode part (sequences, the
KV length they attend to). Everything else is derived from the architecture:

=========================  =======================================================================  ========
feature                    definition (per GPU of the TP group)                                     unit
=========================  =======================================================================  ========
``tokens``                 prefill tokens + decode sequences (rows that pass through every GEMM)        tokens
``num_seqs``               prefill + decode sequences (rows of the LM head, sampled tokens)             seqs
``gemm_flops``             2 · tokens · layer_linear_params / tp  +  2 · num_seqs · vocab · hidden / tp  FLOP
``weight_bytes``           (layer_linear_params + vocab · hidden) · dtype_bytes / tp                     bytes
``attn_prefill_flops``     4 · prefill_attention_pairs · head_dim · q_heads_per_gpu · layers            FLOP
``attn_decode_flops``      4 · decode_context_tokens · head_dim · q_heads_per_gpu · layers              FLOP
``kv_read_bytes``          decode_context_tokens · kv_bytes_per_token_per_gpu                           bytes
``allreduce_bytes``        2 · layers · tokens · hidden · dtype_bytes (0 at TP 1)                       bytes
``allreduce_count``        2 · layers (0 at TP 1)                                                        ops
``graph_tokens``           tokens rounded up to the next CUDA-graph capture size (unchanged if eager)    tokens
``eager_step``             1 if tokens exceed the largest CUDA-graph capture size (no graph), else 0     —
``allreduce_nccl_bytes``   ``allreduce_bytes`` of steps whose message (tokens · hidden · dtype_bytes)    bytes
                           reaches the custom all-reduce limit and goes to NCCL (0 otherwise)
=========================  =======================================================================  ========

``layer_linear_params`` are the weights of the QKV, output, gate/up and down projections of every layer;
``q_heads_per_gpu = heads / tp`` and ``kv_heads_per_gpu = max(1, kv_heads / tp)`` (vLLM replicates KV heads
when TP exceeds their number). A GEMM over ``m`` rows streams its weights once and does ``2·m`` FLOP per
weight, so ``max(gemm_flops / peak_flops, weight_bytes / bandwidth)`` is its roofline time; the latency model
builds its basis from exactly these quantities (see :mod:`.latency`). The last three features depend on the
engine's two thresholds (:class:`.step_regime.StepRegimeLimits`: CUDA-graph capture size, custom all-reduce
limit), why they matter is in :mod:`.step_regime`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .spec import ModelSpec
from .step_regime import StepRegimeLimits, cuda_graph_capture_sizes, padded_tokens

#: Columns of a composition matrix, in order (the profile-schema columns the models consume).
COMPOSITION_COLUMNS: tuple[str, ...] = (
    "tp",
    "num_prefill_seqs",
    "prefill_tokens",
    "prefill_attention_pairs",
    "num_decode_seqs",
    "decode_context_tokens",
)

#: Names of the physical features :func:`iteration_features` returns, in order.
PHYSICAL_FEATURES: tuple[str, ...] = (
    "tokens",
    "num_seqs",
    "gemm_flops",
    "weight_bytes",
    "attn_prefill_flops",
    "attn_decode_flops",
    "kv_read_bytes",
    "allreduce_bytes",
    "allreduce_count",
    "graph_tokens",
    "eager_step",
    "allreduce_nccl_bytes",
)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ArchitectureConstants:
    """Per-architecture constants the features need (derived once from a :class:`ModelSpec`)."""

    layer_linear_params: int
    """Weights of all projection GEMMs of all layers (QKV, output, gate, up, down)."""
    lm_head_params: int
    """Weights of the LM head (``vocab · hidden``)."""
    num_layers: int
    hidden_size: int
    head_dim: int
    num_attention_heads: int
    num_kv_heads: int
    dtype_bytes: int

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ArchitectureConstants:
        """Derive the constants of ``spec``."""
        h, kv_width = spec.hidden_size, spec.num_kv_heads * spec.head_dim
        per_layer = h * (h + 2 * kv_width) + h * h + 3 * h * spec.intermediate_size
        return cls(
            layer_linear_params=spec.num_layers * per_layer,
            lm_head_params=spec.vocab_size * h,
            num_layers=spec.num_layers,
            hidden_size=h,
            head_dim=spec.head_dim,
            num_attention_heads=spec.num_attention_heads,
            num_kv_heads=spec.num_kv_heads,
            dtype_bytes=spec.dtype_bytes,
        )

    def q_heads_per_gpu(self, tp: FloatArray | float) -> FloatArray | float:
        """Query heads one GPU holds at TP ``tp``."""
        return self.num_attention_heads / tp

    def kv_heads_per_gpu(self, tp: FloatArray | float) -> FloatArray | float:
        """KV heads one GPU holds (replicated when ``tp`` exceeds the number of KV heads)."""
        return np.maximum(1.0, self.num_kv_heads / np.asarray(tp, dtype=float))

    def kv_bytes_per_token_per_gpu(self, tp: FloatArray | float) -> FloatArray | float:
        """KV-cache bytes one token occupies on one GPU of the TP group (K and V, all layers)."""
        return 2.0 * self.num_layers * self.kv_heads_per_gpu(tp) * self.head_dim * self.dtype_bytes


def as_composition(x: npt.ArrayLike) -> FloatArray:
    """Validate and return a composition matrix of shape ``(n, 6)`` as float64 (a 1-D row is accepted)."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != len(COMPOSITION_COLUMNS):
        raise ValueError(
            f"a composition matrix needs shape (n, {len(COMPOSITION_COLUMNS)}) with columns "
            f"{list(COMPOSITION_COLUMNS)}; got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise ValueError(f"composition row {row} has a NaN or infinite value: {arr[row].tolist()}")
    if (arr < 0).any():
        row, col = (int(v) for v in np.argwhere(arr < 0)[0])
        raise ValueError(
            f"composition row {row}: {COMPOSITION_COLUMNS[col]}={arr[row, col]} is negative; counts must be >= 0"
        )
    if (arr[:, 0] < 1).any():
        row = int(np.argwhere(arr[:, 0] < 1)[0][0])
        raise ValueError(f"composition row {row}: tp={arr[row, 0]} must be >= 1")
    return arr


def allreduce_message_bytes(constants: ArchitectureConstants, tokens: FloatArray) -> FloatArray:
    """Bytes of one all-reduce message (the activations of every token of the step)."""
    return tokens * constants.hidden_size * constants.dtype_bytes


def iteration_features(
    constants: ArchitectureConstants,
    composition: npt.ArrayLike,
    limits: StepRegimeLimits | None = None,
) -> dict[str, FloatArray]:
    """The physical features of every row of ``composition`` (columns :data:`COMPOSITION_COLUMNS`), for an
    engine with ``limits`` (vLLM 0.26's defaults when omitted).

    Returns a dict keyed by :data:`PHYSICAL_FEATURES`, each an array of length ``n``.
    """
    lim = limits or StepRegimeLimits()
    comp = as_composition(composition)
    tp, n_pre, pre_tok, pairs, n_dec, dec_ctx = (comp[:, i] for i in range(comp.shape[1]))
    c = constants
    tokens = pre_tok + n_dec
    num_seqs = n_pre + n_dec
    q_heads = c.q_heads_per_gpu(tp)
    multi_gpu = (tp > 1).astype(float)
    allreduce_bytes = multi_gpu * 2.0 * c.num_layers * allreduce_message_bytes(c, tokens)
    to_nccl = allreduce_message_bytes(c, tokens) >= lim.custom_allreduce_max_bytes
    return {
        "tokens": tokens,
        "num_seqs": num_seqs,
        "gemm_flops": 2.0 * (tokens * c.layer_linear_params + num_seqs * c.lm_head_params) / tp,
        "weight_bytes": (c.layer_linear_params + c.lm_head_params) * c.dtype_bytes / tp,
        "attn_prefill_flops": 4.0 * pairs * c.head_dim * q_heads * c.num_layers,
        "attn_decode_flops": 4.0 * dec_ctx * c.head_dim * q_heads * c.num_layers,
        "kv_read_bytes": dec_ctx * c.kv_bytes_per_token_per_gpu(tp),
        "allreduce_bytes": allreduce_bytes,
        "allreduce_count": multi_gpu * 2.0 * c.num_layers,
        "graph_tokens": padded_tokens(tokens, cuda_graph_capture_sizes(lim.cuda_graph_max_tokens)),
        "eager_step": (tokens > lim.cuda_graph_max_tokens).astype(float),
        "allreduce_nccl_bytes": np.where(to_nccl, allreduce_bytes, 0.0),
    }


def attention_pairs(chunk_tokens: npt.ArrayLike, context_tokens: npt.ArrayLike = 0) -> FloatArray:
    """Causal (query, key) pairs of prefill chunks: ``chunk·ctx + chunk·(chunk+1)/2`` element-wise."""
    chunk = np.asarray(chunk_tokens, dtype=float)
    ctx = np.asarray(context_tokens, dtype=float)
    return chunk * ctx + chunk * (chunk + 1.0) / 2.0
