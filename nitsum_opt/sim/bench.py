"""Benchmarks on the simulator: the goodput comparison, the simulator's speed, and GPUs needed per system."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.controllers.registry import make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.sim.runner import Progress, SweepResult, machine_label, run_level, run_sweep
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.summary import SweepSummary, break_load, summarize
from nitsum_opt.spec import ClusterSpec
from nitsum_opt.workloads.trace import RequestTrace


class GoodputBench(Frozen):
    """A sweep with its summary (``nitsum bench goodput``)."""

    sweep: SweepResult
    """Every run."""
    summary: SweepSummary
    """Headline numbers and targets."""

    def to_json(self) -> dict[str, Any]:
        """Compact JSON: per level every system's goodput and attainment, the ratios and the targets."""
        sweep = self.sweep
        levels = []
        for lvl, cmp in zip(sweep.levels, self.summary.levels, strict=True):
            levels.append(
                {
                    "load_scale": lvl.load_scale,
                    "offered_rps": round(lvl.offered_rps, 3),
                    "systems": {
                        r.metrics.system: {
                            "goodput_rps": round(r.metrics.goodput_rps, 3),
                            "goodput_per_gpu_rps": round(r.metrics.goodput_per_gpu_rps, 3),
                            "attainment": round(r.metrics.attainment, 4),
                            "tier_attainment": {t.tier: round(t.attainment, 4) for t in r.metrics.tiers},
                            "deployment": r.metrics.deployment,
                        }
                        for r in lvl.runs
                    },
                    "nitsum_vs_strongest_other": {
                        "strongest_other": cmp.strongest_other,
                        "ratio": None if cmp.ratio is None else round(cmp.ratio, 4),
                    },
                }
            )
        return {
            "scenario": sweep.scenario.name,
            "gpus": sweep.scenario.cluster.total_gpus,
            "model_source": sweep.model_source,
            "machine": sweep.machine,
            "wall_s": round(sweep.wall_s, 1),
            "levels": levels,
            "max_load_at_90pct": {s.system: s.max_load_scale for s in self.summary.systems},
            "skipped": sorted({f"{name}: {why}" for lvl in sweep.levels for name, why in lvl.skipped}),
            "targets": [t.model_dump() for t in self.summary.targets],
        }


def goodput_bench(
    scenario: Scenario, base_dir: Path | None = None, workers: int | None = None, progress: Progress | None = None
) -> GoodputBench:
    """Run the sweep; add twice oracle-static's break load when it is missing (for the vllm-static target)."""
    sweep = run_sweep(scenario, base_dir, workers=workers, progress=progress)
    brk = break_load(sweep, "oracle-static")
    if brk is not None and all(abs(lvl.load_scale - 2 * brk) > 1e-9 for lvl in sweep.levels):
        start = time.perf_counter()
        extra = run_level(scenario, 2 * brk, base_dir, progress)
        levels = tuple(sorted((*sweep.levels, extra), key=lambda lvl: lvl.load_scale))
        sweep = sweep.model_copy(
            update={
                "levels": levels,
                "wall_s": sweep.wall_s + time.perf_counter() - start,
                "scenario": sweep.scenario.model_copy(update={"load_scales": tuple(lvl.load_scale for lvl in levels)}),
            }
        )
    return GoodputBench(sweep=sweep, summary=summarize(sweep))


