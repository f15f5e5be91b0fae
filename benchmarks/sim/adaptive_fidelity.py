"""The runtime's control loop on vLLM vs the simulator: the same systems deciding on the same slice.

The GPU half (``benchmarks/gpu/run_adaptive_h200.sh``, :mod:`nitsum_runtime.bench_adaptive`) serves one slice while
each system decides at runtime (``nitsum`` re-plans every epoch; static baselines keep their deployment). This half
simulates each measured system with the same inputs (:func:`nitsum_opt.sim.fidelity.simulate_system`: the controller
built the same way, the engines' measured KV capacity) and prints, per system and tier, attainment, goodput and
latency percentiles real / simulated, and the decisions the controller made at runtime next to those it made in
the simulator. Usage:

* ``python benchmarks/sim/adaptive_fidelity.py slice`` — (re)write ``benchmarks/gpu/adaptive/slices.csv`` (the
  llama8b-tight workload at 12 req/s from minute 11:40 of the trace, 150 s);
* ``python benchmarks/sim/adaptive_fidelity.py compare --measured OUT [OUT ...] [--out-csv F] [--plot F.png]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from nitsum_opt.sim.calibration import StepCalibration
from nitsum_opt.sim.decisions import decision_mismatches
from nitsum_opt.sim.fidelity import (
    Timings,
    compare,
    format_rows,
    read_measured,
    simulate_system,
    slo_met,
    with_prepare_ahead,
    write_comparison_csv,
)
from nitsum_opt.sim.runtime_calibration import fit_runtime_calibration
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice, make_slices, read_slices, write_slices

SCENARIO = Path("examples/scenarios/llama8b-tight.yaml")
SLICES = Path("benchmarks/gpu/adaptive/slices.csv")


def make_slice(args: argparse.Namespace) -> int:
    scenario = Scenario.load(args.scenario)
    pieces = make_slices(scenario.trace(1.0, None), [args.rate], args.window_s, start_s=args.start_s)
    write_slices(args.slices, pieces)
    print(f"wrote {args.slices}: {pieces[0].name}, {len(pieces[0])} requests, {pieces[0].offered_rps:.2f} req/s")
    return 0


def _runs(folders: list[Path]) -> dict[str, tuple[dict, dict, Path]]:
    """Every finished system run: name -> (its meta entry, the folder's meta, the folder)."""
    out: dict[str, tuple[dict, dict, Path]] = {}
    for folder in folders:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise SystemExit(f"--measured {folder}: no meta.json; pass the OUT folder of run_adaptive_h200.sh")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        for system, info in meta.get("runs", {}).items():
            if "epochs" in info and (folder / system / "measured.csv").is_file():
                out[system] = (info, meta, folder)
    return out


def decisions_text(runtime: list[dict], simulated: tuple, switch_s: float) -> list[str]:
    """One line per decision, in order: what the runtime ran afterwards, and whether the simulator decided the same
    (a prepared-ahead transition lands ``switch_s`` later in the simulator); then every difference."""
    lines = []
    for k, e in enumerate(runtime):
        twin = simulated[k][1].describe() if k < len(simulated) else "(none)"
        same = "same" if twin == e["deployment"] else f"simulator: {twin}"
        extra = f", stall {1000 * e['stall_s']:.0f} ms, moved {e['moved']} ({e['migrated']} with KV)"
        lines.append(
            f"  t={e['at_s']:5.0f} s ({e['action']}, ready +{1000 * (e['ready_s'] - e['at_s']):.0f} ms"
            f"{extra if e['action'] == 'transition' else ''}): {e['deployment']} [{same}]"
        )
    problems = decision_mismatches(runtime, simulated, switch_s)
    lines.append("  decisions: " + ("all as in the simulator" if not problems else "; ".join(problems)))
    return lines


def runtime_calibration(runs: dict[str, tuple[dict, dict, Path]]) -> dict[int, StepCalibration]:
    """Per TP degree, the runtime path's measured cost per step outside vLLM's own step (output processing, the
    pipe, the controller: ``busy_s - engine_s`` over the steps of every instance of that TP in the runs), as a
    step-time offset on the latency model."""
    outside: dict[int, float] = {}
    steps: dict[int, int] = {}
    for info, _, _ in runs.values():
        for key, n in info["steps"].items():
            tp = int(key.split("-tp")[1].split("-")[0])
            outside[tp] = outside.get(tp, 0.0) + info["busy_s"][key] - info["engine_s"][key]
            steps[tp] = steps.get(tp, 0) + n
    return {
        tp: StepCalibration(
            offset_ms=1000 * outside[tp] / steps[tp], scale=1.0, steps=steps[tp], source="runtime path cost only"
        )
        for tp in sorted(steps)
        if steps[tp]
    }


def fitted_runtime_calibration(
    runs: dict[str, tuple[dict, dict, Path]], scenario: Scenario, per_seq: bool = True
) -> dict[int, StepCalibration] | None:
    """Per TP degree, the calibration fitted on the round trips of every logged engine step of the runs
    (:func:`~nitsum_opt.sim.runtime_calibration.fit_runtime_calibration` on ``OUT/<system>/steps.csv.gz``, written
    since the step log existed); ``None`` when no run logged its steps."""
    logs = [folder / system / "steps.csv.gz" for system, (_, _, folder) in runs.items()]
    logs = [p for p in logs if p.is_file()]
    if not logs:
        return None
    model, _ = scenario.iteration_model()
    return fit_runtime_calibration(logs, model, per_seq=per_seq)


VARIANTS = ("model", "model+runtime", "replanned")
"""Simulated variants: the latency model as fitted (the decisions the run made, since the same model planned it);
calibrated on the runtime (fitted on the logged steps' round trips, or, for runs without a step log, the runtime
path's measured cost per step as an offset), same decisions; and re-planned with that calibration (adaptive only)."""


def run_compare(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    scenario = Scenario.load(args.scenario)
    runs = _runs([Path(m) for m in args.measured])
    if not runs:
        raise SystemExit(f"{args.measured}: no finished system run")
    pieces = {p.name: p for p in read_slices(args.slices)}
    fit_on = _runs([Path(m) for m in args.calibrate_on]) if args.calibrate_on else runs
    calibration = fitted_runtime_calibration(fit_on, scenario, args.per_seq) or runtime_calibration(fit_on)
    calibrated = scenario.model_copy(update={"latency_calibration": calibration})
    print(
        "runtime calibration: "
        + ", ".join(f"TP{tp} {c.describe()} ({c.steps} steps, {c.source})" for tp, c in calibration.items())
    )
    rows: list[dict[str, object]] = []
    real: dict[str, Timings] = {}
    sim: dict[str, dict[str, Timings]] = {}
    piece: TraceSlice | None = None
    for system, (info, meta, folder) in runs.items():
        piece = pieces[meta["slice"]]
        # runs since preparing ahead existed record it: the simulator then carries changes out the same way
        scenario = with_prepare_ahead(scenario, bool(meta.get("prepare_ahead", False)))
        calibrated = with_prepare_ahead(calibrated, bool(meta.get("prepare_ahead", False)))
        kv = {int(tp): int(n) for tp, n in meta["kv_cache_tokens_by_tp"].items()}
        epoch_s, drain_s = float(meta["epoch_s"]), float(meta["drain_s"])
        real[system] = read_measured(folder / system / "measured.csv", [piece])[piece.name]
        sim[system] = {}
        sim[system]["model"], timeline = simulate_system(scenario, piece, system, 2, epoch_s, drain_s, kv)
        sim[system]["model+runtime"], _ = simulate_system(
            calibrated, piece, system, 2, epoch_s, drain_s, kv, plan_with=scenario
        )
        print(
            f"{system}: {info['requests']} requests, aborted {info['aborted']}, never dispatched "
            f"{info['never_dispatched']}, hand-offs {info['handoffs']} ({info['migrated']} with KV)"
        )
        print("\n".join(decisions_text(info["epochs"], timeline, scenario.settings.switch.switch_s)))
        if len(info["epochs"]) > 1:
            sim[system]["replanned"], replanned = simulate_system(calibrated, piece, system, 2, epoch_s, drain_s, kv)
            changes = [
                f"t={t:.0f} s {d.describe()}"
                for k, (t, d) in enumerate(replanned)
                if k == 0 or d.describe() != replanned[k - 1][1].describe()
            ]
            print(f"  re-planned knowing the runtime cost: {'; '.join(changes)}")
        for variant, timings in sim[system].items():
            for row in compare(piece, real[system], timings, scenario.tiers):
                rows.append({"system": system, "variant": variant, **row})
    assert piece is not None
    print(
        f"{scenario.model_spec.name} on 2× {meta.get('gpu')}; slice {piece.name} ({len(piece)} requests, "
        f"{piece.offered_rps:.2f} req/s); KV cache tokens by TP {meta['kv_cache_tokens_by_tp']}"
    )
    cols = ("attainment", "goodput_rps", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms")
    print("\n".join(format_rows(rows, ("system", "variant", "tier", "requests"), cols)))
    if args.out_csv:
        write_comparison_csv(args.out_csv, rows)
        print(f"wrote {args.out_csv}")
    if args.plot:
        switches = {
            system: [e for e in info["epochs"] if e["action"] == "transition"] for system, (info, _, _) in runs.items()
        }
        _plot(Path(args.plot), piece, real, sim, scenario, switches)
        print(f"wrote {args.plot}")
    return 0


def _plot(
    path: Path, piece: TraceSlice, real: dict, sim: dict, scenario: Scenario, switches: dict[str, list[dict]]
) -> None:
    """Per system: SLO attainment over time (10 s bins of arrival), real and simulated; each transition the runtime
    carried out is a vertical line labelled with the deployment it switched to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    edges = np.arange(0.0, piece.duration_s + 10.0, 10.0)
    which = np.digitize(piece.arrival_s, edges) - 1
    mids = edges[:-1] + 5.0
    for k, system in enumerate(real):
        variants = (
            (real[system], "-", "vLLM"),
            (sim[system]["model"], ":", "sim"),
            (sim[system]["model+runtime"], "--", "sim + runtime cost"),
        )
        for timings, style, label in variants:
            met = slo_met(piece, timings, scenario.tiers)
            att = [met[which == b].mean() if (which == b).any() else np.nan for b in range(len(mids))]
            ax.plot(mids, att, style, color=f"C{k}", label=f"{system} ({label}, {met.mean():.1%})")
    for k, system in enumerate(real):
        for e in switches.get(system, []):
            ax.axvline(e["ready_s"], color=f"C{k}", lw=0.8, alpha=0.6)
            label = f"{system} switches: {e['deployment']}, {1000 * e['stall_s']:.0f} ms stall"
            ax.annotate(
                label,
                (e["ready_s"], 1.02),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=6,
                color=f"C{k}",
                va="bottom",
            )
    ax.set_xlabel("arrival time in the slice (s)")
    ax.set_ylabel("SLO attainment (10 s bins)")
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{scenario.name}: runtime on 2×H200 vs simulator, {piece.name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slice", help="write the slice file the GPU run serves")
    s.add_argument("--scenario", type=Path, default=SCENARIO)
    s.add_argument("--slices", type=Path, default=SLICES)
    s.add_argument("--rate", type=float, default=12.0, help="req/s the whole trace is compressed to")
    s.add_argument("--start-s", type=float, default=700.0, help="window start on the uncompressed trace clock")
    s.add_argument("--window-s", type=float, default=150.0)
    c = sub.add_parser("compare", help="simulate the measured runs and compare")
    c.add_argument("--measured", nargs="+", required=True, help="OUT folders of run_adaptive_h200.sh")
    c.add_argument("--scenario", type=Path, default=SCENARIO)
    c.add_argument("--slices", type=Path, default=SLICES)
    c.add_argument("--out-csv", default="")
    c.add_argument("--plot", default="")
    c.add_argument(
        "--calibrate-on",
        nargs="+",
        default=[],
        help="OUT folders whose logged steps fit the calibration (default: the --measured ones); for held-out checks",
    )
    c.add_argument(
        "--per-seq",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit a cost per scheduled sequence too (offset + scale · model + c · sequences; default on)",
    )
    args = ap.parse_args(argv)
    return make_slice(args) if args.cmd == "slice" else run_compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
