"""``nitsum trace info`` (summary of one trace file) and ``nitsum trace workload`` (a tiered workload)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nitsum_opt.cli.app import app, console, err_console
from nitsum_opt.workloads.builder import BuiltWorkload, build_workload_detailed, build_workload_file
from nitsum_opt.workloads.defaults import default_workload_spec
from nitsum_opt.workloads.demand import epoch_demand
from nitsum_opt.workloads.errors import LoadReport
from nitsum_opt.workloads.formats import FORMATS, detect_format, load_trace
from nitsum_opt.workloads.summary import LengthStats, TraceSummary

trace_app = typer.Typer(help="Inspect request traces and tiered workloads.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")


def _fail(exc: Exception) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=2)


def _lengths_row(label: str, stats: LengthStats | None) -> list[str]:
    if stats is None:
        return [label, "-", "-", "-", "-", "-"]
    return [
        label,
        f"{stats.mean:,.1f}",
        f"{stats.p50:,.0f}",
        f"{stats.p90:,.0f}",
        f"{stats.p99:,.0f}",
        f"{stats.max:,}",
    ]


def _print_summary(title: str, summary: TraceSummary) -> None:
    overview = Table(title=title, show_header=False)
    overview.add_row("requests", f"{summary.requests:,}")
    overview.add_row(
        "interval", f"[{summary.start_s:,.1f}, {summary.end_s:,.1f}] s ({summary.duration_s / 60:,.1f} min)"
    )
    overview.add_row("span (first → last arrival)", f"{summary.span_s:,.1f} s")
    overview.add_row("mean rate", f"{summary.mean_rate_rps:,.3f} req/s")
    overview.add_row(f"peak rate ({summary.peak_window_s:g} s windows)", f"{summary.peak_rate_rps:,.3f} req/s")
    cv = summary.interarrival_cv
    overview.add_row("inter-arrival CV", "-" if cv is None else f"{cv:.2f}")
    console.print(overview)
    lengths = Table(title="lengths (tokens)")
    for column in ("", "mean", "p50", "p90", "p99", "max"):
        lengths.add_column(column, justify="right")
    lengths.add_row(*_lengths_row("input", summary.input_tokens))
    lengths.add_row(*_lengths_row("output", summary.output_tokens))
    console.print(lengths)


def _print_report(report: LoadReport) -> None:
    console.print(
        f"read {report.rows_read:,} rows as [bold]{report.format}[/bold]: {report.requests:,} requests, "
        f"{report.rows_skipped:,} malformed rows skipped, {report.rows_dropped:,} dropped"
        + (", stopped early" if report.stopped_early else "")
    )
    for example in report.skipped_examples:
        console.print(f"  skipped: {example}")
    for note in report.notes:
        console.print(f"  note: {note}")


@trace_app.command("info")
def info(
    file: Annotated[Path, typer.Argument(help="Trace file (.gz read transparently).")],
    format: Annotated[
        str | None, typer.Option("--format", help=f"One of {', '.join(FORMATS)}; default: detect.")
    ] = None,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Skip malformed rows and count them.")] = False,
    max_duration_s: Annotated[
        float | None, typer.Option(help="Read only this many seconds from the first request (timed traces).")
    ] = None,
    duration_s: Annotated[float, typer.Option(help="ServeGen: seconds to sample.")] = 3600.0,
    rate_scale: Annotated[float, typer.Option(help="ServeGen: multiply every window's rate.")] = 1.0,
    seed: Annotated[int, typer.Option(help="ServeGen: sampling seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and load report as JSON.")] = False,
) -> None:
    """Summarise a trace: requests, span, rate, length percentiles."""
    try:
        fmt = format or detect_format(file)
        if fmt == "servegen":
            options: dict[str, object] = {"duration_s": duration_s, "rate_scale": rate_scale, "seed": seed}
        else:
            options = {"max_duration_s": max_duration_s}
        trace, report = load_trace(file, fmt, skip_bad_rows=skip_bad_rows, **options)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None
    summary = trace.summary()
    if as_json:
        console.print_json(
            json.dumps({"summary": summary.model_dump(mode="json"), "load": report.model_dump(mode="json")})
        )
        return
    _print_report(report)
    _print_summary(str(file), summary)


def _print_tiers(built: BuiltWorkload, epoch_s: float) -> None:
    summary = built.trace.summary()
    demand = epoch_demand(built.trace, epoch_s)
    table = Table(title=f"tiers (rates over {epoch_s:g} s epochs)")
    for column in ("tier", "requests", "mean req/s", "min epoch", "max epoch", "mean in", "mean out"):
        table.add_column(column, justify="right")
    for i, (name, tier) in enumerate(summary.tiers.items()):
        rates = demand.rates_rps[:, i]
        table.add_row(
            name,
            f"{tier.requests:,}",
            f"{tier.mean_rate_rps:.3f}",
            f"{rates.min():.3f}",
            f"{rates.max():.3f}",
            "-" if tier.input_tokens is None else f"{tier.input_tokens.mean:,.0f}",
            "-" if tier.output_tokens is None else f"{tier.output_tokens.mean:,.0f}",
        )
    console.print(table)


@trace_app.command("workload")
def workload(
    spec: Annotated[Path | None, typer.Option(help="WorkloadSpec YAML; default: the bundled 3-tier workload.")] = None,
    load_scale: Annotated[float | None, typer.Option(help="Override the spec's load_scale.")] = None,
    epoch_s: Annotated[float, typer.Option(help="Epoch length for the per-tier demand.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary and source reports as JSON.")] = False,
) -> None:
    """Build a tiered workload and summarise it per tier and source."""
    try:
        if spec is None:
            built = build_workload_detailed(default_workload_spec(load_scale=load_scale or 1.0))
        elif load_scale is None:
            built = build_workload_file(spec)
        else:
            from nitsum_opt.workloads.spec import WorkloadSpec

            built = build_workload_detailed(WorkloadSpec.load(spec).scaled(load_scale), base_dir=spec.parent)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None
    if as_json:
        payload = {
            "summary": built.trace.summary().model_dump(mode="json"),
            "sources": [s.model_dump(mode="json") for s in built.sources],
        }
        console.print_json(json.dumps(payload))
        return
    for source in built.sources:
        console.print(
            f"source [bold]{source.name}[/bold] → {source.tier}: {source.requests:,} requests, "
            f"{source.mean_rate_rps:.3f} req/s (time ÷ {source.time_compression:.3g}), "
            f"{source.clipped_requests} clipped, {source.dropped_requests} dropped"
        )
    _print_summary("workload", built.trace.summary())
    _print_tiers(built, epoch_s)
