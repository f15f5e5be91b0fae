"""``nitsum simulate`` (the main job), ``nitsum capacity`` (GPUs each system needs), ``nitsum bench goodput`` and
``nitsum bench sim-speed``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nitsum_opt.cli.app import app, console, err_console
from nitsum_opt.cli.bench_cmd import bench_app
from nitsum_opt.io import ConfigError
from nitsum_opt.sim.bench import GoodputBench, SpeedBench, capacity_search, goodput_bench, speed_bench
from nitsum_opt.sim.report import write_report
from nitsum_opt.sim.runner import Progress as ProgressFn
from nitsum_opt.sim.runner import SweepResult, run_sweep
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.summary import SweepSummary, summarize


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise _fail(f"--{what} {text!r} is not a comma-separated list of numbers, e.g. 4,8,12") from None
    if not values or any(v <= 0 for v in values):
        raise _fail(f"--{what} {text!r}: give positive numbers, e.g. 4,8,12")
    return values


def load_scenario(
    path: Path | None, systems: str | None = None, loads: str | None = None
) -> tuple[Scenario, Path | None]:
    """The scenario (default or from ``path``) with command-line overrides; bad input exits with a clear error."""
    try:
        scenario = Scenario() if path is None else Scenario.load(path)
        update: dict[str, object] = {}
        if systems:
            update["systems"] = tuple(s.strip() for s in systems.split(",") if s.strip())
        scales = _floats(loads, "loads")
        if scales:
            update["load_scales"] = scales
        if update:
            scenario = Scenario.model_validate({**scenario.model_dump(), **update})
    except (ConfigError, ValueError, KeyError) as exc:
        raise _fail(str(exc)) from None
    return scenario, None if path is None else path.resolve().parent


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[ProgressFn]:
    """A rich progress bar advanced by one per message (messages are shown as its description)."""
    if not enabled:
        yield lambda message: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task("simulating", total=total)

        def step(message: str) -> None:
            bar.update(task, advance=1, description=message[:70])

        yield step


def print_sweep(sweep: SweepResult, summary: SweepSummary) -> None:
    """Terminal tables: every run, max load at ≥ 90 %, Nitsum vs the strongest other system, the targets."""
    tiers = [t.name for t in sweep.scenario.tiers]
    table = Table(title=f"{sweep.scenario.name}: {sweep.scenario.cluster.total_gpus} GPUs, {sweep.model_source}")
    for col in ("load", "req/s", "system", "goodput", "per GPU", "attain.", *tiers, "switches"):
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
    table.add_column("first deployment", no_wrap=True, overflow="ellipsis", max_width=44)
    for lvl in sweep.levels:
        for k, run in enumerate(lvl.runs):
            m = run.metrics
            style = "bold" if m.system == "nitsum" else None
            table.add_row(
                f"×{lvl.load_scale:g}" if k == 0 else "",
                f"{lvl.offered_rps:.1f}" if k == 0 else "",
                m.system,
                f"{m.goodput_rps:.1f}",
                f"{m.goodput_per_gpu_rps:.2f}",
                f"{m.attainment:.1%}",
                *(f"{t.attainment:.1%}" for t in m.tiers),
                str(m.engine_switches),
                m.deployment,
                style=style,
                end_section=k == len(lvl.runs) - 1,
            )
    console.print(table)
    skipped = sorted({f"{name}: {why}" for lvl in sweep.levels for name, why in lvl.skipped})
    for line in skipped:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    loads = Table(title="max load at ≥ 90 % attainment")
    for col in ("system", "load ×", "req/s", "peak goodput"):
        loads.add_column(col, justify="right")
    for s in summary.systems:
        loads.add_row(
            s.system,
            "–" if s.max_load_scale is None else f"{s.max_load_scale:.2f}",
            "–" if s.max_offered_rps is None else f"{s.max_offered_rps:.1f}",
            f"{s.peak_goodput_rps:.1f}",
        )
    console.print(loads)
    targets = Table(title="targets")
    for col in ("target", "load ×", "measured", "required", "ceiling", "met", "note"):
        targets.add_column(col)
    for t in summary.targets:
        targets.add_row(
            t.name,
            "–" if t.load_scale is None else f"{t.load_scale:g}",
            "–" if t.ratio is None else f"{t.ratio:.2f}",
            f"{t.target:g}",
            "–" if t.ceiling is None else f"{t.ceiling:.2f}",
            {True: "[green]yes[/]", False: "[red]no[/]", None: "–"}[t.met],
            t.note,
        )
    console.print(targets)


@app.command()
def simulate(
    scenario_file: Annotated[
        Path | None, typer.Option("--scenario", help="Scenario YAML (default: the bundled 8×H200 main job)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder")] = Path("nitsum-report"),
    systems: Annotated[str | None, typer.Option(help="Comma-separated systems (default: the scenario's)")] = None,
    loads: Annotated[str | None, typer.Option(help="Comma-separated load scales (default: the scenario's)")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: up to 2)")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
) -> None:
    """Simulate every system over a load sweep and write a report (HTML, PNG, JSON, CSV) to --out."""
    scenario, base_dir = load_scenario(scenario_file, systems, loads)
    total = len(scenario.load_scales) * len(scenario.systems)
    start = time.perf_counter()
    try:
        with progress_bar(total, not quiet) as step:
            sweep = run_sweep(scenario, base_dir, workers=workers, progress=step)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        raise _fail(str(exc)) from None
    files = write_report(sweep, out)
    print_sweep(sweep, summarize(sweep))
    console.print(
        f"report: {files['html']} (+ {', '.join(p.name for k, p in files.items() if k != 'html')}) · "
        f"{time.perf_counter() - start:.1f} s",
        highlight=False,
    )


@app.command()
def capacity(
    scenario_file: Annotated[
        Path | None, typer.Option("--scenario", help="Scenario YAML (default: the bundled one)")
    ] = None,
    attainment: Annotated[float, typer.Option(min=0.01, max=1.0, help="Required share of requests meeting SLO")] = 0.9,
    load: Annotated[float | None, typer.Option(help="Load scale (default: the scenario's highest)")] = None,
    max_gpus: Annotated[int, typer.Option(min=1, help="Largest pool to try")] = 64,
    systems: Annotated[str | None, typer.Option(help="Comma-separated systems (default: the scenario's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """How many GPUs each system needs to serve the scenario's load with the required attainment."""
    scenario, base_dir = load_scenario(scenario_file, systems)
    the_load = load if load is not None else max(scenario.load_scales)
    try:
        with progress_bar(len(scenario.systems), not as_json) as step:
            result = capacity_search(scenario, the_load, attainment, max_gpus, base_dir, progress=step)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    table = Table(
        title=f"GPUs needed for {attainment:.0%} attainment at load ×{the_load:g} ({result.offered_rps:.1f} req/s)"
    )
    for col in ("system", "GPUs", "attainment there", "pools tried"):
        table.add_column(col, justify="right")
    for row in result.systems:
        table.add_row(
            row.system,
            "> " + str(max_gpus) if row.gpus is None else str(row.gpus),
            "–" if row.attainment is None else f"{row.attainment:.1%}",
            ", ".join(f"{g}:{a:.0%}" for g, a in row.tried),
        )
    console.print(table)


