"""Turn instance counts and admissions into a :class:`~nitsum_opt.plan.Plan` (placement, per-tier summary,
provenance). Every planner ends here, so plans look the same whichever planner made them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from nitsum_opt._version import __version__
from nitsum_opt.evaluate import Counts, best_admission_rps, objective_value, tier_capacity_rps
from nitsum_opt.placement import place_instances
from nitsum_opt.plan import Plan, PlanStatus, Provenance, TierAllocation
from nitsum_opt.spec import PlanningInput


def input_hash(inp: PlanningInput) -> str:
    """sha256 (16 hex) of the canonical JSON of ``inp``: same input, same hash."""
    canonical = json.dumps(inp.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tier_allocations(
    inp: PlanningInput, counts: Counts, admitted_rps: Mapping[str, float]
) -> tuple[TierAllocation, ...]:
    """Per-tier summary, in the input's tier order."""
    out = []
    for t in inp.tiers:
        demand = inp.demand_rps(t.name)
        prefill, decode = tier_capacity_rps(inp, counts, t.name)
        y = min(max(0.0, admitted_rps.get(t.name, 0.0)), demand)
        out.append(
            TierAllocation(
                tier=t.name,
                demand_rps=demand,
                admitted_rps=y,
                best_effort_rps=max(0.0, demand - y),
                admission_fraction=1.0 if demand == 0 else min(1.0, y / demand),
                prefill_capacity_rps=prefill,
                decode_capacity_rps=decode,
                gpus=sum(c.gpus * k for (tier, c), k in counts.items() if tier == t.name),
            )
        )
    return tuple(out)


def assemble_plan(
    inp: PlanningInput,
    counts: Counts,
    *,
    status: PlanStatus,
    planner: str,
    solve_time_ms: float,
    admitted_rps: Mapping[str, float] | None = None,
    objective: float | None = None,
    objective_bound: float | None = None,
    gap: float | None = None,
    solver: str | None = None,
    message: str = "",
) -> Plan:
    """A complete plan from ``n[t,c]``. Admissions default to the largest admissible rates; the objective
    defaults to its recomputed value (the MILP passes the solver's, which tests compare with the recomputed one)."""
    counts = {k: v for k, v in counts.items() if v > 0}
    admitted = dict(admitted_rps) if admitted_rps is not None else best_admission_rps(inp, counts)
    tiers = tier_allocations(inp, counts, admitted)
    clipped = {a.tier: a.admitted_rps for a in tiers}
    return Plan(
        instances=place_instances(inp.cluster, counts, inp.current_plan),
        tiers=tiers,
        objective=objective if objective is not None else objective_value(inp, counts, clipped),
        objective_bound=objective_bound,
        gap=gap,
        status=status,
        solver=solver,
        solve_time_ms=solve_time_ms,
        message=message,
        provenance=Provenance(input_hash=input_hash(inp), planner=planner, nitsum_version=__version__),
    )
