"""Controllers: the registry, Nitsum following a burst, the oracle dominating every static family."""

from __future__ import annotations

import numpy as np
import pytest

from nitsum_opt.sim.controllers.planning import fill_idle_gpus
from nitsum_opt.sim.controllers.registry import SYSTEMS, make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator, oracle_candidates
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.spec import ClusterSpec
from nitsum_opt.workloads.trace import RequestTrace

from sim_factories import LLAMA, ROOFLINE, TIERS, poisson_trace


def _burst_trace(seed: int = 1) -> RequestTrace:
    """chat at 25 req/s throughout; batch at 1 req/s, 30 req/s in the middle third."""
    rng = np.random.default_rng(seed)
    parts = [poisson_trace(25.0, 90.0, seed, tiers=("chat", "batch")).select_tier("chat")]
    for start, rate in ((0.0, 1.0), (30.0, 30.0), (60.0, 1.0)):
        n = rng.poisson(rate * 30.0)
        parts.append(
            RequestTrace.from_arrays(
                np.sort(rng.uniform(start, start + 30.0, n)),
                rng.integers(1000, 3000, n),
                rng.integers(100, 400, n),
                tier=1,
                tier_names=("chat", "batch"),
            )
        )
    return RequestTrace.merge(parts, tier_names=("chat", "batch")).with_interval(0.0, 90.0)


def _evaluator(trace: RequestTrace, gpus: int) -> StaticEvaluator:
    settings = SimSettings(epoch_s=10.0, drain_s=60.0)
    return StaticEvaluator(trace, TIERS, ROOFLINE, LLAMA, ClusterSpec.with_gpus(gpus), settings)


def test_unknown_system_lists_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="valid systems: nitsum, nitsum-greedy"):
        make_controller("vllm", _evaluator(poisson_trace(1.0, 5.0), 2))


def test_tp8_does_not_fit_a_four_gpu_node() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        make_controller("vllm-static-tp8", _evaluator(poisson_trace(1.0, 5.0), 4))


def test_nitsum_moves_gpus_to_the_bursting_tier() -> None:
    ev = _evaluator(_burst_trace(), 8)
    controller = make_controller("nitsum", ev)
    res = Simulator(ev.trace, TIERS, ROOFLINE, LLAMA, ev.cluster, controller, ev.settings).run()

    def batch_gpus(t: float) -> int:
        dep = [d for start, d in res.timeline if start <= t][-1]
        assert dep.gpus_used <= 8 and dep.admitted_rps is not None
        return sum(i.tp for i in dep.instances if i.tier == "batch")

    assert batch_gpus(45.0) > batch_gpus(15.0)
    assert res.slo_met(TIERS).mean() > 0.85


def test_every_system_runs_and_the_oracle_dominates_the_static_ones() -> None:
    ev = _evaluator(poisson_trace(30.0, 40.0, seed=4), 4)
    goodput = {}
    for name in SYSTEMS:
        if name == "vllm-static-tp8":
            continue
        controller = make_controller(name, ev)
        res = Simulator(ev.trace, TIERS, ROOFLINE, LLAMA, ev.cluster, controller, ev.settings).run()
        goodput[name] = res.slo_met(TIERS).sum()
    static = [n for n in goodput if not SYSTEMS[n].adaptive]
    assert goodput["oracle-static"] == max(goodput[n] for n in static)
    assert len(oracle_candidates(ev)) > 20


def test_fill_idle_gpus_uses_the_whole_cluster() -> None:
    from nitsum_opt.planners import MilpPlanner
    from nitsum_opt.sim.controllers.planning import capacity_table
    from nitsum_opt.spec import PlanningInput, TierDemand
    from nitsum_opt.workloads.demand import length_mixes

    ev = _evaluator(poisson_trace(5.0, 30.0), 8)
    inp = PlanningInput(
        cluster=ev.cluster,
        tiers=TIERS,
        demand=(TierDemand(tier="chat", arrival_rate_rps=3.0), TierDemand(tier="batch", arrival_rate_rps=1.0)),
        capacity=capacity_table(ev.ctx, length_mixes(ev.trace)),
    )
    plan = MilpPlanner().plan(inp)
    assert plan.gpus_used < 8
    filled = fill_idle_gpus(inp, plan)
    assert filled.gpus_used == 8
    assert all(a.admitted_rps == pytest.approx(a.demand_rps) for a in filled.tiers)


