"""``nitsum`` against ``nitsum-shared-pd`` (shared instances may also be prefill or decode instances) per scenario
and load: goodput and attainment of both, from the request simulator (``run_level``, the same runs as ``nitsum
bench goodput``), written as CSV with a plot of the ratio per load.

Usage: ``python benchmarks/sim/shared_pd.py [--out-csv benchmarks/sim/shared_pd.csv] [--plot
benchmarks/sim/shared_pd.png]``; scenarios and loads are ``CASES`` below (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

from tqdm import tqdm

from nitsum_opt.sim.runner import run_level
from nitsum_opt.sim.scenario import Scenario

ROOT = Path(__file__).resolve().parents[2]
CASES = (
    ("default", ROOT / "examples/scenarios/default.yaml", (4, 6, 8, 10, 12, 14, 24)),
    ("qwen14b-tight", ROOT / "examples/scenarios/qwen14b-tight.yaml", (2, 3, 4, 5, 6, 7)),
    (
        "llama8b-tight-h200x2-runtime",
        ROOT / "examples/scenarios/llama8b-tight-h200x2-runtime.yaml",
        (0.25, 0.5, 0.75, 1.0, 1.5),
    ),
)
SYSTEMS = ("nitsum", "nitsum-shared-pd")
COLUMNS = ["scenario", "load", "system", "goodput_rps", "attainment", *(f"attainment_{k}" for k in range(3))]


def measure() -> list[dict[str, object]]:
    """One row per scenario, load and system."""
    rows: list[dict[str, object]] = []
    jobs = [(name, path, load) for name, path, loads in CASES for load in loads]
    for name, path, load in tqdm(jobs, desc="scenario × load"):
        for run in run_level(Scenario.load(path), float(load), systems=SYSTEMS).runs:
            m = run.metrics
            row: dict[str, object] = {"scenario": name, "load": load, "system": m.system}
            row |= {"goodput_rps": round(m.goodput_rps, 3), "attainment": round(m.attainment, 4)}
            row |= {f"attainment_{k}": round(t.attainment, 4) for k, t in enumerate(m.tiers)}
            rows.append(row)
    return rows


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Goodput ratio nitsum-shared-pd / nitsum per load, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, _, loads in CASES:
        ratios = []
        for load in loads:
            cell = {r["system"]: float(r["goodput_rps"]) for r in rows if r["scenario"] == name and r["load"] == load}
            ratios.append(cell["nitsum-shared-pd"] / max(cell["nitsum"], 1e-9))
        ax.plot(range(len(loads)), ratios, marker="o", label=name)
        for k, load in enumerate(loads):
            ax.annotate(f"×{load:g}", (k, ratios[k]), fontsize=7, textcoords="offset points", xytext=(0, 5))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("load level (increasing, per scenario)")
    ax.set_ylabel("goodput: nitsum-shared-pd / nitsum")
    ax.set_title("Shared prefill/decode instances vs the colocated pool")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-csv", type=Path, default=ROOT / "benchmarks/sim/shared_pd.csv")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/sim/shared_pd.png")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = measure()
    with args.out_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.plot)
    print(f"wrote {args.out_csv} and {args.plot}")


if __name__ == "__main__":
    main()
