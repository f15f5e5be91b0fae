"""``nitsum profile`` and ``nitsum profile-merge``: registered on the ``nitsum`` CLI via the ``nitsum.cli``
entry-point group (``register``). vLLM is imported only inside ``profile``, through the worker processes."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from nitsum_opt.models.spec import MODEL_PRESETS, SUPPORTED_TP

DEFAULT_BUDGETS = "1=120,2=90,4=60,8=60"


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; a bad item is an error naming it."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} {text!r} must be comma-separated integers, e.g. 1,2,4") from None


def parse_budgets(text: str) -> dict[int, float]:
    """``"1=120,2=90"`` -> ``{1: 120.0, 2: 90.0}`` (seconds of stepping per engine, by TP)."""
    out = {}
    for item in text.split(","):
        tp, sep, sec = item.partition("=")
        try:
            out[int(tp)] = float(sec)
        except ValueError:
            raise typer.BadParameter(f"budget item {item!r} must be TP=SECONDS, e.g. 1=120") from None
        if not sep or out[int(tp)] <= 0:
            raise typer.BadParameter(f"budget item {item!r} must be TP=SECONDS with SECONDS > 0")
    return out


def _visible_gpus() -> list[int]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(sum(1 for line in out.splitlines() if line.startswith("GPU "))))


def register(app: typer.Typer) -> None:
    """Add the runtime's commands to the ``nitsum`` app."""

    @app.command("profile")
    def profile(
        out: Annotated[Path, typer.Option(help="folder for <model>.csv.gz, .meta.json and .details.json")],
        model: Annotated[str, typer.Option(help=f"comma-separated presets: {', '.join(MODEL_PRESETS)}")] = (
            "llama-3.1-8b"
        ),
        tp: Annotated[str, typer.Option(help="comma-separated TP degrees")] = "1,2,4",
        gpus: Annotated[str, typer.Option(help="GPU indices to use, e.g. 0,1,2,3 (default: all)")] = "",
        smoke: Annotated[bool, typer.Option(help="2-layer models and a tiny grid (a check, seconds)")] = False,
        budget_s: Annotated[str, typer.Option(help="stepping seconds per engine by TP")] = DEFAULT_BUDGETS,
        deadline_s: Annotated[float, typer.Option(help="seconds the whole launch may take")] = 3600.0,
        parts: Annotated[Path | None, typer.Option(help="folder of per-engine part files")] = None,
        pack: Annotated[Path | None, typer.Option(help="tar.gz of the parts, rewritten after each engine")] = None,
        passes: Annotated[
            int, typer.Option(min=1, help="times each engine measures the whole grid (repeats spread in time)")
        ] = 1,
    ) -> None:
        """Profile vLLM engines step by step (needs vLLM 0.26.0 and NVIDIA GPUs)."""
        from nitsum_runtime.profile_io import merge_parts
        from nitsum_runtime.profile_launch import launch, plan_jobs
        from nitsum_runtime.vllm_engine import vllm_missing_reason

        models = [m.strip() for m in model.split(",") if m.strip()]
        unknown = [m for m in models if m not in MODEL_PRESETS]
        if unknown:
            raise typer.BadParameter(f"unknown model(s) {unknown}; bundled presets are {sorted(MODEL_PRESETS)}")
        tps = parse_int_list(tp, "--tp")
        bad_tp = [t for t in tps if t not in SUPPORTED_TP]
        if bad_tp:
            raise typer.BadParameter(f"--tp {bad_tp} not supported; use some of {list(SUPPORTED_TP)}")
        budgets = parse_budgets(budget_s)
        missing_budget = [t for t in tps if t not in budgets]
        if missing_budget:
            raise typer.BadParameter(f"--budget-s has no entry for TP {missing_budget} (e.g. 4=60)")
        reason = vllm_missing_reason()
        if reason is not None:
            typer.echo(f"nitsum profile: cannot profile here: {reason}", err=True)
            raise typer.Exit(2)
        gpu_list = parse_int_list(gpus, "--gpus") if gpus else _visible_gpus()
        if not gpu_list:
            typer.echo("nitsum profile: nvidia-smi lists no GPU; run on a GPU machine", err=True)
            raise typer.Exit(2)
        parts_dir = parts or out / "parts"
        command = "nitsum " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        result = launch(
            plan_jobs(models, tps),
            gpu_list,
            parts_dir,
            budgets,
            deadline_s,
            command,
            smoke=smoke,
            pack=pack,
            log=lambda m: typer.echo(m),
            passes=passes,
        )
        failed = {k: v for k, v in result.outcome.items() if v != "done"}
        if failed:
            typer.echo(f"nitsum profile: engines that did not finish: {failed}; see {parts_dir}/*.log", err=True)
            raise typer.Exit(1)
        for name, path in merge_parts([parts_dir], out).items():
            typer.echo(f"{name}: {path}")

    @app.command("profile-merge")
    def profile_merge(
        parts: Annotated[list[Path], typer.Argument(help="folders of part files (<model>-tp<N>.csv/.json)")],
        out: Annotated[Path, typer.Option(help="folder for <model>.csv.gz, .meta.json and .details.json")],
    ) -> None:
        """Merge per-engine part files (possibly from several runs) into per-model profile files."""
        from nitsum_runtime.profile_io import ProfileFileError, merge_parts

        try:
            written = merge_parts(parts, out)
        except ProfileFileError as exc:
            typer.echo(f"nitsum profile-merge: {exc}", err=True)
            raise typer.Exit(1) from None
        for name, path in written.items():
            typer.echo(f"{name}: {path}")
