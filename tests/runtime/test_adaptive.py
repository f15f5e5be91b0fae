"""The runtime's control loop (CPU): a controller's epoch decisions carried out on engine processes while they serve.

Toy vLLM engine processes (TP1 on GPUs 0 and 1, TP2 on both) serve open-loop traffic; the controller switches TP
mid-run, changes only admission, keeps, and switches back. Every request must finish exactly once with the tokens
of an unmoved run, requests in flight must move with the switches, and the scheduler's seat counts must match
where the pool's ledger has the requests. The Nitsum controller itself must decide in the runtime what it decides
in the simulator for the same requests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from engine_factories import start_toy_vllm_pool

from nitsum_opt.models.spec import ModelSpec, Role, model_preset
from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.controllers.registry import make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.sim.timing import ConstantStepModel
from nitsum_opt.spec import ClusterSpec, Tier
from nitsum_opt.workloads.trace import RequestTrace
from nitsum_runtime.adaptive import AdaptiveServer, requests_trace
from nitsum_runtime.engine import EngineState
from nitsum_runtime.executor import TransitionExecutor
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.scenarios import build_reference_pool
from nitsum_runtime.serving import TieredRequest
from nitsum_runtime.toy_vllm import toy_tokens
from nitsum_runtime.vllm_pool import close_pool

SEED = 5
VOCAB = 100
TIERS = (
    Tier(name="chat", ttft_slo_ms=500, tpot_slo_ms=50, weight=2),
    Tier(name="batch", ttft_slo_ms=5000, tpot_slo_ms=200, weight=1),
)
EPOCH_S = 0.4


@pytest.fixture(scope="module")
def toy_pool(tiny_llama: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePool]:
    """TP1 toy vLLM engines on GPUs 0 and 1 and a TP2 one on both, started once, asleep."""
    pool = start_toy_vllm_pool(
        tiny_llama,
        tmp_path_factory.mktemp("adaptive"),
        SEED,
        groups=((0,), (1,), (0, 1)),
        max_num_seqs=64,
        extra_llm_kwargs={"num_gpu_blocks_override": 4096},
    )
    yield pool
    close_pool(pool)


@pytest.fixture
def pool(toy_pool: EnginePool) -> Iterator[EnginePool]:
    fresh = EnginePool(list(toy_pool.engines.values()), node=0, gpus_per_node=2)
    yield fresh
    fresh.sleep_all()


def context(epoch_s: float = EPOCH_S) -> ControlContext:
    return ControlContext(
        cluster=ClusterSpec(num_nodes=1, gpus_per_node=2, gpu_type="H200"),
        tiers=TIERS,
        model_spec=model_preset("llama-3.1-8b"),
        model=ConstantStepModel(10.0),
        settings=SimSettings(epoch_s=epoch_s),
    )


def two_tp1(admit: dict[str, float] | None = None) -> Deployment:
    insts = tuple(DeployedInstance(tier=None, tp=1, role=Role.COLOCATED, gpu_ids=(g,)) for g in (0, 1))
    return Deployment(instances=insts, admitted_rps=admit, tier_priority=True, central_queue=True, spill_over=True)


def one_tp2(admit: dict[str, float] | None = None, seats: int = 1024, budget: int | None = None) -> Deployment:
    inst = DeployedInstance(
        tier=None, tp=2, role=Role.COLOCATED, gpu_ids=(0, 1), slo_safe_seqs=seats, max_num_batched_tokens=budget
    )
    return Deployment(instances=(inst,), admitted_rps=admit, tier_priority=True, central_queue=True, spill_over=True)


class Scripted(Controller):
    """Deploys ``script[0]`` at the start and ``script[k]`` at epoch k (``None``: keep)."""

    name = "scripted"

    def __init__(self, script: Sequence[Deployment | None]) -> None:
        self.script = list(script)
        self.windows: list[tuple[float, int]] = []

    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        first = self.script[0]
        assert first is not None
        return first

    def on_epoch(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment | None:
        self.windows.append((now_s, len(window)))
        k = round(now_s / ctx.settings.epoch_s)
        return self.script[k] if k < len(self.script) else None


def workload(n: int, spacing_s: float) -> list[TieredRequest]:
    """Long enough outputs that requests are decoding whenever the deployment changes."""
    return [TieredRequest(k * spacing_s, 6 + (5 * k) % 31, 150 + (7 * k) % 60, TIERS[k % 2].name) for k in range(n)]


def assert_exact_tokens(pool: EnginePool) -> None:
    for rec in pool.records():
        assert rec.finished, rec
        r = pool.requests[rec.request_id]
        assert list(rec.tokens) == toy_tokens(SEED, r.prompt_token_ids, r.max_tokens, VOCAB), rec


def test_tp_switches_mid_serve_move_requests_and_lose_none(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    admit = {"chat": 50.0, "batch": 50.0}
    script = [two_tp1(), one_tp2(budget=99_999), one_tp2(admit, seats=512, budget=1024), None, two_tp1()]
    ex = TransitionExecutor(pool, tiny_llama)
    server = AdaptiveServer(pool, Scripted(script), context(), ex)
    start = server.start(RequestTrace.empty(tier_names=[t.name for t in TIERS]))
    assert start.action == "start" and start.deployment == two_tp1().describe()
    reqs = workload(120, 0.015)  # 1.8 s of arrivals over five epochs
    res = server.serve(
        reqs, vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, duration_s=2.0, drain_s=60, prefix="a-"
    )
    actions = [e.action for e in res.epochs]
    assert actions == ["transition", "reschedule", "keep", "transition"], res.epochs
    to_tp2, _, _, back = res.epochs
    assert to_tp2.moved > 0 and back.moved > 0  # requests were in flight at both switches
    assert to_tp2.stall_s > 0 and to_tp2.pause_to_resume_s > 0 and not to_tp2.error
    # the TP 2 engine was woken and filled ahead, while the TP 1 engines served; the cut-over skipped both
    assert to_tp2.prepare_s > 0 and back.prepare_s > 0
    assert {kind for kind, _, _ in to_tp2.actions} >= {"pause", "wake", "fill_weights", "move_requests", "route"}
    assert res.epochs[1].admitted_rps == admit
    assert [e.at_s for e in res.epochs] == pytest.approx([EPOCH_S * k for k in range(1, 5)])
    assert all(e.ready_s >= e.at_s for e in res.epochs)
    s = res.serving
    assert s.aborted == 0 and s.never_dispatched == 0 and not pool.unfinished()
    assert_exact_tokens(pool)
    engines = {e for rec in pool.records() for e in rec.engines}
    assert engines == {"tp1-g0", "tp1-g1", "tp2-g0-1"}
    assert any(len(rec.engines) >= 2 for rec in pool.records())  # moved by a switch
    assert s.steps["g0-tp2-colocated"] > 0 and s.steps["g0-tp1-colocated"] > 0
    assert server.deployment.describe() == two_tp1().describe()
    # the planned step budgets reach the engines, capped at what they started with (the toy's 8,192)
    assert s.step_budgets == {"g0-tp1-colocated": 8192, "g1-tp1-colocated": 8192, "g0-tp2-colocated": 1024}
    tp1 = pool.engine((0,))
    assert tp1.set_step_budget(99_999) == 8192 and tp1.set_step_budget(512) == 512 and tp1.set_step_budget(None) == 8192


def test_the_epoch_windows_are_the_simulators(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    ctl = Scripted([two_tp1()])
    server = AdaptiveServer(pool, ctl, context(0.25), TransitionExecutor(pool, tiny_llama))
    server.start(RequestTrace.empty(tier_names=[t.name for t in TIERS]))
    reqs = workload(40, 0.02)  # arrivals over [0, 0.78] s
    res = server.serve(reqs, vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, duration_s=0.8, prefix="w-")
    trace = requests_trace(reqs, [t.name for t in TIERS], 0.8)
    expected = [(0.25 * k, len(trace.window(0.25 * (k - 1), 0.25 * k))) for k in (1, 2, 3)]
    assert ctl.windows == expected
    assert [e.action for e in res.epochs] == ["keep"] * 3
    assert_exact_tokens(pool)


def test_bad_inputs_are_refused(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    other = EnginePool(list(pool.engines.values()), node=0, gpus_per_node=2)
    with pytest.raises(ValueError, match="executor must act on the server's pool"):
        AdaptiveServer(pool, Scripted([two_tp1()]), context(), TransitionExecutor(other, tiny_llama))
    server = AdaptiveServer(pool, Scripted([two_tp1()]), context(), TransitionExecutor(pool, tiny_llama))
    with pytest.raises(RuntimeError, match="call start"):
        server.serve(workload(2, 0.1), vocab_size=VOCAB, max_model_len=256)
    with pytest.raises(ValueError, match="tiers \\['vip'\\]"):
        requests_trace([TieredRequest(0.0, 4, 2, "vip")], ["chat"], 1.0)
    prefill_only = Deployment(instances=(DeployedInstance(tier=None, tp=1, role=Role.PREFILL, gpu_ids=(0,)),))
    with pytest.raises(ValueError, match="no decode instance"):
        AdaptiveServer(pool, Scripted([prefill_only]), context(), TransitionExecutor(pool, tiny_llama)).start(
            RequestTrace.empty(tier_names=["chat", "batch"])
        )


def test_the_nitsum_controller_decides_in_the_runtime_what_it_decides_in_the_simulator(
    pool: EnginePool, tiny_llama: ModelSpec
) -> None:
    scenario = Scenario()
    model, _ = scenario.iteration_model()
    ctx = ControlContext(
        cluster=ClusterSpec(num_nodes=1, gpus_per_node=2, gpu_type="H200"),
        tiers=TIERS,
        model_spec=scenario.model_spec,
        model=model,
        settings=SimSettings(epoch_s=0.5),
    )
    # chat for a second, then a batch surge: the plan's admission follows the mix
    reqs = [TieredRequest(k / 40, 40 + k % 60, 30 + k % 40, "chat") for k in range(40)]
    reqs += [TieredRequest(1.0 + k / 60, 100 + k % 50, 60 + k % 40, "batch") for k in range(60)]
    trace = requests_trace(reqs, [t.name for t in TIERS], 2.0)
    sim = Simulator(
        trace, TIERS, model, ctx.model_spec, ctx.cluster, make_controller("nitsum", _ev(trace, ctx)), ctx.settings
    )
    simulated = sim.run().timeline

    server = AdaptiveServer(pool, make_controller("nitsum", _ev(trace, ctx)), ctx, TransitionExecutor(pool, tiny_llama))
    start = server.start(trace.window(0.0, 0.5))
    res = server.serve(
        reqs, vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, duration_s=2.0, drain_s=60, prefix="n-"
    )
    runtime = [start, *res.epochs]
    assert [e.at_s for e in runtime] == [t for t, _ in simulated]
    assert [(e.deployment, e.admitted_rps) for e in runtime] == [(d.describe(), d.admitted_rps) for _, d in simulated]
    assert len({str(d.admitted_rps) for _, d in simulated}) > 1  # the plan followed the mix (layout changes: above)
    assert res.serving.aborted == 0 and not pool.unfinished()
    assert_exact_tokens(pool)


def _ev(trace: RequestTrace, ctx: ControlContext) -> StaticEvaluator:
    return StaticEvaluator(trace, ctx.tiers, ctx.model, ctx.model_spec, ctx.cluster, ctx.settings)


def test_requests_in_flight_migrate_their_kv_at_a_tp_switch(rank_cluster: RankCluster, tiny_llama: ModelSpec) -> None:
    pool = build_reference_pool(rank_cluster, num_blocks=256, tps=(1, 2), prefix="adapt-")
    try:
        server = AdaptiveServer(
            pool, Scripted([two_tp1(), one_tp2()]), context(0.3), TransitionExecutor(pool, tiny_llama)
        )
        server.start(RequestTrace.empty(tier_names=[t.name for t in TIERS]))
        reqs = [TieredRequest(0.01 * k, 6 + k, 40, "chat") for k in range(8)]
        res = server.serve(
            reqs, vocab_size=tiny_llama.vocab_size, max_model_len=tiny_llama.max_model_len, duration_s=0.6, drain_s=60
        )
        switch = res.epochs[0]
        assert switch.action == "transition" and switch.migrated > 0 and switch.kv_bytes > 0, switch
        assert res.serving.aborted == 0 and not pool.unfinished()
        assert all(len(rec.tokens) == 40 for rec in pool.records())
        assert any("tp2" in rec.engines[-1] and len(rec.engines) == 2 for rec in pool.records())
    finally:
        pool.sleep_all()


def test_a_failed_preparation_leaves_the_old_deployment_serving(
    tiny_llama: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    others = tmp_path / "others-bytes"  # bytes other processes hold on each (simulated) 80 GB GPU
    monkeypatch.setenv("NITSUM_TOY_OTHERS_FILE", str(others))
    pool = start_toy_vllm_pool(tiny_llama, tmp_path, SEED, groups=((0,), (1,), (0, 1)), max_num_seqs=64)
    try:
        server = AdaptiveServer(
            pool, Scripted([two_tp1(), one_tp2()]), context(0.3), TransitionExecutor(pool, tiny_llama)
        )
        server.start(RequestTrace.empty(tier_names=[t.name for t in TIERS]))
        others.write_text("75e9")  # no room left to wake the TP 2 engine next to the TP 1 ones
        res = server.serve(workload(30, 0.02), vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, duration_s=0.6)
        failed = res.epochs[0]
        assert failed.action == "rolled_back" and "GiB are free" in failed.error and failed.stall_s == 0
        assert server.deployment.describe() == two_tp1().describe()
        assert pool.engine((0, 1)).state is EngineState.ASLEEP
        assert res.serving.aborted == 0 and not pool.unfinished()
        assert_exact_tokens(pool)
    finally:
        pool.sleep_all()
        close_pool(pool)


def test_without_preparing_ahead_the_cut_over_wakes_the_engines(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    ex = TransitionExecutor(pool, tiny_llama)
    server = AdaptiveServer(pool, Scripted([two_tp1(), one_tp2()]), context(0.3), ex, prepare_ahead=False)
    server.start(RequestTrace.empty(tier_names=[t.name for t in TIERS]))
    res = server.serve(workload(30, 0.02), vocab_size=VOCAB, max_model_len=tiny_llama.max_model_len, duration_s=0.6)
    switch = res.epochs[0]
    assert switch.action == "transition" and switch.prepare_s == 0 and switch.moved > 0
    assert not pool.unfinished()
    assert_exact_tokens(pool)
