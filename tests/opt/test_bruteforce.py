"""The MILP equals a brute-force optimum on 240 random small instances.

The brute force is written independently of the formulation: it enumerates every vector of dedicated instance
counts ``n[t,c]`` and shared instance counts ``s[c]`` (colocated configs) that fits the GPUs, checks it packs into
the nodes with an explicit first-fit of aligned blocks, and finds the best admission for it. Without shared
instances that is ``min(λ, prefill+colocated, decode+colocated)`` per tier; with them it splits each shared
config's instance-time between the tiers (``f_c`` of ``s_c`` to the first tier, the rest to the second) and
maximises the concave piecewise-linear ``Σ w_t min(λ_t, base_t + X_t(f))`` by enumerating every vertex of the
arrangement of the box ``0 <= f <= s``, the demand breakpoints and the minimum admissions (numpy solves of small
linear systems, no LP solver). It prices GPUs and churn itself.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nitsum_opt import MilpPlanner, PlanStatus, ServingConfig, check_plan

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


def best_shared_value(inp, base: dict[str, float], shared: dict) -> float | None:
    """max Σ w_t y_t over the split of the shared instances' time, or None if a minimum admission cannot be met."""
    tiers = [t.name for t in inp.tiers]
    lam = {t: inp.demand_rps(t) for t in tiers}
    low = {t: inp.tier(t).min_admission * lam[t] for t in tiers}
    weight = {t: inp.tier(t).weight for t in tiers}
    configs = [c for c, k in shared.items() if k > 0]
    table = (inp.shared_capacity or inp.capacity).rates_rps  # R^s, default R
    rate = {t: np.array([table[t][c.key] for c in configs], dtype=float) for t in tiers}
    size = np.array([float(shared[c]) for c in configs])

    def value(extra: dict[str, float]) -> float | None:
        total = 0.0
        for t in tiers:
            y = min(lam[t], base[t] + extra[t])
            if y < low[t] - 1e-9:
                return None
            total += weight[t] * y
        return total

    if not configs:
        return value(dict.fromkeys(tiers, 0.0))
    if len(tiers) == 1:
        (t,) = tiers
        return value({t: float(rate[t] @ size)})
    a, b = tiers
    k = len(configs)
    planes = []  # (coefficients over f, right-hand side)
    for i in range(k):
        unit = np.eye(k)[i]
        planes += [(unit, 0.0), (unit, size[i])]
    full_b = float(rate[b] @ size)
    for target in (lam[a], low[a]):  # base_a + R_a·f = target
        planes.append((rate[a], target - base[a]))
    for target in (lam[b], low[b]):  # base_b + full_b − R_b·f = target
        planes.append((rate[b], base[b] + full_b - target))
    best = None
    for subset in itertools.combinations(planes, k):
        matrix = np.array([p[0] for p in subset])
        if abs(np.linalg.det(matrix)) < 1e-12:
            continue
        f = np.linalg.solve(matrix, np.array([p[1] for p in subset]))
        if np.any(f < -1e-9) or np.any(f > size + 1e-9):
            continue
        f = np.clip(f, 0.0, size)
        got = value({a: float(rate[a] @ f), b: full_b - float(rate[b] @ f)})
        if got is not None and (best is None or got > best):
            best = got
    return best


def brute_force(inp) -> float | None:
    dedicated = [(t.name, c) for t in inp.tiers for c in inp.candidate_configs]
    keys = dedicated + [("*", c) for c in inp.candidate_configs if c.role.value == "colocated"]
    total = inp.cluster.total_gpus
    rho = {
        t.name: t.weight * max(inp.capacity.rates_rps[t.name][k.key] / k.gpus for k in inp.candidate_configs)
        for t in inp.tiers
    }
    rho["*"] = max(rho.values())
    eps = inp.objective.gpu_cost
    eps_shared = eps if inp.objective.shared_gpu_cost is None else inp.objective.shared_gpu_cost  # default: ε + premium
    best = None
    for vec in vectors_within(tuple(c.gpus for _, c in keys), total):
        sizes = [c.gpus for n, (_, c) in zip(vec, keys, strict=True) for _ in range(n)]
        if not packs(sizes, inp.cluster.num_nodes, inp.cluster.gpus_per_node):
            continue
        base = {}
        for t in inp.tiers:
            side = {"prefill": 0.0, "decode": 0.0, "colocated": 0.0}
            for n, (tier, c) in zip(vec, keys, strict=True):
                if tier == t.name:
                    side[c.role.value] += n * inp.capacity.rates_rps[tier][c.key]
            base[t.name] = min(side["prefill"], side["decode"]) + side["colocated"]
        shared = {c: n for n, (tier, c) in zip(vec, keys, strict=True) if tier == "*" and n > 0}
        value = best_shared_value(inp, base, shared)
        if value is None:
            continue
        for n, (tier, c) in zip(vec, keys, strict=True):
            value -= (eps_shared if tier == "*" else eps) * c.gpus * n
            if inp.current_plan is not None:
                n0 = inp.current_plan.count(tier, c)
                per_gpu = rho[tier] * inp.objective.switch_cost_s / inp.objective.plan_horizon_s
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
        used = ServingConfig.parse(k).gpus + ServingConfig.parse(colocated).gpus
        if rng.random() < 0.5 and used <= nodes * per_node:  # a running shared instance too
            current[("*", colocated)] = 1
    shared_rates = None
    if rng.random() < 0.4:  # batching with other tiers costs each tier part of its rate on a shared instance
        shared_rates = {
            t: {k: r * float(rng.choice([0.5, 0.8, 1.0])) for k, r in row.items() if k.endswith("colocated")}
            for t, row in rates.items()
        }
    return make_input(
        rates,
        demand,
        nodes=nodes,
        gpus_per_node=per_node,
        weights={t: float(rng.choice([0.5, 1.0, 2.0, 3.0])) for t in tiers},
        min_admission={tiers[-1]: float(rng.choice([0.0, 0.0, 0.3]))},
        gpu_cost=float(rng.choice([0.0, 0.01])),
        shared_gpu_cost=[None, 0.0, 0.005, 0.02][int(rng.integers(0, 4))],
        shared_rates=shared_rates,
        switch_cost_s=float(rng.choice([0.5, 5.0])),
        plan_horizon_s=30.0,
        current=current,
    )


@pytest.mark.parametrize("block", range(8))
def test_milp_matches_brute_force(block: int) -> None:
    planner = MilpPlanner(time_limit_s=60)
    with_shared = 0
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
        with_shared += any(i.shared for i in plan.instances)
    assert with_shared >= 10, f"only {with_shared} of 30 optimal plans use shared instances: the check lost coverage"
