"""Seat safety at a tight TPOT: how much of a tier's TPOT target the controllers let an instance's mean step take
when they set its SLO-safe capacity (``settings.seat_safety``), on the 2×H200 runtime as calibrated from its own
logged steps.

For each ``seat_safety`` value, on 2 simulated GPUs with the scenario's latency model calibrated on the committed
runtime step logs (``nitsum_opt.sim.runtime_calibration``, offset + scale + cost per sequence):

* the interactive tier alone at several Poisson rates (120 s, prompt and output lengths drawn from the committed
  slice's interactive requests; fixed seeds), served by ``nitsum`` and, for reference, ``vllm-static-tp1``
  (no seats);
* the committed three-tier slice of the adaptive check (``benchmarks/gpu/adaptive/slices.csv``).

Usage: ``python benchmarks/sim/seat_safety.py [--safeties 0.85,0.9,0.95,1.0] [--rates 3,4,5,6,7]
[--out-csv F] [--plot F.png]``.
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nitsum_opt.sim.fidelity import simulate_system, slo_met
from nitsum_opt.sim.runtime_calibration import fit_runtime_calibration
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice, read_slices

SCENARIO = Path("examples/scenarios/llama8b-tight.yaml")
SLICES = Path("benchmarks/gpu/adaptive/slices.csv")
RUNS = Path(__file__).resolve().parents[2] / "benchmarks/gpu/results/adaptive-h200x2-2026-11-23b"
STEP_LOGS = (RUNS / "nitsum/nitsum/steps.csv.gz", *sorted((RUNS / "static").glob("*/steps.csv.gz")))
KV_TOKENS = {1: 210_144, 2: 551_760}
"""KV-cache tokens of the 2×H200 engines at 0.3 memory (``meta.json`` of the runs)."""


def tier_load(piece: TraceSlice, tier: str, rate_rps: float, duration_s: float, seed: int) -> TraceSlice:
    """Poisson arrivals of ``tier`` at ``rate_rps`` whose lengths are drawn from that tier's requests of ``piece``."""
    rng = np.random.default_rng(seed)
    mine = np.flatnonzero(np.asarray(piece.tier) == tier)
    if mine.size == 0:
        raise SystemExit(f"slice {piece.name} has no {tier!r} requests")
    n = int(rng.poisson(rate_rps * duration_s))
    pick = mine[rng.integers(0, mine.size, n)]
    return TraceSlice(
        name=f"{tier}-{rate_rps:g}rps",
        arrival_s=np.sort(rng.uniform(0.0, duration_s, n)),
        input_tokens=piece.input_tokens[pick],
        output_tokens=piece.output_tokens[pick],
        tier=(tier,) * n,
        duration_s=duration_s,
    )


def with_seat_safety(scenario: Scenario, safety: float) -> Scenario:
    """``scenario`` with ``settings.seat_safety`` set."""
    return scenario.model_copy(update={"settings": scenario.settings.model_copy(update={"seat_safety": safety})})


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    base = Scenario.load(args.scenario)
    model, _ = base.iteration_model()
    calibrated = base.model_copy(update={"latency_calibration": fit_runtime_calibration(STEP_LOGS, model)})
    piece = {p.name: p for p in read_slices(args.slices)}[args.slice]
    loads = [(f"interactive {r:g} req/s", tier_load(piece, "interactive", r, 120.0, seed=k)) for k, r in args.rates]
    loads.append((f"slice {piece.name}", piece))
    jobs = [
        (s, name, load, system)
        for s in args.safeties
        for name, load in loads
        for system in args.systems
        if system == "nitsum" or s == args.safeties[0]  # the baselines have no seats: once is enough
    ]
    rows: list[dict[str, object]] = []
    for safety, name, load, system in tqdm(jobs, desc="seat safety"):
        scenario = with_seat_safety(calibrated, safety)
        timings, timeline = simulate_system(scenario, load, system, 2, 15.0, 20.0, KV_TOKENS)
        met = slo_met(load, timings, scenario.tiers)
        last = timeline[-1][1]
        rows.append(
            {
                "seat_safety": safety,
                "workload": name,
                "system": system,
                "requests": len(load),
                "attainment": round(float(met.mean()), 4),
                "goodput_rps": round(float(met.sum()) / load.duration_s, 3),
                "last_deployment": last.describe(),
                "last_seats": " ".join(str(i.slo_safe_seqs) for i in last.instances),
            }
        )
    return rows


def plot(path: Path, rows: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    workloads = list(dict.fromkeys(str(r["workload"]) for r in rows))
    safeties = sorted({float(r["seat_safety"]) for r in rows})  # type: ignore[arg-type]

    def attainment(workload: str, system: str, safety: float | None = None) -> float:
        found = [
            float(r["attainment"])  # type: ignore[arg-type]
            for r in rows
            if r["workload"] == workload and r["system"] == system and safety in (None, r["seat_safety"])
        ]
        return found[0] if found else float("nan")

    xs = range(len(workloads))
    for k, safety in enumerate(safeties):
        att = [attainment(w, "nitsum", safety) for w in workloads]
        ax.plot(xs, att, marker="o", color=f"C{k}", label=f"nitsum, seat_safety {safety:g}")
    ref = [attainment(w, "vllm-static-tp1") for w in workloads]
    ax.plot(xs, ref, "k--", marker="x", label="vllm-static-tp1 (no seats)")
    ax.set_xticks(range(len(workloads)), workloads, rotation=20, fontsize=7)
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("llama8b-tight on 2×H200 (latency model calibrated on the runtime's steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--scenario", type=Path, default=SCENARIO)
    ap.add_argument("--slices", type=Path, default=SLICES)
    ap.add_argument("--slice", default="mean-12rps")
    ap.add_argument("--safeties", default="0.85,0.9,0.95,1.0")
    ap.add_argument("--rates", default="3,4,5,6,7", help="interactive-only Poisson rates, req/s")
    ap.add_argument("--systems", default="nitsum,vllm-static-tp1")
    ap.add_argument("--out-csv", default="")
    ap.add_argument("--plot", default="")
    args = ap.parse_args(argv)
    args.safeties = [float(x) for x in args.safeties.split(",") if x]
    args.rates = list(enumerate(float(x) for x in args.rates.split(",") if x))
    args.systems = [x for x in args.systems.split(",") if x]
    warnings.simplefilter("ignore")
    rows = run(args)
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
    if args.out_csv:
        with Path(args.out_csv).open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out_csv}")
    if args.plot:
        plot(Path(args.plot), rows)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
