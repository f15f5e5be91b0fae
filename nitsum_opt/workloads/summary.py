"""Summary statistics of a request trace (what ``nitsum trace info`` prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from nitsum_opt.models.spec import Frozen

if TYPE_CHECKING:
    from nitsum_opt.workloads.trace import RequestTrace


class LengthStats(Frozen):
    """Distribution of one per-request length, in tokens."""

    mean: float
    """Mean."""
    p50: float
    """Median."""
    p90: float
    """90th percentile."""
    p99: float
    """99th percentile."""
    min: int
    """Smallest value."""
    max: int
    """Largest value."""

    @classmethod
    def of(cls, values: np.ndarray) -> LengthStats | None:
        """Statistics of ``values``; ``None`` when empty."""
        if values.size == 0:
            return None
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(
            mean=float(values.mean()),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            min=int(values.min()),
            max=int(values.max()),
        )


class TierSummary(Frozen):
    """Counts and mean lengths of one tier."""

    requests: int = Field(ge=0)
    """Requests of the tier."""
    mean_rate_rps: float = Field(ge=0)
    """Requests per second over the trace's observation interval."""
    input_tokens: LengthStats | None
    """Prompt lengths (``None`` without requests)."""
    output_tokens: LengthStats | None
    """Output lengths (``None`` without requests)."""


class TraceSummary(Frozen):
    """Overall and per-tier statistics of a :class:`~nitsum_opt.workloads.trace.RequestTrace`."""

    requests: int = Field(ge=0)
    """Requests in the trace."""
    start_s: float
    """Start of the observation interval."""
    end_s: float
    """End of the observation interval."""
    duration_s: float = Field(ge=0)
    """``end_s - start_s``."""
    span_s: float = Field(ge=0)
    """Last arrival minus first arrival."""
    mean_rate_rps: float = Field(ge=0)
    """``requests / duration_s`` (0 for a zero-length interval)."""
    peak_rate_rps: float = Field(ge=0)
    """Highest rate over any aligned window of ``peak_window_s`` seconds."""
    peak_window_s: float = Field(gt=0)
    """Window used for ``peak_rate_rps``."""
    interarrival_cv: float | None
    """Coefficient of variation of the gaps between arrivals (1 for Poisson; ``None`` under 3 requests)."""
    input_tokens: LengthStats | None
    """Prompt lengths."""
    output_tokens: LengthStats | None
    """Output lengths."""
    tiers: dict[str, TierSummary]
    """Per tier, in the trace's tier order."""
    sources: dict[str, int]
    """Requests per source."""


def _peak_rate(arrival_s: np.ndarray, start_s: float, window_s: float) -> float:
    if arrival_s.size == 0:
        return 0.0
    bins = np.floor((arrival_s - start_s) / window_s).astype(np.int64)
    return float(np.bincount(bins).max() / window_s)


def _cv(arrival_s: np.ndarray) -> float | None:
    if arrival_s.size < 3:
        return None
    gaps = np.diff(arrival_s)
    mean = gaps.mean()
    return float(gaps.std() / mean) if mean > 0 else None


def summarize(trace: RequestTrace, peak_window_s: float = 60.0) -> TraceSummary:
    """Compute the :class:`TraceSummary` of ``trace``."""
    if not peak_window_s > 0:
        raise ValueError(f"peak_window_s={peak_window_s} must be > 0")
    duration = trace.duration_s
    tiers: dict[str, TierSummary] = {}
    for index, name in enumerate(trace.tier_names):
        mask = trace.tier == index
        count = int(mask.sum())
        tiers[name] = TierSummary(
            requests=count,
            mean_rate_rps=count / duration if duration > 0 else 0.0,
            input_tokens=LengthStats.of(trace.input_tokens[mask]),
            output_tokens=LengthStats.of(trace.output_tokens[mask]),
        )
    source_counts = np.bincount(trace.source, minlength=len(trace.source_names))
    return TraceSummary(
        requests=len(trace),
        start_s=trace.start_s,
        end_s=trace.end_s,
        duration_s=duration,
        span_s=float(trace.arrival_s[-1] - trace.arrival_s[0]) if len(trace) else 0.0,
        mean_rate_rps=trace.mean_rate_rps,
        peak_rate_rps=_peak_rate(trace.arrival_s, trace.start_s, peak_window_s),
        peak_window_s=peak_window_s,
        interarrival_cv=_cv(trace.arrival_s),
        input_tokens=LengthStats.of(trace.input_tokens),
        output_tokens=LengthStats.of(trace.output_tokens),
        tiers=tiers,
        sources={name: int(c) for name, c in zip(trace.source_names, source_counts, strict=True)},
    )
