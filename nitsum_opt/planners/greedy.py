"""The Nitsum paper's allocator, as a baseline and as the MILP's fallback.

GPUs are handed out one instance group at a time. Each round scores every move that could help a tier —
one more colocated, prefill or decode instance, or a prefill + decode pair — as

    score = w_t · gain / GPUs · starvation_t,   starvation_t = λ_t / served_t,

where ``gain`` is the increase of the tier's served rate ``min(λ_t, P_t + Co_t, D_t + Co_t)`` (for the first
instance of a tier this is ``min(λ, R)``, the paper's numerator) and a tier below its minimum admission is
served first. The best move that still fits the nodes is taken; the loop ends when no move gains anything or
nothing fits. Ties break on tier order, then config order, so the result is deterministic. Like the paper's
allocator it only dedicates instances to tiers: its plans have no shared instances.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nitsum_opt.assemble import assemble_plan
from nitsum_opt.models.spec import Role, ServingConfig
from nitsum_opt.plan import Plan, PlanStatus
from nitsum_opt.planners.base import Planner
from nitsum_opt.spec import PlanningInput

_MIN_ADMISSION_BOOST = 1e6


@dataclass
class _TierState:
    demand: float
    weight: float
    min_rate: float
    prefill: float = 0.0
    decode: float = 0.0
    colocated: float = 0.0

    def served(self, dp: float = 0.0, dd: float = 0.0, dc: float = 0.0) -> float:
        return min(self.demand, self.prefill + dp + self.colocated + dc, self.decode + dd + self.colocated + dc)


@dataclass
class _Budget:
    """GPUs left, tracked with the same aggregate rows the formulation uses (exact for aligned packing)."""

    rows: list[tuple[int, int]]  # (min size s, room left for instances of size >= s)

    def fits(self, sizes: tuple[int, ...]) -> bool:
        return all(sum(s for s in sizes if s >= lo) <= room for lo, room in self.rows)

    def take(self, sizes: tuple[int, ...]) -> None:
        self.rows = [(lo, room - sum(s for s in sizes if s >= lo)) for lo, room in self.rows]


def _budget(inp: PlanningInput) -> _Budget:
    nodes, per_node = inp.cluster.num_nodes, inp.cluster.gpus_per_node
    sizes = sorted({c.gpus for c in inp.candidate_configs})
    rows = [(1, nodes * per_node)] + [(s, nodes * s * (per_node // s)) for s in sizes if per_node % s]
    return _Budget(rows=rows)


@dataclass(frozen=True)
class _Move:
    configs: tuple[ServingConfig, ...]
    rates: tuple[float, ...]
    sizes: tuple[int, ...] = ()
    gpus: int = 0
    deltas: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def of(cls, configs: tuple[ServingConfig, ...], rates: tuple[float, ...]) -> _Move:
        dp = dd = dc = 0.0
        for c, r in zip(configs, rates, strict=True):
            if c.role is Role.PREFILL:
                dp += r
            elif c.role is Role.DECODE:
                dd += r
            else:
                dc += r
        sizes = tuple(c.gpus for c in configs)
        return cls(configs, rates, sizes, sum(sizes), (dp, dd, dc))


def _moves(inp: PlanningInput, tier: str) -> list[_Move]:
    rated = [(c, inp.capacity.rate_rps(tier, c)) for c in inp.candidate_configs]
    rated = [(c, r) for c, r in rated if r > 0]
    singles = [_Move.of((c,), (r,)) for c, r in rated]
    prefill = [(c, r) for c, r in rated if c.role is Role.PREFILL]
    decode = [(c, r) for c, r in rated if c.role is Role.DECODE]
    pairs = [_Move.of((p, d), (rp, rd)) for p, rp in prefill for d, rd in decode]
    return singles + pairs


class GreedyPlanner(Planner):
    """The paper's greedy allocator (see the module docstring)."""

    name = "greedy"

    def plan(self, inp: PlanningInput) -> Plan:
        start = time.perf_counter()
        counts = self.allocate(inp)
        return assemble_plan(
            inp,
            counts,
            status=PlanStatus.HEURISTIC,
            planner=self.label,
            solve_time_ms=(time.perf_counter() - start) * 1000.0,
        )

    def allocate(self, inp: PlanningInput) -> dict[tuple[str, ServingConfig], int]:
        """``n[t,c]`` chosen greedily."""
        states = {
            t.name: _TierState(
                demand=inp.demand_rps(t.name), weight=t.weight, min_rate=t.min_admission * inp.demand_rps(t.name)
            )
            for t in inp.tiers
        }
        moves = {t.name: _moves(inp, t.name) for t in inp.tiers}
        budget = _budget(inp)
        counts: dict[tuple[str, ServingConfig], int] = {}
        best = {tier: self._tier_best(st, moves[tier], budget) for tier, st in states.items()}
        while True:
            choice = None
            for tier, cand in best.items():  # tier order breaks ties
                if cand is not None and (choice is None or cand[0] > choice[0] + 1e-12):
                    choice = (cand[0], tier, cand[1])
            if choice is None:
                return counts
            _, tier, move = choice
            budget.take(move.sizes)
            dp, dd, dc = move.deltas
            st = states[tier]
            st.prefill, st.decode, st.colocated = st.prefill + dp, st.decode + dd, st.colocated + dc
            for c in move.configs:
                counts[tier, c] = counts.get((tier, c), 0) + 1
            # Only the served tier's scores changed; other tiers keep their best unless it no longer fits.
            for other, cand in best.items():
                if other == tier or (cand is not None and not budget.fits(cand[1].sizes)):
                    best[other] = self._tier_best(states[other], moves[other], budget)

    @staticmethod
    def _tier_best(st: _TierState, moves: list[_Move], budget: _Budget) -> tuple[float, _Move] | None:
        """Highest-scoring move of one tier that fits (first in config order on ties)."""
        served = st.served()
        if served >= st.demand:
            return None
        starvation = st.demand / served if served > 0 else 1e12
        boost = _MIN_ADMISSION_BOOST if served < st.min_rate else 1.0
        best: tuple[float, _Move] | None = None
        for move in moves:
            gain = st.served(*move.deltas) - served
            if gain <= 1e-12:
                continue
            score = st.weight * gain / move.gpus * boost * starvation
            if (best is None or score > best[0] + 1e-12) and budget.fits(move.sizes):
                best = (score, move)
        return best
