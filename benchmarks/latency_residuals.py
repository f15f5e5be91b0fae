"""Held-out residuals of the mean model on a profile: signed error vs tokens per step, per TP and experiment,
for the current basis and the first version (no step-regime terms), plus MAPE per TP × experiment.

Usage: ``python benchmarks/latency_residuals.py PROFILE... [--out-dir benchmarks/results]``; writes
``latency_residuals_<model>.png`` and one ``latency_residuals.csv`` for all profiles. Same folds as
``nitsum models fit`` (GroupKFold(5) on ``config_id``, seed 0); errors against each held-out configuration's
mean time.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from nitsum_opt.models.features import COMPOSITION_COLUMNS
from nitsum_opt.models.heldout import heldout_splits
from nitsum_opt.models.latency import IterationTimeModel
from nitsum_opt.models.profile_schema import load_meta, load_profile, meta_path_for
from nitsum_opt.models.step_regime import StepRegimeLimits


def variants(spec, limits: StepRegimeLimits) -> dict[str, IterationTimeModel]:
    """The current basis and the first version (every step 'eager' = a constant column, no hinges, no NCCL)."""
    return {
        "v2 (step regimes)": IterationTimeModel(
            spec=spec,
            cuda_graph_max_tokens=limits.cuda_graph_max_tokens,
            custom_allreduce_max_bytes=limits.custom_allreduce_max_bytes,
        ),
        "v1": IterationTimeModel(
            spec=spec, eager_knots_tokens=(), cuda_graph_max_tokens=0, custom_allreduce_max_bytes=2**62
        ),
    }


def config_errors(profile: Path) -> tuple[str, pd.DataFrame]:
    """Signed held-out error (%) of every (variant, TP, configuration)."""
    meta = load_meta(meta_path_for(profile))
    df = load_profile(profile, meta.model)
    comp = df[list(COMPOSITION_COLUMNS)].to_numpy(float)
    y = df["step_time_ms"].to_numpy(float)
    frames = []
    for name, model in variants(meta.model, StepRegimeLimits.from_engine_args(meta.engine_args)).items():
        pred = np.empty(len(y))
        for train, test in heldout_splits(df["config_id"].to_numpy(), n_splits=5, random_state=0):
            pred[test] = IterationTimeModel(**model.get_params()).fit(comp[train], y[train]).predict(comp[test])
        g = (
            df.assign(pred=pred, tokens=df["prefill_tokens"] + df["num_decode_seqs"])
            .groupby(["tp", "config_id"])
            .agg(
                experiment=("experiment", "first"),
                tokens=("tokens", "first"),
                ms=("step_time_ms", "mean"),
                pred=("pred", "mean"),
            )
            .reset_index()
        )
        g["err_pct"] = (g["pred"] - g["ms"]) / g["ms"] * 100
        frames.append(g.assign(variant=name, model=meta.model.name))
    return meta.model.name, pd.concat(frames, ignore_index=True)


def plot(name: str, errs: pd.DataFrame, path: Path) -> None:
    tps = sorted(errs["tp"].unique())
    names = list(errs["variant"].unique())
    fig = Figure(figsize=(4.2 * len(tps), 3.2 * len(names)))
    axes = fig.subplots(len(names), len(tps), squeeze=False, sharey=True)
    colors = {e: colormaps["tab10"](i) for i, e in enumerate(("decode", "prefill", "mixed"))}
    for i, variant in enumerate(names):
        for j, tp in enumerate(tps):
            ax = axes[i][j]
            sub = errs[(errs["variant"] == variant) & (errs["tp"] == tp)]
            for exp, pts in sub.groupby("experiment"):
                ax.scatter(pts["tokens"], pts["err_pct"], s=10, color=colors.get(exp, "k"), label=exp)
            mape = sub["err_pct"].abs().mean()
            ax.axvline(512.5, color="grey", lw=0.8, ls="--")
            ax.axhline(0, color="k", lw=0.5)
            ax.set(xscale="log", title=f"{variant}, TP{tp}: MAPE {mape:.2f} %", xlabel="tokens per step")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("held-out error, %")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{name}: held-out error per configuration (dashed: largest CUDA graph, 512 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    for profile in args.profiles:
        name, errs = config_errors(profile)
        plot(name, errs, args.out_dir / f"latency_residuals_{name}.png")
        table = errs.assign(ape=errs["err_pct"].abs()).pivot_table(
            index=["model", "variant", "tp"], columns="experiment", values="ape", aggfunc="mean"
        )
        table["all"] = errs.assign(ape=errs["err_pct"].abs()).groupby(["model", "variant", "tp"])["ape"].mean()
        tables.append(table)
    out = pd.concat(tables).round(2)
    out.to_csv(args.out_dir / "latency_residuals.csv")
    print(out.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