@bench_app.command("goodput")
def bench_goodput(
    scenario_file: Annotated[
        Path | None, typer.Option("--scenario", help="Scenario YAML (default: the bundled one)")
    ] = None,
    loads: Annotated[str | None, typer.Option(help="Comma-separated load scales (default: the scenario's)")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the report here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Goodput and attainment of every system per load level, Nitsum vs the strongest other system, and the
    targets (twice oracle-static's break load is added to the sweep when missing)."""
    scenario, base_dir = load_scenario(scenario_file, None, loads)
    total = len(scenario.load_scales) * len(scenario.systems)
    try:
        with progress_bar(total, not as_json) as step:
            result: GoodputBench = goodput_bench(scenario, base_dir, workers=workers, progress=step)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        raise _fail(str(exc)) from None
    if out is not None:
        write_report(result.sweep, out)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    print_sweep(result.sweep, result.summary)


@bench_app.command("sim-speed")
def bench_sim_speed(
    systems: Annotated[str, typer.Option(help="Comma-separated systems")] = "vllm-static-tp1,nitsum",
    repeats: Annotated[int, typer.Option(min=1, help="Runs per system (best is reported)")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Simulator speed (× real time) on the 1-hour default trace at 8 GPUs (load ×1)."""
    names = tuple(s.strip() for s in systems.split(",") if s.strip())
    try:
        result: SpeedBench = speed_bench(names, repeats)
    except (ValueError, KeyError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    table = Table(
        title=f"simulator speed, default trace ({result.trace_s:.0f} s, {result.requests} requests), {result.machine}"
    )
    for col in ("system", "wall s (best)", "× real time", "steps", "events", "controller s"):
        table.add_column(col, justify="right")
    for row in result.rows:
        table.add_row(
            row.system,
            f"{row.wall_s:.2f}",
            f"{row.speed_x:,.0f}",
            f"{row.steps:,}",
            f"{row.events:,}",
            f"{row.controller_s:.2f}",
        )
    console.print(table)
