"""Shared instances: known answers where pooling strictly wins and where it does not, the dedicated-only switch,
the plan types and the re-check of the time-sharing rows."""

from __future__ import annotations

import pytest
import yaml

from nitsum_opt import MilpPlanner, Plan, PlanStatus, check_plan, evaluate_plan
from nitsum_opt.io import dump_text
from nitsum_opt.models.spec import Role, ServingConfig
from nitsum_opt.planners import GreedyPlanner, PinnedPlanner, StabilizerSettings, StabilizerState, stabilize
from nitsum_opt.spec import SHARED_TIER, InstanceCount

from planning_canonical import pooled_fractions
from planning_factories import counts_by_key, make_input

BACKENDS = ["ortools/scip", "ortools/highs", "ortools/cpsat", "pulp/cbc", "pulp/highs"]


@pytest.mark.parametrize("solver", BACKENDS)
def test_sharing_strictly_wins_when_tiers_need_fractions(solver: str) -> None:
    inp = pooled_fractions()
    plan = MilpPlanner(solver=solver, time_limit_s=60).plan(inp)
    # CP-SAT scales continuous variables and reports FEASIBLE for any model that has them (dedicated-only too)
    assert plan.status is (PlanStatus.FEASIBLE if solver == "ortools/cpsat" else PlanStatus.OPTIMAL)
    assert plan.objective == pytest.approx(30 - 0.5 * 3, abs=1e-6)
    assert counts_by_key(plan) == {("a", "tp1-colocated"): 1, ("b", "tp1-colocated"): 1, ("*", "tp1-colocated"): 1}
    assert {a.tier: a.shared_rps for a in plan.tiers} == pytest.approx({"a": 5.0, "b": 5.0})
    assert [a.admitted_rps for a in plan.tiers] == pytest.approx([15.0, 15.0])
    assert evaluate_plan(inp, plan).objective == pytest.approx(plan.objective, abs=1e-6)
    check_plan(inp, plan)


@pytest.mark.parametrize("solver", ["ortools/scip", "pulp/highs"])
def test_dedicated_only_is_the_old_model(solver: str) -> None:
    plan = MilpPlanner(solver=solver, shared=False).plan(pooled_fractions())
    assert plan.objective == pytest.approx(28.0)
    assert counts_by_key(plan) == {("a", "tp1-colocated"): 2, ("b", "tp1-colocated"): 2}
    assert not any(i.shared for i in plan.instances)
    assert all(not a.shared_rates_rps for a in plan.tiers)


@pytest.mark.parametrize(
    ("inp", "why"),
    [
        (pooled_fractions(shared_rate=5.0), "sharing halves the rate"),
        (pooled_fractions(demand_rps=10.0), "whole instances"),
    ],
)
def test_sharing_does_not_win(inp, why: str) -> None:
    plan = MilpPlanner().plan(inp)
    dedicated = MilpPlanner(shared=False).plan(inp)
    assert not any(i.shared for i in plan.instances), why
    assert plan.objective == pytest.approx(dedicated.objective)
    check_plan(inp, plan)


def test_shared_plan_round_trips_yaml_and_json() -> None:
    plan = MilpPlanner().plan(pooled_fractions())
    for again in (
        Plan.model_validate(yaml.safe_load(dump_text(plan, "yaml"))),
        Plan.model_validate_json(dump_text(plan, "json")),
    ):
        assert again == plan
        assert again.shared_rates() == plan.shared_rates()


def test_evaluate_catches_overbooked_shared_instances() -> None:
    inp = pooled_fractions()
    plan = MilpPlanner().plan(inp)
    tiers = tuple(
        a.model_copy(update={"shared_rates_rps": {"tp1-colocated": 8.0}, "admitted_rps": 18.0}) for a in plan.tiers
    )
    bad = plan.model_copy(update={"tiers": tiers})
    violations = evaluate_plan(inp, bad).violations
    assert any("need 1.6 instances, the plan has 1" in v for v in violations), violations
    assert any("admitted 18 req/s > demand 15" in v for v in violations), violations


def test_evaluate_catches_shared_rate_on_a_config_without_shared_instances() -> None:
    inp = pooled_fractions()
    plan = MilpPlanner(shared=False).plan(inp)
    tiers = tuple(a.model_copy(update={"shared_rates_rps": {"tp1-colocated": 1.0}}) for a in plan.tiers)
    violations = evaluate_plan(inp, plan.model_copy(update={"tiers": tiers})).violations
    assert any("need 0.2 instances, the plan has 0" in v for v in violations), violations


def test_greedy_never_shares() -> None:
    plan = GreedyPlanner().plan(pooled_fractions())
    assert not any(i.shared for i in plan.instances)
    check_plan(pooled_fractions(), plan)


def test_pinned_accepts_shared_instances_and_splits_them() -> None:
    inp = pooled_fractions()
    pinned = PinnedPlanner(
        [InstanceCount(tier=SHARED_TIER, config=ServingConfig.parse("tp1-colocated"), count=3)]
    ).plan(inp)
    assert [a.admitted_rps for a in pinned.tiers] == pytest.approx([15.0, 15.0])
    assert sum(a.shared_rps for a in pinned.tiers) == pytest.approx(30.0)
    check_plan(inp, pinned)


