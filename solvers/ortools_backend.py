"""OR-Tools MathOpt backend; the engine (SCIP, HiGHS or CP-SAT) is selectable."""

from __future__ import annotations

import importlib.util
import math
from datetime import timedelta
from typing import Any, ClassVar

from .base import SolverBackend, SolveResult, SolverUnavailableError, SolveStatus, relative_gap
from .model import LinearModel

_ENGINE_TYPES = {"scip": "GSCIP", "highs": "HIGHS", "cpsat": "CP_SAT"}


class OrToolsBackend(SolverBackend):
    """MILP through ``ortools.math_opt``. Engines: ``scip`` (default), ``highs``, ``cpsat``.

    CP-SAT is exact on pure-integer models only: it scales continuous variables to integers, so on a model
    with continuous variables its "optimal" is approximate and is reported as ``FEASIBLE`` (never ``OPTIMAL``).
    """

    name: ClassVar[str] = "ortools"
    engines: ClassVar[tuple[str, ...]] = ("scip", "highs", "cpsat")

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("ortools") is not None

    def _mathopt(self) -> Any:
        try:
            from ortools.math_opt.python import mathopt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SolverUnavailableError("backend 'ortools' needs the `ortools` package: pip install ortools") from exc
        return mathopt

    def build(self, model: LinearModel) -> Any:
        mathopt = self._mathopt()
        native = mathopt.Model(name=model.name)
        xs = [native.add_variable(lb=v.lb, ub=v.ub, is_integer=v.is_integer, name=v.name) for v in model.variables]
        for con in model.constraints:
            expr = mathopt.fast_sum(coef * xs[i] for i, coef in con.terms)
            native.add_linear_constraint(lb=con.lb, ub=con.ub, expr=expr, name=con.name)
        objective = mathopt.fast_sum(coef * xs[i] for i, coef in model.objective.items()) + model.objective_offset
        native.set_objective(objective, is_maximize=model.maximize)
        return native, xs

    def _solve_native(self, native: Any, model: LinearModel) -> SolveResult:
        mathopt = self._mathopt()
        native_model, xs = native
        params = mathopt.SolveParameters(
            time_limit=timedelta(seconds=self.options.time_limit_s),
            relative_gap_tolerance=self.options.relative_gap,
            absolute_gap_tolerance=self.options.absolute_gap,
            # MathOpt's HiGHS interface rejects a thread count (HiGHS MIP search is single-threaded anyway).
            threads=None if self.engine == "highs" else self.options.threads,
            enable_output=False,
        )
        if self.engine == "scip":
            # SCIP's HARD_LP emphasis spends less time in root cut rounds; on the allocation MILP (a few dozen
            # integers) that cut the p90 solve time ~3x and the p99 ~1.5x versus default settings
            # (benchmarks/RESULTS.md, "Planner solve time").
            from ortools.math_opt.solvers.gscip import gscip_pb2

            params.gscip.emphasis = gscip_pb2.GScipParameters.HARD_LP
        solver_type = getattr(mathopt.SolverType, _ENGINE_TYPES[self.engine])
        result = mathopt.solve(native_model, solver_type, params=params)
        status = _status(mathopt, result)
        if not status.has_solution:
            return SolveResult(
                status=status, solve_time_ms=0.0, backend=self.label, message=str(result.termination.detail)
            )
        if status is SolveStatus.OPTIMAL and self.engine == "cpsat" and model.num_integer < len(model.variables):
            status = SolveStatus.FEASIBLE
        values = result.variable_values()
        objective = float(result.objective_value())
        bound = _finite_or_none(result.best_objective_bound())
        return SolveResult(
            status=status,
            objective=objective,
            bound=bound,
            gap=relative_gap(objective, bound),
            solve_time_ms=0.0,
            values={v.name: float(values[x]) for v, x in zip(model.variables, xs, strict=True)},
            backend=self.label,
        )


def _status(mathopt: Any, result: Any) -> SolveStatus:
    reason = result.termination.reason
    reasons = mathopt.TerminationReason
    if reason == reasons.OPTIMAL:
        return SolveStatus.OPTIMAL
    if reason == reasons.INFEASIBLE:
        return SolveStatus.INFEASIBLE
    if reason in (reasons.UNBOUNDED, reasons.INFEASIBLE_OR_UNBOUNDED):
        return SolveStatus.UNBOUNDED if reason == reasons.UNBOUNDED else SolveStatus.INFEASIBLE
    if reason == reasons.FEASIBLE:
        return SolveStatus.FEASIBLE
    if reason == reasons.NO_SOLUTION_FOUND:
        return SolveStatus.NO_SOLUTION
    if result.has_primal_feasible_solution():
        return SolveStatus.FEASIBLE
    return SolveStatus.ERROR


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
