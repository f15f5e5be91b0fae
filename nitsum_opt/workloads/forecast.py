"""Demand forecasters: predict next epoch's arrival rate per tier from the rates observed so far.

A forecaster is a frozen configuration with a pure method ``forecast(history_rps) -> rates``: ``history_rps``
has shape ``(epochs_observed, tiers)`` (rows oldest first, e.g. ``EpochDemand.rates_rps[:k]``) and the
result has shape ``(tiers,)``. No hidden state, so the same history always gives the same forecast and a
controller can be replayed. ``forecast_series`` gives the one-step-ahead forecast for every epoch of a
series at once (row ``k`` uses rows ``< k``), for scoring a forecaster against a trace.

``headroom`` inflates the forecast (0.1 = plan for 10 % more than predicted).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from nitsum_opt.models.spec import Frozen


def _history(history_rps: np.ndarray) -> np.ndarray:
    history = np.asarray(history_rps, dtype=np.float64)
    if history.ndim != 2:
        raise ValueError(f"history_rps must have shape (epochs, tiers), got {history.shape}")
    if history.size and (not np.all(np.isfinite(history)) or history.min() < 0):
        raise ValueError("history_rps must hold finite rates ≥ 0")
    return history


class LastWindowForecaster(Frozen):
    """Next epoch's rate = the last observed epoch's rate (0 before any observation)."""

    kind: Literal["last"] = "last"
    """Discriminator."""
    headroom: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Fraction added on top of the forecast."""

    def forecast(self, history_rps: np.ndarray) -> np.ndarray:
        """Rates for the next epoch, shape ``(tiers,)``."""
        history = _history(history_rps)
        base = history[-1] if history.shape[0] else np.zeros(history.shape[1])
        return base * (1.0 + self.headroom)

    def forecast_series(self, rates_rps: np.ndarray) -> np.ndarray:
        """One-step-ahead forecasts for every epoch (row 0 = 0)."""
        rates = _history(rates_rps)
        out = np.zeros_like(rates)
        out[1:] = rates[:-1]
        return out * (1.0 + self.headroom)


class EwmaForecaster(Frozen):
    """Exponentially weighted moving average: ``f[k+1] = α·x[k] + (1-α)·f[k]``, started at ``f[1] = x[0]``."""

    kind: Literal["ewma"] = "ewma"
    """Discriminator."""
    alpha: float = Field(default=0.5, gt=0, le=1, allow_inf_nan=False)
    """Weight of the newest epoch (1 = last-window)."""
    headroom: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Fraction added on top of the forecast."""

    def forecast_series(self, rates_rps: np.ndarray) -> np.ndarray:
        """One-step-ahead forecasts for every epoch (row 0 = 0, row 1 = the first observation)."""
        rates = _history(rates_rps)
        out = np.zeros_like(rates)
        if rates.shape[0] > 1:
            level = rates[0].copy()
            out[1] = level
            for k in range(1, rates.shape[0] - 1):
                level = self.alpha * rates[k] + (1.0 - self.alpha) * level
                out[k + 1] = level
        return out * (1.0 + self.headroom)

    def forecast(self, history_rps: np.ndarray) -> np.ndarray:
        """Rates for the next epoch, shape ``(tiers,)``."""
        history = _history(history_rps)
        if history.shape[0] == 0:
            return np.zeros(history.shape[1])
        padded = np.vstack([history, np.zeros((1, history.shape[1]))])
        return self.forecast_series(padded)[-1]


Forecaster = Annotated[LastWindowForecaster | EwmaForecaster, Field(discriminator="kind")]
"""Any forecaster, chosen in YAML by ``kind``."""


def forecast_error(forecaster: LastWindowForecaster | EwmaForecaster, rates_rps: np.ndarray) -> np.ndarray:
    """Mean absolute one-step-ahead error per tier in req/s (epoch 0, which has no history, left out)."""
    rates = _history(rates_rps)
    if rates.shape[0] < 2:
        return np.zeros(rates.shape[1])
    return np.abs(forecaster.forecast_series(rates)[1:] - rates[1:]).mean(axis=0)
