"""The multi-tier scheduler as pure logic: admission, routing, spill-over, central queue, hand-off, carry-over."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nitsum_opt.models.spec import Role
from nitsum_opt.scheduler import (
    MultiTierScheduler,
    RequestClass,
    SchedulerConfig,
    SchedulerInstance,
    TierPolicy,
    TokenBucket,
)

FEASIBLE, BEST_EFFORT, BACKGROUND = (int(c) for c in RequestClass)


def tiers(chat_rps: float | None = 10.0, batch_rps: float | None = 1.0) -> tuple[TierPolicy, ...]:
    return (
        TierPolicy(name="chat", admitted_rps=chat_rps, ttft_slo_ms=500, tpot_slo_ms=40, priority=0),
        TierPolicy(name="batch", admitted_rps=batch_rps, ttft_slo_ms=5000, tpot_slo_ms=150, priority=1),
    )


def inst(iid: str, tier: str | None, cap: int = 2, role: Role = Role.COLOCATED) -> SchedulerInstance:
    return SchedulerInstance(instance_id=iid, tier=tier, role=role, slo_safe_seqs=cap)


def sched(*instances: SchedulerInstance, **kwargs: object) -> MultiTierScheduler:
    config = SchedulerConfig(tiers=kwargs.pop("tiers", tiers()), instances=instances, **kwargs)  # type: ignore[arg-type]
    return MultiTierScheduler(config)


def test_token_bucket_admits_its_rate_and_burst() -> None:
    bucket = TokenBucket(rate_rps=2.0, burst_s=1.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]  # depth 2
    assert not bucket.take(0.4)  # 0.8 tokens back
    assert bucket.take(0.5)  # 1.0 token back
    admitted = sum(bucket.take(1.0 + k * 0.01) for k in range(1000))  # 10 s at 100 req/s offered
    assert 19 <= admitted <= 22


def test_admission_splits_feasible_and_best_effort() -> None:
    s = sched(inst("a", "chat", cap=100), inst("b", "batch", cap=100), tiers=tiers(chat_rps=1.0, batch_rps=0.0))
    # a fresh bucket holds max(1, 1 req/s × 2 s) = 2 tokens; a rate of 0 admits nothing
    assert [s.submit(0.0, r, 0)[1] for r in range(3)] == [FEASIBLE, FEASIBLE, BEST_EFFORT]
    assert s.submit(0.0, 3, 1)[1] == BEST_EFFORT
    assert s.submit(1.0, 4, 0)[1] == FEASIBLE  # one token refilled after a second


def test_no_admission_control_makes_everything_feasible() -> None:
    s = sched(inst("a", None, cap=1), tiers=tiers(None, None), central_queue=False)
    assert all(s.submit(0.0, r, r % 2) == (0, FEASIBLE) for r in range(10))
    assert s.load == [10]


def test_least_loaded_within_the_tier() -> None:
    s = sched(inst("a", "chat", cap=4), inst("b", "chat", cap=2), inst("c", "batch", cap=9))
    targets = [s.submit(0.0, r, 0)[0] for r in range(4)]
    # fills by load / capacity: a(0/4) b(0/2) a(1/4) then a(2/4)=b(1/2) → first lowest index wins
    assert targets == [0, 1, 0, 0]
    assert s.load == [3, 1, 0]


def test_feasible_spills_only_to_stricter_tiers_then_waits() -> None:
    s = sched(inst("chat", "chat", cap=1), inst("batch", "batch", cap=5), tiers=tiers(100.0, 100.0))
    assert s.submit(0.0, 0, 1) == (1, FEASIBLE)  # batch request on its own instance
    for r in range(1, 5):
        s.submit(0.0, r, 1)
    assert s.load == [0, 5]
    assert s.submit(0.0, 5, 1) == (0, FEASIBLE)  # batch full: the stricter chat instance has room
    assert s.submit(0.0, 6, 0) == (-1, FEASIBLE)  # chat full: batch is looser, so the chat request waits
    assert s.held == 1


def test_best_effort_spills_anywhere_and_is_held_without_room() -> None:
    s = sched(inst("chat", "chat", cap=1), inst("batch", "batch", cap=1), tiers=tiers(0.0, 0.0))
    assert s.submit(0.0, 0, 0) == (0, BEST_EFFORT)
    assert s.submit(0.0, 1, 0) == (1, BEST_EFFORT)  # spill to the looser tier is fine for best-effort
    assert s.submit(0.0, 2, 0) == (-1, BEST_EFFORT)
    no_spill = sched(
        inst("chat", "chat", cap=1), inst("batch", "batch", cap=1), tiers=tiers(0.0, 0.0), spill_over=False
    )
    no_spill.submit(0.0, 0, 0)
    assert no_spill.submit(0.0, 1, 0) == (-1, BEST_EFFORT)


def test_without_central_queue_requests_join_the_least_loaded_instance() -> None:
    s = sched(inst("a", "chat", cap=1), inst("b", "chat", cap=1), tiers=tiers(0.0, 0.0), central_queue=False)
    assert [s.submit(0.0, r, 0)[0] for r in range(4)] == [0, 1, 0, 1]
    assert s.held == 0


def test_release_serves_feasible_then_best_effort_then_background() -> None:
    s = sched(inst("a", "chat", cap=1), tiers=tiers(chat_rps=1.0))
    assert s.submit(0.0, 0, 0) == (0, FEASIBLE)
    assert s.submit(0.0, 1, 0) == (-1, FEASIBLE)  # full: feasible waits centrally
    s._buckets[0].level = 0.0  # type: ignore[union-attr]
    assert s.submit(0.1, 2, 0) == (-1, BEST_EFFORT)
    assert s.release(0.2, 0) == [(1, 0, 0, FEASIBLE)]
    assert s.release(0.3, 0) == [(2, 0, 0, BEST_EFFORT)]
    assert s.held == 0 and s.load == [1]


def test_requests_past_their_ttft_are_demoted_to_background() -> None:
    s = sched(inst("a", "chat", cap=1), tiers=tiers(0.0, 0.0))
    s.submit(0.0, 0, 0)  # occupies the instance
    s.submit(0.0, 1, 0)  # held, deadline 0.5 s
    s.submit(0.4, 2, 0)  # held, deadline 0.9 s
    assert s.release(0.6, 0) == [(2, 0, 0, BEST_EFFORT)]  # request 1 is late: the fresh one goes first
    assert s.release(0.7, 0) == [(1, 0, 0, BACKGROUND)]


def test_tier_rank_orders_the_central_queue() -> None:
    s = sched(inst("any", None, cap=1), tiers=tiers(0.0, 0.0))
    s.submit(0.0, 0, 1)  # takes the instance
    s.submit(0.0, 1, 1)  # batch, held first
    s.submit(0.1, 2, 0)  # chat, held later but ranked first
    assert s.release(0.2, 0) == [(2, 0, 0, BEST_EFFORT)]
    assert s.priority(FEASIBLE, 1) < s.priority(BEST_EFFORT, 0) < s.priority(BACKGROUND, 0)


def test_handoff_goes_to_the_host_tier_decode_instances() -> None:
    s = sched(
        inst("p", "chat", cap=4, role=Role.PREFILL),
        inst("d1", "chat", cap=4, role=Role.DECODE),
        inst("d2", "batch", cap=4, role=Role.DECODE),
    )
    assert s.submit(0.0, 0, 0) == (0, FEASIBLE)  # prompts never go to decode instances
    assert s.handoff(0.0, tier=0, host_tier=0, klass=FEASIBLE) == 1
    assert s.handoff(0.0, tier=1, host_tier=1, klass=FEASIBLE) == 2
    assert s.resume_target(0, FEASIBLE) == 1
    assert s.release(0.0, 1) == []  # a decode instance takes no prompts from the central queue


def test_reconfiguration_carries_loads_and_held_requests() -> None:
    old = sched(inst("a", "chat", cap=1), inst("b", "batch", cap=1), tiers=tiers(0.0, 0.0), spill_over=False)
    old.submit(0.0, 0, 0)
    old.submit(0.0, 1, 0)  # held
    config = SchedulerConfig(tiers=tiers(0.0, 0.0), instances=(inst("a", "chat", cap=1), inst("c", "chat", cap=1)))
    new = MultiTierScheduler(config, previous=old, now_s=1.0)
    assert new.load == [1, 0] and new.held == 1
    assert new.pump(0.2) == [(1, 0, 1, BEST_EFFORT)]


def test_bad_configs_are_rejected_with_names() -> None:
    with pytest.raises(ValidationError, match="not among"):
        SchedulerConfig(tiers=tiers(), instances=(inst("a", "nope"),))
    with pytest.raises(ValidationError, match="unique"):
        SchedulerConfig(tiers=tiers(), instances=(inst("a", "chat"), inst("a", "batch")))
    with pytest.raises(KeyError, match="tiers"):
        sched(inst("a", "chat")).tier_index("gold")


def seated(iid: str, tier: str, cap: int, seats: dict[str, int], role: Role = Role.COLOCATED) -> SchedulerInstance:
    return SchedulerInstance(instance_id=iid, tier=tier, role=role, slo_safe_seqs=cap, tier_seqs=seats)


def test_spilled_requests_take_the_seats_of_their_mix() -> None:
    # a chat instance holds 12 chat requests, or 4 batch ones (longer contexts): a batch request takes 3 seats
    s = sched(
        seated("chat", "chat", 12, {"chat": 12, "batch": 4}), inst("batch", "batch", cap=1), tiers=tiers(0.0, 0.0)
    )
    assert s.submit(0.0, 0, 1) == (1, BEST_EFFORT)  # batch fills its own instance
    assert [s.submit(0.0, r, 1)[0] for r in range(1, 6)] == [0, 0, 0, 0, -1]  # then 4 spill onto chat, 3 seats each
    assert s.load == [12.0, 1.0]
    assert not s.has_spare(0, tier=0) and not s.has_spare(0)
    assert s.release(0.1, 0, tier=1) == [(5, 1, 0, BEST_EFFORT)]  # 3 seats back: the held batch request fits again
    s.release(0.2, 0, tier=1)
    assert s.load == [12.0 - 3.0, 1.0] and s.has_spare(0, tier=0) and s.has_spare(0, tier=1)
    assert s.submit(0.3, 6, 0) == (0, BEST_EFFORT)  # a chat request takes one seat
    assert s.load[0] == 10.0


def test_a_mix_with_no_safe_seat_never_spills_there_and_release_needs_the_tier() -> None:
    s = sched(seated("chat", "chat", 5, {"batch": 0}), tiers=tiers(0.0, 0.0))
    assert s.submit(0.0, 0, 1) == (-1, BEST_EFFORT)  # held: a batch request would break the chat SLO at once
    assert s.submit(0.0, 1, 0) == (0, BEST_EFFORT)  # a tier left out of tier_seqs takes one seat
    assert s.release(0.1, 0, tier=0) == []  # the held batch request still does not fit an empty chat instance
    s.submit(0.2, 2, 0)
    with pytest.raises(ValueError, match="pass the released request's tier"):
        s.release(0.3, 0)


def test_reconfiguration_reweighs_carried_requests_under_the_new_seats() -> None:
    old = sched(inst("a", "chat", cap=10), inst("b", "batch", cap=1), tiers=tiers(0.0, 0.0))
    for r in range(4):
        old.submit(0.0, r, 1)  # one on b, three spill onto a at one seat each
    assert old.load == [3, 1]
    config = SchedulerConfig(tiers=tiers(0.0, 0.0), instances=(seated("a", "chat", 10, {"batch": 5}),))
    new = MultiTierScheduler(config, previous=old, now_s=1.0)
    assert new.load == [6.0]  # the same three batch requests at two seats each
    new.release(1.1, 0, tier=1)
    assert new.load == [4.0]


def test_seats_for_unknown_tiers_are_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown tiers"):
        SchedulerConfig(tiers=tiers(), instances=(seated("a", "chat", 2, {"gold": 1}),))


def test_recount_sets_loads_from_where_requests_are() -> None:
    # a transition moved requests between engines behind the scheduler's back: the ledger is the truth
    s = sched(seated("a", "chat", 10, {"batch": 5}), inst("b", "batch", cap=2), tiers=tiers(0.0, 0.0))
    s.submit(0.0, 0, 0)
    s.submit(0.0, 1, 1)
    s.recount([(0, 1), (0, 1), (0, 0), (1, 1)])
    assert s.load == [2.0 + 2.0 + 1.0, 1.0]
    s.release(0.1, 0, tier=1)
    assert s.load == [3.0, 1.0]
    s.recount([])
    assert s.load == [0.0, 0.0] and s.has_spare(1)


def test_a_full_decode_side_steers_prompts_away_from_shared_prefill_instances() -> None:
    s = sched(
        inst("p", None, cap=4, role=Role.PREFILL),
        inst("d", None, cap=1, role=Role.DECODE),
        inst("c", "chat", cap=1),
        tiers=tiers(chat_rps=None, batch_rps=None),
    )
    assert s.submit(0.0, 0, 0) == (0, FEASIBLE)  # the least-loaded prompt-taker: the prefill instance
    assert s.handoff(0.1, 0, None, FEASIBLE) == 1  # decode full now
    assert s.release(0.1, 0, 0) == []
    assert s.submit(0.2, 1, 0) == (2, FEASIBLE)  # decode full: the colocated instance, not the prefill one
    assert s.submit(0.3, 2, 0) == (0, FEASIBLE)  # nothing else has room: prefilled anyway, never held for it
    # without a central queue (plain vLLM-style routing) only the load counts
    plain = sched(
        inst("p", None, cap=4, role=Role.PREFILL),
        inst("d", None, cap=1, role=Role.DECODE),
        inst("c", "chat", cap=1),
        tiers=tiers(chat_rps=None, batch_rps=None),
        central_queue=False,
    )
    plain.submit(0.0, 0, 0)
    plain.handoff(0.1, 0, None, FEASIBLE)
    plain.release(0.1, 0, 0)
    assert plain.submit(0.2, 1, 0) == (0, FEASIBLE)
