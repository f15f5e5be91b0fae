"""The runtime's logged engine steps against the latency model: how much slower a vLLM step is on the serving path
than the profiled model says, per TP degree and decode batch size, with the Nitsum KV connector on or off.

Reads the step logs of :mod:`nitsum_runtime.bench_adaptive` runs (``OUT/<system>/steps.csv.gz``: every engine step's
seconds inside vLLM's ``step()``, its round trip through the engine process, and its composition) and, per run and
instance, prints

* the least-squares ``offset + scale · model`` of the steps inside vLLM and of the round trips (the second is what
  ``adaptive_fidelity.py compare`` simulates as ``latency_calibration``);
* for decode-only steps, per batch-size bucket: the measured and modelled p50 step and their ratio.

Usage: ``python benchmarks/sim/runtime_steps.py --measured OUT [OUT ...] [--out-csv F] [--plot F.png]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from nitsum_opt.sim.calibration import fit_step_calibration, predicted_steps_ms
from nitsum_opt.sim.fidelity import format_cell, write_comparison_csv
from nitsum_opt.sim.runtime_calibration import read_serving_steps, tp_of
from nitsum_opt.sim.scenario import Scenario

SCENARIO = Path("examples/scenarios/llama8b-tight.yaml")
BUCKETS = ((1, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 1 << 20))
"""Decode batch-size buckets ``[lo, hi)``."""
MIN_BUCKET_STEPS = 20
KEYS = ("run", "instance", "tp", "batch", "steps")
FIT_COLUMNS = ("step_offset_ms", "step_scale", "round_trip_offset_ms", "round_trip_scale")
BUCKET_COLUMNS = ("step_p50_ms", "model_p50_ms", "step_over_model", "round_trip_p50_ms")


def instance_rows(label: str, instance: str, steps: tuple[np.ndarray, np.ndarray, np.ndarray], model: object) -> list:
    """The fit row and one row per decode batch bucket of one instance's steps."""
    step_s, trip_s, comps = steps
    tp = tp_of(instance)
    inside = fit_step_calibration(model, tp, step_s, comps)  # type: ignore[arg-type]
    trip = fit_step_calibration(model, tp, trip_s, comps)  # type: ignore[arg-type]
    predicted = predicted_steps_ms(model, tp, comps)  # type: ignore[arg-type]
    base = {"run": label, "instance": instance, "tp": tp}
    rows = [
        {
            **base,
            "batch": "all (fit)",
            "steps": len(step_s),
            "step_offset_ms": inside.offset_ms,
            "step_scale": inside.scale,
            "round_trip_offset_ms": trip.offset_ms,
            "round_trip_scale": trip.scale,
        }
    ]
    decode_only = comps[:, 0] == 0
    for lo, hi in BUCKETS:
        mask = decode_only & (comps[:, 3] >= lo) & (comps[:, 3] < hi)
        if mask.sum() < MIN_BUCKET_STEPS:
            continue
        measured_ms = 1000 * step_s[mask]
        rows.append(
            {
                **base,
                "batch": f"{lo}-{hi - 1}" if hi < 1 << 20 else f"{lo}+",
                "steps": int(mask.sum()),
                "step_p50_ms": float(np.median(measured_ms)),
                "model_p50_ms": float(np.median(predicted[mask])),
                "step_over_model": float(np.median(measured_ms / predicted[mask])),
                "round_trip_p50_ms": float(np.median(1000 * trip_s[mask])),
            }
        )
    return rows


def run_label(folder: Path, system: str) -> str:
    """``<folder>/<system>`` plus whether its engines ran the KV connector (``meta.json``'s settings)."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    connector = "on" if meta.get("settings", {}).get("kv_connector", True) else "off"
    return f"{folder.name}/{system} (KV connector {connector})"


def plot(path: Path, rows: list[dict]) -> None:
    """Measured / modelled decode step (p50) against the decode batch bucket, one line per run and instance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{lo}-{hi - 1}" if hi < 1 << 20 else f"{lo}+" for lo, hi in BUCKETS]
    keys = dict.fromkeys((r["run"], r["instance"]) for r in rows)
    for k, (run, instance) in enumerate(keys):
        points = {r["batch"]: r["step_over_model"] for r in rows if (r["run"], r["instance"]) == (run, instance)}
        xs = [i for i, b in enumerate(labels) if b in points]
        style = "-" if "connector on" in run else "--"
        ax.plot(xs, [points[labels[i]] for i in xs], style, marker="o", color=f"C{k}", label=f"{run}: {instance}")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("decode batch (sequences), decode-only steps")
    ax.set_ylabel("vLLM step / latency model (p50)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("Engine steps on the runtime's serving path vs the H200 latency model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--measured", nargs="+", required=True, type=Path, help="OUT folders of run_adaptive_h200.sh")
    ap.add_argument("--scenario", type=Path, default=SCENARIO, help="the scenario whose latency model is checked")
    ap.add_argument("--out-csv", default="")
    ap.add_argument("--plot", default="")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    model, _ = Scenario.load(args.scenario).iteration_model()
    rows: list[dict] = []
    for folder in args.measured:
        logs = sorted(folder.glob("*/steps.csv.gz"))
        if not logs:
            raise SystemExit(f"--measured {folder}: no <system>/steps.csv.gz (run bench_adaptive with --log-steps)")
        for log in logs:
            label = run_label(folder, log.parent.name)
            for instance, steps in sorted(read_serving_steps(log).items()):
                rows.extend(instance_rows(label, instance, steps, model))
    rows = [{c: row.get(c, float("nan")) for c in (*KEYS, *FIT_COLUMNS, *BUCKET_COLUMNS)} for row in rows]
    print(" | ".join((*KEYS, *FIT_COLUMNS, *BUCKET_COLUMNS)))
    for row in rows:
        print(" | ".join(format_cell(v) for v in row.values()))
    if args.out_csv:
        write_comparison_csv(args.out_csv, rows)
        print(f"wrote {args.out_csv}")
    if args.plot:
        plot(Path(args.plot), [r for r in rows if "step_over_model" in r])
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
