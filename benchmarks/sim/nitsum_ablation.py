"""Ablation of the Nitsum controller on a scenario: its goodput with each knob changed, next to oracle-static with
and without the tier-aware plans made with Nitsum's planning inputs and scheduler.

Usage: ``python benchmarks/sim/nitsum_ablation.py [--scenario FILE] [--loads 4,6,8,10,12,14]
[--out benchmarks/sim/nitsum_ablation.csv]``

Variants (every other knob at the controller's default):

* ``before`` — the controller as it was before the role preference and the weighted seats
  (``role_preference=1``, ``weighted_seats=False``);
* ``+role-preference`` — ``before`` plus the role preference (``weighted_seats=False``);
* ``default`` — the current controller (role preference and weighted seats);
* ``default, no burst factor`` / ``max burst factor 1.5`` / ``dwell 60 s`` / ``last-window forecast`` — one knob
  of the default changed.

Oracle columns: ``oracle-static`` (the registry's search: every static family) and ``oracle-static (plain tiered
family only)`` (the same search without the tier-aware plans made with Nitsum's planning inputs and scheduler, i.e.
the oracle as it was before those were added). Each row also gives the ratio to the full oracle.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from nitsum_opt.planners import MilpPlanner, StabilizerSettings
from nitsum_opt.sim.controllers.base import Controller
from nitsum_opt.sim.controllers.nitsum import NitsumController
from nitsum_opt.sim.controllers.refine import refine
from nitsum_opt.sim.controllers.search import StaticEvaluator, TieredOrigin, oracle_candidates
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.workloads.forecast import LastWindowForecaster

Variant = Callable[[Scenario], Controller]


def _nitsum(**knobs: object) -> Variant:
    def make(sc: Scenario) -> Controller:
        rest = dict(knobs)
        stabilizer = rest.pop("stabilizer", sc.stabilizer)
        forecaster = rest.pop("forecaster", sc.forecaster)
        return NitsumController(
            "nitsum",
            MilpPlanner(time_limit_s=sc.milp_time_limit_s),
            forecaster,  # type: ignore[arg-type]
            stabilizer,  # type: ignore[arg-type]
            **rest,  # type: ignore[arg-type]
        )

    return make


VARIANTS: dict[str, Callable[[], Variant]] = {
    "before": lambda: _nitsum(role_preference=1.0, weighted_seats=False),
    "+role-preference": lambda: _nitsum(weighted_seats=False),
    "default": lambda: _nitsum(),
    "default, no burst factor": lambda: _nitsum(burst_quantile=None),
    "default, max burst factor 1.5": lambda: _nitsum(max_burst_factor=1.5),
    "default, dwell 60 s": lambda: _nitsum(stabilizer=StabilizerSettings(min_dwell_s=60.0)),
    "default, last-window forecast": lambda: _nitsum(forecaster=LastWindowForecaster(headroom=0.1)),
}


def run(scenario: Scenario, loads: tuple[float, ...]) -> list[dict[str, object]]:
    """One row per (load, variant) and two oracle rows per load."""
    model, _ = scenario.iteration_model()
    rows: list[dict[str, object]] = []
    for load in tqdm(loads, desc="loads"):
        trace = scenario.trace(load)
        ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, scenario.cluster, scenario.settings)
        span = trace.duration_s
        origins: dict[str, TieredOrigin] = {}
        candidates = oracle_candidates(ev, origins)
        plain = [d for d in candidates if "[Nitsum planning inputs]" not in d.label]
        oracle_plain, _ = ev.best(plain)
        oracle = refine(ev, ev.best(candidates)[0], origins)  # as the registry's oracle-static
        best = ev.memo[ev.key(oracle)]
        for name, dep in (("oracle-static (plain tiered family only)", oracle_plain), ("oracle-static", oracle)):
            res = ev.results[ev.key(dep)]
            met = res.slo_met(scenario.tiers)
            rows.append(_row(load, name, met.sum() / span, met.mean(), best, 0, dep.describe()))
        for name, make in VARIANTS.items():
            controller = make()(scenario)
            start = time.perf_counter()
            sim = Simulator(
                trace, scenario.tiers, model, scenario.model_spec, scenario.cluster, controller, scenario.settings
            )
            res = sim.run()
            met = res.slo_met(scenario.tiers)
            rows.append(
                _row(
                    load,
                    name,
                    met.sum() / span,
                    met.mean(),
                    best,
                    len(res.switch_windows),
                    f"{time.perf_counter() - start:.1f} s",
                )
            )
    return rows


def _row(
    load: float, system: str, goodput: float, attainment: float, oracle: float, switches: int, note: str
) -> dict[str, object]:
    return {
        "load_scale": load,
        "system": system,
        "goodput_rps": round(float(goodput), 3),
        "attainment": round(float(attainment), 4),
        "vs_oracle_static": round(float(goodput) / max(oracle, 1e-9), 4),
        "engine_switches": switches,
        "note": note,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=None, help="scenario YAML (default: the bundled one)")
    parser.add_argument("--loads", default=None, help="comma-separated load scales (default: the scenario's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sim/nitsum_ablation.csv"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    scenario = Scenario() if args.scenario is None else Scenario.load(args.scenario)
    loads = scenario.load_scales if args.loads is None else tuple(float(x) for x in args.loads.split(","))
    rows = run(scenario, loads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
