"""The reference engine on 4 gloo ranks: TP1 -> TP2 -> TP4 -> TP1 with requests decoding and their KV
migrated, a switch loop with zero lost requests, migrated KV equal to what the target TP computes, and
rollback on real failures (memory budget exceeded at wake, no KV blocks at import)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.engine import EngineError, GenerationRequest
from nitsum_runtime.executor import TransitionExecutor
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.reference_engine import ReferenceEngine
from nitsum_runtime.scenarios import (
    TIER,
    _drain,
    build_reference_pool,
    pinned_plan,
    run_round_trip,
    run_switch_loop,
)


@pytest.fixture
def make_pool(rank_cluster: RankCluster) -> Iterator[Callable[..., EnginePool]]:
    """Pools on the shared rank_cluster, put to sleep after the test so that tests do not share memory."""
    pools: list[EnginePool] = []

    def make(num_blocks: int, prefix: str, engines: list[ReferenceEngine] | None = None) -> EnginePool:
        if engines is not None:
            pools.append(EnginePool(engines, gpus_per_node=4))
        else:
            pools.append(build_reference_pool(rank_cluster, num_blocks=num_blocks, prefix=prefix))
        return pools[-1]

    yield make
    for p in pools:
        p.sleep_all()


def test_round_trip_tp1_tp2_tp4_tp1_with_migration(make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec) -> None:
    pool = make_pool(128, "rt-")
    ex = TransitionExecutor(pool, tiny_llama, policy="migrate")
    res = run_round_trip(pool, ex, tiny_llama, live=3, prompt_len=10, max_tokens=10, steps_between=2, tolerance=1e-4)
    assert res.probe_bit_identical
    assert res.ledger_ok
    assert res.max_logprob_diff <= 1e-4, res.max_logprob_diff_by_engine
    assert set(res.max_logprob_diff_by_engine) == {"rt-tp1-g0", "rt-tp2-g0-1", "rt-tp4-g0-1-2-3"}
    live = [t for t in res.transitions if t.label in ("tp1->tp2", "tp2->tp4", "tp4->tp1")]
    assert [t.in_flight for t in live] == [3, 3, 3]
    assert all(t.report.migrated == 3 and t.report.kv_bytes_moved > 0 for t in live)
    assert all(t.report.pause_to_resume_s > 0 for t in res.transitions if t.label != "start")
    records = {r.request_id: r for r in pool.records()}
    assert records["live0"].engines == ("rt-tp1-g0", "rt-tp2-g0-1", "rt-tp4-g0-1-2-3", "rt-tp1-g0")
    assert res.probe_comparison.identical and res.probe_comparison.steps == 2 * 10
    assert res.probe_repeat.identical and res.probe_engines == ("rt-tp1-g0",) and res.weight_mismatches == ()
    assert res.passed
    with pytest.raises(ValueError, match="must end on the GPU group it starts on"):
        run_round_trip(pool, ex, tiny_llama, path=((0,), (0, 1), (1,)))


def test_round_trip_with_reprefill_instead_of_migration(
    make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec
) -> None:
    pool = make_pool(128, "rp-")
    ex = TransitionExecutor(pool, tiny_llama, policy="reprefill")
    res = run_round_trip(pool, ex, tiny_llama, live=3, prompt_len=10, max_tokens=10, steps_between=2, tolerance=1e-4)
    assert res.passed, res
    live = [t.report for t in res.transitions if t.in_flight]
    assert len(live) == 3 and all(r.reprefilled == 3 and r.migrated == 0 and r.kv_bytes_moved == 0 for r in live)


def test_migrated_kv_equals_what_the_target_tp_computes(
    make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec
) -> None:
    pool = make_pool(64, "kv-")
    ex = TransitionExecutor(pool, tiny_llama, policy="migrate")
    ex.execute(None, pinned_plan([(0,)]))
    req = GenerationRequest(request_id="a", prompt_token_ids=tuple(range(3, 17)), max_tokens=6)
    pool.submit(TIER, req)
    for _ in range(3):
        pool.step()
    report = ex.execute(pinned_plan([(0,)]), pinned_plan([(0, 1, 2, 3)]))
    assert report.ok and report.migrated == 1
    tp4 = pool.engine((0, 1, 2, 3))
    migrated = tp4.read_kv("a")  # type: ignore[attr-defined]
    # The same tokens prefilled directly at TP4: its KV must agree with the migrated one, rank by rank.
    tokens = req.prompt_token_ids + tuple(e.token_id for e in pool.outputs["a"])
    tp4.add_request(GenerationRequest(request_id="b", prompt_token_ids=tokens[:-1], max_tokens=2))
    tp4.step()
    direct = tp4.read_kv("b")  # type: ignore[attr-defined]
    assert len(migrated) == 4
    for m, d in zip(migrated, direct, strict=True):
        assert m.shape == d.shape == (2, len(tokens) - 1, 1, 8)
        assert torch.allclose(m, d, atol=1e-5)


def test_switch_loop_loses_no_request(make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec) -> None:
    pool = make_pool(128, "loop-")
    ex = TransitionExecutor(pool, tiny_llama)
    res = run_switch_loop(pool, ex, tiny_llama, switches=20, in_flight=3, prompt_len=6, max_tokens=4)
    assert res.switches == 20 and res.lost == 0 and res.completed == res.submitted >= 10
    assert res.migrated > 0


def test_instance_ids_reused_across_plans_route_correctly(
    make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec
) -> None:
    # pinned plans number instances per plan: "chat/tp1-colocated/0" is GPU 1 in the first layout and GPU 0 in
    # the second, where GPU 1's instance is renamed "/1" while its requests keep decoding.
    pool = make_pool(64, "ren-")
    ex = TransitionExecutor(pool, tiny_llama)
    layouts = (((1,),), ((0,), (1,)), ((0,),))
    res = run_switch_loop(pool, ex, tiny_llama, switches=6, layouts=layouts, in_flight=3, prompt_len=5, max_tokens=3)
    assert res.lost == 0 and res.completed == res.submitted


def test_wake_failure_rolls_back_without_losing_requests(
    rank_cluster: RankCluster, make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec
) -> None:
    pool = make_pool(32, "fail-")
    ex = TransitionExecutor(pool, tiny_llama, policy="migrate")
    two_tp1 = pinned_plan([(0,), (1,)])
    assert ex.execute(None, two_tp1).ok
    reqs = [GenerationRequest(request_id=f"f{i}", prompt_token_ids=(5, 6, 7 + i), max_tokens=6) for i in range(4)]
    for r in reqs:
        pool.submit(TIER, r)
    pool.step()
    per_rank = rank_cluster.call([0], "memory")[0]["fail-tp1-g0"]
    rank_cluster.call([0, 1], "set_memory_budget", budget_bytes=int(per_rank * 1.3))  # no room for a TP2 shard too
    try:
        report = ex.execute(two_tp1, pinned_plan([(0, 1)]))
    finally:
        rank_cluster.call([0, 1], "set_memory_budget", budget_bytes=None)
    assert not report.ok and report.rolled_back
    assert "MemoryError" in report.error and "wake" in report.error
    assert [s.kind for s in report.steps if s.kind.startswith("undo")] == [
        "undo:wake",
        "undo:pause",
        "undo:pause",
    ]
    assert pool.engine((0, 1)).state.value == "asleep"
    assert rank_cluster.call([0, 1], "memory") == [{"fail-tp1-g0": per_rank}, {"fail-tp1-g1": per_rank}]
    while pool.unfinished():
        pool.step()
    # Never moved: same tokens as an undisturbed run of the same batch on the same engines.
    again = [r.model_copy(update={"request_id": r.request_id + "x"}) for r in reqs]
    for r in again:
        pool.submit(TIER, r)
    while pool.unfinished():
        pool.step()
    for r in reqs:
        assert [e.top for e in pool.outputs[r.request_id]] == [e.top for e in pool.outputs[r.request_id + "x"]]


def test_import_failure_midway_rolls_back(
    rank_cluster: RankCluster, make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec
) -> None:
    engines = [
        ReferenceEngine(rank_cluster, (0, 1), 32, engine_id="cap-tp2"),
        ReferenceEngine(rank_cluster, (0,), 32, engine_id="cap-tp1-g0"),
        ReferenceEngine(rank_cluster, (1,), 4, engine_id="cap-tp1-g1"),
    ]
    pool = make_pool(0, "", engines)
    ex = TransitionExecutor(pool, tiny_llama, policy="migrate")
    assert ex.execute(None, pinned_plan([(0, 1)])).ok
    for i in range(3):
        pool.submit(TIER, GenerationRequest(request_id=f"c{i}", prompt_token_ids=tuple(range(1, 21)), max_tokens=8))
    pool.step()
    # Round-robin over the two TP1 targets: c0, c2 fit on GPU 0's engine; c1 (20 tokens = 5 blocks) does not
    # fit in GPU 1's 4 blocks, after c0 and c2 were imported: their copies must be dropped again.
    report = ex.execute(pinned_plan([(0, 1)]), pinned_plan([(0,), (1,)]))
    assert not report.ok and report.rolled_back and "no free blocks" in report.error
    assert [s.kind for s in report.steps if s.kind.startswith("undo")][:2] == [
        "undo:move_requests",
        "undo:wake",
    ]
    assert pool.engine((0,)).request_ids() == () and pool.engine((1,)).request_ids() == ()
    assert sorted(pool.engine((0, 1)).request_ids()) == ["c0", "c1", "c2"]
    while pool.unfinished():
        pool.step()
    assert all(len(pool.outputs[f"c{i}"]) == 8 for i in range(3))


def test_sleep_refuses_an_engine_with_requests(make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec) -> None:
    pool = make_pool(16, "slp-")
    ex = TransitionExecutor(pool, tiny_llama)
    ex.execute(None, pinned_plan([(2,)]))
    pool.submit(TIER, GenerationRequest(request_id="s", prompt_token_ids=(1, 2), max_tokens=3))
    with pytest.raises(EngineError, match="still holds requests"):
        pool.engine((2,)).sleep()


def test_idle_engine_places_kv_canonically_and_its_weights_match_the_store(
    make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec
) -> None:
    pool = make_pool(32, "can-")
    ex = TransitionExecutor(pool, tiny_llama)
    ex.execute(None, pinned_plan([(1,)]))
    engine = pool.engine((1,))
    fresh = engine.free_blocks()  # type: ignore[attr-defined]
    assert fresh == tuple(range(32))
    # A history that scrambles the free list: different lengths, finishing in another order than they came.
    for i, (n, m) in enumerate([(9, 5), (3, 2), (14, 3), (5, 6)]):
        pool.submit(TIER, GenerationRequest(request_id=f"h{i}", prompt_token_ids=tuple(range(1, n + 1)), max_tokens=m))
    for _ in range(4):
        pool.step()
    assert engine.free_blocks() != fresh  # type: ignore[attr-defined]
    while pool.unfinished():
        pool.step()
    assert engine.free_blocks() == fresh  # type: ignore[attr-defined]
    pool.submit(TIER, GenerationRequest(request_id="p", prompt_token_ids=tuple(range(1, 10)), max_tokens=2))
    pool.step()
    assert engine.blocks_of("p") == (0, 1, 2)  # type: ignore[attr-defined]
    assert engine.check_weights() == {1: []}  # type: ignore[attr-defined]


def _two_tier_plan(groups: dict[str, list[tuple[int, ...]]]):
    plans = [pinned_plan(g, tier=tier) for tier, g in groups.items()]
    return plans[0].model_copy(
        update={
            "instances": tuple(i for p in plans for i in p.instances),
            "tiers": tuple(a for p in plans for a in p.tiers),
        }
    )


def test_shared_instance_serves_every_tier_across_a_transition(
    make_pool: Callable[..., EnginePool], tiny_llama: ModelSpec
) -> None:
    pool = make_pool(64, "sh-")
    ex = TransitionExecutor(pool, tiny_llama, policy="migrate")
    assert ex.execute(None, _two_tier_plan({"chat": [(0,)], "bg": [(1,)]})).ok
    first = [GenerationRequest(request_id=f"r{t}", prompt_token_ids=(3, 4, 5, 6), max_tokens=6) for t in ("c", "b")]
    assert pool.submit("chat", first[0]) == "chat/tp1-colocated/0"
    assert pool.submit("bg", first[1]) == "bg/tp1-colocated/0"
    for _ in range(2):
        pool.step()
    # both tiers' instances become one shared TP2 instance: their requests migrate onto it
    report = ex.execute(_two_tier_plan({"chat": [(0,)], "bg": [(1,)]}), pinned_plan([(0, 1)], tier="*"))
    assert report.ok and report.migrated == 2
    later = [GenerationRequest(request_id=f"s{t}", prompt_token_ids=(7, 8, 9), max_tokens=3) for t in ("c", "b")]
    assert {pool.submit("chat", later[0]), pool.submit("bg", later[1])} == {"*/tp2-colocated/0"}
    _drain(pool, [r.request_id for r in first + later])
    records = {r.request_id: r for r in pool.records()}
    assert all(records[r.request_id].finished for r in first + later)
    assert records["rb"].engines == ("sh-tp1-g1", "sh-tp2-g0-1") and records["rb"].tier == "bg"
