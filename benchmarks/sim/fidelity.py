"""Simulator vs a real vLLM engine on the same requests (:mod:`nitsum_opt.sim.fidelity`).

Usage:

* ``python benchmarks/sim/fidelity.py prepare [--rates 4,8,10,13] [--window-s 60] [--start-s 1200]
  [--out benchmarks/gpu/fidelity/slices.csv]`` — cut the slices from the bundled default workload (a window
  starting at minute 20 of the trace, inside the background burst, so all three tiers are in it) compressed to each
  rate. The file is committed: the GPU run and the comparison read the same requests.
* on an H200: ``OUT=... bash benchmarks/gpu/run_fidelity_h200.sh`` (writes ``measured.csv`` and ``meta.json``);
* ``python benchmarks/sim/fidelity.py compare --measured DIR [--scenario FILE] [--out-csv
  benchmarks/sim/fidelity.csv] [--plot benchmarks/sim/fidelity.png]`` — simulate each measured slice on one engine
  of the measured TP (the scenario's fitted H200 model, engine settings and tiers; drain as in the GPU run) and
  print the table real vs simulated. ``--calibrate-on SLICE[,SLICE]`` first fits a per-host calibration of the
  latency model on those slices' step logs (:mod:`nitsum_opt.sim.calibration`) and simulates every slice with it
  (the other slices are held out; ``--calibration-dir`` takes the step logs from another run's folder).

Other models and TP degrees: ``prepare --scenario FILE --out OTHER.csv``, then ``MODEL=... TP=... OUT=... bash
benchmarks/gpu/run_fidelity_h200.sh OTHER.csv`` and ``compare --scenario FILE --slices OTHER.csv``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nitsum_opt.sim.calibration import fit_step_calibration
from nitsum_opt.sim.fidelity import (
    compare,
    format_rows,
    read_measured,
    read_steps,
    simulate_slice,
    slo_met,
    step_errors,
    write_comparison_csv,
)
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice, make_slices, read_slices, write_slices

DEFAULT_SLICES = Path("benchmarks/gpu/fidelity/slices.csv")


def _scenario(path: Path | None) -> Scenario:
    return Scenario() if path is None else Scenario.load(path)


def prepare(args: argparse.Namespace) -> int:
    scenario = _scenario(args.scenario)
    rates = [float(x) for x in args.rates.split(",")]
    slices = make_slices(scenario.trace(1.0), rates, args.window_s, start_s=args.start_s)
    write_slices(args.out, slices)
    for s in slices:
        counts = {t: s.tier.count(t) for t in sorted(set(s.tier))}
        print(f"{s.name}: {len(s)} requests, {s.offered_rps:.2f} req/s, {counts}")
    print(f"wrote {args.out}")
    return 0


def _plot(path: Path, pieces: list[TraceSlice], real: dict, sim: dict, scenario: Scenario, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(pieces), figsize=(4 * len(pieces), 6.5), squeeze=False)
    for j, piece in enumerate(pieces):
        for i, (metric, label) in enumerate((("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"))):
            ax = axes[i][j]
            for name, timings, style in (("vLLM on H200", real[piece.name], "-"), ("simulator", sim[piece.name], "--")):
                values = np.sort(getattr(timings, metric)) * 1000.0
                values = values[np.isfinite(values)]
                ax.plot(values, np.arange(1, values.size + 1) / values.size, style, label=name)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("share of requests")
            ax.grid(alpha=0.3)
            if i == 0:
                met_r = slo_met(piece, real[piece.name], scenario.tiers).mean()
                met_s = slo_met(piece, sim[piece.name], scenario.tiers).mean()
                ax.set_title(f"{piece.offered_rps:.1f} req/s: attainment {met_r:.0%} real, {met_s:.0%} sim")
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: measured vs simulated (CDF)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _calibrated(scenario: Scenario, measured_dir: Path, tp: int, names: list[str]) -> Scenario:
    """The scenario with its model calibrated at ``tp`` on the step logs of slices ``names``."""
    missing = [n for n in names if not (measured_dir / f"steps-{n}.csv.gz").is_file()]
    if missing:
        raise SystemExit(
            f"--calibrate-on {','.join(names)}: no step log steps-<slice>.csv.gz in {measured_dir} for {missing}; "
            "re-run the GPU replay with LOG_STEPS=1"
        )
    logs = [read_steps(measured_dir / f"steps-{n}.csv.gz") for n in names]
    base = scenario.model_copy(update={"latency_calibration": {}})
    model, _ = base.iteration_model()
    cal = fit_step_calibration(
        model,
        tp,
        np.concatenate([t for t, _ in logs]),
        np.concatenate([c for _, c in logs]),
        source=f"{measured_dir.name}: {','.join(names)}",
    )
    print(
        f"calibration fitted on {cal.steps} steps of {','.join(names)}: t = {cal.offset_ms:+.3f} ms + "
        f"{cal.scale:.4f} × model; in a scenario: latency_calibration: "
        f"{{{tp}: {{offset_ms: {cal.offset_ms:.3f}, scale: {cal.scale:.4f}}}}}"
    )
    return scenario.model_copy(update={"latency_calibration": {**scenario.latency_calibration, tp: cal}})


def run_compare(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    scenario = _scenario(args.scenario)
    measured_dir = Path(args.measured)
    missing = [name for name in ("meta.json", "measured.csv") if not (measured_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"--measured {measured_dir}: no {' or '.join(missing)} there; pass the OUT folder of "
            "benchmarks/gpu/run_fidelity_h200.sh (e.g. benchmarks/gpu/results/fidelity-h200-2026-11-23)"
        )
    meta = json.loads((measured_dir / "meta.json").read_text(encoding="utf-8"))
    if meta.get("model") != scenario.model_spec.name:
        raise SystemExit(
            f"{measured_dir}/meta.json measured {meta.get('model')!r} but the scenario serves "
            f"{scenario.model_spec.name!r}; pass --scenario with that model"
        )
    tp = int(meta["engine_settings"]["tp"])
    # an engine measured with less memory than the profiles' 0.9 has a smaller KV cache: simulate that one
    kv = meta["kv_cache_tokens"] if meta["engine_settings"].get("gpu_memory_utilization", 0.9) != 0.9 else None
    pieces = read_slices(args.slices)
    real = read_measured(measured_dir / "measured.csv", pieces)
    done = [p for p in pieces if p.name in real]
    fitted_on = _names(args.calibrate_on)
    if fitted_on:
        scenario = _calibrated(scenario, Path(args.calibration_dir or measured_dir), tp, fitted_on)
    drain_s = float(meta.get("drain_s", 60.0))
    sim = {
        p.name: simulate_slice(scenario, p, tp=tp, drain_s=drain_s, kv_cache_tokens=kv)
        for p in tqdm(done, desc="simulating")
    }
    rows = [row for p in done for row in compare(p, real[p.name], sim[p.name], scenario.tiers)]
    if fitted_on:
        for row in rows:
            row["calibration"] = "fitted on" if row["slice"] in fitted_on else "held out"
    model, _ = scenario.iteration_model()
    print(f"{meta['model']} TP{tp} on {meta.get('gpu')}")
    sim_kv = kv if kv is not None else model.kv_cache_tokens(tp)
    print(f"KV cache tokens: vLLM {meta.get('kv_cache_tokens')}, simulator {sim_kv}")
    cols = ("slice", "tier", "requests", "attainment", "goodput_rps", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms")
    print("\n".join(format_rows(rows, cols[:3], cols[3:])))
    for p in done:
        step_file = measured_dir / f"steps-{p.name}.csv.gz"
        if step_file.exists():
            e = step_errors(model, tp, *read_steps(step_file))
            print(
                f"{p.name} steps: {e['all_steps']} (predicted/measured time {e['all_ratio']:.3f}, median step "
                f"{e['all_median_ratio']:.3f}, MAPE {e['all_mape_pct']:.1f} %); decode-only {e['decode_steps']} "
                f"({e['decode_ratio']:.3f}, median {e['decode_median_ratio']:.3f}, MAPE {e['decode_mape_pct']:.1f} %)"
            )
    if args.out_csv:
        write_comparison_csv(args.out_csv, rows)
        print(f"wrote {args.out_csv}")
    if args.plot:
        title = f"{meta['model']}, TP{tp} on {meta.get('gpu')}, {scenario.name} workload slices"
        _plot(Path(args.plot), done, real, sim, scenario, title)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="cut the slices from the default workload")
    p.add_argument("--rates", default="4,8,10,13", help="comma-separated arrival rates, req/s")
    p.add_argument("--window-s", type=float, default=60.0, help="seconds of arrivals per slice")
    p.add_argument("--start-s", type=float, default=1200.0, help="window start on the uncompressed trace clock")
    p.add_argument("--out", type=Path, default=DEFAULT_SLICES)
    p.add_argument("--scenario", type=Path, default=None, help="scenario YAML whose workload to cut (default: bundled)")
    c = sub.add_parser("compare", help="simulate the measured slices and compare")
    c.add_argument("--measured", required=True, help="folder with measured.csv and meta.json from the GPU run")
    c.add_argument("--slices", type=Path, default=DEFAULT_SLICES)
    c.add_argument("--scenario", type=Path, default=None, help="scenario YAML (model, tiers, engine; default: bundled)")
    c.add_argument("--out-csv", default="", help="write the comparison rows here")
    c.add_argument("--plot", default="", help="write the CDF plot here (PNG)")
    c.add_argument(
        "--calibrate-on",
        default="",
        help="comma-separated slices whose step logs calibrate the latency model (nitsum_opt.sim.calibration); "
        "the other slices are held out",
    )
    c.add_argument(
        "--calibration-dir",
        default="",
        help="folder with the step logs of the --calibrate-on slices (default: --measured), e.g. another run",
    )
    args = parser.parse_args(argv)
    return prepare(args) if args.command == "prepare" else run_compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
