"""Quantiles of the iteration time (p50/p90/p99 for tail SLOs), calibrated on held-out configurations.

Step times scatter around the mean (repeat jitter) and the mean model has residual error on configurations it
never saw; both matter for tail SLOs. The quantile model fits the mean model on cross-validation folds that
hold out whole configurations (``GroupKFold`` on ``config_id``), records the out-of-fold ratio ``measured /
predicted`` of every row, and keeps per TP and per band of predicted time the empirical quantiles of that
ratio (finite-sample conformal level ``⌈(n+1)q⌉/n``). ``q̂_p(x) = mean(x) · ratio_p``: calibrated on unseen
configurations by construction, and as cheap as the mean.

"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import GroupKFold
from sklearn.utils.validation import check_is_fitted

from .features import FloatArray, as_composition
from .latency import (
    DEFAULT_EAGER_KNOTS_TOKENS,
    DEFAULT_KNOTS_TOKENS,
    DEFAULT_QUANTILES,
    IterationTimeModel,
    OutOfProfileRangeWarning,
    _check_target,
)
from .spec import ModelSpec
from .step_regime import VLLM_CUSTOM_ALLREDUCE_MAX_BYTES, VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE


def _conformal_quantile(values: FloatArray, q: float) -> float:
    """Finite-sample conformal quantile: the ⌈(n+1)q⌉-th smallest value (the largest when that exceeds n)."""
    v = np.sort(values)
    rank = min(len(v), math.ceil((len(v) + 1) * q))
    return float(v[max(rank, 1) - 1])


class IterationTimeQuantileModel(BaseEstimator):
    """Quantiles (e.g. p50/p90/p99) of the step time: mean model × out-of-fold ratio quantiles per TP and
    band.

    ``fit(X, y, groups)`` holds out whole configurations (``groups`` = ``config_id``; identical compositions
    when omitted) to calibrate; ``predict`` returns shape ``(n, len(quantiles))`` in ms. The knot and engine
    parameters are those of the mean model (:class:`.latency.IterationTimeModel`).
    """

    def __init__(
        self,
        spec: ModelSpec | None = None,
        quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
        n_bands: int = 3,
        n_splits: int = 5,
        roofline_knots_tokens: tuple[int, ...] = DEFAULT_KNOTS_TOKENS,
        random_state: int = 0,
        eager_knots_tokens: tuple[int, ...] = DEFAULT_EAGER_KNOTS_TOKENS,
        cuda_graph_max_tokens: int = VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE,
        custom_allreduce_max_bytes: int = VLLM_CUSTOM_ALLREDUCE_MAX_BYTES,
    ) -> None:
        self.spec = spec
        self.quantiles = quantiles
        self.n_bands = n_bands
        self.n_splits = n_splits
        self.roofline_knots_tokens = roofline_knots_tokens
        self.random_state = random_state
        self.eager_knots_tokens = eager_knots_tokens
        self.cuda_graph_max_tokens = cuda_graph_max_tokens
        self.custom_allreduce_max_bytes = custom_allreduce_max_bytes

    def _mean_estimator(self) -> IterationTimeModel:
        return IterationTimeModel(
            spec=self.spec,
            roofline_knots_tokens=self.roofline_knots_tokens,
            eager_knots_tokens=self.eager_knots_tokens,
            cuda_graph_max_tokens=self.cuda_graph_max_tokens,
            custom_allreduce_max_bytes=self.custom_allreduce_max_bytes,
        )

    def fit(
        self, X: npt.ArrayLike, y: npt.ArrayLike, groups: npt.ArrayLike | None = None
    ) -> IterationTimeQuantileModel:
        """Calibrate the ratio quantiles on held-out folds and fit the final mean model; returns ``self``."""
        qs = tuple(float(q) for q in self.quantiles)
        if not qs or any(not 0 < q < 1 for q in qs) or list(qs) != sorted(set(qs)):
            raise ValueError(f"quantiles={self.quantiles} must be increasing values in (0, 1)")
        if self.n_bands < 1 or self.n_splits < 2:
            raise ValueError(f"n_bands={self.n_bands} must be >= 1 and n_splits={self.n_splits} >= 2")
        comp = as_composition(X)
        target = _check_target(y, comp.shape[0])
        grp = np.unique(comp, axis=0, return_inverse=True)[1].ravel() if groups is None else np.asarray(groups).ravel()
        base = self._mean_estimator()
        oof = np.empty_like(target)
        splitter = GroupKFold(n_splits=self.n_splits, shuffle=True, random_state=self.random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutOfProfileRangeWarning)
            for train, test in splitter.split(comp, target, grp):
                oof[test] = clone(base).fit(comp[train], target[train]).predict(comp[test])
        ratio = target / np.maximum(oof, 1e-9)
        edges: dict[int, list[float]] = {}
        table: dict[int, list[list[float]]] = {}
        for tp in np.unique(comp[:, 0]).astype(int):
            rows = comp[:, 0] == tp
            inner = np.quantile(oof[rows], np.linspace(0, 1, self.n_bands + 1)[1:-1]).tolist()
            band = np.searchsorted(inner, oof[rows], side="right")
            edges[int(tp)] = [float(e) for e in inner]
            table[int(tp)] = [
                [_conformal_quantile(ratio[rows][band == b], q) if (band == b).any() else 1.0 for q in qs]
                for b in range(self.n_bands)
            ]
        self.mean_model_ = clone(base).fit(comp, target)
        self.band_edges_ms_ = edges
        self.ratios_ = table
        self.n_features_in_ = comp.shape[1]
        return self

    def _ratios(self, tp: int, mean_ms: float) -> list[float]:
        edges = self.band_edges_ms_[tp]
        band = 0
        while band < len(edges) and mean_ms >= edges[band]:
            band += 1
        return self.ratios_[tp][band]

    def predict(self, X: npt.ArrayLike) -> FloatArray:
        """Quantiles of the step time (ms), shape ``(n, len(quantiles))``."""
        check_is_fitted(self, "ratios_")
        comp = as_composition(X)
        mean = self.mean_model_.predict(comp)
        out = np.empty((comp.shape[0], len(self.quantiles)))
        for tp in np.unique(comp[:, 0]).astype(int):
            rows = np.flatnonzero(comp[:, 0] == tp)
            edges = np.asarray(self.band_edges_ms_[int(tp)])
            band = np.searchsorted(edges, mean[rows], side="right")
            out[rows] = mean[rows, None] * np.asarray(self.ratios_[int(tp)])[band]
        return out

    def predict_quantile_ms(
        self,
        quantile: float,
        tp: int,
        num_prefill_seqs: int,
        prefill_tokens: int,
        prefill_attention_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """One quantile of one step's time (ms), pure Python; ``quantile`` must be one of ``quantiles``."""
        try:
            j = self.quantiles.index(quantile)
        except ValueError:
            raise ValueError(f"quantile {quantile} was not fitted; fitted quantiles: {list(self.quantiles)}") from None
        mean = self.mean_model_.predict_ms(
            tp,
            num_prefill_seqs,
            prefill_tokens,
            prefill_attention_pairs,
            num_decode_seqs,
            decode_context_tokens,
        )
        return mean * self._ratios(tp, mean)[j]

    def to_params(self) -> dict[str, Any]:
        """Learned state as plain JSON-able numbers."""
        check_is_fitted(self, "ratios_")
        return {
            "quantiles": [float(q) for q in self.quantiles],
            "n_bands": int(self.n_bands),
            "n_splits": int(self.n_splits),
            "random_state": int(self.random_state),
            "band_edges_ms": {str(tp): e for tp, e in self.band_edges_ms_.items()},
            "ratios": {str(tp): r for tp, r in self.ratios_.items()},
        }

    @classmethod
    def from_params(cls, mean_model: IterationTimeModel, params: dict[str, Any]) -> IterationTimeQuantileModel:
        """Rebuild a fitted quantile model around an already rebuilt mean model (validated)."""
        model = cls(
            spec=mean_model.spec,
            quantiles=tuple(float(q) for q in params["quantiles"]),
            n_bands=int(params["n_bands"]),
            n_splits=int(params["n_splits"]),
            roofline_knots_tokens=mean_model.roofline_knots_tokens,
            random_state=int(params["random_state"]),
            eager_knots_tokens=mean_model.eager_knots_tokens,
            cuda_graph_max_tokens=mean_model.cuda_graph_max_tokens,
            custom_allreduce_max_bytes=mean_model.custom_allreduce_max_bytes,
        )
        edges = {int(tp): [float(v) for v in e] for tp, e in params["band_edges_ms"].items()}
        ratios = {int(tp): [[float(v) for v in row] for row in r] for tp, r in params["ratios"].items()}
        if set(edges) != set(mean_model.coef_) or set(ratios) != set(edges):
            raise ValueError("quantile bands and ratios must cover exactly the mean model's TP degrees")
        for tp in edges:
            if len(edges[tp]) != model.n_bands - 1 or len(ratios[tp]) != model.n_bands:
                raise ValueError(f"tp={tp}: expected {model.n_bands} bands")
            if any(
                len(row) != len(model.quantiles) or not all(v > 0 and math.isfinite(v) for v in row)
                for row in ratios[tp]
            ):
                raise ValueError(f"tp={tp}: every band needs one finite ratio > 0 per quantile")
        model.mean_model_ = mean_model
        model.band_edges_ms_ = edges
        model.ratios_ = ratios
        model.n_features_in_ = 6
        return model
