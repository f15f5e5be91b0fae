"""The runtime's serving loop on real engine processes (CPU): the simulator's scheduler routes requests to toy vLLM
engines stepped concurrently over their pipes, prefill instances hand requests to decode instances, and every token
is checked against an unmoved run of the toy model; on reference engines (gloo ranks) the hand-off moves the KV."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engine_factories import start_toy_vllm_pool

from nitsum_opt.models.spec import ModelSpec, Role
from nitsum_opt.scheduler import RequestClass
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.spec import Tier
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.scenarios import build_reference_pool
from nitsum_runtime.serving import PlanServer, TieredRequest, check_servable
from nitsum_runtime.toy_vllm import toy_tokens
from nitsum_runtime.vllm_pool import close_pool

SEED = 11
VOCAB = 100
TIERS = (
    Tier(name="chat", ttft_slo_ms=500, tpot_slo_ms=50, weight=2),
    Tier(name="batch", ttft_slo_ms=5000, tpot_slo_ms=200, weight=1),
)


@pytest.fixture(scope="module")
def toy_pool(tiny_llama: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePool]:
    """Two TP1 toy vLLM engine processes (GPUs 0 and 1), started once."""
    pool = start_toy_vllm_pool(
        tiny_llama, tmp_path_factory.mktemp("serving"), SEED, groups=((0,), (1,)), max_num_seqs=64
    )
    yield pool
    close_pool(pool)


@pytest.fixture
def pool(toy_pool: EnginePool) -> Iterator[EnginePool]:
    """A fresh ledger over the module's engines (asleep again afterwards)."""
    fresh = EnginePool(list(toy_pool.engines.values()), node=0, gpus_per_node=2)
    yield fresh
    fresh.sleep_all()


def instance(gpu: int, role: Role, tier: str | None = None, seats: int = 1024) -> DeployedInstance:
    return DeployedInstance(tier=tier, tp=1, role=role, gpu_ids=(gpu,), slo_safe_seqs=seats)


def workload(n: int, spacing_s: float, tiers: tuple[str, ...] = ("chat",)) -> list[TieredRequest]:
    return [TieredRequest(k * spacing_s, 5 + (7 * k) % 23, 1 + (5 * k) % 9, tiers[k % len(tiers)]) for k in range(n)]


def assert_exact_tokens(pool: EnginePool, seed: int = SEED) -> None:
    """Every finished request has the tokens of an unmoved run of the toy model."""
    for rec in pool.records():
        if rec.finished:
            r = pool.requests[rec.request_id]
            assert list(rec.tokens) == toy_tokens(seed, r.prompt_token_ids, r.max_tokens, VOCAB), rec


