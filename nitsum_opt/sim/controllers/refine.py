"""Local search around the oracle's best tier-aware plan: the hindsight oracle judged by the simulator, not by the
capacity table.

The tier-aware candidates of :func:`~nitsum_opt.sim.controllers.search.tiered_candidates` come from the MILP, which
ranks plans with the capacity table ``R[t,c]``. Where the table cannot tell two plans apart the simulator often can:
at load ×24 of the default scenario the MILP prefers 4 prefill + 3 decode TP1 instances for the interactive tier
plus one shared instance (122.9 vs 117.9 req/s in the table), while the simulator gives 5 prefill + 3 decode
127.3 req/s against 117.1 (``benchmarks/RESULTS.md``). A static oracle in hindsight should find the better one, so
after its search the oracle hill-climbs from its best tier-aware candidate over *neighbouring* plans, each built
exactly like the candidate (same planning input, tuning, seats and admission rule):

* one instance of a tier's prefill/decode pair switched to the other role (same TP, same GPUs);
* one colocated instance (dedicated or shared) turned into a prefill or a decode instance of the strictest tier
  (the lowest TPOT target), the tier for which prefill/decode placement matters most.

Each round simulates the neighbours with the evaluator's branch and bound against the current best and moves to
the best one; it stops when no neighbour wins (or after ``max_rounds``). The result is never worse than the
candidate it started from.
"""

from __future__ import annotations

from nitsum_opt.assemble import assemble_plan
from nitsum_opt.evaluate import Counts
from nitsum_opt.models.spec import Role, ServingConfig
from nitsum_opt.placement import PlacementError
from nitsum_opt.plan import PlanStatus
from nitsum_opt.sim.controllers.search import StaticEvaluator, TieredOrigin, tiered_deployment
from nitsum_opt.sim.deployment import Deployment

MAX_ROUNDS = 6
"""Most hill-climbing rounds (each moves one instance)."""


def _moved(counts: Counts, src: tuple[str, ServingConfig], dst: tuple[str, ServingConfig]) -> Counts:
    out = dict(counts)
    out[src] -= 1
    if out[src] == 0:
        del out[src]
    out[dst] = out.get(dst, 0) + 1
    return out


def neighbours(counts: Counts, strictest: str) -> list[Counts]:
    """The plans one instance move away (see the module docstring), without duplicates."""
    flip = {Role.PREFILL: Role.DECODE, Role.DECODE: Role.PREFILL}
    seen: set[tuple[tuple[str, str, int], ...]] = set()
    out: list[Counts] = []

    def add(moved: Counts) -> None:
        key = tuple(sorted((t, str(c), n) for (t, c), n in moved.items()))
        if key not in seen:
            seen.add(key)
            out.append(moved)

    for (tier, cfg), n in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if n <= 0:
            continue
        if cfg.role in flip:
            add(_moved(counts, (tier, cfg), (tier, ServingConfig(tp=cfg.tp, role=flip[cfg.role]))))
        elif cfg.role is Role.COLOCATED:
            for role in (Role.PREFILL, Role.DECODE):
                add(_moved(counts, (tier, cfg), (strictest, ServingConfig(tp=cfg.tp, role=role))))
    return out


def build_variant(ev: StaticEvaluator, origin: TieredOrigin, counts: Counts) -> tuple[Deployment, TieredOrigin] | None:
    """The deployment of plan ``counts`` built like ``origin``'s (and its origin), or ``None`` when the instances do
    not fit the nodes."""
    try:
        plan = assemble_plan(origin.inp, counts, status=PlanStatus.FEASIBLE, planner="oracle refine", solve_time_ms=0)
    except (PlacementError, ValueError):
        return None  # the moved instances do not fit the nodes, or the plan is not valid
    moved = TieredOrigin(origin.inp, plan.counts(), origin.admit, origin.tuning, origin.seats, origin.label)
    return tiered_deployment(ev, plan, moved), moved


def refine(
    ev: StaticEvaluator, best: Deployment, origins: dict[str, TieredOrigin], max_rounds: int = MAX_ROUNDS
) -> Deployment:
    """Hill-climb from ``best`` when it is a tier-aware candidate (else return it): see the module docstring."""
    origin = origins.get(ev.key(best))
    if origin is None:
        return best
    strictest = min(ev.tiers, key=lambda t: t.tpot_slo_ms).name
    current = best
    for _ in range(max_rounds):
        built = [b for n in neighbours(origin.counts, strictest) if (b := build_variant(ev, origin, n)) is not None]
        if not built:
            break
        by_key = {ev.key(dep): moved for dep, moved in built}
        winner, _ = ev.best([current, *(dep for dep, _ in built)])
        if ev.key(winner) == ev.key(current):
            break
        current = winner.model_copy(update={"label": f"{winner.label} [refined]"})
        origin = by_key[ev.key(winner)]
    return current


__all__ = ["MAX_ROUNDS", "build_variant", "neighbours", "refine"]
