"""Switch-cost sensitivity of the Nitsum controller: its goodput, engine switches and KV migrations on one scenario
under several plan-change costs.

Usage: ``python benchmarks/sim/switch_sensitivity.py [--scenario FILE] [--loads 10,14]
[--out benchmarks/sim/switch_sensitivity.csv]``

Settings (everything else as in the scenario; the defaults of :class:`~nitsum_opt.sim.settings.SwitchCosts` are
the H200 measurements):

* ``engine switch 0.26 s`` — the scenario's switch costs (bundled default: standby engines, 0.26 s pause);
* ``engine switch 0.5 s`` — standby engines with a 0.5 s pause (the default before the H200 measurement);
* ``restart only`` — no standby engines (``use_standby=False``): every new or re-shaped instance pauses for the
  restart time (50.4 s by default).

One row per (setting, load): goodput req/s, attainment, engine switches (engines started by plan changes) and
KV migrations, as ``nitsum bench goodput`` counts them (:class:`~nitsum_opt.sim.metrics.RunMetrics`).
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from nitsum_opt.sim.runner import run_level
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.settings import SwitchCosts

SETTINGS: dict[str, Callable[[SwitchCosts], SwitchCosts]] = {
    "engine switch 0.26 s (measured default)": lambda sw: sw,
    "engine switch 0.5 s": lambda sw: sw.model_copy(update={"standby_wake_s": 0.5}),
    "restart only (no standby engines)": lambda sw: sw.model_copy(update={"use_standby": False}),
}
"""Label → the switch costs derived from the scenario's."""


def run(
    base: Scenario, loads: tuple[float, ...], base_dir: Path | None = None, system: str = "nitsum"
) -> list[dict[str, object]]:
    """One row per (setting, load) for ``system`` (``base_dir``: where the scenario's relative paths start)."""
    rows: list[dict[str, object]] = []
    todo = [(label, load) for label in SETTINGS for load in loads]
    for label, load in tqdm(todo, desc="runs"):
        switch = SETTINGS[label](base.settings.switch)
        settings = base.settings.model_copy(update={"switch": switch})
        scenario = base.model_copy(update={"settings": settings, "systems": (system,)})
        start = time.perf_counter()
        level = run_level(scenario, load, base_dir)
        (sys_run,) = level.runs
        m = sys_run.metrics
        rows.append(
            {
                "setting": label,
                "switch_s": switch.switch_s,
                "load_scale": load,
                "goodput_rps": round(m.goodput_rps, 3),
                "attainment": round(m.attainment, 4),
                "engine_switches": m.engine_switches,
                "migrations": m.migrations,
                "deployments": m.deployments,
                "wall_s": round(time.perf_counter() - start, 1),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=None, help="scenario YAML (default: the bundled one)")
    parser.add_argument("--loads", default="10,14", help="comma-separated load scales")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sim/switch_sensitivity.csv"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    scenario = Scenario() if args.scenario is None else Scenario.load(args.scenario)
    loads = tuple(float(x) for x in args.loads.split(","))
    start = time.perf_counter()
    rows = run(scenario, loads, None if args.scenario is None else args.scenario.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
    for row in rows:
        print(
            f"{row['setting']:<42} ×{row['load_scale']:g}: {row['goodput_rps']:.1f} req/s "
            f"({100 * float(row['attainment']):.1f} %), {row['engine_switches']} switches, "
            f"{row['migrations']} migrations"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
