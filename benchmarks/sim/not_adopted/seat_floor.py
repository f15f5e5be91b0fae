"""Throwaway experiment kept for reproducibility (benchmarks/RESULTS.md, "Seats amortized over the host's request
lifetime"): Nitsum with a *seat floor* (no request costs more than 1/k of an instance) at some loads.

    python benchmarks/sim/not_adopted/seat_floor.py base|min<k> SCENARIO.yaml LOADS [SYSTEMS]

e.g. ``min4 examples/scenarios/llama8b-tight-h200x2-runtime.yaml 0.5,0.75,1.0``. The amortized-seats rows of
``seat-variants.txt`` come from ``git apply benchmarks/sim/not_adopted/amortized-seats.diff`` and ``base``."""

from __future__ import annotations

import sys
import time
import warnings

from nitsum_opt.sim.controllers import nitsum as nitsum_controller
from nitsum_opt.sim.controllers import planning, search
from nitsum_opt.sim.runner import run_level
from nitsum_opt.sim.scenario import Scenario

warnings.simplefilter("ignore")
ORIGINAL = planning.seats_table


def main() -> None:
    variant, path, loads = sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3].split(",")]
    systems = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 else ("nitsum",)
    if variant.startswith("min"):
        floor = int(variant[3:])

        def floored(ctx, mixes):  # type: ignore[no-untyped-def]
            out = ORIGINAL(ctx, mixes)
            for row in out.values():
                for tier, seqs in row.items():
                    if seqs > 0:
                        row[tier] = max(seqs, floor)
            return out

        nitsum_controller.seats_table = floored  # type: ignore[assignment]
        search.seats_table = floored  # type: ignore[assignment]
    scenario = Scenario.load(path)
    for load in loads:
        start = time.time()
        for r in run_level(scenario, load, systems=systems).runs:
            m = r.metrics
            tiers = [(t.tier, round(t.attainment, 3)) for t in m.tiers]
            print(
                variant,
                path.split("/")[-1],
                load,
                m.system,
                f"goodput {m.goodput_rps:.2f} att {m.attainment:.3f}",
                tiers,
                f"{time.time() - start:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
