"""Shared instances in the simulator: deployment, the controllers that plan them, and the oracle's candidates."""

from __future__ import annotations

import pytest

from nitsum_opt.models.spec import Role
from nitsum_opt.planners import MilpPlanner, PinnedPlanner
from nitsum_opt.sim.controllers.base import StaticController
from nitsum_opt.sim.controllers.nitsum import NitsumController
from nitsum_opt.sim.controllers.planning import (
    candidate_configs,
    capacity_table,
    shared_capacity_table,
    tuning_table,
)
from nitsum_opt.sim.controllers.registry import make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator, tiered_candidates
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.deployment import deployment_from_plan, shared_host_tier
from nitsum_opt.sim.results import Outcome
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.spec import SHARED_TIER, ClusterSpec, InstanceCount, PlanningInput, TierDemand
from nitsum_opt.workloads.demand import length_mixes

from sim_factories import LLAMA, ROOFLINE, TIERS, poisson_trace


def _evaluator(gpus: int = 4) -> StaticEvaluator:
    trace = poisson_trace(12.0, 40.0, seed=3)
    return StaticEvaluator(trace, TIERS, ROOFLINE, LLAMA, ClusterSpec.with_gpus(gpus), SimSettings(epoch_s=10.0))


def _input(ev: StaticEvaluator) -> PlanningInput:
    return PlanningInput(
        cluster=ev.cluster,
        tiers=TIERS,
        demand=tuple(TierDemand(tier=t.name, arrival_rate_rps=3.0) for t in TIERS),
        capacity=capacity_table(ev.ctx, length_mixes(ev.trace)),
        configs=candidate_configs(ev.ctx),
    )


def test_shared_instances_deploy_untiered_and_tuned_for_the_strictest_tier() -> None:
    ev = _evaluator()
    inp = _input(ev)
    shared = next(c for c in inp.candidate_configs if c.role is Role.COLOCATED and c.tp == 1)
    plan = PinnedPlanner([InstanceCount(tier=SHARED_TIER, config=shared, count=2)]).plan(inp)
    strictest = min(TIERS, key=lambda t: t.tpot_slo_ms).name
    assert shared_host_tier(plan, TIERS, shared) == strictest
    tuning = tuning_table(ev.ctx, length_mixes(ev.trace))
    dep = deployment_from_plan(plan, tuning, tiers=TIERS)
    assert [i.tier for i in dep.instances] == [None, None]
    assert {i.max_num_batched_tokens for i in dep.instances} == {tuning[strictest, 1, Role.COLOCATED][1]}
    assert dep.tier_priority and dep.admitted_rps is not None
    with pytest.raises(ValueError, match="pass the tiers"):
        deployment_from_plan(plan, tuning)
    res = Simulator(ev.trace, TIERS, ROOFLINE, LLAMA, ev.cluster, make_controller("split", ev), ev.settings).run()
    assert res.slo_met(TIERS).sum() > 0


def test_nitsum_pools_on_ties_and_the_dedicated_ablation_never_shares() -> None:
    ev = _evaluator(8)
    window = ev.trace.window(0.0, 10.0)
    pooled = NitsumController("nitsum", MilpPlanner()).start(ev.ctx, window)
    assert any(i.tier is None for i in pooled.instances)  # what the MILP plans is pooled (idle GPUs filled per tier)
    dedicated = make_controller("nitsum-dedicated", ev).start(ev.ctx, window)
    assert all(i.tier is not None for i in dedicated.instances)
    for name in ("nitsum", "nitsum-dedicated"):
        res = Simulator(ev.trace, TIERS, ROOFLINE, LLAMA, ev.cluster, make_controller(name, ev), ev.settings).run()
        assert res.slo_met(TIERS).mean() > 0.8, name


