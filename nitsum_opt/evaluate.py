"""Independent re-check of a plan: feasibility from its concrete instances, and its objective recomputed.

``evaluate_plan`` trusts nothing the planner says: it rebuilds ``n[t,c]`` from the instances' GPU ids, checks
every GPU is used once, inside the cluster, by an aligned group inside one node, recomputes each tier's
capacity from the capacity table, checks admissions against demand, capacity and minimum admission, and
recomputes the objective. The MILP planner's objective must agree with it (tests check this on every plan).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from pydantic import Field

from nitsum_opt.models.spec import Frozen, Role, ServingConfig
from nitsum_opt.plan import Plan
from nitsum_opt.spec import PlanningInput

Counts = Mapping[tuple[str, ServingConfig], int]

#: Tolerance (req/s, relative) for comparing admitted rates with capacities.
RATE_TOLERANCE = 1e-6


class InfeasiblePlanError(ValueError):
    """A plan breaks a constraint; the message lists every violation."""


class PlanEvaluation(Frozen):
    """What ``evaluate_plan`` found."""

    objective: float
    """Objective recomputed from the plan's instances and admissions."""
    gpus_used: int = Field(ge=0)
    """GPUs held by instances."""
    churn_instances: int = Field(ge=0)
    """Instances added plus removed relative to the running plan."""
    violations: tuple[str, ...]
    """Every broken constraint (empty for a feasible plan)."""

    @property
    def feasible(self) -> bool:
        """No violation."""
        return not self.violations


def tier_capacity_rps(inp: PlanningInput, counts: Counts, tier: str) -> tuple[float, float]:
    """(prefill-side, decode-side) capacity of ``tier``: Σ R·n over prefill+colocated and decode+colocated."""
    prefill = decode = 0.0
    for (t, config), count in counts.items():
        if t != tier or count == 0:
            continue
        rate = inp.capacity.rate_rps(tier, config) * count
        if config.role in (Role.PREFILL, Role.COLOCATED):
            prefill += rate
        if config.role in (Role.DECODE, Role.COLOCATED):
            decode += rate
    return prefill, decode


def best_admission_rps(inp: PlanningInput, counts: Counts) -> dict[str, float]:
    """Largest admissible ``y_t = min(λ_t, prefill capacity, decode capacity)`` per tier."""
    return {t.name: min(inp.demand_rps(t.name), *tier_capacity_rps(inp, counts, t.name)) for t in inp.tiers}


def churn_by_key(inp: PlanningInput, counts: Counts) -> dict[tuple[str, ServingConfig], int]:
    """``|n[t,c] − n⁰[t,c]|`` for every (tier, config) present in either plan."""
    if inp.current_plan is None:
        return {}
    keys = set(counts) | {(ic.tier, ic.config) for ic in inp.current_plan.counts}
    return {k: abs(counts.get(k, 0) - inp.current_plan.count(*k)) for k in keys}


def objective_value(inp: PlanningInput, counts: Counts, admitted_rps: Mapping[str, float]) -> float:
    """``Σ w_t y_t − ε Σ g_c n[t,c] − Σ β[t,c] |n[t,c] − n⁰[t,c]|``."""
    value = sum(t.weight * admitted_rps.get(t.name, 0.0) for t in inp.tiers)
    value -= inp.objective.gpu_cost * sum(c.gpus * k for (_, c), k in counts.items())
    value -= sum(inp.churn_price(t, c) * d for (t, c), d in churn_by_key(inp, counts).items())
    return value


def evaluate_plan(inp: PlanningInput, plan: Plan) -> PlanEvaluation:
    """Re-check ``plan`` against ``inp`` and recompute its objective (never raises for violations)."""
    violations = _placement_violations(inp, plan)
    counts = dict(Counter((i.tier, i.config) for i in plan.instances))
    allowed = set(inp.candidate_configs)
    for tier, config in counts:
        if config not in allowed:
            violations.append(f"instance config {config.key} of tier {tier!r} is not a candidate config")
    admitted = {a.tier: a.admitted_rps for a in plan.tiers}
    violations += _admission_violations(inp, counts, admitted)
    return PlanEvaluation(
        objective=objective_value(inp, counts, admitted),
        gpus_used=sum(i.tp for i in plan.instances),
        churn_instances=sum(churn_by_key(inp, counts).values()),
        violations=tuple(violations),
    )


def check_plan(inp: PlanningInput, plan: Plan, objective_tolerance: float = 1e-6) -> PlanEvaluation:
    """``evaluate_plan`` that raises :class:`InfeasiblePlanError` on a violation or an objective mismatch."""
    result = evaluate_plan(inp, plan)
    problems = list(result.violations)
    scale = max(1.0, abs(result.objective))
    if abs(result.objective - plan.objective) > objective_tolerance * scale:
        problems.append(f"plan objective {plan.objective} != recomputed {result.objective}")
    if problems:
        raise InfeasiblePlanError("; ".join(problems))
    return result


def _placement_violations(inp: PlanningInput, plan: Plan) -> list[str]:
    cluster = inp.cluster
    out: list[str] = []
    seen: set[int] = set()
    for inst in plan.instances:
        ids = inst.gpu_ids
        if len(ids) != inst.tp:
            out.append(f"{inst.instance_id}: {len(ids)} GPU ids for tp={inst.tp}")
            continue
        if any(g < 0 or g >= cluster.total_gpus for g in ids):
            out.append(f"{inst.instance_id}: GPU ids {ids} outside 0..{cluster.total_gpus - 1}")
            continue
        nodes = {g // cluster.gpus_per_node for g in ids}
        if nodes != {inst.node}:
            out.append(f"{inst.instance_id}: GPUs {ids} are not all on node {inst.node}")
        if tuple(ids) != tuple(range(ids[0], ids[0] + inst.tp)) or (ids[0] % cluster.gpus_per_node) % inst.tp:
            out.append(f"{inst.instance_id}: GPUs {ids} are not an aligned consecutive group")
        clash = seen.intersection(ids)
        if clash:
            out.append(f"{inst.instance_id}: GPUs {sorted(clash)} already used by another instance")
        seen.update(ids)
    return out


def _admission_violations(inp: PlanningInput, counts: Counts, admitted: Mapping[str, float]) -> list[str]:
    out: list[str] = []
    for t in inp.tiers:
        if t.name not in admitted:
            out.append(f"tier {t.name!r} has no admission in the plan")
            continue
        y, demand = admitted[t.name], inp.demand_rps(t.name)
        prefill, decode = tier_capacity_rps(inp, counts, t.name)
        tol = RATE_TOLERANCE * max(1.0, demand)
        if y > demand + tol:
            out.append(f"tier {t.name!r}: admitted {y:.6g} req/s > demand {demand:.6g}")
        if y > prefill + tol:
            out.append(f"tier {t.name!r}: admitted {y:.6g} req/s > prefill capacity {prefill:.6g}")
        if y > decode + tol:
            out.append(f"tier {t.name!r}: admitted {y:.6g} req/s > decode capacity {decode:.6g}")
        if y < t.min_admission * demand - tol:
            out.append(f"tier {t.name!r}: admitted {y:.6g} req/s < minimum {t.min_admission:.0%} of {demand:.6g}")
    return out