def test_burst_factor_is_one_for_poisson_and_above_for_bursts() -> None:
    from nitsum_opt.planners import MilpPlanner
    from nitsum_opt.sim.controllers.nitsum import NitsumController

    controller = NitsumController("nitsum", MilpPlanner())
    controller._ttft_s = [0.5, 5.0]
    smooth = poisson_trace(40.0, 300.0, seed=8)
    assert np.allclose(controller._burst_factors(smooth, smooth.tier_names), 1.0, atol=0.05)
    rng = np.random.default_rng(0)
    on = np.concatenate([rng.uniform(k * 20.0, k * 20.0 + 4.0, 200) for k in range(15)])  # 4 s bursts every 20 s
    bursty = RequestTrace.from_arrays(
        on, np.full(on.size, 500), np.full(on.size, 50), tier_names=("chat", "batch"), start_s=0.0, end_s=300.0
    )
    factors = controller._burst_factors(bursty, bursty.tier_names)
    assert factors[0] == pytest.approx(2.0) and factors[1] == 1.0


def test_capacity_tables_are_memoised_and_planned_at_the_raised_percentile() -> None:
    from nitsum_opt.sim.controllers import planning
    from nitsum_opt.sim.controllers.planning import capacity_table, planning_slo
    from nitsum_opt.workloads.demand import length_mixes

    ev = _evaluator(poisson_trace(5.0, 30.0, seed=12), 8)
    mixes = length_mixes(ev.trace)
    first = capacity_table(ev.ctx, mixes)
    rows = len(planning._TABLES)
    assert capacity_table(ev.ctx, mixes) == first and len(planning._TABLES) == rows  # every row memoised
    assert planning_slo(ev.ctx, TIERS[0]).slo_percentile == 97.0
    relaxed = ev.ctx.settings.model_copy(update={"capacity_percentile": None})
    from nitsum_opt.sim.controllers.base import ControlContext

    ctx = ControlContext(ev.cluster, TIERS, LLAMA, ROOFLINE, relaxed)
    assert planning_slo(ctx, TIERS[0]) == TIERS[0].slo
    looser = capacity_table(ctx, mixes)
    assert len(planning._TABLES) == rows + 2
    assert looser.rates_rps["chat"]["tp1-prefill"] >= first.rates_rps["chat"]["tp1-prefill"]


def test_branch_and_bound_search_finds_the_exhaustive_winner() -> None:
    trace = poisson_trace(30.0, 40.0, seed=6)
    pruning = _evaluator(trace, 4)
    candidates = oracle_candidates(pruning)
    winner, scores = pruning.best(candidates)
    exhaustive = _evaluator(trace, 4)
    full = [exhaustive.goodput(d) for d in candidates]
    assert pruning.memo[pruning.key(winner)] == pytest.approx(max(full))
    assert full.index(max(full)) == candidates.index(winner)
    assert any(score is None for _, score in scores)  # some losers were cut short
    assert pruning.goodput(candidates[-1]) == pytest.approx(full[-1])  # a pruned one re-runs fully on demand


def test_role_preference_scales_the_disfavoured_family_only() -> None:
    from nitsum_opt.models.spec import CapacityTable
    from nitsum_opt.sim.controllers.planning import prefer_roles

    row = {"tp1-prefill": 10.0, "tp1-decode": 20.0, "tp1-colocated": 8.0}
    table = CapacityTable(rates_rps={"chat": dict(row), "batch": dict(row)})
    out = prefer_roles(table, TIERS, 0.5)
    # chat has the strictest TPOT: its colocated cell is disfavoured; batch: its prefill and decode cells
    assert out.rates_rps["chat"] == {"tp1-prefill": 10.0, "tp1-decode": 20.0, "tp1-colocated": 4.0}
    assert out.rates_rps["batch"] == {"tp1-prefill": 5.0, "tp1-decode": 10.0, "tp1-colocated": 8.0}
    assert prefer_roles(table, TIERS, 1.0) is table
    assert prefer_roles(CapacityTable(rates_rps={"chat": row}), TIERS[:1], 0.5).rates_rps["chat"] == row


def test_seats_of_heavier_mixes_are_fewer_and_own_seats_match_the_tuning() -> None:
    from nitsum_opt.models.spec import LengthMix, Role
    from nitsum_opt.sim.controllers.planning import seats_table, tuning_table

    ev = _evaluator(poisson_trace(5.0, 30.0), 8)
    mixes = {"chat": LengthMix.single(500, 100), "batch": LengthMix.single(4000, 400)}
    seats = seats_table(ev.ctx, mixes)
    tuning = tuning_table(ev.ctx, mixes)
    for (host, tp, role), row in seats.items():
        assert row[host] == tuning[host, tp, role][0]
    assert seats["chat", 1, Role.DECODE]["batch"] < seats["chat", 1, Role.DECODE]["chat"]
    assert seats["chat", 1, Role.PREFILL]["batch"] < seats["chat", 1, Role.PREFILL]["chat"]


