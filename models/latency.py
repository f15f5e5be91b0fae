"""Mean iteration time (a scikit-learn estimator), per TP degree, with a pure-Python fast path.

**Mean model** (:class:`IterationTimeModel`). For each TP degree, the step time is a *non-negative*
combination of physically meaningful terms (features from :mod:`.features`, ``T`` = tokens through the GEMMs):

    t_ms = c0                                  fixed per-step cost (weight-streaming floor, launches, CPU)
         + Σ_k a_k · (2·P/tp) · max(T, τ_k)     GEMM rooflines: weight-bound below τ_k tokens, compute above
         + b1 · attn_prefill_flops              causal attention of the prefill part (compute-bound)
         + b2 · kv_read_bytes                   decode attention (memory-bound: KV bytes read)
         + b3 · num_prefill_seqs                per-sequence work (LM-head rows, sampling, metadata)
         + b4 · num_decode_seqs
         + e1 · [prefill part present]          fixed cost of each phase's attention kernels
         + e2 · [decode part present]

``P`` are the layer weights; ``τ_0 = 0`` gives the pure-compute term. A GEMM over ``T`` rows costs ``max(FLOPs
/ peak, bytes / bandwidth)``, and ``2·P/tp · max(T, τ)`` is exactly that roofline with its ridge at ``τ``
tokens (= FLOP/byte for bf16); real kernels change regime gradually, so a non-negative mix of rooflines with
ridges at ``roofline_knots_tokens`` fits them. Within one TP the all-reduce volume is proportional to ``T``,
so its cost is carried by the same terms (and its fixed latency by ``c0``). Coefficients are found by
non-negative least squares on the *relative* error (rows divided by the measured time, repeats of a
configuration averaged first), so every term keeps its physical sign and the fit minimises the error that MAPE
measures.

Prediction is a dot product: :meth:`IterationTimeModel.predict_ms` evaluates one step in pure Python from
folded per-TP coefficients (a few µs, see ``benchmarks/RESULTS.md``), for the simulator's inner loop.

The quantile variant lives in :mod:`.quantile`.

Extrapolation: predicting for a composition outside the range profiled at that TP warns once per feature
(:class:`OutOfProfileRangeWarning`) naming the feature, the value and the range.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import nnls
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from .features import ArchitectureConstants, FloatArray, as_composition
from .spec import ModelSpec

DEFAULT_KNOTS_TOKENS: tuple[int, ...] = (0, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)

#: Composition quantities whose profiled range is guarded (name -> how to compute it from a composition row).
RANGE_FEATURES: tuple[str, ...] = (
    "tokens",
    "num_prefill_seqs",
    "prefill_attention_pairs",
    "num_decode_seqs",
    "decode_context_tokens",
)


class OutOfProfileRangeWarning(UserWarning):
    """A prediction was asked for outside the range the model was profiled on (it extrapolates)."""


def _range_values(comp: FloatArray) -> FloatArray:
    """Columns of :data:`RANGE_FEATURES` for a composition matrix."""
    return np.column_stack([comp[:, 2] + comp[:, 4], comp[:, 1], comp[:, 3], comp[:, 4], comp[:, 5]])


def basis_names(knots_tokens: Sequence[int]) -> list[str]:
    """Names of the design-matrix columns for the given roofline knots."""
    return (
        ["const"]
        + [f"gemm_roofline_{int(k)}" for k in knots_tokens]
        + ["attn_prefill_flops", "kv_read_bytes", "num_prefill_seqs", "num_decode_seqs"]
        + ["has_prefill", "has_decode"]
    )


def design_matrix(consts: ArchitectureConstants, comp: FloatArray, knots_tokens: Sequence[int]) -> FloatArray:
    """Design matrix (rows of ``comp``; columns :func:`basis_names`)."""
    tp, n_pre, pre_tok, pairs, n_dec, dec_ctx = (comp[:, i] for i in range(6))
    tokens = pre_tok + n_dec
    gemm_scale = 2.0 * consts.layer_linear_params / tp
    cols = [np.ones_like(tp)]
    cols += [gemm_scale * np.maximum(tokens, float(k)) for k in knots_tokens]
    cols += [
        4.0 * pairs * consts.head_dim * consts.q_heads_per_gpu(tp) * consts.num_layers,
        dec_ctx * consts.kv_bytes_per_token_per_gpu(tp),
        n_pre,
        n_dec,
        (n_pre > 0).astype(float),
        (n_dec > 0).astype(float),
    ]
    return np.column_stack(cols)


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


class _RangeGuard:
    """Warn once per feature when a prediction leaves the profiled range of its TP."""

    def __init__(self, model_name: str, ranges: dict[int, list[list[float]]]) -> None:
        self.model_name = model_name
        self.ranges = ranges
        self.warned: set[str] = set()

    def warn(self, feature: str, tp: int, value: float) -> None:
        if feature in self.warned:
            return
        self.warned.add(feature)
        lo, hi = self.ranges[tp][RANGE_FEATURES.index(feature)]
        warnings.warn(
            f"{self.model_name} latency model: {feature}={value:,.0f} at tp={tp} is outside the profiled "
            "range "
            f"[{lo:,.0f}, {hi:,.0f}]; the prediction extrapolates (profile larger batches to cover it). "
            "Warned once per feature.",
            OutOfProfileRangeWarning,
            stacklevel=4,
        )

    def check_matrix(self, comp: FloatArray) -> None:
        values = _range_values(comp)
        for tp in np.unique(comp[:, 0]).astype(int):
            rows = comp[:, 0] == tp
            bounds = np.asarray(self.ranges[int(tp)])
            v = values[rows]
            outside = (v < bounds[:, 0]) | (v > bounds[:, 1])
            for j in np.flatnonzero(outside.any(axis=0)):
                self.warn(RANGE_FEATURES[j], int(tp), float(v[outside[:, j], j][0]))


class IterationTimeModel(RegressorMixin, BaseEstimator):
    """Mean iteration time (ms) from a composition matrix (columns :data:`.features.COMPOSITION_COLUMNS`).

    Parameters are only stored here (scikit-learn contract); ``fit`` learns one coefficient vector per TP.
    """

    def __init__(
        self,
        spec: ModelSpec | None = None,
        roofline_knots_tokens: tuple[int, ...] = DEFAULT_KNOTS_TOKENS,
    ) -> None:
        self.spec = spec
        self.roofline_knots_tokens = roofline_knots_tokens

    # -- fitting ---------------------------------------------------------------------------------------------
    def _constants(self) -> ArchitectureConstants:
        if not isinstance(self.spec, ModelSpec):
            raise ValueError(
                f"{type(self).__name__}(spec=...) needs a ModelSpec (e.g. model_preset('llama-3.1-8b')); "
                f"got {self.spec!r}"
            )
        return ArchitectureConstants.from_spec(self.spec)

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> IterationTimeModel:
        """Fit per-TP coefficients by relative non-negative least squares; returns ``self``."""
        consts = self._constants()
        knots = tuple(int(k) for k in self.roofline_knots_tokens)
        if any(k < 0 for k in knots) or len(set(knots)) != len(knots):
            raise ValueError(f"roofline_knots_tokens={self.roofline_knots_tokens} must be distinct and >= 0")
        comp = as_composition(X)
        target = _check_target(y, comp.shape[0])
        comp_u, target_u = _aggregate(comp, target)
        n_basis = len(basis_names(knots))
        coef: dict[int, FloatArray] = {}
        ranges: dict[int, list[list[float]]] = {}
        for tp in np.unique(comp_u[:, 0]).astype(int):
            rows = comp_u[:, 0] == tp
            if rows.sum() < n_basis:
                raise ValueError(
                    f"tp={tp} has {int(rows.sum())} distinct configurations; the model has {n_basis} "
                    "coefficients per TP: profile more configurations at this TP"
                )
            coef[int(tp)] = _relative_nnls(design_matrix(consts, comp_u[rows], knots), target_u[rows])
            values = _range_values(comp[comp[:, 0] == tp])
            ranges[int(tp)] = np.column_stack([values.min(axis=0), values.max(axis=0)]).tolist()
        self.coef_ = coef
        self.ranges_ = ranges
        self.tps_ = tuple(sorted(coef))
        self.feature_names_ = tuple(basis_names(knots))
        self.n_features_in_ = comp.shape[1]
        self._prepare()
        return self

    # -- state that is derived from the learned coefficients (rebuilt after loading) -------------------------
    def _prepare(self) -> None:
        consts = self._constants()
        knots = [float(k) for k in self.roofline_knots_tokens]
        fast: dict[int, tuple[Any, ...]] = {}
        for tp, c in self.coef_.items():
            gemm_scale = 2.0 * consts.layer_linear_params / tp
            hinge = [(k, float(a) * gemm_scale) for k, a in zip(knots, c[1 : 1 + len(knots)], strict=True) if a > 0]
            linear = sum(a for k, a in hinge if k == 0.0)
            hinge = [(k, a) for k, a in hinge if k > 0.0]
            tail = c[1 + len(knots) :]
            attn = 4.0 * consts.head_dim * float(consts.q_heads_per_gpu(tp)) * consts.num_layers
            fast[tp] = (
                float(c[0]),
                float(linear),
                tuple(hinge),
                float(tail[0]) * attn,
                float(tail[1]) * float(consts.kv_bytes_per_token_per_gpu(tp)),
                float(tail[2]),
                float(tail[3]),
                tuple(tuple(r) for r in self.ranges_[tp]),
                float(tail[4]),
                float(tail[5]),
            )
        self._fast = fast
        self._consts_cache = consts
        self._guard = _RangeGuard(self.spec.name if self.spec else "?", self.ranges_)

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
        consts = self._constants()
        out = np.empty(comp.shape[0])
        for tp in np.unique(comp[:, 0]).astype(int):
            self._check_tp(int(tp))
            rows = comp[:, 0] == tp
            out[rows] = design_matrix(consts, comp[rows], self.roofline_knots_tokens) @ self.coef_[int(tp)]
        self._guard.check_matrix(comp)
        return out

    def predict_trusted(self, comp: FloatArray) -> FloatArray:
        """Like :meth:`predict` for a float64 ``(n, 6)`` composition built by trusted code: no validation and
        no range warnings (the capacity builder probes far outside any profile on purpose)."""
        consts = self._consts_cache
        tps = comp[:, 0]
        first = int(tps[0])
        if (tps == first).all():
            self._check_tp(first)
            return design_matrix(consts, comp, self.roofline_knots_tokens) @ self.coef_[first]
        out = np.empty(comp.shape[0])
        for tp in np.unique(tps).astype(int):
            self._check_tp(int(tp))
            rows = tps == tp
            out[rows] = design_matrix(consts, comp[rows], self.roofline_knots_tokens) @ self.coef_[int(tp)]
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
        """Mean time of one step, in ms, in pure Python (the simulator's inner loop; a few µs)."""
        try:
            c0, lin, hinge, b_attn, b_kv, b_pre, b_dec, rng, e_pre, e_dec = self._fast[tp]
        except (KeyError, AttributeError):
            check_is_fitted(self, "coef_")
            self._check_tp(tp)
            raise
        tokens = prefill_tokens + num_decode_seqs
        t = c0 + lin * tokens + b_attn * prefill_attention_pairs + b_kv * decode_context_tokens
        t += b_pre * num_prefill_seqs + b_dec * num_decode_seqs
        if num_prefill_seqs:
            t += e_pre
        if num_decode_seqs:
            t += e_dec
        for k, a in hinge:
            t += a * (tokens if tokens > k else k)
        if (
            tokens > rng[0][1]
            or num_prefill_seqs > rng[1][1]
            or prefill_attention_pairs > rng[2][1]
            or num_decode_seqs > rng[3][1]
            or decode_context_tokens > rng[4][1]
            or tokens < rng[0][0]
        ):
            self._warn_scalar(
                tp,
                (tokens, num_prefill_seqs, prefill_attention_pairs, num_decode_seqs, decode_context_tokens),
            )
        return t

    def _warn_scalar(self, tp: int, values: tuple[float, ...]) -> None:
        for j, (v, (lo, hi)) in enumerate(zip(values, self._fast[tp][7], strict=True)):
            if v < lo or v > hi:
                self._guard.warn(RANGE_FEATURES[j], tp, float(v))

    # -- persistence (plain numbers only) --------------------------------------------------------------------
    def to_params(self) -> dict[str, Any]:
        """Learned state as plain JSON-able numbers."""
        check_is_fitted(self, "coef_")
        return {
            "roofline_knots_tokens": [int(k) for k in self.roofline_knots_tokens],
            "feature_names": list(self.feature_names_),
            "coef": {str(tp): [float(v) for v in c] for tp, c in self.coef_.items()},
            "ranges": {str(tp): r for tp, r in self.ranges_.items()},
        }

    @classmethod
    def from_params(cls, spec: ModelSpec, params: dict[str, Any]) -> IterationTimeModel:
        """Rebuild a fitted model from :meth:`to_params` output (validated)."""
        model = cls(spec=spec, roofline_knots_tokens=tuple(int(k) for k in params["roofline_knots_tokens"]))
        names = basis_names(model.roofline_knots_tokens)
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
