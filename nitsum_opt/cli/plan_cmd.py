"""``nitsum plan`` (one epoch's plan from a YAML/JSON planning input) and ``nitsum schema`` (JSON Schemas)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.table import Table

import nitsum_opt as api
from nitsum_opt.cli.app import app, console, err_console
from nitsum_opt.formulation import build_formulation
from nitsum_opt.io import ConfigError, dump_text, load
from nitsum_opt.plan import Plan
from nitsum_opt.planners import StabilizerSettings, make_planner
from nitsum_opt.solvers import SolverUnavailableError, write_model
from nitsum_opt.spec import SHARED_TIER

SCHEMAS: dict[str, type[BaseModel]] = {
    "planning-input": api.PlanningInput,
    "plan": api.Plan,
    "cluster": api.ClusterSpec,
    "tier": api.Tier,
    "tier-demand": api.TierDemand,
    "capacity-table": api.CapacityTable,
    "current-plan": api.CurrentPlan,
    "objective": api.ObjectiveSettings,
    "model-spec": api.ModelSpec,
    "serving-config": api.ServingConfig,
    "length-mix": api.LengthMix,
    "stabilizer": StabilizerSettings,
}


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` to stderr and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@app.command()
def schema(name: Annotated[str, typer.Argument(help=f"One of: {', '.join(SCHEMAS)}")]) -> None:
    """Print the JSON Schema of an input or output type."""
    key = name.lower().replace("_", "-")
    if key not in SCHEMAS:
        raise fail(f"unknown schema {name!r}; valid names: {', '.join(SCHEMAS)}")
    console.print_json(json.dumps(SCHEMAS[key].model_json_schema()))


@app.command()
def plan(
    file: Annotated[Path, typer.Argument(help="Planning input (YAML or JSON); see examples/planning/")],
    planner: Annotated[str, typer.Option(help="milp or greedy")] = "milp",
    solver: Annotated[
        str, typer.Option(help="backend[/engine]: ortools, ortools/highs, ortools/cpsat, pulp, pulp/highs")
    ] = "ortools",
    time_limit_s: Annotated[float, typer.Option("--time-limit-s", help="MILP time limit")] = 1.0,
    shared: Annotated[
        bool, typer.Option("--shared/--no-shared", help="Let the MILP use shared instances (serving every tier)")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON")] = False,
    export: Annotated[Path | None, typer.Option(help="Also write the MILP to this .lp or .mps file")] = None,
) -> None:
    """Plan one epoch: instances (TP, role, GPUs) per tier and admitted rate per tier."""
    try:
        inp = load(api.PlanningInput, file)
        chosen = (
            make_planner(planner, solver=solver, time_limit_s=time_limit_s, shared=shared)
            if planner == "milp"
            else (make_planner(planner))
        )
    except (ConfigError, ValueError, SolverUnavailableError) as exc:
        raise fail(str(exc)) from None
    if export is not None:
        write_model(build_formulation(inp, shared=shared and planner == "milp").model, export)
    result = chosen.plan(inp)
    if as_json:
        print(dump_text(result, "json"), end="")
        return
    print_plan(result, inp)


def _instance_summary(plan_: Plan, tier: str) -> str:
    counts = Counter(i.config.key for i in plan_.instances if i.tier == tier)
    return ", ".join(f"{k}×{key}" for key, k in sorted(counts.items())) or "-"


def print_plan(plan_: Plan, inp: api.PlanningInput) -> None:
    """Rich table of a plan: one row per tier (its dedicated instances; the rate it has planned on shared
    instances), a row for the shared instances, then status and provenance."""
    table = Table(title=f"Plan for {inp.cluster.total_gpus} × {inp.cluster.gpu_type}")
    columns = ("tier", "instances", "GPUs", "demand req/s", "admitted", "goodput req/s", "on shared req/s")
    for col in (*columns, "best-effort req/s"):
        table.add_column(col, justify="left" if col in ("tier", "instances") else "right")
    for alloc in plan_.tiers:
        table.add_row(
            alloc.tier,
            _instance_summary(plan_, alloc.tier),
            str(alloc.gpus),
            f"{alloc.demand_rps:.2f}",
            f"{alloc.admission_fraction:.1%}",
            f"{alloc.admitted_rps:.2f}",
            f"{alloc.shared_rps:.2f}" if alloc.shared_rates_rps else "-",
            f"{alloc.best_effort_rps:.2f}",
        )
    shared_gpus = sum(i.tp for i in plan_.instances if i.shared)
    if shared_gpus:
        total = sum(a.shared_rps for a in plan_.tiers)
        table.add_row(
            "* shared", _instance_summary(plan_, SHARED_TIER), str(shared_gpus), "", "", "", f"{total:.2f}", ""
        )
    console.print(table)
    bound = "" if plan_.objective_bound is None else f", bound {plan_.objective_bound:.6g}, gap {plan_.gap or 0:.2e}"
    console.print(
        f"status [bold]{plan_.status.value}[/] · objective {plan_.objective:.6g}{bound} · "
        f"{plan_.gpus_used}/{inp.cluster.total_gpus} GPUs · {plan_.solve_time_ms:.1f} ms · "
        f"{plan_.provenance.planner} · input {plan_.provenance.input_hash}",
        highlight=False,
    )
    if plan_.message:
        console.print(f"[yellow]{plan_.message}[/]", highlight=False)
