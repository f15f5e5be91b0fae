"""The exact planner: the allocation MILP (``nitsum_opt.formulation``) solved by any registered backend.

If the solver returns no solution (infeasible minimum admissions, time limit without incumbent, solver
error), the planner returns the greedy plan with status ``FALLBACK`` and the reason in ``message``; a time-limit
incumbent comes back as ``FEASIBLE`` with its gap. It never raises for those.
"""

from __future__ import annotations

import time

from nitsum_opt.admission import prefer_dedicated
from nitsum_opt.assemble import assemble_plan
from nitsum_opt.evaluate import objective_value
from nitsum_opt.formulation import build_formulation
from nitsum_opt.plan import Plan, PlanStatus
from nitsum_opt.planners.base import Planner
from nitsum_opt.planners.greedy import GreedyPlanner
from nitsum_opt.solvers import SolverOptions, SolveStatus, get_backend
from nitsum_opt.spec import SHARED_TIER, PlanningInput


class MilpPlanner(Planner):
    """Exact allocation by mixed-integer programming.

    Args:
        solver: ``backend[/engine]``, e.g. ``ortools`` (SCIP), ``ortools/highs``, ``ortools/cpsat``, ``pulp``
            (CBC) or ``pulp/highs``. Unknown names raise at construction with the list of valid ones.
        time_limit_s: wall-clock limit of one solve.
        relative_gap: optimality tolerance.
        shared: whether the plan may use shared instances (colocated instances serving every tier with tier
            priority, ``s[c]`` and ``x[t,c]`` in :mod:`nitsum_opt.formulation`); ``False`` = dedicated instances only.
    """

    name = "milp"

    def __init__(
        self, solver: str = "ortools", time_limit_s: float = 1.0, relative_gap: float = 1e-9, shared: bool = True
    ) -> None:
        self.options = SolverOptions(time_limit_s=time_limit_s, relative_gap=relative_gap)
        self.shared = shared
        self.backend = get_backend(solver, self.options)
        self.fallback = GreedyPlanner()

    @property
    def label(self) -> str:
        shared = "" if self.shared else ", shared=False"
        return (
            f"milp({self.backend.label}, time_limit_s={self.options.time_limit_s:g}, "
            f"gap={self.options.relative_gap:g}{shared})"
        )

    def plan(self, inp: PlanningInput) -> Plan:
        start = time.perf_counter()
        formulation = build_formulation(inp, shared=self.shared)
        result = self.backend.solve(formulation.model)
        if not result.status.has_solution:
            return self._fallback(inp, start, f"MILP {result.status.value}: {result.message or 'no solution'}")
        status = PlanStatus.OPTIMAL if result.status is SolveStatus.OPTIMAL else PlanStatus.FEASIBLE
        counts = formulation.counts(result.values)
        admitted = formulation.admitted(result.values)
        shared = formulation.shared_rates(result.values)
        objective = result.objective
        if any(t == SHARED_TIER for t, _ in counts):  # ties between shared and dedicated go to dedicated
            counts, shared = prefer_dedicated(inp, counts, shared)
            objective = max(objective, objective_value(inp, counts, admitted))
        return assemble_plan(
            inp,
            counts,
            status=status,
            planner=self.label,
            solve_time_ms=(time.perf_counter() - start) * 1000.0,
            admitted_rps=admitted,
            shared_rps=shared,
            objective=objective,
            objective_bound=result.bound,
            gap=result.gap,
            solver=self.backend.label,
        )

    def _fallback(self, inp: PlanningInput, start: float, reason: str) -> Plan:
        counts = self.fallback.allocate(inp)
        return assemble_plan(
            inp,
            counts,
            status=PlanStatus.FALLBACK,
            planner=f"{self.label} -> greedy",
            solve_time_ms=(time.perf_counter() - start) * 1000.0,
            solver=self.backend.label,
            message=f"{reason}; returned the greedy plan",
        )
