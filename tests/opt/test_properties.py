"""Invariants on random instances (hypothesis): MILP >= greedy, backends agree, evaluate_plan agrees."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nitsum_opt import GreedyPlanner, MilpPlanner, PlanStatus, check_plan, evaluate_plan
from nitsum_opt.bench.instances import random_planning_input

SCIP = MilpPlanner("ortools/scip", time_limit_s=60)
HIGHS = MilpPlanner("ortools/highs", time_limit_s=60)
CBC = MilpPlanner("pulp/cbc", time_limit_s=60)
GREEDY = GreedyPlanner()

instances = st.builds(
    lambda seed, gpus, tiers, minimum: random_planning_input(
        np.random.default_rng(seed), gpus, num_tiers=tiers, min_admission=minimum
    ),
    seed=st.integers(0, 2**32 - 1),
    gpus=st.sampled_from([2, 4, 8, 16, 32, 64]),
    tiers=st.integers(1, 3),
    minimum=st.booleans(),
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(inp=instances)
def test_milp_never_worse_than_greedy(inp) -> None:
    milp, greedy = SCIP.plan(inp), GREEDY.plan(inp)
    greedy_eval = evaluate_plan(inp, greedy)
    if milp.status is PlanStatus.OPTIMAL and greedy_eval.feasible:
        assert milp.objective >= greedy_eval.objective - 1e-6 * max(1.0, abs(milp.objective))


@SETTINGS
@given(inp=instances)
def test_evaluate_plan_agrees_with_the_solver(inp) -> None:
    plan = SCIP.plan(inp)
    if plan.status is PlanStatus.OPTIMAL:
        check_plan(inp, plan)  # raises on any violation or objective mismatch
    else:
        assert plan.status is PlanStatus.FALLBACK and plan.message


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inp=instances)
def test_backends_agree_on_the_optimum(inp) -> None:
    results = [p.plan(inp) for p in (SCIP, HIGHS, CBC)]
    statuses = {r.status for r in results}
    assert len(statuses) == 1, statuses
    if results[0].status is PlanStatus.OPTIMAL:
        objectives = [r.objective for r in results]
        assert max(objectives) - min(objectives) <= 1e-6 * max(1.0, abs(objectives[0]))


@SETTINGS
@given(inp=instances)
def test_plans_are_deterministic(inp) -> None:
    a, b = SCIP.plan(inp), SCIP.plan(inp)
    assert a.instances == b.instances and a.tiers == b.tiers
    assert a.provenance == b.provenance
