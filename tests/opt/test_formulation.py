"""Known-answer instances (hand-derived optima), golden LP files, and the formulation's structure."""

from __future__ import annotations

from pathlib import Path

import pytest

from nitsum_opt import MilpPlanner, PlanStatus, check_plan
from nitsum_opt.formulation import build_formulation, instance_upper_bound
from nitsum_opt.models.spec import ServingConfig
from nitsum_opt.solvers import to_lp

from planning_canonical import GOLDEN, churn, odd_nodes, prefill_decode_split, single_tier_tp_choice, weighted_tiers
from planning_factories import counts_by_key

GOLDEN_DIR = Path(__file__).with_name("goldens")


@pytest.fixture(params=["ortools/scip", "ortools/highs", "pulp/cbc", "pulp/highs"])
def planner(request) -> MilpPlanner:
    return MilpPlanner(solver=request.param, time_limit_s=60)


def test_tp_choice(planner: MilpPlanner) -> None:
    inp = single_tier_tp_choice()
    plan = planner.plan(inp)
    assert plan.status is PlanStatus.OPTIMAL
    assert plan.objective == pytest.approx(9.96)
    assert counts_by_key(plan) == {("chat", "tp2-colocated"): 2}
    check_plan(inp, plan)


def test_prefill_decode_split(planner: MilpPlanner) -> None:
    inp = prefill_decode_split()
    plan = planner.plan(inp)
    assert plan.objective == pytest.approx(8 - 0.008)
    assert counts_by_key(plan) == {("chat", "tp2-prefill"): 2, ("chat", "tp2-decode"): 2}
    alloc = plan.tier_allocation("chat")
    assert (alloc.prefill_capacity_rps, alloc.decode_capacity_rps, alloc.admitted_rps) == (12, 8, 8)
    assert alloc.best_effort_rps == pytest.approx(92)
    check_plan(inp, plan)


@pytest.mark.parametrize(
    ("switch_cost_s", "objective", "counts"),
    [
        (6.0, 8.96, {("chat", "tp4-colocated"): 1}),
        (0.6, 10 - 0.04 - 8 * 0.025, {("chat", "tp2-colocated"): 2}),
    ],
)
def test_churn_prices_a_switch(planner: MilpPlanner, switch_cost_s: float, objective: float, counts) -> None:
    inp = churn(switch_cost_s)
    plan = planner.plan(inp)
    assert plan.objective == pytest.approx(objective)
    assert counts_by_key(plan) == counts
    check_plan(inp, plan)


@pytest.mark.parametrize(("min_b", "objective", "y_b"), [(0.0, 12.0, 0.0), (0.2, 11.0, 2.0)])
def test_weights_and_min_admission(planner: MilpPlanner, min_b: float, objective: float, y_b: float) -> None:
    inp = weighted_tiers(min_b)
    plan = planner.plan(inp)
    assert plan.objective == pytest.approx(objective)
    assert plan.tier_allocation("b").admitted_rps == pytest.approx(y_b)
    assert plan.tier_allocation("b").best_effort_rps == pytest.approx(10 - y_b)
    check_plan(inp, plan)


def test_node_packing_is_enforced(planner: MilpPlanner) -> None:
    inp = odd_nodes()
    plan = planner.plan(inp)
    assert plan.objective == pytest.approx(28.0)
    assert counts_by_key(plan) == {("chat", "tp4-colocated"): 2, ("chat", "tp1-colocated"): 4}
    check_plan(inp, plan)
    assert sorted({i.node for i in plan.instances if i.tp == 4}) == [0, 1]


def test_min_admission_infeasible_falls_back_to_greedy() -> None:
    inp = weighted_tiers(min_admission_b=0.9)  # needs 9 req/s of b = 4.5 GPUs of 4
    plan = MilpPlanner().plan(inp)
    assert plan.status is PlanStatus.FALLBACK
    assert "infeasible" in plan.message and "greedy" in plan.message
    assert plan.gpus_used == 4


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "dedicated"])
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_lp(name: str, shared: bool) -> None:
    expected = (GOLDEN_DIR / f"{name}{'' if shared else '.dedicated'}.lp").read_text()
    assert to_lp(build_formulation(GOLDEN[name](), shared=shared).model) == expected, (
        f"formulation changed for {name}; if intended, run `python tests/opt/regen_goldens.py` and review the diff"
    )


def test_solver_visible_names_follow_the_math() -> None:
    model = build_formulation(churn(6.0)).model
    names = {v.name for v in model.variables} | {c.name for c in model.constraints}
    for expected in (
        "n[chat,tp2-colocated]",
        "b[chat]",
        "tier_gpus[chat]",
        "y[chat]",
        "up[chat,tp4-colocated]",
        "down[chat,tp4-colocated]",
        "demand_cap[chat]",
        "gpu_budget",
        "prefill_capacity[chat]",
        "decode_capacity[chat]",
        "churn_balance[chat,tp4-colocated]",
    ):
        assert expected in names
    assert not any(n.startswith("node_packing") for n in names)  # 4 GPUs per node: every size divides it
    packing = {c.name for c in build_formulation(odd_nodes()).model.constraints}
    assert "node_packing[4]" in packing


def test_upper_bound_is_derived_from_demand() -> None:
    inp = single_tier_tp_choice()
    assert instance_upper_bound(inp, "chat", ServingConfig.parse("tp1-colocated")) == 4  # ceil(10/2)=5, fit=4
    assert instance_upper_bound(inp, "chat", ServingConfig.parse("tp2-colocated")) == 2
    # tp4 (9 req/s) is dominated by two tp2 on the same GPUs (10 req/s) and is not running: fixed to 0
    assert instance_upper_bound(inp, "chat", ServingConfig.parse("tp4-colocated")) == 0
    # ... unless it is running (removing it would be churn)
    assert instance_upper_bound(churn(6.0), "chat", ServingConfig.parse("tp4-colocated")) == 1


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_lp_solves_to_the_planner_optimum(name: str) -> None:
    """The LP text is a faithful model: HiGHS reading the file finds the planner's optimum."""
    highspy = pytest.importorskip("highspy")
    solver = highspy.Highs()
    solver.setOptionValue("output_flag", False)
    assert solver.readModel(str(GOLDEN_DIR / f"{name}.lp")) == highspy.HighsStatus.kOk
    solver.run()
    inp = GOLDEN[name]()
    assert solver.getInfo().objective_function_value == pytest.approx(MilpPlanner().plan(inp).objective)
