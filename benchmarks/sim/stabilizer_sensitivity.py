"""Overload knobs of the Nitsum controller: its goodput under several stabilizer minimum gains (for every
re-plan and for role-only re-plans) and overload admission fractions.

Usage: ``python benchmarks/sim/stabilizer_sensitivity.py [--scenario FILE] [--loads 10,12,14,24]
[--gains 0.02,0.05,0.1] [--role-only 0.1] [--admissions 1] [--out benchmarks/sim/stabilizer_sensitivity.csv]``

One row per (load, ``min_relative_gain``, ``role_only_min_relative_gain``, ``overload_admission``): goodput req/s,
attainment, deployments and engine switches of ``nitsum`` (everything else as in the scenario; defaults: gain 0.02
and role-only gain 0.1, :class:`~nitsum_opt.planners.StabilizerSettings`; overload admission 1,
:class:`~nitsum_opt.sim.controllers.nitsum.NitsumController`). ``--role-only none`` gives the stabilizer as it was
before the role-only rule.
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

from tqdm import tqdm

from nitsum_opt.planners import StabilizerSettings
from nitsum_opt.sim.controllers.nitsum import NitsumController
from nitsum_opt.sim.controllers.registry import ControllerOptions, make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.metrics import run_metrics
from nitsum_opt.sim.scenario import Scenario


def run(
    scenario: Scenario,
    loads: list[float],
    gains: list[float],
    admissions: tuple[float, ...] = (1.0,),
    role_only: tuple[float | None, ...] = (0.1,),
) -> list[dict[str, object]]:
    """One row per (load, gain, role-only gain, overload admission)."""
    model, _ = scenario.iteration_model()
    rows: list[dict[str, object]] = []
    todo = [(lo, g, r, a) for lo in loads for g in gains for r in role_only for a in admissions]
    for load, gain, role_gain, admission in tqdm(todo, desc="runs"):
        trace = scenario.trace(load)
        ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, scenario.cluster, scenario.settings)
        stabilizer = StabilizerSettings(min_relative_gain=gain, role_only_min_relative_gain=role_gain)
        opts = ControllerOptions(stabilizer=stabilizer)
        controller = make_controller("nitsum", ev, opts)
        assert isinstance(controller, NitsumController)
        controller.overload_admission = admission
        sim = Simulator(trace, scenario.tiers, model, scenario.model_spec, scenario.cluster, controller, ev.settings)
        m = run_metrics(sim.run(), scenario.tiers, "nitsum", load, scenario.cluster.total_gpus, 0.0)
        rows.append(
            {
                "load_scale": load,
                "min_relative_gain": gain,
                "role_only_min_relative_gain": "none" if role_gain is None else role_gain,
                "overload_admission": admission,
                "goodput_rps": round(m.goodput_rps, 3),
                "attainment": round(m.attainment, 4),
                "deployments": m.deployments,
                "engine_switches": m.engine_switches,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=None, help="scenario YAML (default: the bundled one)")
    parser.add_argument("--loads", default="10,12,14,24", help="comma-separated load scales")
    parser.add_argument("--gains", default="0.02,0.05,0.1", help="comma-separated min_relative_gain values")
    parser.add_argument(
        "--role-only", default="0.1", help="comma-separated role_only_min_relative_gain values ('none': the gain)"
    )
    parser.add_argument("--admissions", default="1", help="comma-separated overload_admission values")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sim/stabilizer_sensitivity.csv"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    scenario = Scenario() if args.scenario is None else Scenario.load(args.scenario)
    rows = run(
        scenario,
        [float(x) for x in args.loads.split(",")],
        [float(x) for x in args.gains.split(",")],
        tuple(float(x) for x in args.admissions.split(",")),
        tuple(None if x == "none" else float(x) for x in args.role_only.split(",")),
    )
    with args.out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(row)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
