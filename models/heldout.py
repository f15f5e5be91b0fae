"""Held-out evaluation of the iteration-time models: whole batch configurations are held out, never repeats.

``GroupKFold`` on ``config_id`` (shuffled, seeded): every row of a configuration lands in the same fold, so a
test configuration was never seen in training, not even as another repeat. Metrics, per TP degree:

* mean model: MAPE of the prediction against each held-out configuration's *mean* measured time (the quantity
the
  mean model predicts; per-row jitter is the quantile model's job), plus the 90th percentile and max of that
  error;
* quantile model: coverage = share of held-out *rows* whose time is at or below the predicted quantile (a
  calibrated p90 covers ~90 %).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.model_selection import GroupKFold

from .features import COMPOSITION_COLUMNS
from .latency import (
    DEFAULT_KNOTS_TOKENS,
    DEFAULT_QUANTILES,
    IterationTimeModel,
    OutOfProfileRangeWarning,
)
from .quantile import IterationTimeQuantileModel
from .spec import ModelSpec
from .step_regime import StepRegimeLimits


class TpHeldoutError(BaseModel):
    """Held-out error of one TP degree."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: int = Field(ge=1)
    """TP degree."""
    n_configs: int = Field(ge=1)
    """Held-out configurations (each predicted by a model that never saw it)."""
    n_rows: int = Field(ge=1)
    """Held-out rows (configurations × repeats)."""
    mean_mape_pct: float = Field(ge=0)
    """Mean absolute percentage error of the mean model vs each configuration's mean time."""
    mean_p90_ape_pct: float = Field(ge=0)
    """90th percentile of that error over configurations."""
    mean_max_ape_pct: float = Field(ge=0)
    """Largest error over configurations."""
    coverage_pct: dict[str, float]
    """Quantile -> share of held-out rows at or below the predicted quantile, e.g. ``{"0.9": 90.4}``."""


class HeldoutReport(BaseModel):
    """Held-out errors of the mean and quantile models, per TP."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    """How the data was split, e.g. ``GroupKFold(5) on config_id, seed 0``."""
    per_tp: list[TpHeldoutError]
    """One entry per TP degree, ascending."""

    def by_tp(self) -> dict[int, TpHeldoutError]:
        """Entries keyed by TP degree."""
        return {e.tp: e for e in self.per_tp}


def heldout_splits(
    groups: npt.ArrayLike, n_splits: int = 5, random_state: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices of a group k-fold over ``groups`` (configurations never straddle a split)."""
    g = np.asarray(groups)
    n_groups = len(np.unique(g))
    if n_groups < n_splits:
        raise ValueError(f"{n_groups} configurations cannot fill {n_splits} held-out folds; profile more configs")
    splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros((len(g), 1)), groups=g))


