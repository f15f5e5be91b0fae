"""Mean iteration time (a scikit-learn estimator), per TP degree, with a pure-Python fast path.

**Mean model** (:class:`IterationTimeModel`). For each TP degree, the step time is a *non-negative*
combination of physically meaningful terms (features from :mod:`.features`; ``T`` = tokens through the GEMMs,
``T_g`` = ``T`` rounded up to the next CUDA-graph capture size when the step runs as a graph):

    t_ms = c0                                  fixed per-step cost (weight-streaming floor, launches, CPU)
         + Σ_k a_k · (2·P/tp) · max(T_g, τ_k)   GEMM rooflines: weight-bound below τ_k tokens, compute above
         + b1 · attn_prefill_flops              causal attention of the prefill part (compute-bound)
         + b2 · kv_read_bytes                   decode attention (memory-bound: KV bytes read)
         + b3 · num_prefill_seqs                per-sequence work (LM-head rows, sampling, metadata)
         + b4 · num_decode_seqs
         + e1 · [prefill part present]          fixed cost of each phase's attention kernels
         + e2 · [decode part present]
         + f0 · [eager]                         a step beyond the CUDA-graph sizes launches every kernel
         + Σ_j f_j · [eager] · max(0, σ_j − T)  ... and the GPU idles until the launches are done
         + g · allreduce_nccl_bytes             all-reduce messages above the custom all-reduce limit (NCCL)

``P`` are the layer weights; ``τ_0 = 0`` gives the pure-compute term. A GEMM over ``T`` rows costs ``max(FLOPs
/ peak, bytes / bandwidth)``, and ``2·P/tp · max(T, τ)`` is exactly that roofline with its ridge at ``τ``
tokens (= FLOP/byte for bf16); real kernels change regime gradually, so a non-negative mix of rooflines with
ridges at ``roofline_knots_tokens`` fits them. Within one TP the all-reduce volume is proportional to ``T``,
so its cost is carried by the same terms (and its fixed latency by ``c0``), except where vLLM switches from its
custom all-reduce to NCCL (``g``).

*Eager steps* (more tokens than ``cuda_graph_max_tokens``, see :mod:`.step_regime`) are launched kernel by
kernel from Python. Their time is ``max(CPU launch time L, GPU time G(T))``; ``max(L, G) = G + max(0, L − G)``
and, with ``G`` growing in ``T``, the excess ``max(0, L − G)`` is a convex, decreasing function of ``T`` that
vanishes once the GPU work outlasts the launches. The reverse hinges ``max(0, σ_j − T)`` (``σ`` =
``eager_knots_tokens``) with non-negative weights represent exactly such functions, so mid-size steps get
their CPU floor and large ones none. This is what makes TP4 no faster than TP2 at 1–2k tokens on H200.

Coefficients are found by non-negative least squares on the *relative* error (rows divided by the measured
time, repeats of a configuration averaged first), so every term keeps its physical sign and the fit minimises
the error that MAPE measures.

Prediction is a dot product: :meth:`IterationTimeModel.predict_ms` evaluates one step in pure Python from
folded per-TP coefficients (about 1 µs, see ``benchmarks/RESULTS.md``), for the simulator's inner loop.

The quantile variant lives in :mod:`.quantile`.

Extrapolation: predicting for a composition outside the range profiled at that TP warns once per feature
(:class:`OutOfProfileRangeWarning`, :mod:`.ranges`) naming the feature, the value and the range.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import nnls
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from .basis import DEFAULT_EAGER_KNOTS_TOKENS, DEFAULT_KNOTS_TOKENS, Basis, basis_names, design_matrix
from .features import ArchitectureConstants, FloatArray, as_composition
from .ranges import RANGE_FEATURES, OutOfProfileRangeWarning, RangeGuard, profiled_ranges
from .spec import ModelSpec
from .step_regime import VLLM_CUSTOM_ALLREDUCE_MAX_BYTES, VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE, cuda_graph_capture_sizes

DEFAULT_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)

__all__ = [
    "DEFAULT_EAGER_KNOTS_TOKENS",
    "DEFAULT_KNOTS_TOKENS",
    "DEFAULT_QUANTILES",
    "RANGE_FEATURES",
    "Basis",
    "IterationTimeModel",
    "OutOfProfileRangeWarning",
    "basis_names",
    "design_matrix",
]


def _relative_nnls(a: FloatArray, y: FloatArray) -> FloatArray:
    """argmin_{c >= 0} Σ ((A c - y) / y)^2, solved with column scaling for conditioning."""
    aw = a / y[:, None]
    norms = np.linalg.norm(aw, axis=0)
    norms[norms == 0] = 1.0
    coef, _ = nnls(aw / norms, np.ones_like(y), maxiter=50 * a.shape[1])
    return coef / norms


def _aggregate(comp: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Average the targets of identical compositions (repeats of one configuration)."""
    uniq, inverse = np.unique(comp, axis=0, return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=y, minlength=len(uniq))
    counts = np.bincount(inverse.ravel(), minlength=len(uniq))
    return uniq, sums / counts


