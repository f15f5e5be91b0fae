"""The MILP equals a brute-force optimum on 240 random small instances.

The brute force is written independently of the formulation: it enumerates every instance-count vector that
fits the GPUs, checks it packs into the nodes with an explicit first-fit of aligned blocks, computes the best
admission ``min(λ, prefill+colocated, decode+colocated)``, and prices churn and GPUs itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from nitsum_opt import MilpPlanner, PlanStatus, check_plan

from planning_factories import make_input

ROLES = ("prefill", "decode", "colocated")


def packs(sizes: list[int], nodes: int, per_node: int) -> bool:
    free = [[True] * per_node for _ in range(nodes)]
    for size in sorted(sizes, reverse=True):
        placed = False
        for node in free:
            for off in range(0, per_node - size + 1, size):
                if all(node[off : off + size]):
                    node[off : off + size] = [False] * size
                    placed = True
                    break
            if placed:
                break
        if not placed:
            return False
    return True


def vectors_within(sizes: tuple[int, ...], budget: int):
    """Every count vector with Σ n_i·sizes_i <= budget."""
    if not sizes:
        yield ()
        return
    for n in range(budget // sizes[0] + 1):
        for rest in vectors_within(sizes[1:], budget - n * sizes[0]):
            yield (n, *rest)


def brute_force(inp) -> float | None:
    keys = [(t.name, c) for t in inp.tiers for c in inp.candidate_configs]
    total = inp.cluster.total_gpus
    best = None
    for vec in vectors_within(tuple(c.gpus for _, c in keys), total):
        gpus = sum(n * c.gpus for n, (_, c) in zip(vec, keys, strict=True))
        sizes = [c.gpus for n, (_, c) in zip(vec, keys, strict=True) for _ in range(n)]
        if not packs(sizes, inp.cluster.num_nodes, inp.cluster.gpus_per_node):
            continue
        value, ok = 0.0, True
        for t in inp.tiers:
            side = {"prefill": 0.0, "decode": 0.0, "colocated": 0.0}
            for n, (tier, c) in zip(vec, keys, strict=True):
                if tier == t.name:
                    side[c.role.value] += n * inp.capacity.rates_rps[tier][c.key]
            lam = inp.demand_rps(t.name)
            y = min(lam, side["prefill"] + side["colocated"], side["decode"] + side["colocated"])
            if y < t.min_admission * lam - 1e-9:
                ok = False
                break
            value += t.weight * y
        if not ok:
            continue
        value -= inp.objective.gpu_cost * gpus
        if inp.current_plan is not None:
            for n, (tier, c) in zip(vec, keys, strict=True):
                n0 = inp.current_plan.count(tier, c)
                rho = max(inp.capacity.rates_rps[tier][k.key] / k.gpus for k in inp.candidate_configs)
                per_gpu = inp.tier(tier).weight * rho * inp.objective.switch_cost_s / inp.objective.plan_horizon_s
                value -= per_gpu * c.gpus * abs(n - n0)
        best = value if best is None else max(best, value)
    return best


def random_small_input(seed: int):
    rng = np.random.default_rng(seed)
    nodes, per_node = [(1, 4), (1, 6), (2, 3), (1, 8), (2, 4)][seed % 5]
    sizes = [s for s in (1, 2, 4, 8) if s <= per_node]
    candidates = [f"tp{s}-{r}" for s in sizes for r in ROLES]
    n_tiers = 1 + seed % 2
    keys = sorted(rng.choice(candidates, size=min(len(candidates), 3 if n_tiers == 2 else 4), replace=False))
    tiers = ["a", "b"][:n_tiers]
    colocated = keys[0].split("-")[0] + "-colocated"
    keys = sorted(set(keys) | {colocated})
    rates = {t: {k: float(rng.integers(0, 9)) / 2 for k in keys} for t in tiers}
    for t in tiers:  # keep every tier servable: its colocated config has capacity
        rates[t][colocated] = max(rates[t][colocated], 1.5)
    demand = {t: float(rng.integers(1, 30)) / 2 for t in tiers}
    current = None
    if rng.random() < 0.5:
        all_keys = sorted({k for row in rates.values() for k in row})
        k = str(rng.choice(all_keys))
        current = {(tiers[0], k): 1}
    return make_input(
        rates,
        demand,
        nodes=nodes,
        gpus_per_node=per_node,
        weights={t: float(rng.choice([0.5, 1.0, 2.0, 3.0])) for t in tiers},
        min_admission={tiers[-1]: float(rng.choice([0.0, 0.0, 0.3]))},
        gpu_cost=float(rng.choice([0.0, 0.01])),
        switch_cost_s=float(rng.choice([0.5, 5.0])),
        plan_horizon_s=30.0,
        current=current,
    )


@pytest.mark.parametrize("block", range(8))
def test_milp_matches_brute_force(block: int) -> None:
    planner = MilpPlanner(time_limit_s=60)
    for seed in range(block * 30, block * 30 + 30):
        inp = random_small_input(seed)
        expected = brute_force(inp)
        plan = planner.plan(inp)
        if expected is None:
            assert plan.status is PlanStatus.FALLBACK, f"seed {seed}: brute force found no feasible plan"
            continue
        assert plan.status is PlanStatus.OPTIMAL, f"seed {seed}: {plan.status} {plan.message}"
        assert plan.objective == pytest.approx(expected, abs=1e-6), f"seed {seed}"
        check_plan(inp, plan)
