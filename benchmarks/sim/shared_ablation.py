"""Shared instances in the Nitsum controller: its goodput per load with each way of planning them.

Usage: ``python benchmarks/sim/shared_ablation.py [--loads 4,6,8,10,12,14,24]
[--out benchmarks/sim/shared_ablation.csv]`` (the bundled default scenario; 2 worker processes).

Variants (every other knob at the controller's default):

* ``dedicated only`` — ``MilpPlanner(shared=False)``: the controller as it was before shared instances
  (= the registry's ``nitsum-dedicated``);
* ``ties dedicated`` — shared instances allowed, ``ε_s = ε`` (the planner library's default: where sharing gains
  nothing in the model the tiers stay isolated), with ``R^s = R`` or ``R^s`` at the strictest TPOT target;
* ``ties pooled`` — ``ε_s = ε / 2``: ties go to shared instances, with ``R^s = R``, ``R^s`` at the strictest TPOT
  (slack 1), or at twice the strictest TPOT (slack 2: the controller's default, = ``nitsum``);
* ``ties pooled, engine seats`` (``R^s = R``; a shared instance takes up to 1,024 requests instead of its host
  tier's SLO-safe capacity).

``--scenario FILE`` runs another scenario (e.g. ``examples/scenarios/qwen14b-tight.yaml --loads 2,3,4,5,6,7``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from nitsum_opt.planners import MilpPlanner
from nitsum_opt.sim.controllers import registry
from nitsum_opt.sim.controllers.nitsum import POOL_ON_TIES, NitsumController
from nitsum_opt.sim.runner import run_sweep
from nitsum_opt.sim.scenario import Scenario

VARIANTS: dict[str, dict[str, object]] = {
    "dedicated only": {"shared": False},
    "ties dedicated, R^s = R": {"shared_gpu_cost": None, "shared_table": False},
    "ties dedicated, R^s strictest TPOT": {"shared_gpu_cost": None, "shared_tpot_slack": 1.0},
    "ties pooled, R^s = R": {"shared_gpu_cost": POOL_ON_TIES, "shared_table": False},
    "ties pooled, R^s strictest TPOT": {"shared_gpu_cost": POOL_ON_TIES, "shared_tpot_slack": 1.0},
    "ties pooled, R^s 2x strictest TPOT (nitsum)": {"shared_gpu_cost": POOL_ON_TIES, "shared_tpot_slack": 2.0},
    "ties pooled, engine seats": {"shared_gpu_cost": POOL_ON_TIES, "shared_table": False, "shared_seats": "engine"},
}


def _register(label: str, knobs: dict[str, object]) -> str:
    """Register the variant as a system (worker processes are forked, so they see it)."""
    name = "ablation-" + "".join(ch if ch.isalnum() else "-" for ch in label)
    rest = dict(knobs)
    shared = bool(rest.pop("shared", True))

    def make(ev: object, opts: registry.ControllerOptions) -> NitsumController:
        planner = MilpPlanner(time_limit_s=opts.milp_time_limit_s, shared=shared)
        return NitsumController(name, planner, opts.forecaster, opts.stabilizer, **rest)  # type: ignore[arg-type]

    registry.SYSTEMS[name] = registry.SystemInfo(label, make, adaptive=True)  # type: ignore[arg-type]
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="4,6,8,10,12,14,24")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sim/shared_ablation.csv"))
    parser.add_argument("--scenario", type=Path, default=None, help="scenario YAML (default: the bundled one)")
    args = parser.parse_args()
    names = {label: _register(label, knobs) for label, knobs in VARIANTS.items()}
    base = Scenario.load(args.scenario) if args.scenario else Scenario()
    loads = tuple(float(x) for x in args.loads.split(","))
    scenario = Scenario.model_validate({**base.model_dump(), "systems": tuple(names.values()), "load_scales": loads})
    sweep = run_sweep(scenario, workers=2, progress=print)
    label_of = {v: k for k, v in names.items()}
    with args.out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "load_scale", "goodput_rps", "attainment", "deployment"])
        for level in sweep.levels:
            for run in level.runs:
                m = run.metrics
                writer.writerow(
                    [label_of[m.system], level.load_scale, f"{m.goodput_rps:.2f}", f"{m.attainment:.4f}", m.deployment]
                )
    print(f"wrote {args.out} ({sweep.wall_s:.0f} s)")
    for label in VARIANTS:
        cells = [
            f"{run.metrics.goodput_rps:.1f}"
            for level in sweep.levels
            for run in level.runs
            if run.metrics.system == names[label]
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
