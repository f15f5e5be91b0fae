"""PuLP backend; the engine (CBC or HiGHS) is selectable."""

from __future__ import annotations

import importlib.util
import math
from typing import Any, ClassVar

from .base import SolverBackend, SolveResult, SolverUnavailableError, SolveStatus, relative_gap
from .model import LinearModel


class PulpBackend(SolverBackend):
    """MILP through PuLP. Engines: ``cbc`` (default, bundled with PuLP) and ``highs`` (needs ``highspy``)."""

    name: ClassVar[str] = "pulp"
    engines: ClassVar[tuple[str, ...]] = ("cbc", "highs")

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("pulp") is not None

    def _pulp(self) -> Any:
        try:
            import pulp
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SolverUnavailableError("backend 'pulp' needs the `pulp` package: pip install pulp") from exc
        return pulp

    def build(self, model: LinearModel) -> Any:
        pulp = self._pulp()
        sense = pulp.LpMaximize if model.maximize else pulp.LpMinimize
        prob = pulp.LpProblem(model.name, sense)
        cat = {True: pulp.LpInteger, False: pulp.LpContinuous}
        xs = [
            _new_variable(
                pulp,
                prob,
                v.name,
                None if math.isinf(v.lb) else v.lb,
                None if math.isinf(v.ub) else v.ub,
                cat[v.is_integer],
            )
            for v in model.variables
        ]
        prob.setObjective(
            pulp.LpAffineExpression([(xs[i], c) for i, c in model.objective.items()], constant=model.objective_offset)
        )
        for con in model.constraints:
            expr = pulp.LpAffineExpression([(xs[i], c) for i, c in con.terms])
            if con.lb == con.ub:
                prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintEQ, rhs=con.ub), name=con.name)
                continue
            if math.isfinite(con.ub):
                prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintLE, rhs=con.ub), name=con.name)
            if math.isfinite(con.lb):
                lb_name = con.name if math.isinf(con.ub) else f"{con.name}__lb"
                prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintGE, rhs=con.lb), name=lb_name)
        return prob, xs

    def _make_solver(self, pulp: Any) -> Any:
        opts = self.options
        if self.engine == "cbc":
            return pulp.PULP_CBC_CMD(
                msg=False,
                timeLimit=opts.time_limit_s,
                gapRel=opts.relative_gap,
                gapAbs=opts.absolute_gap,
                threads=opts.threads,
            )
        solver = pulp.HiGHS(
            msg=False,
            timeLimit=opts.time_limit_s,
            gapRel=opts.relative_gap,
            gapAbs=opts.absolute_gap,
            threads=opts.threads,
        )
        if not solver.available():
            raise SolverUnavailableError("engine 'highs' of backend 'pulp' needs `highspy`: pip install highspy")
        return solver

    def _solve_native(self, native: Any, model: LinearModel) -> SolveResult:
        pulp = self._pulp()
        prob, xs = native
        prob.solve(self._make_solver(pulp))
        status = _status(pulp, prob)
        if not status.has_solution:
            return SolveResult(
                status=status,
                solve_time_ms=0.0,
                backend=self.label,
                message=f"pulp status {pulp.LpStatus[prob.status]}, solution status {prob.sol_status}",
            )
        values = {v.name: float(x.varValue or 0.0) for v, x in zip(model.variables, xs, strict=True)}
        objective = model.evaluate_objective(values)
        bound = objective if status is SolveStatus.OPTIMAL else None
        return SolveResult(
            status=status,
            objective=objective,
            bound=bound,
            gap=relative_gap(objective, bound),
            solve_time_ms=0.0,
            values=values,
            backend=self.label,
        )


def _new_variable(pulp: Any, prob: Any, name: str, lb: float | None, ub: float | None, cat: str) -> Any:
    """A variable attached to ``prob`` (PuLP >= 3.3 API), or a free-standing one on older PuLP."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lowBound=lb, upBound=ub, cat=cat)
    return pulp.LpVariable(name, lowBound=lb, upBound=ub, cat=cat)


def _status(pulp: Any, prob: Any) -> SolveStatus:
    if prob.status == pulp.LpStatusOptimal:
        return SolveStatus.OPTIMAL if prob.sol_status == pulp.LpSolutionOptimal else SolveStatus.FEASIBLE
    if prob.status == pulp.LpStatusInfeasible:
        return SolveStatus.INFEASIBLE
    if prob.status == pulp.LpStatusUnbounded:
        return SolveStatus.UNBOUNDED
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return SolveStatus.FEASIBLE
    if prob.status == pulp.LpStatusNotSolved:
        return SolveStatus.NO_SOLUTION
    return SolveStatus.ERROR
