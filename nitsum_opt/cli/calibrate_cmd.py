"""``nitsum calibrate``: fit a scenario's ``latency_calibration`` on the runtime's own logged engine steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from nitsum_opt.cli.app import app, console
from nitsum_opt.cli.sim_cmd import _fail, load_scenario
from nitsum_opt.sim.calibration import StepCalibration
from nitsum_opt.sim.runtime_calibration import fit_runtime_calibration


def calibration_yaml(calibration: dict[int, StepCalibration]) -> str:
    """The ``latency_calibration:`` block to paste into a scenario YAML."""
    block = {
        "latency_calibration": {
            tp: {k: round(v, 5) if isinstance(v, float) else v for k, v in c.model_dump().items()}
            for tp, c in sorted(calibration.items())
        }
    }
    return yaml.safe_dump(block, sort_keys=False, allow_unicode=True)


@app.command()
def calibrate(
    step_logs: Annotated[
        list[Path],
        typer.Argument(help="Serving step logs: OUT/<system>/steps.csv.gz of nitsum_runtime.bench_adaptive"),
    ],
    scenario_file: Annotated[
        Path | None, typer.Option("--scenario", help="Scenario whose latency model is calibrated (default: bundled)")
    ] = None,
    per_seq: Annotated[
        bool, typer.Option(help="Fit a cost per scheduled sequence too (t = a + b·t_model + c·sequences)")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table and YAML")] = False,
) -> None:
    """Fit, per TP degree, the step-time calibration of the scenario's latency model on the runtime's logged engine
    steps, and print the ``latency_calibration:`` block for the scenario YAML."""
    scenario, _ = load_scenario(scenario_file)
    missing = [str(p) for p in step_logs if not p.is_file()]
    if missing:
        raise _fail(f"no such step log: {', '.join(missing)} (bench_adaptive writes OUT/<system>/steps.csv.gz)")
    base = scenario.model_copy(update={"latency_calibration": {}})
    model, source = base.iteration_model()
    try:
        calibration = fit_runtime_calibration(step_logs, model, per_seq=per_seq, source=f"{len(step_logs)} step log(s)")
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        console.print_json(json.dumps({str(tp): c.model_dump() for tp, c in sorted(calibration.items())}))
        return
    table = Table(title=f"calibration of {source}")
    for column in ("TP", "steps", "offset ms", "scale", "ms per sequence"):
        table.add_column(column, justify="right")
    for tp, c in sorted(calibration.items()):
        table.add_row(str(tp), f"{c.steps:,}", f"{c.offset_ms:+.3f}", f"{c.scale:.4f}", f"{c.per_seq_ms:.4f}")
    console.print(table)
    console.print("Add to the scenario YAML:", style="bold")
    console.print(calibration_yaml(calibration), highlight=False, markup=False)


__all__ = ["calibrate", "calibration_yaml"]