def heldout_predictions(
    profile: pd.DataFrame,
    spec: ModelSpec,
    n_splits: int = 5,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    random_state: int = 0,
    roofline_knots_tokens: tuple[int, ...] = DEFAULT_KNOTS_TOKENS,
    limits: StepRegimeLimits | None = None,
) -> pd.DataFrame:
    """The profile with out-of-fold ``pred_mean_ms`` and ``pred_q<q>_ms`` columns (each row predicted by
    models that never saw its configuration) and a ``fold`` column. ``limits``: the profiled engine's
    thresholds (vLLM 0.26's defaults when omitted)."""
    x = profile[list(COMPOSITION_COLUMNS)].to_numpy(dtype=float)
    y = profile["step_time_ms"].to_numpy(dtype=float)
    groups = profile["config_id"].to_numpy()
    out = profile.copy()
    out["fold"] = -1
    mean = np.empty(len(y))
    qpred = np.empty((len(y), len(quantiles)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfProfileRangeWarning)
        for fold, (train, test) in enumerate(heldout_splits(groups, n_splits, random_state)):
            qmodel = _quantile_estimator(spec, quantiles, random_state, roofline_knots_tokens, limits).fit(
                x[train], y[train], groups=groups[train]
            )
            mean[test] = qmodel.mean_model_.predict(x[test])
            qpred[test] = qmodel.predict(x[test])
            out.loc[out.index[test], "fold"] = fold
    out["pred_mean_ms"] = mean
    for j, q in enumerate(quantiles):
        out[f"pred_q{q:g}_ms"] = qpred[:, j]
    return out


def _quantile_estimator(
    spec: ModelSpec,
    quantiles: Sequence[float],
    random_state: int,
    roofline_knots_tokens: tuple[int, ...],
    limits: StepRegimeLimits | None,
) -> IterationTimeQuantileModel:
    lim = limits or StepRegimeLimits()
    return IterationTimeQuantileModel(
        spec=spec,
        quantiles=tuple(quantiles),
        roofline_knots_tokens=roofline_knots_tokens,
        random_state=random_state,
        cuda_graph_max_tokens=lim.cuda_graph_max_tokens,
        custom_allreduce_max_bytes=lim.custom_allreduce_max_bytes,
    )


def summarize(pred: pd.DataFrame, quantiles: Sequence[float], method: str) -> HeldoutReport:
    """Per-TP metrics from :func:`heldout_predictions` output."""
    per_tp = []
    for tp, rows in pred.groupby("tp"):
        configs = rows.groupby("config_id").agg(measured=("step_time_ms", "mean"), pred=("pred_mean_ms", "mean"))
        ape = (configs["pred"] - configs["measured"]).abs() / configs["measured"] * 100
        coverage = {f"{q:g}": float((rows["step_time_ms"] <= rows[f"pred_q{q:g}_ms"]).mean() * 100) for q in quantiles}
        per_tp.append(
            TpHeldoutError(
                tp=int(tp),
                n_configs=len(configs),
                n_rows=len(rows),
                mean_mape_pct=float(ape.mean()),
                mean_p90_ape_pct=float(np.percentile(ape, 90)),
                mean_max_ape_pct=float(ape.max()),
                coverage_pct=coverage,
            )
        )
    return HeldoutReport(method=method, per_tp=per_tp)


def evaluate_heldout(
    profile: pd.DataFrame,
    spec: ModelSpec,
    n_splits: int = 5,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    random_state: int = 0,
    roofline_knots_tokens: tuple[int, ...] = DEFAULT_KNOTS_TOKENS,
    limits: StepRegimeLimits | None = None,
) -> HeldoutReport:
    """Held-out MAPE (mean model) and coverage (quantile model) per TP, grouping folds by ``config_id``."""
    pred = heldout_predictions(profile, spec, n_splits, quantiles, random_state, roofline_knots_tokens, limits)
    method = (
        f"GroupKFold({n_splits}, shuffled, seed {random_state}) on config_id; MAPE vs held-out config means, "
        "coverage over held-out rows"
    )
    return summarize(pred, quantiles, method)


def fit_models(
    profile: pd.DataFrame,
    spec: ModelSpec,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    random_state: int = 0,
    roofline_knots_tokens: tuple[int, ...] = DEFAULT_KNOTS_TOKENS,
    limits: StepRegimeLimits | None = None,
) -> IterationTimeQuantileModel:
    """Fit the quantile model (and with it the final mean model, ``.mean_model_``) on the whole profile."""
    x = profile[list(COMPOSITION_COLUMNS)].to_numpy(dtype=float)
    y = profile["step_time_ms"].to_numpy(dtype=float)
    return _quantile_estimator(spec, quantiles, random_state, roofline_knots_tokens, limits).fit(
        x, y, groups=profile["config_id"].to_numpy()
    )


__all__ = [
    "HeldoutReport",
    "IterationTimeModel",
    "TpHeldoutError",
    "evaluate_heldout",
    "fit_models",
    "heldout_predictions",
    "heldout_splits",
    "summarize",
]
