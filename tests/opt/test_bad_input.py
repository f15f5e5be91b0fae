"""Bad input gets a clear error that names the field and the fix; a failed solve is a typed status."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from nitsum_opt import ClusterSpec, MilpPlanner, PlanStatus, ServingConfig, Tier, TierDemand, evaluate_plan
from nitsum_opt.bench.instances import random_planning_input
from nitsum_opt.io import ConfigError, load
from nitsum_opt.spec import PlanningInput

from planning_factories import make_input

RATES = {"chat": {"tp1-colocated": 2.0, "tp2-colocated": 5.0}}


@pytest.mark.parametrize("rate", [-1.0, math.nan, math.inf])
def test_negative_or_nan_rate(rate: float) -> None:
    with pytest.raises(ValidationError, match="arrival_rate_rps"):
        TierDemand(tier="chat", arrival_rate_rps=rate)


def test_negative_capacity_names_the_cell() -> None:
    with pytest.raises(ValidationError, match=r"rates_rps\.chat\.tp1-colocated"):
        make_input({"chat": {"tp1-colocated": -2.0}}, {"chat": 1})


def test_zero_gpus() -> None:
    with pytest.raises(ValidationError, match="num_nodes"):
        ClusterSpec(num_nodes=0, gpus_per_node=8)
    with pytest.raises(ValueError, match="at least one GPU"):
        ClusterSpec.with_gpus(0)


def test_tp_larger_than_a_node() -> None:
    with pytest.raises(ValidationError, match=r"tp8-colocated needs 8 GPUs in one node but cluster.gpus_per_node=4"):
        make_input({"chat": {"tp8-colocated": 9.0}}, {"chat": 1}, gpus_per_node=4)


def test_unsupported_tp() -> None:
    with pytest.raises(ValidationError, match=r"tp=3 is not supported; use one of \[1, 2, 4, 8\]"):
        ServingConfig(tp=3, role="decode")
    with pytest.raises(ValueError, match="not of the form tp<N>-<role>"):
        ServingConfig.parse("tp2-both")


def test_unknown_solver() -> None:
    with pytest.raises(ValueError, match=r"unknown solver 'cplex'; valid solvers: ortools"):
        MilpPlanner(solver="cplex")


def test_slo_no_config_can_meet() -> None:
    with pytest.raises(ValidationError, match=r"no candidate config can meet tier 'chat'.*relax the SLO"):
        make_input({"chat": {"tp1-colocated": 0.0, "tp2-prefill": 3.0}}, {"chat": 1})


def test_missing_capacity_cell() -> None:
    inp = make_input(RATES, {"chat": 1})
    data = inp.model_dump()
    data["configs"] = [*data["configs"], {"tp": 4, "role": "decode"}]
    with pytest.raises(ValidationError, match=r"missing cells \['chat/tp4-decode'\].*restrict `configs`"):
        PlanningInput.model_validate(data)


def test_demand_must_cover_every_tier() -> None:
    inp = make_input(RATES, {"chat": 1})
    data = inp.model_dump()
    data["demand"] = []
    with pytest.raises(ValidationError, match="demand must list every tier exactly once"):
        PlanningInput.model_validate(data)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Tier(name="chat", ttft_slo_ms=1, tpot_slo_ms=1, ttft_ms=3)


def test_malformed_yaml_names_line_and_column(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cluster:\n  num_nodes: 1\n   gpus_per_node: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:\d+: malformed YAML"):
        load(PlanningInput, path)


def test_invalid_yaml_lists_each_field(tmp_path) -> None:
    data = make_input(RATES, {"chat": 1}).model_dump(mode="json")
    data["cluster"]["gpus_per_node"] = 0
    data["tiers"][0]["ttft_slo_ms"] = -5
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load(PlanningInput, path)
    assert "cluster.gpus_per_node" in str(err.value) and "tiers.0.ttft_slo_ms" in str(err.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(PlanningInput, tmp_path / "nope.yaml")


def test_current_plan_larger_than_the_cluster() -> None:
    with pytest.raises(ValidationError, match="current_plan uses 16 GPUs but the cluster has 8"):
        make_input(RATES, {"chat": 1}, current={("chat", "tp2-colocated"): 8})


def test_solver_timeout_is_a_typed_fallback() -> None:
    """A limit too short to find any solution returns the greedy plan with a FALLBACK status, no exception."""
    inp = random_planning_input(np.random.default_rng(1), 4096, with_current_plan=True)
    for solver in ("ortools/scip", "pulp/cbc"):
        plan = MilpPlanner(solver, time_limit_s=1e-6).plan(inp)
        assert plan.status is PlanStatus.FALLBACK, solver
        assert "no_solution" in plan.message and "greedy" in plan.message
        assert evaluate_plan(inp, plan).feasible
