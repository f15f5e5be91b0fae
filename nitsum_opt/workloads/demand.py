"""Per-epoch demand per tier and per-tier length mixes: the inputs of the controller's forecast.

The epoch grid starts at the trace's ``start_s``: epoch ``k`` is ``[start_s + k·E, start_s + (k+1)·E)``; an
arrival exactly at ``end_s`` belongs to the last epoch, so the counts always sum to the number of requests.
A rate is the epoch's count divided by the part of the epoch inside the trace's interval (the last epoch may
be partial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nitsum_opt.models.spec import LengthMix
from nitsum_opt.spec import TierDemand
from nitsum_opt.workloads.trace import RequestTrace


@dataclass(frozen=True, eq=False)
class EpochDemand:
    """Arrivals per epoch and tier (arrays are read-only)."""

    epoch_s: float
    """Epoch length ``E`` in seconds."""
    start_s: float
    """Start of epoch 0."""
    tier_names: tuple[str, ...]
    """Column order of :attr:`counts` and :attr:`rates_rps`."""
    counts: np.ndarray
    """``counts[k, t]``: arrivals of tier ``t`` in epoch ``k`` (int64, shape ``(epochs, tiers)``)."""
    covered_s: np.ndarray
    """Seconds of each epoch inside the trace's interval (``E`` except perhaps the last)."""

    @property
    def num_epochs(self) -> int:
        """Number of epochs."""
        return int(self.counts.shape[0])

    @property
    def epoch_starts_s(self) -> np.ndarray:
        """Start time of every epoch."""
        return self.start_s + self.epoch_s * np.arange(self.num_epochs)

    @property
    def rates_rps(self) -> np.ndarray:
        """``rates_rps[k, t]``: arrival rate of tier ``t`` in epoch ``k`` in req/s (0 if not covered)."""
        covered = self.covered_s[:, None]
        return np.divide(self.counts, covered, out=np.zeros(self.counts.shape), where=covered > 0)

    def tier_rates_rps(self, tier: str) -> np.ndarray:
        """The rate series of one tier."""
        try:
            return self.rates_rps[:, self.tier_names.index(tier)]
        except ValueError:
            raise KeyError(f"unknown tier {tier!r}; tiers are {list(self.tier_names)}") from None

    def tier_demands(self, epoch: int, length_mixes: dict[str, LengthMix] | None = None) -> tuple[TierDemand, ...]:
        """The planner's ``TierDemand`` of every tier in ``epoch`` (its observed rate), with length mixes
        from ``length_mixes`` where given."""
        if not 0 <= epoch < self.num_epochs:
            raise IndexError(f"epoch {epoch} is outside 0..{self.num_epochs - 1}")
        mixes = length_mixes or {}
        rates = self.rates_rps[epoch]
        return tuple(
            TierDemand(tier=name, arrival_rate_rps=float(rates[i]), length_mix=mixes.get(name))
            for i, name in enumerate(self.tier_names)
        )


def epoch_demand(trace: RequestTrace, epoch_s: float) -> EpochDemand:
    """Count arrivals per epoch of ``epoch_s`` seconds and per tier."""
    if not (math.isfinite(epoch_s) and epoch_s > 0):
        raise ValueError(f"epoch_s={epoch_s} must be a finite number of seconds > 0")
    epochs = max(1, math.ceil(trace.duration_s / epoch_s - 1e-9))
    index = np.floor((trace.arrival_s - trace.start_s) / epoch_s).astype(np.int64)
    np.clip(index, 0, epochs - 1, out=index)
    tiers = len(trace.tier_names)
    counts = np.bincount(index * tiers + trace.tier, minlength=epochs * tiers).reshape(epochs, tiers)
    starts = epoch_s * np.arange(epochs)
    covered = np.clip(trace.duration_s - starts, 0.0, epoch_s)
    counts.setflags(write=False)
    covered.setflags(write=False)
    return EpochDemand(
        epoch_s=float(epoch_s),
        start_s=trace.start_s,
        tier_names=trace.tier_names,
        counts=counts,
        covered_s=covered,
    )


def length_mixes(trace: RequestTrace, max_buckets: int = 32) -> dict[str, LengthMix]:
    """Per-tier ``LengthMix`` (``LengthMix.from_samples``: quantile bins of prompt length, means exact);
    tiers without requests are left out."""
    mixes: dict[str, LengthMix] = {}
    for index, name in enumerate(trace.tier_names):
        mask = trace.tier == index
        if mask.any():
            mixes[name] = LengthMix.from_samples(
                trace.input_tokens[mask].tolist(), trace.output_tokens[mask].tolist(), max_buckets=max_buckets
            )
    return mixes


def observed_demand(trace: RequestTrace, start_s: float, end_s: float, max_buckets: int = 32) -> tuple[TierDemand, ...]:
    """``TierDemand`` of every tier over ``[start_s, end_s)``: the observed rate and length mix (``None``
    for a tier without requests there). This is what a controller sees of the last window."""
    if not end_s > start_s:
        raise ValueError(f"observation window [{start_s}, {end_s}) is empty")
    window = trace.window(start_s, end_s)
    mixes = length_mixes(window, max_buckets)
    counts = np.bincount(window.tier, minlength=len(trace.tier_names))
    return tuple(
        TierDemand(tier=name, arrival_rate_rps=float(counts[i]) / (end_s - start_s), length_mix=mixes.get(name))
        for i, name in enumerate(trace.tier_names)
    )
