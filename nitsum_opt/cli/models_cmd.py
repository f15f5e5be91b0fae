"""``nitsum models fit|report|plot`` and ``nitsum capacity-table``: latency models and the capacity table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nitsum_opt.cli.app import app, console, err_console
from nitsum_opt.models.bundle import (
    PerformanceModel,
    bundled_models,
    default_model_path,
    fit_performance_model,
    load_performance_model,
)
from nitsum_opt.models.capacity import build_capacity_cells, load_tiers_file
from nitsum_opt.models.latency import IterationTimeModel
from nitsum_opt.models.plots import plot_tp_effect
from nitsum_opt.models.profile_schema import ProfileError, load_meta, load_profile, meta_path_for
from nitsum_opt.models.step_regime import StepRegimeLimits

models_app = typer.Typer(help="Fit, inspect and plot the iteration-time models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

DEFAULT_MODEL = "llama-3.1-8b"


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


def _report_table(pm: PerformanceModel) -> Table:
    quantiles = [f"{q:g}" for q in pm.quantiles]
    table = Table(title=f"{pm.spec.name} on {pm.gpu}: held-out errors ({pm.heldout.method})")
    for col in ["TP", "configs", "rows", "mean MAPE %", "p90 APE %", "max APE %"]:
        table.add_column(col, justify="right")
    for q in quantiles:
        table.add_column(f"p{float(q) * 100:g} coverage %", justify="right")
    table.add_column("KV tokens", justify="right")
    for e in pm.heldout.per_tp:
        table.add_row(
            str(e.tp),
            str(e.n_configs),
            str(e.n_rows),
            f"{e.mean_mape_pct:.2f}",
            f"{e.mean_p90_ape_pct:.2f}",
            f"{e.mean_max_ape_pct:.2f}",
            *[f"{e.coverage_pct[q]:.1f}" for q in quantiles],
            f"{pm.kv_cache_tokens(e.tp):,}",
        )
    return table


def _report_json(pm: PerformanceModel) -> dict[str, object]:
    return {
        "model": pm.spec.name,
        "gpu": pm.gpu,
        "method": pm.heldout.method,
        "per_tp": {
            str(e.tp): {
                "n_configs": e.n_configs,
                "mean_mape_pct": e.mean_mape_pct,
                "mean_p90_ape_pct": e.mean_p90_ape_pct,
                "mean_max_ape_pct": e.mean_max_ape_pct,
                "coverage_pct": e.coverage_pct,
                "kv_cache_tokens": pm.kv_cache_tokens(e.tp),
            }
            for e in pm.heldout.per_tp
        },
        "provenance": pm.doc.provenance.model_dump(),
    }


@models_app.command("fit")
def fit(
    profile: Annotated[Path, typer.Argument(help="Profile CSV (.csv or .csv.gz) in the profile schema.")],
    out: Annotated[Path | None, typer.Option(help="Output JSON (default: <profile>.perf.json next to it).")] = None,
    meta: Annotated[Path | None, typer.Option(help="Meta JSON (default: <model>.meta.json next to it).")] = None,
    splits: Annotated[int, typer.Option(min=2, help="Held-out folds (GroupKFold on config_id).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the fold shuffle.")] = 0,
) -> None:
    """Validate PROFILE, report held-out errors per TP, fit on all rows and save the model as JSON."""
    start = time.perf_counter()
    try:
        pm = fit_performance_model(profile, meta_path=meta, n_splits=splits, random_state=seed)
    except (ProfileError, ValueError, KeyError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    path = pm.save(out or default_model_path(profile))
    console.print(_report_table(pm))
    console.print(f"saved {path} ({time.perf_counter() - start:.1f} s)")


@models_app.command("report")
def report(
    model: Annotated[str, typer.Argument(help="Fitted model file or bundled name.")] = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Held-out MAPE (mean model) and coverage (quantile model) per TP of a fitted model."""
    try:
        pm = load_performance_model(model)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        console.print_json(json.dumps(_report_json(pm)))
    else:
        console.print(_report_table(pm))


@models_app.command("list")
def list_models() -> None:
    """Bundled fitted models."""
    for name, path in bundled_models().items():
        console.print(f"{name}  [dim]{path}[/dim]")


@models_app.command("plot")
def plot(
    profile: Annotated[Path, typer.Argument(help="Profile CSV to plot.")],
    out_dir: Annotated[Path, typer.Option(help="Where the PNGs go.")] = Path("docs"),
    model: Annotated[str | None, typer.Option(help="Fitted model for the lines (default: fit on the profile).")] = None,
    context: Annotated[
        float | None, typer.Option(help="Decode context per sequence, tokens (default: the most common).")
    ] = None,
) -> None:
    """Plot decode step time and per-GPU throughput vs batch size per TP, and prefill time vs tokens."""
    try:
        meta_file = meta_path_for(profile)
        meta = load_meta(meta_file) if meta_file.is_file() else None
        spec = meta.model if meta is not None else None
        df = load_profile(profile, spec)
        if model is not None:
            mean_model = load_performance_model(model).mean_model
        else:
            if spec is None:
                raise ProfileError(f"no meta file {meta_file}; pass --model with a fitted model")
            cols = [
                "tp",
                "num_prefill_seqs",
                "prefill_tokens",
                "prefill_attention_pairs",
                "num_decode_seqs",
                "decode_context_tokens",
            ]
            limits = StepRegimeLimits.from_engine_args(meta.engine_args if meta is not None else {})
            mean_model = IterationTimeModel(
                spec=spec,
                cuda_graph_max_tokens=limits.cuda_graph_max_tokens,
                custom_allreduce_max_bytes=limits.custom_allreduce_max_bytes,
            ).fit(df[cols].to_numpy(float), df["step_time_ms"].to_numpy())
        gpu = str(df["gpu"].iloc[0])
        title = f"{df['model'].iloc[0]} on {gpu}"
        paths = plot_tp_effect(df, mean_model, out_dir, title=title, context=context)
    except (ProfileError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    for p in paths:
        console.print(f"wrote {p}")


@app.command("capacity-table")
def capacity_table(
    tiers: Annotated[Path, typer.Option("--tiers", help="Tiers YAML (SLO + length mix per tier).")],
    model: Annotated[str, typer.Option("--model", help="Fitted model file or bundled name.")] = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (rates and binding constraints).")] = False,
) -> None:
    """R[t,c]: the highest SLO-compliant request rate of one instance of each config for each tier."""
    try:
        pm = load_performance_model(model)
        request = load_tiers_file(tiers)
        configs = request.serving_configs(pm.tps)
        start = time.perf_counter()
        cells = build_capacity_cells(pm, request.tiers, configs, request.options, pm.engine_args)
        elapsed = time.perf_counter() - start
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        payload = {
            "model": pm.spec.name,
            "gpu": pm.gpu,
            "build_s": elapsed,
            "source": f"{pm.doc.provenance.profile_file}@{pm.doc.provenance.profile_sha256[:12]}",
            "rates_rps": {t: {k: c.rate_rps for k, c in row.items()} for t, row in cells.items()},
            "binding": {t: {k: c.binding for k, c in row.items()} for t, row in cells.items()},
        }
        console.print_json(json.dumps(payload))
        return
    table = Table(title=f"R[t,c] (req/s) for {pm.spec.name} on {pm.gpu}; built in {elapsed * 1000:.0f} ms")
    table.add_column("config")
    for tier in cells:
        table.add_column(tier, justify="right")
    for c in configs:
        table.add_row(c.key, *[f"{row[c.key].rate_rps:8.2f} [dim]{row[c.key].binding}[/dim]" for row in cells.values()])
    console.print(table)
