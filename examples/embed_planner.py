"""Embedding the planner in a serving control loop.

Every epoch the loop (1) measures per-tier demand, (2) asks the stabilized MILP planner for a plan, priced
against the plan that runs now, and (3) hands the plan to the runtime (here: prints what would change).
The demand here replays the bundled Azure trace per minute; a real loop reads it from its router's telemetry.

Run: python examples/embed_planner.py
"""

from __future__ import annotations

from pathlib import Path

from nitsum_opt import MilpPlanner, Plan, PlanningInput, StabilizedPlanner, StabilizerSettings
from nitsum_opt.io import load
from nitsum_opt.workloads import default_workload, epoch_demand

EXAMPLE = Path(__file__).parent / "planning" / "three_tiers_8gpu.yaml"


def changes(old: Plan | None, new: Plan) -> str:
    before = {i.instance_id for i in old.instances} if old else set()
    after = {i.instance_id for i in new.instances}
    return f"+{sorted(after - before)} -{sorted(before - after)}" if before != after else "no change"


def main() -> None:
    base = load(PlanningInput, EXAMPLE)
    demand = epoch_demand(default_workload(), epoch_s=60.0)
    planner = StabilizedPlanner(MilpPlanner(time_limit_s=0.5), StabilizerSettings(min_dwell_s=120))
    running: Plan | None = None
    for epoch in range(0, 12):
        now_s = epoch * 60.0
        inp = base.model_copy(
            update={
                "demand": demand.tier_demands(epoch),
                "current_plan": running.as_current() if running else None,
            }
        )
        plan = planner.plan(PlanningInput.model_validate(inp.model_dump()), now_s=now_s)
        rates = ", ".join(f"{a.tier} {a.demand_rps:.1f}→{a.admission_fraction:.0%}" for a in plan.tiers)
        print(f"t={now_s:5.0f}s {plan.status.value:9s} {rates:60s} {changes(running, plan)}")
        running = plan


if __name__ == "__main__":
    main()
