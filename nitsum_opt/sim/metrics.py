"""Metrics of one simulated run: per-tier SLO attainment, goodput, goodput per GPU, latency percentiles."""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.scheduler import RequestClass
from nitsum_opt.sim.results import Outcome, SimResult
from nitsum_opt.spec import Tier


def _pct(values: np.ndarray, q: float) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, q)) if finite.size else None


class TierMetrics(Frozen):
    """One tier's outcome in one run."""

    tier: str
    """Tier name."""
    requests: int = Field(ge=0)
    """Requests of the tier in the trace."""
    attainment: float = Field(ge=0, le=1)
    """Share of the tier's requests that completed within both SLO targets (rejected and unfinished count as
    misses)."""
    goodput_rps: float = Field(ge=0)
    """The tier's requests/s (over the trace interval) that met both targets."""
    completed: int = Field(ge=0)
    """Requests that finished."""
    rejected: int = Field(ge=0)
    """Requests rejected (with a reason)."""
    unfinished: int = Field(ge=0)
    """Requests still in the system at the horizon."""
    admitted_share: float = Field(ge=0, le=1)
    """Share classified feasible (admitted) by the scheduler; the rest was best-effort or background."""
    ttft_p50_ms: float | None = None
    """Median TTFT of requests that got a first token."""
    ttft_p90_ms: float | None = None
    """90th percentile TTFT."""
    tpot_p50_ms: float | None = None
    """Median TPOT of completed requests with ≥ 2 output tokens."""
    tpot_p90_ms: float | None = None
    """90th percentile TPOT."""


class RunMetrics(Frozen):
    """One system at one load level."""

    system: str
    """System name."""
    load_scale: float = Field(gt=0)
    """Load multiplier of the workload."""
    offered_rps: float = Field(ge=0)
    """Requests/s offered (trace requests over its interval)."""
    gpus: int = Field(ge=1)
    """GPUs of the cluster."""
    attainment: float = Field(ge=0, le=1)
    """Share of all requests meeting their tier's SLO."""
    goodput_rps: float = Field(ge=0)
    """Requests/s meeting both targets of their tier."""
    goodput_per_gpu_rps: float = Field(ge=0)
    """``goodput_rps / gpus``."""
    weighted_goodput: float = Field(ge=0)
    """``Σ_t w_t · goodput_t`` (the planner's objective, measured)."""
    meets_slo: bool
    """Every tier's attainment reaches its ``slo_percentile``."""
    tiers: tuple[TierMetrics, ...]
    """Per-tier detail."""
    deployments: int = Field(ge=0)
    """Deployments applied (1 for a static system)."""
    engine_switches: int = Field(ge=0)
    """Engines started by plan changes (each paused for the switch cost)."""
    migrations: int = Field(ge=0)
    """KV migrations caused by plan changes."""
    preemptions: int = Field(ge=0)
    """Recompute preemptions."""
    deployment: str = ""
    """The (first) deployment, described."""
    sim_wall_s: float = Field(default=0.0, ge=0)
    """Wall time of the simulation (search runs excluded)."""
    speed_x: float = Field(default=0.0, ge=0)
    """Simulated trace seconds per wall second."""


def run_metrics(
    result: SimResult, tiers: tuple[Tier, ...], system: str, load_scale: float, gpus: int, wall_s: float = 0.0
) -> RunMetrics:
    """Metrics of ``result`` (see :class:`RunMetrics`)."""
    met = result.slo_met(tiers)
    span = max(result.end_s - result.start_s, 1e-9)
    per_tier = []
    meets = True
    for k, tier in enumerate(tiers):
        mask = result.tier == k
        n = int(mask.sum())
        att = float(met[mask].mean()) if n else 1.0
        meets = meets and att * 100.0 >= tier.slo_percentile - 1e-9
        outcome = result.outcome[mask]
        ttft = result.ttft_s[mask] * 1000.0
        tpot = result.tpot_s[mask] * 1000.0
        per_tier.append(
            TierMetrics(
                tier=tier.name,
                requests=n,
                attainment=att,
                goodput_rps=float(met[mask].sum()) / span,
                completed=int((outcome == Outcome.COMPLETED).sum()),
                rejected=int((outcome == Outcome.REJECTED).sum()),
                unfinished=int((outcome == Outcome.UNFINISHED).sum()),
                admitted_share=float((result.request_class[mask] == RequestClass.FEASIBLE).mean()) if n else 1.0,
                ttft_p50_ms=_pct(ttft, 50),
                ttft_p90_ms=_pct(ttft, 90),
                tpot_p50_ms=_pct(tpot, 50),
                tpot_p90_ms=_pct(tpot, 90),
            )
        )
    goodput = float(met.sum()) / span
    return RunMetrics(
        system=system,
        load_scale=load_scale,
        offered_rps=len(result) / span,
        gpus=gpus,
        attainment=float(met.mean()) if len(result) else 1.0,
        goodput_rps=goodput,
        goodput_per_gpu_rps=goodput / gpus,
        weighted_goodput=sum(t.weight * m.goodput_rps for t, m in zip(tiers, per_tier, strict=True)),
        meets_slo=meets,
        tiers=tuple(per_tier),
        deployments=len(result.timeline),
        engine_switches=len(result.switch_windows),
        migrations=int(result.migrations.sum()),
        preemptions=int(result.preemptions.sum()),
        deployment=result.timeline[0][1].describe() if result.timeline else "",
        sim_wall_s=wall_s,
        speed_x=(span / wall_s) if wall_s > 0 else 0.0,
    )


def max_load_at(points: list[tuple[float, float]], threshold: float = 0.9) -> float | None:
    """Highest load with attainment ≥ ``threshold`` before it first falls below, linearly interpolated between
    the last passing and the first failing sweep point; ``None`` when even the lowest load fails."""
    ordered = sorted(points)
    last: tuple[float, float] | None = None
    for load, att in ordered:
        if att < threshold:
            if last is None:
                return None
            (l0, a0), (l1, a1) = last, (load, att)
            return l0 + (a0 - threshold) / (a0 - a1) * (l1 - l0) if a0 != a1 else l0
        last = (load, att)
    return None if last is None else last[0]


def ratio(a: float, b: float) -> float:
    """``a / b`` (inf when ``b`` is 0 and ``a`` > 0, 1 when both are 0)."""
    if b > 0:
        return a / b
    return math.inf if a > 0 else 1.0
