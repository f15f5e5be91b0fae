"""Independent re-check of a plan: feasibility from its concrete instances, and its objective recomputed.

``evaluate_plan`` trusts nothing the planner says: it rebuilds ``n[t,c]`` and ``s[c]`` from the instances' GPU
ids, checks every GPU is used once, inside the cluster, by an aligned group inside one node, recomputes each
tier's capacity from the capacity table and its shared rates ``x[t,c]``, re-checks every time-sharing row
``Σ_t x[t,c] / R^s[t,c] <= s[c]``, checks admissions against demand, capacity and minimum admission, and recomputes
the objective. The MILP planner's objective must agree with it (tests check this on every plan).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from pydantic import Field

from nitsum_opt.admission import Counts, SharedRates, dedicated_capacity_rps, shared_counts
from nitsum_opt.models.spec import Frozen, Role, ServingConfig
from nitsum_opt.plan import Plan
from nitsum_opt.spec import SHARED_TIER, PlanningInput

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


def tier_capacity_rps(
    inp: PlanningInput, counts: Counts, tier: str, shared_rps: SharedRates | None = None
) -> tuple[float, float]:
    """(prefill-side, decode-side) capacity of ``tier``: Σ R·n over its prefill+colocated and decode+colocated
    instances, plus its rates on shared instances ``x[t,c]`` (from ``shared_rps``) on the side(s) of their role
    (colocated: both)."""
    prefill, decode = dedicated_capacity_rps(inp, counts, tier)
    for config, rate in (shared_rps or {}).get(tier, {}).items():
        if config.role is not Role.DECODE:
            prefill += rate
        if config.role is not Role.PREFILL:
            decode += rate
    return prefill, decode


def churn_by_key(inp: PlanningInput, counts: Counts) -> dict[tuple[str, ServingConfig], int]:
    """``|n[t,c] − n⁰[t,c]|`` for every (tier, config) present in either plan."""
    if inp.current_plan is None:
        return {}
    keys = set(counts) | {(ic.tier, ic.config) for ic in inp.current_plan.counts}
    return {k: abs(counts.get(k, 0) - inp.current_plan.count(*k)) for k in keys}


def objective_value(inp: PlanningInput, counts: Counts, admitted_rps: Mapping[str, float]) -> float:
    """``Σ w_t y_t − ε Σ g_c n[t,c] − ε_s Σ g_c s[c] − Σ β[t,c] |n[t,c] − n⁰[t,c]|`` (shared: tier ``"*"``)."""
    value = sum(t.weight * admitted_rps.get(t.name, 0.0) for t in inp.tiers)
    value -= sum(inp.gpu_price(t) * c.gpus * k for (t, c), k in counts.items())
    value -= sum(inp.churn_price(t, c) * d for (t, c), d in churn_by_key(inp, counts).items())
    return value


def evaluate_plan(inp: PlanningInput, plan: Plan) -> PlanEvaluation:
    """Re-check ``plan`` against ``inp`` and recompute its objective (never raises for violations)."""
    violations = _placement_violations(inp, plan)
    counts = dict(Counter((i.tier, i.config) for i in plan.instances))
    allowed = set(inp.candidate_configs)
    tiers = {t.name for t in inp.tiers}
    for tier, config in counts:
        if config not in allowed:
            violations.append(f"instance config {config.key} of tier {tier!r} is not a candidate config")
        if tier == SHARED_TIER and config.role not in inp.shared_roles:
            roles = [r.value for r in inp.shared_roles]
            violations.append(f"shared instances of {config.key}: shared_roles is {roles}")
        if tier != SHARED_TIER and tier not in tiers:
            violations.append(f"instances of tier {tier!r}, which is not among {sorted(tiers)}")
    admitted = {a.tier: a.admitted_rps for a in plan.tiers}
    shared_rps, problems = _shared_rates(plan)
    violations += problems
    violations += _shared_violations(inp, counts, shared_rps)
    violations += _admission_violations(inp, counts, admitted, shared_rps)
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


def _shared_rates(plan: Plan) -> tuple[dict[str, dict[ServingConfig, float]], list[str]]:
    """The plan's ``x[t,c]`` parsed from its tier allocations, and what is malformed about them."""
    out: dict[str, dict[ServingConfig, float]] = {}
    problems: list[str] = []
    for alloc in plan.tiers:
        for key, rate in alloc.shared_rates_rps.items():
            try:
                config = ServingConfig.parse(key)
            except ValueError as exc:
                problems.append(f"tier {alloc.tier!r}: shared rate key {key!r}: {exc}")
                continue
            if not rate >= 0:
                problems.append(f"tier {alloc.tier!r}: shared rate x[{alloc.tier},{key}]={rate} must be >= 0")
                continue
            out.setdefault(alloc.tier, {})[config] = rate
    return out, problems


def _shared_violations(inp: PlanningInput, counts: Counts, shared_rps: SharedRates) -> list[str]:
    """Re-check every time-sharing row ``Σ_t x[t,c] / R^s[t,c] <= s[c]``."""
    out: list[str] = []
    instances = shared_counts(counts)
    used: dict[ServingConfig, float] = {}
    for tier, row in shared_rps.items():
        for config, rate in row.items():
            if rate == 0:
                continue
            cell = inp.shared_rate_rps(tier, config) if config in set(inp.shared_configs) else 0.0
            if cell <= 0:
                out.append(f"tier {tier!r}: shared rate {rate:.6g} req/s on {config.key}, which cannot serve it (R=0)")
                continue
            used[config] = used.get(config, 0.0) + rate / cell
    for config, share in sorted(used.items(), key=lambda kv: kv[0].tp):
        have = instances.get(config, 0)
        if share > have + RATE_TOLERANCE * max(1.0, have):
            out.append(f"shared {config.key}: the tiers' rates need {share:.6g} instances, the plan has {have}")
    return out


def _admission_violations(
    inp: PlanningInput, counts: Counts, admitted: Mapping[str, float], shared_rps: SharedRates
) -> list[str]:
    out: list[str] = []
    for t in inp.tiers:
        if t.name not in admitted:
            out.append(f"tier {t.name!r} has no admission in the plan")
            continue
        y, demand = admitted[t.name], inp.demand_rps(t.name)
        prefill, decode = tier_capacity_rps(inp, counts, t.name, shared_rps)
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