def test_pinned_rejects_shared_prefill() -> None:
    with pytest.raises(ValueError, match=r"add the role to PlanningInput\.shared_roles"):
        PinnedPlanner([InstanceCount(tier=SHARED_TIER, config=ServingConfig.parse("tp1-prefill"), count=1)]).plan(
            pooled_fractions()
        )


def test_running_shared_instances_are_priced_as_churn() -> None:
    inp = pooled_fractions()
    first = MilpPlanner().plan(inp)
    again = inp.model_copy(update={"current_plan": first.as_current()})
    second = MilpPlanner().plan(again)
    assert counts_by_key(second) == counts_by_key(first)
    assert {i.instance_id: i.gpu_ids for i in second.instances} == {i.instance_id: i.gpu_ids for i in first.instances}
    check_plan(again, second)


def test_stabilizer_keeps_a_running_shared_plan() -> None:
    inp = pooled_fractions()
    plan = MilpPlanner().plan(inp)
    first = stabilize(inp, plan, 0.0, StabilizerState(), StabilizerSettings())
    later = pooled_fractions(demand_rps=15.3).model_copy(update={"current_plan": plan.as_current()})
    candidate = MilpPlanner(shared=False).plan(later)  # a dedicated-only candidate is no better: keep the pool
    decision = stabilize(later, candidate, 60.0, first.state, StabilizerSettings(demand_band=0.0))
    assert not decision.switched, decision.reason
    assert decision.plan.counts() == plan.counts()
    assert decision.plan.status is PlanStatus.KEPT
    check_plan(later, decision.plan)


def _pd_pair_input(shared_roles: tuple[Role, ...]):
    """2 GPUs, prefill and decode TP1 only (R = 2 req/s for both tiers and roles), λ_a = λ_b = 1, ε = 0.1: each
    tier needs half a prefill and half a decode instance. Dedicated pairs serve one tier (objective 2·1 − 0.2 = 1.8
    with weights 2 and 1); a shared prefill + decode pair serves both (3 − 0.2 = 2.8)."""
    rates = {"a": {"tp1-prefill": 2, "tp1-decode": 2}, "b": {"tp1-prefill": 2, "tp1-decode": 2}}
    inp = make_input(rates, {"a": 1.0, "b": 1.0}, gpus_per_node=2, gpu_cost=0.1, weights={"a": 2.0, "b": 1.0})
    return inp.model_copy(update={"shared_roles": shared_roles})


@pytest.mark.parametrize("solver", ["ortools/scip", "ortools/highs", "pulp/cbc", "pulp/highs"])
def test_a_shared_prefill_decode_pair_serves_every_tier(solver: str) -> None:
    inp = _pd_pair_input((Role.COLOCATED, Role.PREFILL, Role.DECODE))
    plan = MilpPlanner(solver=solver, time_limit_s=60).plan(inp)
    assert counts_by_key(plan) == {("*", "tp1-prefill"): 1, ("*", "tp1-decode"): 1}
    assert [a.admitted_rps for a in plan.tiers] == pytest.approx([1.0, 1.0])
    assert plan.objective == pytest.approx(2.8, abs=1e-6)
    for a in plan.tiers:  # each side counts only its own role's shared rate
        assert a.prefill_capacity_rps == pytest.approx(1.0) and a.decode_capacity_rps == pytest.approx(1.0)
        assert a.shared_rates_rps == pytest.approx({"tp1-prefill": 1.0, "tp1-decode": 1.0})
    check_plan(inp, plan)


def test_without_shared_prefill_decode_one_tier_gets_the_pair() -> None:
    plan = MilpPlanner().plan(_pd_pair_input((Role.COLOCATED,)))
    assert counts_by_key(plan) == {("a", "tp1-prefill"): 1, ("a", "tp1-decode"): 1}
    assert [a.admitted_rps for a in plan.tiers] == pytest.approx([1.0, 0.0])
    assert plan.objective == pytest.approx(1.8)


def test_shared_prefill_without_shared_decode_needs_decode_capacity() -> None:
    inp = _pd_pair_input((Role.PREFILL,))  # tier b can be prefilled on the shared instance, never decoded
    pinned = PinnedPlanner(
        [
            InstanceCount(tier=SHARED_TIER, config=ServingConfig.parse("tp1-prefill"), count=1),
            InstanceCount(tier="a", config=ServingConfig.parse("tp1-decode"), count=1),
        ]
    ).plan(inp)
    assert [a.admitted_rps for a in pinned.tiers] == pytest.approx([1.0, 0.0])
    check_plan(inp, pinned)


def test_evaluate_names_shared_roles_the_input_does_not_allow() -> None:
    inp = _pd_pair_input((Role.COLOCATED, Role.PREFILL, Role.DECODE))
    plan = MilpPlanner().plan(inp)
    narrow = inp.model_copy(update={"shared_roles": (Role.COLOCATED,)})
    violations = evaluate_plan(narrow, plan).violations
    assert any("shared instances of tp1-prefill: shared_roles is ['colocated']" in v for v in violations), violations
    with pytest.raises(ValueError, match="add 'decode' to shared_roles"):
        narrow.model_validate(narrow.model_dump() | {"current_plan": plan.as_current().model_dump()})
