"""Run a scenario: every system at every load level, in parallel over load levels, with progress.

Each load level runs in its own worker process (the searches of the static systems share one
:class:`~nitsum_opt.sim.controllers.search.StaticEvaluator` per level). The result keeps, per system and level, the
metrics, how long the search and the simulation took, and the deployment timeline (for the report's GPU timeline).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue as queue_module
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from nitsum_opt.models.spec import Frozen, Role
from nitsum_opt.sim.controllers.registry import make_controller, system_info
from nitsum_opt.sim.controllers.search import StaticEvaluator
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.metrics import RunMetrics, run_metrics
from nitsum_opt.sim.results import SimResult
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.spec import ClusterSpec

Progress = Callable[[str], None]


class TimelineInstance(Frozen):
    """One engine in a deployment snapshot."""

    gpu_ids: tuple[int, ...]
    """Its GPUs."""
    tp: int
    """TP degree."""
    role: Role
    """Role."""
    tier: str | None
    """Tier (``None`` = every tier)."""


class TimelinePoint(Frozen):
    """The deployment from ``t_s`` on."""

    t_s: float
    """Start, seconds on the trace clock."""
    instances: tuple[TimelineInstance, ...]
    """Engines."""


class SystemRun(Frozen):
    """One system at one load level."""

    metrics: RunMetrics
    """Outcome."""
    search_runs: int = Field(ge=0)
    """Simulations the level's static searches had run when this system's controller was built (cumulative)."""
    setup_wall_s: float = Field(ge=0)
    """Wall time to build the controller (hindsight searches included)."""
    timeline: tuple[TimelinePoint, ...]
    """Deployments over time."""
    pauses: tuple[tuple[tuple[int, ...], float, float], ...] = ()
    """(GPUs, start, end) of every switch pause."""


class LevelResult(Frozen):
    """Every system at one load level."""

    load_scale: float
    """Time-compression factor of the workload."""
    offered_rps: float
    """Requests/s offered."""
    duration_s: float
    """Trace interval."""
    requests: int
    """Requests in the trace."""
    runs: tuple[SystemRun, ...]
    """One per system, in scenario order."""
    skipped: tuple[tuple[str, str], ...] = ()
    """Systems that could not run here, with the reason (e.g. a TP degree the latency model does not cover)."""

    def run(self, system: str) -> SystemRun | None:
        """The run of ``system`` (``None`` if it was not run here)."""
        return next((r for r in self.runs if r.metrics.system == system), None)


class SweepResult(Frozen):
    """A whole scenario run."""

    scenario: Scenario
    """What ran."""
    model_source: str
    """Where step times came from (fitted model or roofline)."""
    machine: str
    """CPU / Python of the machine that ran it."""
    workers: int
    """Worker processes."""
    wall_s: float
    """Wall time of the sweep."""
    levels: tuple[LevelResult, ...]
    """One per load level, ascending."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.system()


def machine_label() -> str:
    """Short description of this machine."""
    cpu = _cpu_model()
    return f"{platform.machine()} {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def timeline_of(result: SimResult) -> tuple[TimelinePoint, ...]:
    """The deployments of a run as snapshots."""
    return tuple(
        TimelinePoint(
            t_s=t,
            instances=tuple(
                TimelineInstance(gpu_ids=i.gpu_ids, tp=i.tp, role=i.role, tier=i.tier) for i in d.instances
            ),
        )
        for t, d in result.timeline
    )


def run_system(
    scenario: Scenario, name: str, ev: StaticEvaluator, load_scale: float, cluster: ClusterSpec | None = None
) -> SystemRun:
    """Build system ``name``'s controller (searching if it must) and simulate it on the evaluator's trace."""
    start = time.perf_counter()
    controller = make_controller(name, ev, scenario.controller_options())
    setup = time.perf_counter() - start
    sim = Simulator(ev.trace, ev.tiers, ev.model, ev.model_spec, ev.cluster, controller, ev.settings)
    start = time.perf_counter()
    result = sim.run()
    wall = time.perf_counter() - start
    metrics = run_metrics(result, ev.tiers, name, load_scale, (cluster or ev.cluster).total_gpus, wall)
    return SystemRun(
        metrics=metrics,
        search_runs=ev.runs,
        setup_wall_s=setup,
        timeline=timeline_of(result),
        pauses=tuple((g, a, b) for _, g, a, b in result.switch_windows),
    )


def run_level(
    scenario: Scenario,
    load_scale: float,
    base_dir: Path | None = None,
    progress: Progress | None = None,
    cluster: ClusterSpec | None = None,
    systems: tuple[str, ...] | None = None,
) -> LevelResult:
    """Every system of the scenario at one load level."""
    trace = scenario.trace(load_scale, base_dir)
    model, _ = scenario.iteration_model()
    the_cluster = cluster or scenario.cluster
    ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, the_cluster, scenario.settings)
    runs = []
    skipped = []
    for name in systems or scenario.systems:
        try:
            system_info(name)
            runs.append(run_system(scenario, name, ev, load_scale, the_cluster))
        except ValueError as exc:
            skipped.append((name, str(exc)))
            if progress is not None:
                progress(f"load ×{load_scale:g}: {name} skipped ({exc})")
            continue
        if progress is not None:
            m = runs[-1].metrics
            progress(f"load ×{load_scale:g}: {name} goodput {m.goodput_rps:.1f} req/s, attainment {m.attainment:.1%}")
    return LevelResult(
        load_scale=load_scale,
        offered_rps=trace.mean_rate_rps,
        duration_s=trace.duration_s,
        requests=len(trace),
        runs=tuple(runs),
        skipped=tuple(skipped),
    )


_QUEUE: mp.Queue | None = None  # type: ignore[type-arg]


def _init_worker(queue: mp.Queue) -> None:  # type: ignore[type-arg]
    global _QUEUE
    _QUEUE = queue


def _level_task(args: tuple[Scenario, float, Path | None]) -> LevelResult:
    scenario, load, base_dir = args
    queue = _QUEUE
    return run_level(scenario, load, base_dir, progress=None if queue is None else queue.put)


def run_sweep(
    scenario: Scenario,
    base_dir: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    extra_loads: tuple[float, ...] = (),
) -> SweepResult:
    """Run every system at every load level (``workers`` processes; default: up to 2, one per level)."""
    loads = tuple(sorted(set(scenario.load_scales) | set(extra_loads)))
    count = max(1, min(workers or min(2, os.cpu_count() or 1), len(loads)))
    _, source = scenario.iteration_model()
    start = time.perf_counter()
    if count == 1:
        levels = [run_level(scenario, load, base_dir, progress) for load in loads]
    else:
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        with ctx.Pool(count, initializer=_init_worker, initargs=(queue,)) as pool:
            pending = pool.map_async(_level_task, [(scenario, load, base_dir) for load in loads], chunksize=1)
            while not pending.ready() or not queue.empty():
                try:
                    message = queue.get(timeout=0.2)
                except queue_module.Empty:
                    continue
                if progress is not None:
                    progress(message)
            levels = pending.get()
    return SweepResult(
        scenario=scenario,
        model_source=source,
        machine=machine_label(),
        workers=count,
        wall_s=time.perf_counter() - start,
        levels=tuple(sorted(levels, key=lambda lvl: lvl.load_scale)),
    )


__all__ = [
    "LevelResult",
    "SweepResult",
    "SystemRun",
    "TimelineInstance",
    "TimelinePoint",
    "run_level",
    "run_sweep",
    "run_system",
]
