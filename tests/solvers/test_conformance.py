"""Conformance suite every solver backend passes (PuLP ``solver_common.py`` style).

Each backend/engine pair subclasses :class:`BackendConformance`; the tests are known-answer models with
hand-derived optima, typed statuses for infeasible/unbounded models, and export round trips.
"""

from __future__ import annotations

import math

import pytest

from nitsum_opt.solvers import (
    LinearModel,
    SolverOptions,
    SolveStatus,
    get_backend,
    to_mps,
)


def knapsack() -> LinearModel:
    """max 5a+4b+3c s.t. 2a+3b+c <= 5, 4a+b+2c <= 11, 3a+4b+2c <= 8, integer: optimum 13 at (2,0,1)."""
    m = LinearModel("knapsack")
    a, b, c = (m.add_variable(n, 0, 10, integer=True) for n in ("a", "b", "c"))
    m.add_constraint("r1", {a: 2, b: 3, c: 1}, ub=5)
    m.add_constraint("r2", {a: 4, b: 1, c: 2}, ub=11)
    m.add_constraint("r3", {a: 3, b: 4, c: 2}, ub=8)
    m.set_objective({a: 5, b: 4, c: 3})
    return m


def mixed() -> LinearModel:
    """max x + 0.5 y s.t. 2x + y <= 7.3, y <= 3.5, x integer: x=3, y=1.3 -> 3.65 (x=2,y=3.3 gives 3.65 too)."""
    m = LinearModel("mixed")
    x = m.add_variable("x", 0, 10, integer=True)
    y = m.add_variable("y", 0, 3.5)
    m.add_constraint("cap", {x: 2.0, y: 1.0}, ub=7.3)
    m.set_objective({x: 1.0, y: 0.5})
    return m


def ranged_equality_min() -> LinearModel:
    """min 2p + 3q s.t. p + q = 4, 1 <= p - q <= 2, p,q integer: p=3, q=1 -> 9."""
    m = LinearModel("ranged")
    p = m.add_variable("p", -5, 5, integer=True)
    q = m.add_variable("q", -5, 5, integer=True)
    m.add_constraint("sum", {p: 1, q: 1}, lb=4, ub=4)
    m.add_constraint("diff", {p: 1, q: -1}, lb=1, ub=2)
    m.set_objective({p: 2, q: 3}, maximize=False)
    return m


def infeasible() -> LinearModel:
    m = LinearModel("infeasible")
    x = m.add_variable("x", 0, 10, integer=True)
    m.add_constraint("low", {x: 1}, lb=5)
    m.add_constraint("high", {x: 1}, ub=3)
    m.set_objective({x: 1})
    return m


def unbounded() -> LinearModel:
    m = LinearModel("unbounded")
    x = m.add_variable("x", 0, math.inf)
    y = m.add_variable("y", 0, math.inf, integer=True)
    m.add_constraint("c", {x: 1, y: -1}, ub=1)
    m.set_objective({x: 1, y: 1})
    return m


class BackendConformance:
    """Subclasses set ``spec`` (``backend/engine``); ``exact_continuous`` is False for engines that only
    approximate continuous variables (they must then never claim OPTIMAL on such a model)."""

    spec: str
    exact_continuous: bool = True

    def solve(self, model: LinearModel, **opts: float):
        return get_backend(self.spec, SolverOptions(**opts)).solve(model)

    def test_knapsack_known_optimum(self) -> None:
        result = self.solve(knapsack())
        assert result.status is SolveStatus.OPTIMAL
        assert result.objective == pytest.approx(13.0)
        assert knapsack().violations(result.values) == []
        assert result.values == {"a": pytest.approx(2), "b": pytest.approx(0), "c": pytest.approx(1)}

    def test_mixed_integer_continuous(self) -> None:
        result = self.solve(mixed())
        if self.exact_continuous:
            assert result.status is SolveStatus.OPTIMAL
            assert result.objective == pytest.approx(3.65)
        else:
            assert result.status is SolveStatus.FEASIBLE
            assert result.objective <= 3.65 + 1e-6
        assert mixed().violations(result.values) == []

    def test_minimise_with_equality_and_range(self) -> None:
        result = self.solve(ranged_equality_min())
        assert result.status is SolveStatus.OPTIMAL
        assert result.objective == pytest.approx(9.0)
        assert result.values["p"] == pytest.approx(3) and result.values["q"] == pytest.approx(1)

    def test_objective_matches_values(self) -> None:
        model = knapsack()
        result = self.solve(model)
        assert model.evaluate_objective(result.values) == pytest.approx(result.objective)

    def test_infeasible_is_a_status(self) -> None:
        result = self.solve(infeasible())
        assert result.status is SolveStatus.INFEASIBLE
        assert not result.status.has_solution and result.values == {}

    def test_unbounded_is_a_status(self) -> None:
        result = self.solve(unbounded())
        assert result.status in (SolveStatus.UNBOUNDED, SolveStatus.INFEASIBLE, SolveStatus.ERROR)
        assert not result.status.has_solution

    def test_time_is_measured_and_labelled(self) -> None:
        result = self.solve(knapsack())
        assert result.solve_time_ms > 0
        assert result.backend == get_backend(self.spec).label

    def test_mps_export_round_trips_through_pulp(self, tmp_path) -> None:
        pulp = pytest.importorskip("pulp")
        model = knapsack()
        path = tmp_path / "k.mps"
        path.write_text(to_mps(model))
        _, prob = pulp.LpProblem.fromMPS(str(path), sense=pulp.LpMaximize)
        prob.solve(pulp.PULP_CBC_CMD(msg=False))
        assert pulp.value(prob.objective) == pytest.approx(self.solve(model).objective)


class TestOrToolsScip(BackendConformance):
    spec = "ortools/scip"


class TestOrToolsHighs(BackendConformance):
    spec = "ortools/highs"


class TestOrToolsCpSat(BackendConformance):
    spec = "ortools/cpsat"
    exact_continuous = False


class TestPulpCbc(BackendConformance):
    spec = "pulp/cbc"


class TestPulpHighs(BackendConformance):
    spec = "pulp/highs"