def test_prefill_decode_hand_off_on_toy_vllm_engines(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    dep = Deployment(instances=(instance(0, Role.PREFILL), instance(1, Role.DECODE)), label="1P+1D")
    server = PlanServer(pool, dep, TIERS)
    server.wake()
    reqs = workload(30, 0.01)
    res = server.serve(reqs, vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, drain_s=30)
    assert res.aborted == 0 and res.never_dispatched == 0 and not pool.unfinished()
    assert all(t.finish_s > 0 and t.ttft_s > 0 for t in res.timings)
    multi = [k for k, r in enumerate(reqs) if r.output_tokens >= 2]
    assert res.handoffs == len(multi) and res.migrated == 0  # no GPU: the decode engine re-prefills
    assert_exact_tokens(pool)
    for rec in pool.records():
        k = int(rec.request_id[1:])
        assert rec.engines == (("tp1-g0", "tp1-g1") if k in multi else ("tp1-g0",)), rec
    assert res.steps["g0-tp1-prefill"] > 0 and res.steps["g1-tp1-decode"] > 0
    assert all(res.busy_s[k] > 0 for k in ("g0-tp1-prefill", "g1-tp1-decode"))
    assert all(0 < res.engine_s[k] <= res.busy_s[k] for k in res.busy_s)  # engine time is part of the round trip
    # vLLM engines hand off in two parts: off the prefill engine at once, onto the decode engine between its steps
    assert 0 < len(res.leave_s) <= len(multi) and 0 < len(res.arrive_s) <= len(multi)
    assert all(r == int(RequestClass.FEASIBLE) for r in res.classes)  # no admission control
    assert all(t.tpot_s >= 0 for k, t in enumerate(res.timings) if k in multi)


def test_scheduler_holds_requests_centrally_and_demotes_over_the_admitted_rate(
    pool: EnginePool, tiny_llama: ModelSpec
) -> None:
    dep = Deployment(
        instances=(instance(0, Role.COLOCATED, "chat", seats=2), instance(1, Role.COLOCATED, "batch", seats=2)),
        admitted_rps={"chat": 5.0, "batch": 5.0},
        tier_priority=True,
        spill_over=True,
        central_queue=True,
    )
    server = PlanServer(pool, dep, TIERS)
    server.wake()
    reqs = workload(24, 0.0, ("chat", "batch"))
    res = server.serve(reqs, vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, drain_s=30, prefix="s-")
    assert res.max_held > 0  # 2 seats per engine, 24 requests at once: the rest wait in the scheduler
    assert res.classes.count(int(RequestClass.BEST_EFFORT)) > 0  # over the token bucket's 2 s burst
    assert res.classes.count(int(RequestClass.FEASIBLE)) > 0
    assert res.aborted == 0 and res.never_dispatched == 0 and not pool.unfinished()
    assert max(res.late_adds) > 0.01  # the held ones waited for a seat
    assert_exact_tokens(pool)
    by_engine = {rec.request_id: rec.engines for rec in pool.records()}
    assert {e for es in by_engine.values() for e in es} == {"tp1-g0", "tp1-g1"}


def test_requests_left_at_the_drain_limit_are_aborted_and_counted(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    dep = Deployment(instances=(instance(0, Role.COLOCATED, seats=1),), central_queue=True)
    server = PlanServer(pool, dep, TIERS)
    server.wake()
    reqs = [TieredRequest(0.0, 10, 240, "batch") for _ in range(3)]
    res = server.serve(reqs, vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, drain_s=0.01, prefix="d-")
    assert res.aborted + res.never_dispatched + sum(t.finish_s > 0 for t in res.timings) == 3
    assert res.aborted == 1 and res.never_dispatched == 2  # one seat: one runs, two wait in the scheduler
    assert not pool.engine((0,)).request_ids()


def test_bad_deployments_and_requests_are_refused(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    with pytest.raises(ValueError, match="no decode instance"):
        check_servable(Deployment(instances=(instance(0, Role.PREFILL),)))
    server = PlanServer(pool, Deployment(instances=(instance(0, Role.COLOCATED),)), TIERS)
    with pytest.raises(ValueError, match="tiers \\['vip'\\]"):
        server.serve([TieredRequest(0.0, 4, 2, "vip")], vocab_size=VOCAB, max_model_len=256)
    with pytest.raises(ValueError, match="exceed max_model_len"):
        server.serve([TieredRequest(0.0, 250, 20, "chat")], vocab_size=VOCAB, max_model_len=256)
    with pytest.raises(KeyError, match="no engine on GPUs"):
        PlanServer(pool, Deployment(instances=(instance(5, Role.COLOCATED),)), TIERS)


def test_hand_off_moves_the_kv_between_reference_engines(rank_cluster: RankCluster, tiny_llama: ModelSpec) -> None:
    pool = build_reference_pool(rank_cluster, num_blocks=128, tps=(1,), prefix="serve-")
    try:
        dep = Deployment(instances=(instance(0, Role.PREFILL), instance(2, Role.DECODE)))
        server = PlanServer(pool, dep, TIERS)
        server.wake()
        reqs = [TieredRequest(0.01 * k, 6 + k, 4, "chat") for k in range(6)]
        res = server.serve(reqs, vocab_size=tiny_llama.vocab_size, max_model_len=tiny_llama.max_model_len, drain_s=60)
        assert res.handoffs == 6 and res.migrated == 6  # every hand-off carried its KV
        assert not pool.unfinished() and res.aborted == 0
        assert all(len(rec.tokens) == 4 and len(rec.engines) == 2 for rec in pool.records())
    finally:
        pool.sleep_all()
