"""Turn instance counts and admissions into a :class:`~nitsum_opt.plan.Plan` (placement, per-tier summary,
provenance). Every planner ends here, so plans look the same whichever planner made them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from nitsum_opt._version import __version__
from nitsum_opt.admission import SharedRates, best_admission, trim_shared_rates
from nitsum_opt.evaluate import Counts, objective_value, tier_capacity_rps
from nitsum_opt.placement import place_instances
from nitsum_opt.plan import Plan, PlanStatus, Provenance, TierAllocation
from nitsum_opt.spec import PlanningInput


def input_hash(inp: PlanningInput) -> str:
    """sha256 (16 hex) of the canonical JSON of ``inp``: same input, same hash."""
    canonical = json.dumps(inp.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tier_allocations(
    inp: PlanningInput, counts: Counts, admitted_rps: Mapping[str, float], shared_rps: SharedRates | None = None
) -> tuple[TierAllocation, ...]:
    """Per-tier summary, in the input's tier order."""
    out = []
    shared_rps = shared_rps or {}
    for t in inp.tiers:
        demand = inp.demand_rps(t.name)
        prefill, decode = tier_capacity_rps(inp, counts, t.name, shared_rps)
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
                shared_rates_rps={
                    c.key: rate for c, rate in sorted(shared_rps.get(t.name, {}).items(), key=lambda kv: kv[0].tp)
                },
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
    shared_rps: SharedRates | None = None,
    objective: float | None = None,
    objective_bound: float | None = None,
    gap: float | None = None,
    solver: str | None = None,
    message: str = "",
) -> Plan:
    """A complete plan from ``n[t,c]`` and ``s[c]`` (tier ``"*"``). Admissions and shared rates ``x[t,c]`` default
    to the best ones for the counts (:func:`nitsum_opt.admission.best_admission`); given ones (the MILP's) are kept,
    each tier's shared rate trimmed to what its admission needs. The objective defaults to its recomputed value (the
    MILP passes the solver's, which tests compare with the recomputed one)."""
    counts = {k: v for k, v in counts.items() if v > 0}
    if admitted_rps is None:
        admitted, shared = best_admission(inp, counts)
    else:
        admitted = dict(admitted_rps)
        shared = trim_shared_rates(inp, counts, admitted, shared_rps or {})
    tiers = tier_allocations(inp, counts, admitted, shared)
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
