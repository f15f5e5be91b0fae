"""``nitsum bench solve``: planner speed and quality on seeded random instances.

For each pool size, ``instances`` random inputs (3 tiers, TP {1,2,4,8} × 3 roles, half of them with a running
plan so churn is priced) are planned by every planner. Times are wall-clock per ``plan()`` call, model build,
placement and plan assembly included, after one warm-up call per planner (imports and solver start-up happen
once per process in a real controller); CPU time of the calling process is reported beside it, because wall time
on a shared 2-core machine also measures the neighbours (PuLP's CBC runs in a subprocess, so its CPU time is
not counted there). Python's cyclic garbage collector runs before each timed call (``gc.collect()``, as
``timeit`` keeps it out of its timings): otherwise a collection of the objects earlier calls left behind lands in
whichever call happens to trigger it (seen: one 85 ms pause in an otherwise 10–25 ms series). Quality is each
plan's objective divided by the greedy plan's.
"""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from nitsum_opt.bench.instances import random_planning_input
from nitsum_opt.planners import GreedyPlanner, MilpPlanner, Planner

PLANNER_FACTORIES: dict[str, Callable[[float], Planner]] = {
    "milp/ortools": lambda limit: MilpPlanner("ortools", time_limit_s=limit),
    "milp/pulp": lambda limit: MilpPlanner("pulp", time_limit_s=limit),
    "milp/ortools-dedicated": lambda limit: MilpPlanner("ortools", time_limit_s=limit, shared=False),
    "greedy": lambda limit: GreedyPlanner(),
}


class SolveBenchRow(BaseModel):
    """Figures of one planner at one pool size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: int
    planner: str
    instances: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_p50_ms: float
    cpu_p99_ms: float
    mean_objective_vs_greedy: float
    min_objective_vs_greedy: float
    share_at_least_greedy: float
    share_strictly_better: float
    statuses: dict[str, int]


class SolveBenchReport(BaseModel):
    """All rows plus the machine they were measured on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    machine: str
    python: str
    seed: int
    rows: list[SolveBenchRow]


def _machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.platform(terse=True)}"


def run_solve_bench(
    gpus: Sequence[int],
    instances: int,
    planners: Sequence[str] = tuple(PLANNER_FACTORIES),
    seed: int = 0,
    time_limit_s: float = 10.0,
    progress: Callable[[str], None] | None = None,
) -> SolveBenchReport:
    """Plan ``instances`` random inputs per size with every planner and summarise."""
    unknown = [p for p in planners if p not in PLANNER_FACTORIES]
    if unknown:
        raise ValueError(f"unknown planners {unknown}; choose from {list(PLANNER_FACTORIES)}")
    built = {name: PLANNER_FACTORIES[name](time_limit_s) for name in planners}
    rows: list[SolveBenchRow] = []
    for size in gpus:
        rng = np.random.default_rng([seed, size])
        inputs = [random_planning_input(rng, size) for _ in range(instances)]
        greedy_obj = [GreedyPlanner().plan(inp).objective for inp in inputs]
        for name, planner in built.items():
            planner.plan(inputs[0])  # warm-up
            times, cpu_times, ratios, statuses = [], [], [], {}
            for inp, base in zip(inputs, greedy_obj, strict=True):
                gc.collect()
                start, cpu_start = time.perf_counter(), time.process_time()
                plan = planner.plan(inp)
                times.append((time.perf_counter() - start) * 1000.0)
                cpu_times.append((time.process_time() - cpu_start) * 1000.0)
                ratios.append(plan.objective / base if base else 1.0)
                statuses[plan.status.value] = statuses.get(plan.status.value, 0) + 1
            r = np.array(ratios)
            rows.append(
                SolveBenchRow(
                    gpus=size,
                    planner=name,
                    instances=instances,
                    p50_ms=float(np.percentile(times, 50)),
                    p99_ms=float(np.percentile(times, 99)),
                    max_ms=float(np.max(times)),
                    cpu_p50_ms=float(np.percentile(cpu_times, 50)),
                    cpu_p99_ms=float(np.percentile(cpu_times, 99)),
                    mean_objective_vs_greedy=float(r.mean()),
                    min_objective_vs_greedy=float(r.min()),
                    share_at_least_greedy=float(np.mean(r >= 1 - 1e-9)),
                    share_strictly_better=float(np.mean(r > 1 + 1e-9)),
                    statuses=statuses,
                )
            )
            if progress:
                progress(f"{size:>5} GPUs {name:<13} p50 {rows[-1].p50_ms:7.1f} ms  p99 {rows[-1].p99_ms:7.1f} ms")
    return SolveBenchReport(machine=_machine(), python=platform.python_version(), seed=seed, rows=rows)
