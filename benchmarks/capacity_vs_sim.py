"""Check every capacity-table cell against the request-level simulator: SLO attainment at R and at 1.2·R.

Usage: ``python benchmarks/capacity_vs_sim.py [--model llama-3.1-8b] [--tiers examples/capacity/tiers.yaml]
[--requests 4000] [--seeds 2] [--out benchmarks/results/capacity_vs_sim.csv]``

For each (tier, config) it builds ``R`` with :func:`build_capacity_cells`, then simulates one instance fed
Poisson arrivals at ``R`` and ``1.2·R`` (``--seeds`` runs of ``--requests`` requests each, warm-up dropped)
and records the share of requests meeting the role's SLO. Also times the table build (median of 5, CPU and
wall).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from nitsum_opt.models.bundle import load_performance_model
from nitsum_opt.models.capacity import build_capacity_cells, load_tiers_file
from nitsum_opt.models.reqsim import simulate_instance
from nitsum_opt.models.spec import ServingConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--tiers", type=Path, default=Path("examples/capacity/tiers.yaml"))
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/capacity_vs_sim.csv"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    pm = load_performance_model(args.model)
    request = load_tiers_file(args.tiers)
    configs = request.serving_configs(pm.tps)
    walls, cpus = [], []
    for _ in range(5):
        wall, cpu = time.perf_counter(), time.process_time()
        cells = build_capacity_cells(pm, request.tiers, configs, request.options, pm.engine_args)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    budget, max_seqs = request.options.resolved(pm.engine_args)
    rows = []
    todo = [(t, c) for t in request.tiers for c in configs]
    for tier, config in tqdm(todo, desc="cells"):
        cell = cells[tier.name][config.key]
        row = {
            "tier": tier.name,
            "config": config.key,
            "rate_rps": cell.rate_rps,
            "binding": cell.binding,
            "percentile": tier.slo.slo_percentile,
        }
        for factor in (1.0, 1.2):
            if cell.rate_rps <= 0:
                row[f"attainment_at_{factor:g}R"] = float("nan")
                continue
            att = [
                simulate_instance(
                    pm,
                    config.tp,
                    ServingConfig.parse(config.key).role,
                    tier.length_mix,
                    cell.rate_rps * factor,
                    n_requests=args.requests,
                    seed=seed,
                    max_num_batched_tokens=budget,
                    max_num_seqs=max_seqs,
                ).attainment(tier.slo, config.role)
                for seed in range(args.seeds)
            ]
            row[f"attainment_at_{factor:g}R"] = float(np.mean(att)) * 100
        rows.append(row)
    df = pd.DataFrame(rows)
    target = df["percentile"]
    df["holds_at_R"] = df["attainment_at_1R"] >= target - 1.0
    df["fails_at_1.2R"] = df["attainment_at_1.2R"] < target
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False, float_format="%.3f")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(
        f"\nbuild: median wall {np.median(walls) * 1000:.0f} ms, median CPU {np.median(cpus) * 1000:.0f} ms "
        f"({len(request.tiers)} tiers x {len(configs)} configs)"
    )
    print(
        f"holds at R (within 1 pp): {int(df['holds_at_R'].sum())}/{len(df)}; "
        f"fails at 1.2R: {int(df['fails_at_1.2R'].sum())}/{len(df)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