def _check_target(y: npt.ArrayLike, n_rows: int) -> FloatArray:
    arr = np.asarray(y, dtype=float).ravel()
    if arr.shape[0] != n_rows:
        raise ValueError(f"y has {arr.shape[0]} values but X has {n_rows} rows")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        bad = int(np.argwhere(~np.isfinite(arr) | (arr <= 0))[0][0])
        raise ValueError(f"step times must be finite and > 0 ms; row {bad} has {arr[bad]}")
    return arr


@dataclass(frozen=True, slots=True)
class _FastTp:
    """Per-TP coefficients folded for :meth:`IterationTimeModel.predict_ms` (ms per unit of each quantity)."""

    const: float
    per_token: float  # pure-compute roofline term (knot 0)
    hinges: tuple[tuple[float, float], ...]  # (knot tokens, ms per token) of the other rooflines
    per_pair: float
    per_kv_token: float
    per_prefill_seq: float
    per_decode_seq: float
    has_prefill: float
    has_decode: float
    eager: float
    underlaps: tuple[tuple[float, float], ...]  # (eager knot tokens, ms per token below it)
    nccl_per_token: float
    nccl_min_tokens: float  # steps with at least this many tokens all-reduce through NCCL
    ranges: tuple[tuple[float, float], ...]


class IterationTimeModel(RegressorMixin, BaseEstimator):
    """Mean iteration time (ms) from a composition matrix (columns :data:`.features.COMPOSITION_COLUMNS`).

    Parameters are only stored here (scikit-learn contract); ``fit`` learns one coefficient vector per TP.
    ``cuda_graph_max_tokens`` and ``custom_allreduce_max_bytes`` describe the profiled engine
    (:class:`.step_regime.StepRegimeLimits`; vLLM 0.26's defaults).
    """

    def __init__(
        self,
        spec: ModelSpec | None = None,
        roofline_knots_tokens: tuple[int, ...] = DEFAULT_KNOTS_TOKENS,
        eager_knots_tokens: tuple[int, ...] = DEFAULT_EAGER_KNOTS_TOKENS,
        cuda_graph_max_tokens: int = VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE,
        custom_allreduce_max_bytes: int = VLLM_CUSTOM_ALLREDUCE_MAX_BYTES,
    ) -> None:
        self.spec = spec
        self.roofline_knots_tokens = roofline_knots_tokens
        self.eager_knots_tokens = eager_knots_tokens
        self.cuda_graph_max_tokens = cuda_graph_max_tokens
        self.custom_allreduce_max_bytes = custom_allreduce_max_bytes

    # -- fitting ---------------------------------------------------------------------------------------------
    def _constants(self) -> ArchitectureConstants:
        if not isinstance(self.spec, ModelSpec):
            raise ValueError(
                f"{type(self).__name__}(spec=...) needs a ModelSpec (e.g. model_preset('llama-3.1-8b')); "
                f"got {self.spec!r}"
            )
        return ArchitectureConstants.from_spec(self.spec)

    def _basis(self) -> Basis:
        basis = Basis(
            roofline_knots_tokens=tuple(int(k) for k in self.roofline_knots_tokens),
            eager_knots_tokens=tuple(int(k) for k in self.eager_knots_tokens),
            cuda_graph_max_tokens=int(self.cuda_graph_max_tokens),
            custom_allreduce_max_bytes=int(self.custom_allreduce_max_bytes),
        )
        basis.validate()
        return basis

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> IterationTimeModel:
        """Fit per-TP coefficients by relative non-negative least squares; returns ``self``."""
        consts = self._constants()
        basis = self._basis()
        comp = as_composition(X)
        target = _check_target(y, comp.shape[0])
        comp_u, target_u = _aggregate(comp, target)
        n_basis = len(basis.names())
        coef: dict[int, FloatArray] = {}
        ranges: dict[int, list[list[float]]] = {}
        for tp in np.unique(comp_u[:, 0]).astype(int):
            rows = comp_u[:, 0] == tp
            if rows.sum() < n_basis:
                raise ValueError(
                    f"tp={tp} has {int(rows.sum())} distinct configurations; the model has {n_basis} "
                    "coefficients per TP: profile more configurations at this TP"
                )
            coef[int(tp)] = _relative_nnls(design_matrix(consts, comp_u[rows], basis), target_u[rows])
            ranges[int(tp)] = profiled_ranges(comp[comp[:, 0] == tp])
        self.coef_ = coef
        self.ranges_ = ranges
        self.tps_ = tuple(sorted(coef))
        self.feature_names_ = tuple(basis.names())
        self.n_features_in_ = comp.shape[1]
        self._prepare()
        return self

    # -- state that is derived from the learned coefficients (rebuilt after loading) -------------------------
    def _fold(self, tp: int, c: FloatArray, consts: ArchitectureConstants, basis: Basis) -> _FastTp:
        n_roof, n_eager = len(basis.roofline_knots_tokens), len(basis.eager_knots_tokens)
        gemm_scale = 2.0 * consts.layer_linear_params / tp
        roof_coef = zip(basis.roofline_knots_tokens, c[1 : 1 + n_roof], strict=True)
        roof = [(float(k), float(a) * gemm_scale) for k, a in roof_coef if a > 0]
        tail = [float(v) for v in c[1 + n_roof : 1 + n_roof + 7]]
        under = zip(basis.eager_knots_tokens, c[8 + n_roof : 8 + n_roof + n_eager], strict=True)
        message_per_token = consts.hidden_size * consts.dtype_bytes
        multi_gpu = tp > 1
        return _FastTp(
            const=float(c[0]),
            per_token=sum(a for k, a in roof if k == 0.0),
            hinges=tuple((k, a) for k, a in roof if k > 0.0),
            per_pair=tail[0] * 4.0 * consts.head_dim * float(consts.q_heads_per_gpu(tp)) * consts.num_layers,
            per_kv_token=tail[1] * float(consts.kv_bytes_per_token_per_gpu(tp)),
            per_prefill_seq=tail[2],
            per_decode_seq=tail[3],
            has_prefill=tail[4],
            has_decode=tail[5],
            eager=tail[6],
            underlaps=tuple((float(k), float(a)) for k, a in under if a > 0),
            nccl_per_token=float(c[-1]) * 2.0 * consts.num_layers * message_per_token if multi_gpu else 0.0,
            nccl_min_tokens=basis.custom_allreduce_max_bytes / message_per_token if multi_gpu else float("inf"),
            ranges=tuple((float(lo), float(hi)) for lo, hi in self.ranges_[tp]),
        )

    def _prepare(self) -> None:
        consts = self._constants()
        basis = self._basis()
        self._fast = {tp: self._fold(tp, c, consts, basis) for tp, c in self.coef_.items()}
        self._graph_max = basis.cuda_graph_max_tokens
        self._graph_sizes = cuda_graph_capture_sizes(basis.cuda_graph_max_tokens)
        self._consts_cache = consts
        self._basis_cache = basis
        self._guard = RangeGuard(self.spec.name if self.spec else "?", self.ranges_)

    def _check_tp(self, tp: int) -> None:
        if tp not in self.coef_:
            raise ValueError(
                f"no latency model for tp={tp}: the profile covers tp {list(self.tps_)}; profile tp={tp} or "
                "drop the configs that use it"
            )

    # -- prediction ------------------------------------------------------------------------------------------
    def predict(self, X: npt.ArrayLike) -> FloatArray:
        """Mean step time in ms for every row of the composition matrix ``X``."""
        check_is_fitted(self, "coef_")
        comp = as_composition(X)
        for tp in np.unique(comp[:, 0]).astype(int):
            self._check_tp(int(tp))
        out = self.predict_trusted(comp)
        self._guard.check_matrix(comp)
        return out

    def predict_trusted(self, comp: FloatArray) -> FloatArray:
        """Like :meth:`predict` for a float64 ``(n, 6)`` composition built by trusted code: no validation and
        no range warnings (the capacity builder probes far outside any profile on purpose)."""
        consts, basis = self._consts_cache, self._basis_cache
        tps = comp[:, 0]
        first = int(tps[0])
        if (tps == first).all():
            self._check_tp(first)
            return design_matrix(consts, comp, basis) @ self.coef_[first]
        out = np.empty(comp.shape[0])
        for tp in np.unique(tps).astype(int):
            self._check_tp(int(tp))
            rows = tps == tp
            out[rows] = design_matrix(consts, comp[rows], basis) @ self.coef_[int(tp)]
        return out

    def predict_ms(
        self,
        tp: int,
        num_prefill_seqs: int,
        prefill_tokens: int,
        prefill_attention_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """Mean time of one step, in ms, in pure Python (the simulator's inner loop; about 1 µs)."""
        try:
            f = self._fast[tp]
        except (KeyError, AttributeError):
            check_is_fitted(self, "coef_")
            self._check_tp(tp)
            raise
        tokens = prefill_tokens + num_decode_seqs
        t = f.const + f.per_pair * prefill_attention_pairs + f.per_kv_token * decode_context_tokens
        t += f.per_prefill_seq * num_prefill_seqs + f.per_decode_seq * num_decode_seqs
        if num_prefill_seqs:
            t += f.has_prefill
        if num_decode_seqs:
            t += f.has_decode
        if tokens > self._graph_max:
            gemm_tokens = tokens
            t += f.eager
            for k, a in f.underlaps:
                if tokens < k:
                    t += a * (k - tokens)
        else:
            sizes = self._graph_sizes
            i = bisect_left(sizes, tokens)
            gemm_tokens = sizes[i] if i < len(sizes) else tokens
        if tokens >= f.nccl_min_tokens:
            t += f.nccl_per_token * tokens
        t += f.per_token * gemm_tokens
        for k, a in f.hinges:
            t += a * (gemm_tokens if gemm_tokens > k else k)
        rng = f.ranges
        if (
            tokens > rng[0][1]
            or num_prefill_seqs > rng[1][1]
            or prefill_attention_pairs > rng[2][1]
            or num_decode_seqs > rng[3][1]
            or decode_context_tokens > rng[4][1]
            or tokens < rng[0][0]
        ):
            self._guard.check_scalar(
                tp, (tokens, num_prefill_seqs, prefill_attention_pairs, num_decode_seqs, decode_context_tokens)
            )
        return t

    # -- persistence (plain numbers only) --------------------------------------------------------------------
    def to_params(self) -> dict[str, Any]:
        """Learned state as plain JSON-able numbers."""
        check_is_fitted(self, "coef_")
        basis = self._basis()
        return {
            "roofline_knots_tokens": list(basis.roofline_knots_tokens),
            "eager_knots_tokens": list(basis.eager_knots_tokens),
            "cuda_graph_max_tokens": basis.cuda_graph_max_tokens,
            "custom_allreduce_max_bytes": basis.custom_allreduce_max_bytes,
            "feature_names": list(self.feature_names_),
            "coef": {str(tp): [float(v) for v in c] for tp, c in self.coef_.items()},
            "ranges": {str(tp): r for tp, r in self.ranges_.items()},
        }

    @classmethod
    def from_params(cls, spec: ModelSpec, params: dict[str, Any]) -> IterationTimeModel:
        """Rebuild a fitted model from :meth:`to_params` output (validated)."""
        model = cls(
            spec=spec,
            roofline_knots_tokens=tuple(int(k) for k in params["roofline_knots_tokens"]),
            eager_knots_tokens=tuple(int(k) for k in params["eager_knots_tokens"]),
            cuda_graph_max_tokens=int(params["cuda_graph_max_tokens"]),
            custom_allreduce_max_bytes=int(params["custom_allreduce_max_bytes"]),
        )
        names = model._basis().names()
        if list(params["feature_names"]) != names:
            raise ValueError(f"feature names {params['feature_names']} do not match this version's {names}")
        coef = {int(tp): np.asarray(c, dtype=float) for tp, c in params["coef"].items()}
        for tp, c in coef.items():
            if c.shape != (len(names),) or not np.isfinite(c).all() or (c < 0).any():
                raise ValueError(f"coefficients for tp={tp} must be {len(names)} finite numbers >= 0")
        ranges = {int(tp): [[float(v) for v in r] for r in rs] for tp, rs in params["ranges"].items()}
        if set(ranges) != set(coef) or any(len(r) != len(RANGE_FEATURES) for r in ranges.values()):
            raise ValueError("ranges must give the range of every guarded feature for every TP")
        model.coef_, model.ranges_ = coef, ranges
        model.tps_ = tuple(sorted(coef))
        model.feature_names_ = tuple(names)
        model.n_features_in_ = 6
        model._prepare()
        return model
