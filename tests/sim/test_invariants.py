"""Whole-run invariants: conservation, switch costs honoured by plan changes, monotonicity in GPUs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nitsum_opt.models.spec import Role
from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.controllers.search import StaticEvaluator, split_deployment
from nitsum_opt.sim.controllers.static import split, vllm_static
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.sim.results import Outcome, RejectReason
from nitsum_opt.sim.settings import SimSettings, SwitchCosts
from nitsum_opt.spec import ClusterSpec
from nitsum_opt.workloads.trace import RequestTrace

from sim_factories import LLAMA, ROOFLINE, TIERS, SmallCache, colocated, poisson_trace, run


class Cycling(Controller):
    """Cycles through deployments, one per epoch (a real controller with frequent plan changes)."""

    def __init__(self, deployments: list[Deployment]) -> None:
        self.deployments = deployments
        self.k = 0

    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        return self.deployments[0]

    def on_epoch(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment | None:
        self.k += 1
        return self.deployments[self.k % len(self.deployments)]


def _pd(tier: str | None, p: tuple[int, ...], d: tuple[int, ...]) -> tuple[DeployedInstance, ...]:
    return (
        DeployedInstance(tier=tier, tp=len(p), role=Role.PREFILL, gpu_ids=p, slo_safe_seqs=8),
        DeployedInstance(tier=tier, tp=len(d), role=Role.DECODE, gpu_ids=d, slo_safe_seqs=64),
    )


SHAPES = [
    Deployment(instances=colocated(4, tier=None)),
    Deployment(
        instances=(
            *_pd("chat", (0,), (1,)),
            DeployedInstance(tier="batch", tp=2, role=Role.COLOCATED, gpu_ids=(2, 3), slo_safe_seqs=16),
        ),
        admitted_rps={"chat": 5.0, "batch": 1.0},
        tier_priority=True,
        spill_over=True,
        central_queue=True,
    ),
    Deployment(instances=colocated(4, tp=4, tier=None), tier_priority=True),
]


class Counting(Simulator):
    """The simulator with every request ending counted."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ends: Counter[int] = Counter()

    def complete(self, r: int, now: float, engine: object) -> None:  # type: ignore[override]
        self.ends[r] += 1
        super().complete(r, now, engine)  # type: ignore[arg-type]

    def reject(self, r: int, now: float, engine: object, reason: int) -> None:  # type: ignore[override]
        self.ends[r] += 1
        super().reject(r, now, engine, reason)  # type: ignore[arg-type]


def test_every_request_ends_exactly_once_through_plan_changes_and_preemption() -> None:
    base = poisson_trace(rate_rps=20.0, duration_s=60.0, seed=11, input_range=(200, 3000), output_range=(1, 600))
    too_long = RequestTrace.from_arrays([5.0, 17.0], [8000, 9000], [400, 10], tier=[0, 1], tier_names=base.tier_names)
    trace = RequestTrace.merge([base, too_long], tier_names=base.tier_names).with_interval(0.0, 60.0)
    settings = SimSettings(epoch_s=7.0, drain_s=900.0, switch=SwitchCosts(standby_wake_s=0.3))
    sim = Counting(trace, TIERS, SmallCache(25_000), LLAMA, ClusterSpec.with_gpus(4), Cycling(SHAPES), settings)
    res = sim.run()
    assert len(res.timeline) >= 8 and res.migrations.sum() > 0 and res.preemptions.sum() > 0
    assert sorted(sim.ends) == list(range(len(trace))) and set(sim.ends.values()) == {1}
    assert set(np.unique(res.outcome)) <= {Outcome.COMPLETED, Outcome.REJECTED}
    rejected = res.outcome == Outcome.REJECTED
    assert rejected.sum() == 2 and (res.reject_reason[rejected] == RejectReason.OVER_MAX_MODEL_LEN).all()
    assert (res.reject_reason[~rejected] == RejectReason.NONE).all()
    done = res.outcome == Outcome.COMPLETED
    assert (res.ttft_s[done] > 0).all() and (res.finish_s[done] >= res.arrival_s[done] + res.ttft_s[done] - 1e-9).all()


def test_unfinished_requests_are_reported_at_the_horizon() -> None:
    trace = poisson_trace(rate_rps=40.0, duration_s=20.0, seed=2, input_range=(3000, 6000), output_range=(300, 800))
    res = run(trace, Deployment(instances=colocated(1)), gpus=1, settings=SimSettings(drain_s=1.0))
    unfinished = res.outcome == Outcome.UNFINISHED
    assert unfinished.any() and np.isnan(res.finish_s[unfinished]).all()
    assert (res.outcome != Outcome.REJECTED).all()


