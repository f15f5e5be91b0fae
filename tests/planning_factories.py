"""Tiny factories for planning inputs (vLLM ``tests/v1/core/utils.py`` style): every test builds exactly what
it needs in one call, with readable defaults."""

from __future__ import annotations

from collections.abc import Mapping

from nitsum_opt import (
    CapacityTable,
    ClusterSpec,
    CurrentPlan,
    InstanceCount,
    ObjectiveSettings,
    PlanningInput,
    ServingConfig,
    Tier,
    TierDemand,
)


def tier(name: str = "chat", weight: float = 1.0, min_admission: float = 0.0) -> Tier:
    return Tier(name=name, ttft_slo_ms=500, tpot_slo_ms=50, weight=weight, min_admission=min_admission)


def make_input(
    rates: Mapping[str, Mapping[str, float]],
    demand: Mapping[str, float],
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    weights: Mapping[str, float] | None = None,
    min_admission: Mapping[str, float] | None = None,
    gpu_cost: float = 0.0,
    shared_gpu_cost: float | None = None,
    switch_cost_s: float = 0.5,
    plan_horizon_s: float = 60.0,
    current: Mapping[tuple[str, str], int] | None = None,
    shared_rates: Mapping[str, Mapping[str, float]] | None = None,
) -> PlanningInput:
    """A planning input whose candidate configs are exactly the keys of ``rates`` (same for every tier);
    ``current`` maps ``(tier or "*", config key)`` to running instances."""
    weights = weights or {}
    min_admission = min_admission or {}
    keys = sorted({k for row in rates.values() for k in row}, key=lambda k: (ServingConfig.parse(k).tp, k))
    current_plan = None
    if current is not None:
        current_plan = CurrentPlan(
            counts=tuple(InstanceCount(tier=t, config=ServingConfig.parse(k), count=n) for (t, k), n in current.items())
        )
    return PlanningInput(
        cluster=ClusterSpec(num_nodes=nodes, gpus_per_node=gpus_per_node),
        tiers=tuple(tier(t, weights.get(t, 1.0), min_admission.get(t, 0.0)) for t in rates),
        demand=tuple(TierDemand(tier=t, arrival_rate_rps=demand[t]) for t in rates),
        capacity=CapacityTable(rates_rps={t: dict(row) for t, row in rates.items()}),
        shared_capacity=None
        if shared_rates is None
        else CapacityTable(rates_rps={t: dict(row) for t, row in shared_rates.items()}),
        configs=tuple(ServingConfig.parse(k) for k in keys),
        objective=ObjectiveSettings(
            gpu_cost=gpu_cost,
            shared_gpu_cost=shared_gpu_cost,
            switch_cost_s=switch_cost_s,
            plan_horizon_s=plan_horizon_s,
        ),
        current_plan=current_plan,
    )


def counts_by_key(plan) -> dict[tuple[str, str], int]:
    return {(t, c.key): n for (t, c), n in plan.counts().items()}
