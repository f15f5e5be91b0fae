"""Guardrails against plan flapping, as a pure function of explicit state (Ray Serve autoscaling style).

``stabilize`` decides between the running plan (re-admitted for the new demand) and a planner's candidate:

1. the running plan is always replaced when it is no longer feasible (GPUs gone, a minimum admission broken);
2. **minimum dwell time**: no change within ``min_dwell_s`` of the last one;
3. **hysteresis**: no change while every tier's demand stays within ``±demand_band`` of the demand the running
   plan was made for;
4. **minimum gain**: the candidate must beat the running plan's objective (same input, so the candidate already
   pays its churn) by ``min_relative_gain`` of it plus ``min_absolute_gain`` — or by
   ``role_only_min_relative_gain`` when it only changes roles: the same number of instances of each TP degree
   per tier (shared instances counted as one more tier), prefill, decode and colocated reassigned among them.
   Such plans differ by less than the capacity table resolves (measured in ``benchmarks/RESULTS.md``).

:class:`StabilizedPlanner` wraps any planner and carries the state between epochs.
"""

from __future__ import annotations

import time

from pydantic import Field

from nitsum_opt.assemble import assemble_plan
from nitsum_opt.evaluate import evaluate_plan
from nitsum_opt.models.spec import Frozen
from nitsum_opt.plan import Plan, PlanStatus
from nitsum_opt.planners.base import Planner
from nitsum_opt.spec import PlanningInput


class StabilizerSettings(Frozen):
    """Guardrail knobs."""

    min_dwell_s: float = Field(default=10.0, ge=0)
    """Seconds a plan stays in place before another change is allowed."""
    demand_band: float = Field(default=0.05, ge=0, le=1)
    """Relative band around the demand the running plan was made for inside which nothing changes."""
    min_relative_gain: float = Field(default=0.02, ge=0)
    """Required improvement of the objective, as a fraction of the running plan's objective."""
    min_absolute_gain: float = Field(default=0.0, ge=0)
    """Required improvement of the objective, in weighted req/s."""
    role_only_min_relative_gain: float | None = Field(default=0.1, ge=0)
    """Required relative improvement for a candidate that only changes roles (see the module docstring);
    ``None``: ``min_relative_gain``. Default 0.1: measured on the simulator (``benchmarks/RESULTS.md``, "Role-only
    re-plans"), it keeps Nitsum at load ×24 from trading between prefill/decode splits the table rates within 2 %
    (105.4 → 116.2 req/s) and changes nothing where plans differ in TP or GPUs per tier."""


class StabilizerState(Frozen):
    """What the stabilizer remembers between epochs."""

    last_change_s: float | None = None
    """Time of the last accepted change (None before the first plan)."""
    planned_demand_rps: dict[str, float] = Field(default_factory=dict)
    """Demand per tier the running plan was made for."""


class StabilizerDecision(Frozen):
    """The plan to run and the state for the next epoch."""

    plan: Plan
    """Either the candidate or the running plan (status ``KEPT``)."""
    state: StabilizerState
    """State to pass to the next call."""
    switched: bool
    """Whether the candidate was accepted."""
    reason: str
    """Which rule decided."""


def _accept(inp: PlanningInput, candidate: Plan, now_s: float, reason: str) -> StabilizerDecision:
    demand = {d.tier: d.arrival_rate_rps for d in inp.demand}
    state = StabilizerState(last_change_s=now_s, planned_demand_rps=demand)
    return StabilizerDecision(plan=candidate, state=state, switched=True, reason=reason)


def _within_band(inp: PlanningInput, state: StabilizerState, band: float) -> bool:
    for d in inp.demand:
        ref = state.planned_demand_rps.get(d.tier)
        if ref is None or abs(d.arrival_rate_rps - ref) > band * max(ref, 1e-9):
            return False
    return True


def _shape(plan: Plan) -> dict[tuple[str, int], int]:
    """Instances per (tier, TP), roles left out (shared instances under tier ``"*"``)."""
    out: dict[tuple[str, int], int] = {}
    for inst in plan.instances:
        out[(inst.tier, inst.tp)] = out.get((inst.tier, inst.tp), 0) + 1
    return out


def stabilize(
    inp: PlanningInput, candidate: Plan, now_s: float, state: StabilizerState, settings: StabilizerSettings
) -> StabilizerDecision:
    """Choose between the running plan in ``inp.current_plan`` and ``candidate`` (see the module docstring)."""
    if inp.current_plan is None or state.last_change_s is None:
        return _accept(inp, candidate, now_s, "first plan")
    counts = {(ic.tier, ic.config): ic.count for ic in inp.current_plan.counts if ic.count > 0}
    kept = assemble_plan(
        inp,
        counts,
        status=PlanStatus.KEPT,
        planner=f"stabilizer({candidate.provenance.planner})",
        solve_time_ms=candidate.solve_time_ms,
    )
    if not evaluate_plan(inp, kept).feasible:
        return _accept(inp, candidate, now_s, "running plan is no longer feasible")

    def keep(reason: str) -> StabilizerDecision:
        return StabilizerDecision(
            plan=kept.model_copy(update={"message": reason}), state=state, switched=False, reason=reason
        )

    if now_s - state.last_change_s < settings.min_dwell_s:
        return keep(f"dwell: {now_s - state.last_change_s:.1f} s since the last change < {settings.min_dwell_s} s")
    if _within_band(inp, state, settings.demand_band):
        return keep(f"hysteresis: every tier's demand within ±{settings.demand_band:.0%} of the planned demand")
    gain = settings.min_relative_gain
    if settings.role_only_min_relative_gain is not None and _shape(kept) == _shape(candidate):
        gain = settings.role_only_min_relative_gain
    needed = kept.objective + gain * abs(kept.objective) + settings.min_absolute_gain
    if candidate.objective < needed:
        return keep(f"gain: candidate objective {candidate.objective:.4g} < required {needed:.4g}")
    return _accept(inp, candidate, now_s, f"gain: {candidate.objective:.4g} >= {needed:.4g}")


class StabilizedPlanner(Planner):
    """Any planner behind the stabilizer; keeps the :class:`StabilizerState` between calls."""

    name = "stabilized"

    def __init__(self, inner: Planner, settings: StabilizerSettings | None = None) -> None:
        self.inner = inner
        self.settings = settings or StabilizerSettings()
        self.state = StabilizerState()
        self.last_decision: StabilizerDecision | None = None

    @property
    def label(self) -> str:
        return f"stabilized({self.inner.label})"

    def plan(self, inp: PlanningInput, now_s: float | None = None) -> Plan:
        """The candidate of the inner planner, or the running plan when a guardrail says keep it."""
        now = time.monotonic() if now_s is None else now_s
        decision = stabilize(inp, self.inner.plan(inp), now, self.state, self.settings)
        self.state = decision.state
        self.last_decision = decision
        return decision.plan
