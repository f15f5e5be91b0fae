"""``nitsum bench ...``: benchmarks that ship with the library (their recorded results: benchmarks/RESULTS.md)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from nitsum_opt.bench.solve import run_solve_bench
from nitsum_opt.cli.app import app, console, err_console

bench_app = typer.Typer(help="Benchmarks (speed and quality figures).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 8,128,1024") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{text!r}: give positive GPU counts, e.g. 8,128,1024")
    return values


@bench_app.command("solve")
def bench_solve(
    gpus: Annotated[str, typer.Option(help="Pool sizes, comma separated")] = "8,128,1024,4096",
    instances: Annotated[int, typer.Option(min=1, help="Random instances per size")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the random instances")] = 0,
    planners: Annotated[str, typer.Option(help="Comma-separated planners")] = "milp/ortools,milp/pulp,greedy",
    time_limit_s: Annotated[float, typer.Option("--time-limit-s", help="MILP time limit")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Planner solve time (p50/p99, model build included) and objective relative to the greedy."""
    sizes = _int_list(gpus)
    names = [p.strip() for p in planners.split(",") if p.strip()]
    try:
        report = run_solve_bench(
            sizes,
            instances,
            names,
            seed=seed,
            time_limit_s=time_limit_s,
            progress=None if as_json else lambda line: err_console.print(line, highlight=False),
        )
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    table = Table(title=f"nitsum bench solve ({report.machine})")
    for col in (
        "GPUs",
        "planner",
        "p50 ms",
        "p99 ms",
        "cpu p99 ms",
        "obj/greedy mean",
        "obj/greedy min",
        ">= greedy",
        "> greedy",
        "statuses",
    ):
        table.add_column(col, justify="right")
    for r in report.rows:
        table.add_row(
            str(r.gpus),
            r.planner,
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.cpu_p99_ms:.1f}",
            f"{r.mean_objective_vs_greedy:.4f}",
            f"{r.min_objective_vs_greedy:.4f}",
            f"{r.share_at_least_greedy:.0%}",
            f"{r.share_strictly_better:.0%}",
            ", ".join(f"{k}:{v}" for k, v in sorted(r.statuses.items())),
        )
    console.print(table)
