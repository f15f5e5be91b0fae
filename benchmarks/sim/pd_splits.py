"""Static prefill/decode splits for the strictest tier, judged by the simulator: how far apart plans are that the
capacity table ranks close together.

Usage: ``python benchmarks/sim/pd_splits.py [--scenario FILE] [--load 24] [--admission-scale 1]
[--out benchmarks/sim/pd_splits.csv]``

Every plan is built like one of the oracle's tier-aware candidates with admission and Nitsum's planning inputs
(the one planned for the mean demand when it is among the distinct candidates;
:func:`~nitsum_opt.sim.controllers.search.tiered_candidates`; same capacity table, tuning, seats and admission
rule, :func:`~nitsum_opt.sim.controllers.refine.build_variant`), with TP1
instances: ``p`` prefill + ``d`` decode for the strictest tier, optionally one shared colocated instance. One row
per plan: the admitted rate the capacity table gives the strictest tier (times ``--admission-scale``), and the
simulated goodput and per-tier attainment on the scenario's trace at ``--load``.
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

from tqdm import tqdm

from nitsum_opt.models.spec import ServingConfig
from nitsum_opt.sim.controllers.refine import build_variant
from nitsum_opt.sim.controllers.search import StaticEvaluator, TieredOrigin, tiered_candidates
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.spec import SHARED_TIER

ORIGIN = "(admission) [Nitsum planning inputs]"
"""The candidates whose construction the plans copy (the first of them, mean demand first)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=None, help="scenario YAML (default: the bundled one)")
    parser.add_argument("--load", type=float, default=24.0, help="load scale")
    parser.add_argument("--admission-scale", type=float, default=1.0, help="multiply every admitted rate by this")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sim/pd_splits.csv"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    scenario = Scenario() if args.scenario is None else Scenario.load(args.scenario)
    model, _ = scenario.iteration_model()
    trace = scenario.trace(args.load)
    ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, scenario.cluster, scenario.settings)
    origins: dict[str, TieredOrigin] = {}
    tiered_candidates(ev, origins)
    origin = min(
        (o for o in origins.values() if ORIGIN in o.label), key=lambda o: (not o.label.startswith("for mean"),)
    )
    print(f"plans built like the candidate {origin.label!r}")
    strict = min(scenario.tiers, key=lambda t: t.tpot_slo_ms).name
    p1, d1, c1 = (ServingConfig.parse(k) for k in ("tp1-prefill", "tp1-decode", "tp1-colocated"))
    gpus = scenario.cluster.total_gpus
    plans = {f"{p}P+{gpus - p}D": {(strict, p1): p, (strict, d1): gpus - p} for p in range(2, gpus - 1)}
    plans |= {
        f"{p}P+{gpus - 1 - p}D+1 shared": {(strict, p1): p, (strict, d1): gpus - 1 - p, (SHARED_TIER, c1): 1}
        for p in range(3, gpus - 2)
    }
    rows = []
    for name, counts in tqdm(plans.items(), desc="plans"):
        built = build_variant(ev, origin, counts)
        if built is None:
            continue
        dep, _ = built
        if dep.admitted_rps is not None and args.admission_scale != 1.0:
            scaled = {t: r * args.admission_scale for t, r in dep.admitted_rps.items()}
            dep = dep.model_copy(update={"admitted_rps": scaled, "label": f"{dep.label} ×{args.admission_scale:g}"})
        result = ev.simulate(dep)
        met = result.slo_met(scenario.tiers)
        row: dict[str, object] = {
            "plan": name,
            f"admitted_{strict}_rps": round((dep.admitted_rps or {}).get(strict, 0.0), 1),
            "goodput_rps": round(ev.goodput(dep), 2),
        }
        row |= {f"attainment_{t.name}": round(float(met[result.tier == k].mean()), 4) for k, t in enumerate(ev.tiers)}
        rows.append(row)
        print(row)
    with args.out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
