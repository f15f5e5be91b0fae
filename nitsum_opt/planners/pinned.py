"""A user's fixed plan: the same instances every epoch, with admission recomputed for the current demand."""

from __future__ import annotations

import time
from collections.abc import Iterable

from nitsum_opt.assemble import assemble_plan
from nitsum_opt.models.spec import ServingConfig
from nitsum_opt.plan import Plan, PlanStatus
from nitsum_opt.planners.base import Planner
from nitsum_opt.spec import SHARED_TIER, InstanceCount, PlanningInput


class PinnedPlanner(Planner):
    """Always the given instances (e.g. a static deployment to compare against); tier ``"*"`` pins shared
    instances, whose split between the tiers is recomputed with the admissions."""

    name = "pinned"

    def __init__(self, counts: Iterable[InstanceCount]) -> None:
        self.counts: dict[tuple[str, ServingConfig], int] = {}
        for ic in counts:
            self.counts[ic.tier, ic.config] = self.counts.get((ic.tier, ic.config), 0) + ic.count

    def plan(self, inp: PlanningInput) -> Plan:
        start = time.perf_counter()
        tiers = {t.name for t in inp.tiers}
        unknown = sorted({t for t, _ in self.counts if t not in tiers and t != SHARED_TIER})
        if unknown:
            raise ValueError(
                f"pinned plan names tiers {unknown} that are not in the input ({sorted(tiers)}, or '*' for shared)"
            )
        not_shared = sorted({c.key for t, c in self.counts if t == SHARED_TIER and c.role not in inp.shared_roles})
        if not_shared:
            raise ValueError(
                f"pinned plan has shared ('*') instances of {not_shared}, but the input's shared_roles is "
                f"{[r.value for r in inp.shared_roles]}; add the role to PlanningInput.shared_roles"
            )
        used = sum(c.gpus * k for (_, c), k in self.counts.items())
        if used > inp.cluster.total_gpus:
            raise ValueError(
                f"pinned plan needs {used} GPUs but the cluster has {inp.cluster.total_gpus}; shrink the plan"
            )
        return assemble_plan(
            inp,
            self.counts,
            status=PlanStatus.PINNED,
            planner=self.label,
            solve_time_ms=(time.perf_counter() - start) * 1000.0,
        )
