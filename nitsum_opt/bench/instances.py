"""Seeded random planning inputs with the structure of real capacity tables.

Per tier ``t``: a per-GPU base rate ``ρ_t``, a TP-efficiency exponent ``α_t`` (an instance of TP ``k`` serves
``ρ_t · k^(1−α_t)`` — more per instance, less per GPU as TP grows), role factors for prefill and decode and a
colocated factor around their harmonic combination; strict tiers may be unservable at TP1 prefill/colocated
(TTFT out of reach: capacity 0). Demand is a random load factor times what the pool could serve.
"""

from __future__ import annotations

import numpy as np

from nitsum_opt.models.spec import CapacityTable, Role, all_configs
from nitsum_opt.planners.greedy import GreedyPlanner
from nitsum_opt.spec import ClusterSpec, ObjectiveSettings, PlanningInput, Tier, TierDemand

TIER_NAMES = ("interactive", "standard", "background")


def _capacity_row(rng: np.random.Generator, max_tp: int, strict: bool) -> dict[str, float]:
    base = rng.uniform(0.5, 3.0)
    alpha = rng.uniform(0.0, 0.3)
    f_prefill, f_decode = rng.uniform(0.8, 2.0, size=2)
    f_colocated = rng.uniform(0.9, 1.3) / (1 / f_prefill + 1 / f_decode)
    factors = {Role.PREFILL: f_prefill, Role.DECODE: f_decode, Role.COLOCATED: f_colocated}
    row = {}
    for c in all_configs(max_tp):
        rate = base * c.tp ** (1 - alpha) * factors[c.role]
        if strict and c.tp == 1 and c.role is not Role.DECODE:
            rate = 0.0
        row[c.key] = round(float(rate), 4)
    return row


def random_planning_input(
    rng: np.random.Generator,
    total_gpus: int,
    num_tiers: int = 3,
    gpus_per_node: int = 8,
    with_current_plan: bool | None = None,
    min_admission: bool = False,
) -> PlanningInput:
    """A random input on ``total_gpus`` GPUs; ``with_current_plan=None`` flips a coin for a running plan."""
    cluster = ClusterSpec.with_gpus(total_gpus, gpus_per_node=gpus_per_node)
    names = TIER_NAMES[:num_tiers] if num_tiers <= len(TIER_NAMES) else tuple(f"tier{i}" for i in range(num_tiers))
    max_tp = min(8, cluster.gpus_per_node)
    rows = {name: _capacity_row(rng, max_tp, strict=(i == 0)) for i, name in enumerate(names)}
    weights = sorted(rng.uniform(0.5, 3.0, size=num_tiers), reverse=True)
    tiers = tuple(
        Tier(
            name=name,
            ttft_slo_ms=300.0 * (i + 1) ** 2,
            tpot_slo_ms=30.0 * (i + 1),
            weight=round(float(w), 3),
            min_admission=round(float(rng.uniform(0.1, 0.6)), 2) if min_admission and i == 0 else 0.0,
        )
        for i, (name, w) in enumerate(zip(names, weights, strict=True))
    )
    share = rng.dirichlet(np.ones(num_tiers))
    per_gpu = np.mean([np.mean(list(r.values())) for r in rows.values()]) / 3.0
    load = rng.uniform(0.4, 1.5)
    demand = tuple(
        TierDemand(tier=name, arrival_rate_rps=round(float(load * total_gpus * per_gpu * s), 4))
        for name, s in zip(names, share, strict=True)
    )
    inp = PlanningInput(
        cluster=cluster,
        tiers=tiers,
        demand=demand,
        capacity=CapacityTable(rates_rps=rows, source="random"),
        objective=ObjectiveSettings(switch_cost_s=0.5, plan_horizon_s=30.0),
    )
    if with_current_plan is None:
        with_current_plan = bool(rng.random() < 0.5)
    if not with_current_plan:
        return inp
    scale = rng.uniform(0.6, 1.4, size=num_tiers)
    previous = inp.model_copy(
        update={
            "demand": tuple(
                d.model_copy(update={"arrival_rate_rps": d.arrival_rate_rps * float(k)})
                for d, k in zip(demand, scale, strict=True)
            )
        }
    )
    current = GreedyPlanner().plan(previous).as_current()
    return PlanningInput.model_validate({**inp.model_dump(), "current_plan": current.model_dump()})
