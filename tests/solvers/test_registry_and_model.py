"""Registry errors, the model IR's own checks, and LP export details."""

from __future__ import annotations

import math

import pytest

from nitsum_opt.solvers import (
    LinearModel,
    ModelError,
    available_backends,
    backend_names,
    get_backend,
    parse_solver_spec,
    to_lp,
    write_model,
)


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown solver 'gurobi'.*ortools.*pulp"):
        get_backend("gurobi")


def test_unknown_engine_lists_engines() -> None:
    with pytest.raises(ValueError, match=r"no engine 'glpk'.*scip"):
        get_backend("ortools/glpk")


def test_registry_names_and_availability() -> None:
    assert backend_names() == ["ortools", "pulp"]
    assert set(available_backends()) == {"ortools", "pulp"}
    assert parse_solver_spec("pulp/highs") == ("pulp", "highs")
    assert parse_solver_spec("ortools") == ("ortools", None)


def test_model_rejects_duplicate_names_and_bad_bounds() -> None:
    m = LinearModel("m")
    x = m.add_variable("x", 0, 1)
    with pytest.raises(ModelError, match="used twice"):
        m.add_variable("x")
    with pytest.raises(ModelError, match="empty or NaN bounds"):
        m.add_variable("z", 2, 1)
    with pytest.raises(ModelError, match="non-finite coefficient"):
        m.add_constraint("c", {x: math.nan}, ub=1)
    with pytest.raises(ModelError, match="whitespace"):
        m.add_variable("has space")


def test_violations_report_each_broken_row() -> None:
    m = LinearModel("m")
    x = m.add_variable("x", 0, 3, integer=True)
    m.add_constraint("cap", {x: 1}, ub=2)
    assert m.violations({"x": 1.0}) == []
    problems = m.violations({"x": 2.5})
    assert any("not integral" in p for p in problems) and any("cap" in p for p in problems)


def test_lp_text_is_deterministic_and_named() -> None:
    def build() -> LinearModel:
        m = LinearModel("demo")
        n = m.add_variable("n[chat,tp2-decode]", 0, 4, integer=True)
        y = m.add_variable("y[chat]", 0)
        m.add_constraint("decode_capacity[chat]", {y: 1, n: -2.5}, ub=0)
        m.set_objective({y: 2.0, n: -0.0002})
        return m

    text = to_lp(build())
    assert text == to_lp(build())
    assert " decode_capacity(chat): y(chat) - 2.5 n(chat,tp2_decode) <= 0" in text
    assert "General\n n(chat,tp2_decode)" in text


def test_write_model_checks_suffix(tmp_path) -> None:
    m = LinearModel("m")
    m.add_variable("x", 0, 1)
    assert write_model(m, tmp_path / "a.lp").read_text().startswith("\\ Model m")
    with pytest.raises(ValueError, match=r"\.lp or \.mps"):
        write_model(m, tmp_path / "a.txt")