def test_oracle_plans_with_and_without_shared_instances() -> None:
    labels = [d.label for d in tiered_candidates(_evaluator(8))]
    assert any("[dedicated only]" in label and "*:" not in label for label in labels)
    assert any("[shared, ties pooled]" in label and "*:" in label for label in labels)


def test_shared_table_prices_tiers_at_the_slackened_strictest_tpot() -> None:
    ev = _evaluator()
    mixes = length_mixes(ev.trace)
    strictest = min(t.tpot_slo_ms for t in TIERS)
    own = capacity_table(ev.ctx, mixes)
    exact = shared_capacity_table(ev.ctx, mixes, 1.0, tpot_slack=1.0)
    loose = shared_capacity_table(ev.ctx, mixes, 1.0, tpot_slack=1e9)  # = each tier at its own TPOT
    slack2 = shared_capacity_table(ev.ctx, mixes, 1.0, tpot_slack=2.0)
    for tier in TIERS:
        for config, rate in exact.rates_rps[tier.name].items():
            assert rate <= slack2.rates_rps[tier.name][config] + 1e-9 <= loose.rates_rps[tier.name][config] + 2e-9
            assert loose.rates_rps[tier.name][config] == pytest.approx(own.rates_rps[tier.name][config])
            if tier.tpot_slo_ms <= strictest * 2:  # its own TPOT is within the slack: priced as if alone
                assert slack2.rates_rps[tier.name][config] == pytest.approx(own.rates_rps[tier.name][config])
    with pytest.raises(ValueError, match=r"tpot_slack=0\.5"):
        shared_capacity_table(ev.ctx, mixes, 1.0, tpot_slack=0.5)


def test_shared_decode_cells_are_priced_at_the_strictest_tpot_itself() -> None:
    ev = _evaluator()
    mixes = length_mixes(ev.trace)
    roles = (Role.COLOCATED, Role.PREFILL, Role.DECODE)
    slack2 = shared_capacity_table(ev.ctx, mixes, 1.0, tpot_slack=2.0, roles=roles)
    exact = shared_capacity_table(ev.ctx, mixes, 1.0, tpot_slack=1.0, roles=roles)
    colocated_only = shared_capacity_table(ev.ctx, mixes, 1.0, tpot_slack=2.0)
    for tier in TIERS:
        row = slack2.rates_rps[tier.name]
        assert {k.split("-", 1)[1] for k in row} == {"colocated", "prefill", "decode"}
        assert set(colocated_only.rates_rps[tier.name]) == {k for k in row if k.endswith("colocated")}
        for key, rate in row.items():
            if not key.endswith("colocated"):  # the slack applies to colocated cells only
                assert rate == pytest.approx(exact.rates_rps[tier.name][key])


def test_a_shared_prefill_decode_pair_deploys_and_serves_every_tier() -> None:
    ev = _evaluator(2)
    roles = (Role.COLOCATED, Role.PREFILL, Role.DECODE)
    inp = _input(ev).model_copy(update={"shared_roles": roles})
    pair = [
        InstanceCount(tier=SHARED_TIER, config=c, count=1)
        for c in inp.candidate_configs
        if c.tp == 1 and c.role in (Role.PREFILL, Role.DECODE)
    ]
    plan = PinnedPlanner(pair).plan(inp)
    mixes = length_mixes(ev.trace)
    dep = deployment_from_plan(plan, tuning_table(ev.ctx, mixes), tiers=TIERS)
    assert sorted((i.tier, i.role.value) for i in dep.instances) == [(None, "decode"), (None, "prefill")]
    res = Simulator(ev.trace, TIERS, ROOFLINE, LLAMA, ev.cluster, StaticController("pair", dep), ev.settings).run()
    assert (res.outcome == Outcome.COMPLETED).all()  # hand-offs from the shared prefill all found the decode
    assert res.slo_met(TIERS).mean() > 0.8
    controller = make_controller("nitsum-shared-pd", ev)
    assert isinstance(controller, NitsumController) and controller.shared_roles == roles