class _TimedController(Controller):
    """Measures the wall time a controller spends deciding."""

    def __init__(self, inner: Controller) -> None:
        self.inner = inner
        self.name = inner.name
        self.is_static = inner.is_static
        self.seconds = 0.0

    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        t = time.perf_counter()
        try:
            return self.inner.start(ctx, warmup)
        finally:
            self.seconds += time.perf_counter() - t

    def on_epoch(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment | None:
        t = time.perf_counter()
        try:
            return self.inner.on_epoch(ctx, now_s, window)
        finally:
            self.seconds += time.perf_counter() - t


class SpeedRow(Frozen):
    """One system's simulation speed."""

    system: str
    """System name."""
    wall_s: float = Field(ge=0)
    """Best wall time of the simulation (controller decisions included, hindsight searches excluded)."""
    speed_x: float = Field(ge=0)
    """Trace seconds per wall second."""
    steps: int = Field(ge=0)
    """Engine steps simulated."""
    events: int = Field(ge=0)
    """Events processed."""
    controller_s: float = Field(ge=0)
    """Wall time inside the controller (planning) in the best run."""


class SpeedBench(Frozen):
    """``nitsum bench sim-speed``."""

    machine: str
    """Where it ran."""
    trace_s: float
    """Trace interval simulated."""
    requests: int
    """Requests in it."""
    gpus: int
    """GPUs simulated."""
    rows: tuple[SpeedRow, ...]
    """One per system."""


def speed_bench(systems: tuple[str, ...], repeats: int = 3, scenario: Scenario | None = None) -> SpeedBench:
    """Simulate the scenario's workload at load ×1 (default: the 1-hour Azure trace on 8×H200) per system."""
    sc = scenario or Scenario()
    trace = sc.trace(1.0)
    model, _ = sc.iteration_model()
    ev = StaticEvaluator(trace, sc.tiers, model, sc.model_spec, sc.cluster, sc.settings)
    rows = []
    for name in systems:
        best: tuple[float, Simulator, _TimedController] | None = None
        for _ in range(repeats):
            controller = _TimedController(make_controller(name, ev, sc.controller_options()))
            sim = Simulator(trace, sc.tiers, model, sc.model_spec, sc.cluster, controller, sc.settings)
            start = time.perf_counter()
            sim.run()
            wall = time.perf_counter() - start
            if best is None or wall < best[0]:
                best = (wall, sim, controller)
        assert best is not None
        wall, sim, controller = best
        rows.append(
            SpeedRow(
                system=name,
                wall_s=wall,
                speed_x=trace.duration_s / wall,
                steps=sim.steps_simulated,
                events=sim.events,
                controller_s=controller.seconds,
            )
        )
    return SpeedBench(
        machine=machine_label(),
        trace_s=trace.duration_s,
        requests=len(trace),
        gpus=sc.cluster.total_gpus,
        rows=tuple(rows),
    )


class CapacityRow(Frozen):
    """GPUs one system needs."""

    system: str
    """System name."""
    gpus: int | None
    """Smallest pool tried that reaches the attainment (``None``: none up to the limit)."""
    attainment: float | None
    """Attainment at that pool."""
    tried: tuple[tuple[int, float], ...]
    """(GPUs, attainment) of every pool simulated."""


class CapacityResult(Frozen):
    """``nitsum capacity``."""

    load_scale: float
    """Load scale."""
    offered_rps: float
    """Offered requests/s."""
    attainment_target: float
    """Required share of requests meeting their SLO."""
    systems: tuple[CapacityRow, ...]
    """One per system."""


def pool_sizes(gpus_per_node: int, max_gpus: int) -> list[int]:
    """Pools tried: 1, 2, 4 GPUs (below one node), then whole nodes."""
    small = [g for g in (1, 2, 4) if g < gpus_per_node and g <= max_gpus]
    return small + [gpus_per_node * k for k in range(1, max_gpus // gpus_per_node + 1)]


def capacity_search(
    scenario: Scenario,
    load_scale: float,
    attainment: float,
    max_gpus: int,
    base_dir: Path | None = None,
    progress: Progress | None = None,
) -> CapacityResult:
    """Smallest pool per system whose attainment reaches ``attainment`` (pools in increasing size; a system that
    does not fit a pool, e.g. TP 8 on 4 GPUs, skips it)."""
    remaining = list(scenario.systems)
    tried: dict[str, list[tuple[int, float]]] = {s: [] for s in remaining}
    found: dict[str, tuple[int, float]] = {}
    offered = 0.0
    gpn = scenario.cluster.gpus_per_node
    for gpus in pool_sizes(gpn, max_gpus):
        if not remaining:
            break
        cluster = ClusterSpec.with_gpus(gpus, gpus_per_node=gpn)
        level = run_level(scenario, load_scale, base_dir, cluster=cluster, systems=tuple(remaining))
        offered = level.offered_rps
        for run in level.runs:
            m = run.metrics
            tried[m.system].append((gpus, m.attainment))
            if m.attainment >= attainment and m.system in remaining:
                found[m.system] = (gpus, m.attainment)
                remaining.remove(m.system)
                if progress is not None:
                    progress(f"{m.system}: {gpus} GPUs ({m.attainment:.1%})")
    return CapacityResult(
        load_scale=load_scale,
        offered_rps=offered,
        attainment_target=attainment,
        systems=tuple(
            CapacityRow(
                system=s,
                gpus=found[s][0] if s in found else None,
                attainment=found[s][1] if s in found else None,
                tried=tuple(tried[s]),
            )
            for s in scenario.systems
        ),
    )