def test_a_paused_engine_serves_nothing_during_its_switch() -> None:
    trace = poisson_trace(rate_rps=8.0, duration_s=40.0, seed=4)
    two_tp1 = Deployment(instances=colocated(2))
    one_tp2 = Deployment(instances=colocated(2, tp=2))
    pause = 1.5
    settings = SimSettings(epoch_s=10.0, drain_s=300.0, switch=SwitchCosts(standby_wake_s=pause))
    sim = Simulator(
        trace, TIERS, ROOFLINE, LLAMA, ClusterSpec.with_gpus(2), Cycling([two_tp1, one_tp2]), settings, True
    )
    res = sim.run()
    assert len(res.switch_windows) >= 4
    for _, gpus, start, end in res.switch_windows:
        assert end - start == pytest.approx(pause)
        for step in res.step_log:
            if set(step.gpu_ids) & set(gpus):
                assert step.end_s <= start + 1e-9 or step.start_s >= end - 1e-9, (step, start, end)
    # a request migrated at a switch finishes only after the new engine woke up
    for t, _ in res.timeline[1:]:
        moved = (res.migrations > 0) & (res.arrival_s < t) & (res.finish_s > t)
        assert (res.finish_s[moved] >= t + pause - 1e-9).all()
    assert (res.outcome == Outcome.COMPLETED).all()


@pytest.mark.parametrize("family", ["vllm-static-tp1", "vllm-static-tp2", "split"])
def test_more_gpus_never_lower_a_static_systems_goodput(family: str) -> None:
    trace = poisson_trace(rate_rps=45.0, duration_s=40.0, seed=9)
    goodputs = []
    for gpus in (2, 4, 8):
        cluster = ClusterSpec.with_gpus(gpus)
        if family == "split":
            dep = split_deployment(StaticEvaluator(trace, TIERS, ROOFLINE, LLAMA, cluster, SimSettings()))
        else:
            dep = vllm_static(cluster, int(family[-1]))
        res = run(trace, dep, gpus=gpus)
        goodputs.append(res.slo_met(TIERS).sum())
    assert goodputs == sorted(goodputs), goodputs
    assert goodputs[-1] > goodputs[0]


def test_split_gives_every_tier_with_demand_its_own_gpus() -> None:
    from nitsum_opt.models.spec import CapacityTable

    table = CapacityTable.from_mapping(
        {"chat": {"tp1-colocated": 2.0, "tp2-colocated": 3.0}, "batch": {"tp1-colocated": 1.0, "tp2-colocated": 1.0}}
    )
    cluster = ClusterSpec.with_gpus(4, gpus_per_node=4)
    tuning = {(t, tp, Role.COLOCATED): (8, None) for t in ("chat", "batch") for tp in (1, 2)}
    dep = split(
        cluster,
        {"chat": 6.0, "batch": 1.0},
        table.model_copy(update={"rates_rps": {k: {**v, "tp4-colocated": 0.5} for k, v in table.rates_rps.items()}}),
        tuning,
    )
    gpus = Counter()
    for inst in dep.instances:
        gpus[inst.tier] += inst.tp
    assert gpus["chat"] == 3 and gpus["batch"] == 1


def test_prepared_ahead_the_old_engines_serve_until_the_new_ones_take_over_without_a_pause() -> None:
    trace = poisson_trace(rate_rps=8.0, duration_s=40.0, seed=4)
    two_tp1 = Deployment(instances=colocated(2))
    one_tp2 = Deployment(instances=colocated(2, tp=2))
    wake = 1.5
    switch = SwitchCosts(standby_wake_s=wake, prepare_ahead=True)
    settings = SimSettings(epoch_s=10.0, drain_s=300.0, switch=switch)
    sim = Simulator(
        trace, TIERS, ROOFLINE, LLAMA, ClusterSpec.with_gpus(2), Cycling([two_tp1, one_tp2]), settings, True
    )
    res = sim.run()
    assert res.switch_windows == ()  # nothing pauses: the new engines were woken while the old ones served
    changes = [t for t, _ in res.timeline[1:]]
    assert changes == pytest.approx([10.0 * k + wake for k in range(1, len(changes) + 1)])  # decided at k·10 s
    served_meanwhile = 0
    for t, dep in res.timeline[1:]:
        for step in res.step_log:  # between a decision and its change the old engines keep stepping
            if t - wake < step.start_s < t - 1e-9:
                assert step.engine_key not in {i.key for i in dep.instances}, (step, t)
                served_meanwhile += 1
    assert served_meanwhile > 0
    assert (res.outcome == Outcome.COMPLETED).all()