def test_nitsum_deploys_weighted_seats_unless_told_not_to() -> None:
    from nitsum_opt.planners import MilpPlanner
    from nitsum_opt.sim.controllers.nitsum import NitsumController

    ev = _evaluator(_burst_trace(), 8)
    weighted = NitsumController("nitsum", MilpPlanner()).start(ev.ctx, ev.trace.window(0.0, 10.0))
    assert all(i.tier_seqs is not None and set(i.tier_seqs) == {"chat", "batch"} for i in weighted.instances)
    plain = NitsumController("nitsum", MilpPlanner(), weighted_seats=False).start(ev.ctx, ev.trace.window(0.0, 10.0))
    assert all(i.tier_seqs is None for i in plain.instances)


def test_a_candidate_pruned_by_an_earlier_search_can_still_win_a_later_one() -> None:
    ev = _evaluator(poisson_trace(30.0, 40.0, seed=6), 4)
    candidates = oracle_candidates(ev)
    exhaustive = _evaluator(ev.trace, 4)
    full = [exhaustive.goodput(d) for d in candidates]
    ev.best(candidates)
    pruned = [k for k, d in enumerate(candidates) if ev.key(d) in ev.pruned]
    assert pruned
    # a later search over pruned candidates only (each lost to a higher bar) must still find their best
    subset = [candidates[k] for k in pruned]
    winner, _ = ev.best(subset)
    assert ev.memo[ev.key(winner)] == pytest.approx(max(full[k] for k in pruned))


def test_overload_admission_scales_only_tiers_short_of_capacity() -> None:
    from nitsum_opt.planners import MilpPlanner
    from nitsum_opt.sim.controllers.nitsum import NitsumController

    class Recording(NitsumController):
        def _overload_admission(self, deployment, plan):
            out = super()._overload_admission(deployment, plan)
            calls.append((deployment, plan, out))
            return out

    calls: list = []
    ev = _evaluator(poisson_trace(150.0, 20.0, seed=3), 2)
    controller = Recording("nitsum", MilpPlanner(), overload_admission=0.5)
    Simulator(ev.trace, TIERS, ROOFLINE, LLAMA, ev.cluster, controller, ev.settings).run()
    scaled = 0
    for deployment, plan, out in calls:
        short = {a.tier for a in plan.tiers if a.admitted_rps < 0.999 * a.demand_rps}
        for tier, rate in deployment.admitted_rps.items():
            assert out.admitted_rps[tier] == pytest.approx(rate * 0.5 if tier in short else rate)
            scaled += tier in short
    assert calls and scaled > 0, "the trace must overload a tier"
    with pytest.raises(ValueError, match="overload_admission=0"):
        NitsumController("nitsum", MilpPlanner(), overload_admission=0.0)


def test_seat_safety_sets_how_much_of_the_tpot_target_seats_and_budgets_may_take() -> None:
    import dataclasses

    from nitsum_opt.models.spec import LengthMix, Role
    from nitsum_opt.sim.controllers.planning import seats_table, tuning_table
    from nitsum_opt.sim.settings import SimSettings

    ev = _evaluator(poisson_trace(5.0, 30.0), 8)
    mixes = {"chat": LengthMix.single(500, 100), "batch": LengthMix.single(4000, 400)}

    def tuned(safety: float) -> tuple[dict, dict]:
        ctx = dataclasses.replace(ev.ctx, settings=ev.ctx.settings.model_copy(update={"seat_safety": safety}))
        return tuning_table(ctx, mixes), seats_table(ctx, mixes)

    (loose, loose_seats), (tight, tight_seats) = tuned(1.0), tuned(0.6)
    assert ev.ctx.settings.seat_safety == 0.85  # the default
    assert tight["chat", 1, Role.COLOCATED][0] < loose["chat", 1, Role.COLOCATED][0]
    assert tight["chat", 1, Role.PREFILL][0] < loose["chat", 1, Role.PREFILL][0]
    assert tight["chat", 1, Role.DECODE][1] <= loose["chat", 1, Role.DECODE][1]  # the step budget
    assert tight_seats["chat", 1, Role.DECODE]["batch"] <= loose_seats["chat", 1, Role.DECODE]["batch"]
    with pytest.raises(ValueError, match="seat_safety"):
        SimSettings(seat_safety=1.2)
