"""VllmEngine behind the Engine protocol, driven over real pipes to real engine processes on CPU.

Each engine is a process running the engine-process code of the vLLM path (``vllm_process._Engine``, its
command table and watchdog) over the toy stand-in for vLLM (``toy_vllm.ToyLLM``): nothing of the controller
side is replaced. The toy model is a pure function of the weights and the context, so every token a switched
request produces must equal the token of an unswitched run (``toy_tokens``), and an engine whose refill was
skipped would produce other tokens. Failures are real: an engine process that exits during a wake, and one
whose step hangs until its watchdog reports it and exits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_factories import start_toy_vllm_pool

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.engine import Engine, EngineCapacityError, EngineError, EngineState, GenerationRequest
from nitsum_runtime.executor import TransitionExecutor
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.scenarios import TIER, pinned_plan, run_round_trip, run_switch_loop
from nitsum_runtime.toy_vllm import toy_engine_process, toy_tokens, toy_top, write_toy_store
from nitsum_runtime.vllm_pool import VllmPoolSettings, build_vllm_pool, close_pool, start_waves
from nitsum_runtime.vllm_pool_engine import VllmEngine
from nitsum_runtime.vllm_protocol import VllmDeadlines

SEED = 7  # the toy resident store
VOCAB = 100  # tiny_llama's


@pytest.fixture(scope="module")
def base_pool(tiny_llama: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePool]:
    """One toy engine process per candidate group of 4 GPUs (TP1 x4, TP2 x2, TP4), started once."""
    tmp = tmp_path_factory.mktemp("vllm-pool")
    store = write_toy_store(tmp / "store.json", SEED)
    settings = VllmPoolSettings(tps=(1, 2, 4), concurrent_starts=True, max_model_len=tiny_llama.max_model_len)
    pool, reports = build_vllm_pool(tiny_llama, 4, store, tmp, settings, target=toy_engine_process, log=lambda _: None)
    assert [r.mismatched for r in reports] == [()] * 7 and all(r.checked for r in reports)
    yield pool
    close_pool(pool)


@pytest.fixture
def pool(base_pool: EnginePool) -> Iterator[EnginePool]:
    """A fresh routing table and ledger over the module's engines; every engine asleep again afterwards."""
    fresh = EnginePool(list(base_pool.engines.values()), node=0, gpus_per_node=4)
    yield fresh
    for e in fresh.engines.values():
        assert isinstance(e, VllmEngine)
        if e.failure is not None:
            e.drop_requests(e.request_ids())
            e.restart()
    fresh.sleep_all()


def engine(pool: EnginePool, *gpus: int) -> VllmEngine:
    e = pool.engine(gpus)
    assert isinstance(e, VllmEngine)
    return e


def req(rid: str, prompt_len: int, max_tokens: int, salt: int = 0, **kw: object) -> GenerationRequest:
    prompt = tuple((salt + 13 * j + 1) % VOCAB for j in range(prompt_len))
    return GenerationRequest(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def assert_exact_outputs(pool: EnginePool) -> None:
    """Every request finished with exactly the tokens of an unswitched run of the toy model."""
    assert not pool.unfinished()
    for rec in pool.records():
        r = pool.requests[rec.request_id]
        assert rec.finished and list(rec.tokens) == toy_tokens(SEED, r.prompt_token_ids, r.max_tokens, VOCAB), rec


def test_engine_protocol_over_the_pipe(pool: EnginePool) -> None:
    e = engine(pool, 0, 1)
    assert isinstance(e, Engine) and e.state is EngineState.ASLEEP and e.engine_id == "tp2-g0-1"
    e.wake()
    assert e.check_weights() == {0: ["toy.weights"], 1: ["toy.weights"]}  # undefined until refilled
    assert e.fill_weights().bytes_copied > 0 and e.check_weights() == {0: [], 1: []}
    a, b = req("a", 20, 5, prompt_logprobs=True, top_k=3), req("b", 9, 3, salt=4)
    e.add_request(a)
    e.add_request(b)
    with pytest.raises(EngineError, match="already on engine"):
        e.add_request(b)
    events = e.step() + e.step()
    snap = e.export_requests(["a"])[0]
    assert snap.output_token_ids == tuple(toy_tokens(SEED, a.prompt_token_ids, 2, VOCAB))
    assert snap.kv is not None and snap.kv.engine_id == "tp2-g0-1" and snap.kv.block_size == 16
    assert snap.num_computed_tokens == snap.kv.num_tokens == 21 and len(snap.kv.block_ids) == 2
    assert not e.can_migrate_from(e)
    with pytest.raises(EngineError, match="KV connector"):
        e.import_requests([snap], e)
    while e.request_ids():
        events += e.step()
    for r in (a, b):
        mine = [ev for ev in events if ev.request_id == r.request_id]
        context = list(r.prompt_token_ids)
        assert [ev.index for ev in mine] == list(range(r.max_tokens))
        assert [ev.finished for ev in mine] == [False] * (r.max_tokens - 1) + [True]
        for ev in mine:
            ids, lps = toy_top(SEED, context, r.top_k, VOCAB)
            assert (ev.token_id, ev.top.token_ids, ev.top.logprobs) == (ids[0], tuple(ids), tuple(lps))
            context.append(ev.token_id)
    first_a = next(ev for ev in events if ev.request_id == "a")
    assert [p.token_ids for p in first_a.prompt_top] == [
        tuple(toy_top(SEED, a.prompt_token_ids[:i], 3, VOCAB)[0]) for i in range(1, 20)
    ]
    e.sleep()
    assert e.state is EngineState.ASLEEP and e.request_ids() == ()
    with pytest.raises(EngineError, match="asleep"):
        e.add_request(req("c", 4, 2))


def test_import_re_prefills_all_or_nothing(pool: EnginePool) -> None:
    src, dst = engine(pool, 0), engine(pool, 0, 1, 2, 3)
    for e in (src, dst):
        e.wake()
        e.fill_weights()
    r = req("r", 30, 8, salt=2)
    src.add_request(r)
    for _ in range(3):
        src.step()
    snap = src.export_requests(["r"])[0]
    bad = snap.model_copy(update={"request": req("bad", 5, 4).model_copy(update={"prompt_token_ids": (3, 150)})})
    with pytest.raises(EngineError, match="out of vocabulary"):  # the engine process rejects the second one
        dst.import_requests([snap, bad], None)
    assert dst.request_ids() == () and _unfinished_in_process(dst) == 0
    too_long = snap.model_copy(update={"request": req("long", 250, 8)})
    with pytest.raises(EngineCapacityError, match="max_model_len=256"):
        dst.import_requests([snap, too_long], None)
    result = dst.import_requests([snap], None)
    assert (result.migrated, result.reprefilled, result.bytes_moved) == (0, 1, 0)
    src.drop_requests(["r"])
    events = []
    while dst.request_ids():
        events += dst.step()
    assert [ev.index for ev in events] == [3, 4, 5, 6, 7] and {ev.engine_id for ev in events} == {dst.engine_id}
    assert [ev.token_id for ev in events] == toy_tokens(SEED, r.prompt_token_ids, 8, VOCAB)[3:]


def _unfinished_in_process(e: VllmEngine) -> int:
    return int(e.handle.call("describe", 10)["unfinished_in_output_processor"])


def test_executor_round_trip_tp1_tp2_tp4_tp1(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    res = run_round_trip(pool, TransitionExecutor(pool, tiny_llama), tiny_llama, live=4)
    assert res.passed and res.probe_bit_identical and res.probe_repeat.identical and res.ledger_ok
    assert res.probe_engines == ("tp1-g0",) and res.weight_mismatches == ()
    assert res.max_logprob_diff == 0.0 and res.greedy_agreement == 1.0  # every switched token on its true context
    busy = [t for t in res.transitions if t.in_flight]
    assert [t.label for t in busy] == ["tp1->tp2", "tp2->tp4", "tp4->tp1"]
    assert all(t.report.ok and t.report.reprefilled == 4 and t.report.migrated == 0 for t in busy)
    assert all(m.cost.choice == "reprefill" for t in busy for m in t.report.moves)
    kinds = [s.kind for s in busy[0].report.steps]
    assert kinds == ["pause", "wake", "fill_weights", "move_requests", "route", "sleep", "resume"]
    assert_exact_outputs(pool)


def test_switch_loop_loses_no_request(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    ex = TransitionExecutor(pool, tiny_llama, policy="migrate")  # no KV path into vLLM: re-prefill anyway
    res = run_switch_loop(pool, ex, tiny_llama, switches=40)
    assert res.lost == 0 and res.completed == res.submitted > 40 // 3
    assert res.migrated == 0 and res.reprefilled > 40 and len(res.pause_to_resume_s) == 40
    assert_exact_outputs(pool)


def test_rollback_when_the_target_process_dies_during_wake(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    ex = TransitionExecutor(pool, tiny_llama)
    tp1, tp2 = pinned_plan([(0,)]), pinned_plan([(0, 1)])
    assert ex.execute(None, tp1).ok
    for i in range(3):
        pool.submit(TIER, req(f"k{i}", 10 + i, 12, salt=i))
    pool.step()
    pool.step()
    target = engine(pool, 0, 1)
    target.rpc("toy_fault", "wake_up", "exit", 1)  # the process exits in its second wake_up call (the KV)
    report = ex.execute(tp1, tp2)
    assert not report.ok and report.rolled_back and "died during 'wake_kv'" in report.error
    assert [(s.kind, s.ok) for s in report.steps] == [
        ("pause", True),
        ("wake", False),
        ("undo:wake", True),
        ("undo:pause", True),
    ]
    assert target.failure is not None and target.state is EngineState.ASLEEP and target.handle.proc is None
    assert engine(pool, 0).state is EngineState.AWAKE and list(pool.routes) == ["chat/tp1-colocated/0"]
    pool.step()
    again = ex.execute(tp1, tp2)  # the lost engine refuses to wake until restarted; nothing is lost either
    assert again.rolled_back and "restart() it" in again.error
    target.restart()
    assert ex.execute(tp1, tp2).ok
    while pool.unfinished():
        pool.step()
    assert {rec.engines for rec in pool.records()} == {("tp1-g0", "tp2-g0-1")}
    assert_exact_outputs(pool)


def test_requests_of_a_lost_engine_move_to_another(pool: EnginePool, tiny_llama: ModelSpec) -> None:
    ex = TransitionExecutor(pool, tiny_llama)
    lost = engine(pool, 1)
    lost.deadlines = VllmDeadlines(step_s=1.0, grace_s=5.0)
    try:
        assert ex.execute(None, pinned_plan([(1,)])).ok
        for i in range(2):
            pool.submit(TIER, req(f"h{i}", 12, 10, salt=5 + i))
        pool.step()
        pool.step()
        lost.rpc("toy_fault", "step", "hang", 0)
        t0 = time.perf_counter()
        with pytest.raises(EngineError, match=r"(?s)watchdog: 'step 1 of 1' still running.*is lost"):
            pool.step()
        # the watchdog's answer (matched above) within its 1 s deadline plus process teardown; the bound is loose
        # because the CI machine's two cores may be busy (5 s failed once under load)
        assert time.perf_counter() - t0 < 20 and lost.failure is not None and lost.handle.proc is None
        report = ex.execute(pinned_plan([(1,)]), pinned_plan([(2, 3)]))  # tokens so far come from this side
        assert report.ok and report.reprefilled == 2
        while pool.unfinished():
            pool.step()
        assert {rec.engines for rec in pool.records()} == {("tp1-g1", "tp2-g2-3")}
        assert_exact_outputs(pool)
    finally:
        lost.deadlines = VllmDeadlines()


def test_deferred_sleep_ends_before_a_sibling_wakes(tiny_llama: ModelSpec, tmp_path: Path) -> None:
    store = write_toy_store(tmp_path / "store.json", SEED)
    settings = VllmPoolSettings(groups=((0,), (0, 1)), max_model_len=256, check_fill_at_start=False)
    env = {"NITSUM_TOY_SLEEP_S": "0.3"}
    pool, _ = build_vllm_pool(
        tiny_llama, 2, store, tmp_path, settings, target=toy_engine_process, env=env, log=lambda _: None
    )
    try:
        a, b = engine(pool, 0), engine(pool, 0, 1)
        assert a.siblings == [b] and b.siblings == [a]
        a.wake()
        t0 = time.perf_counter()
        a.sleep()
        assert time.perf_counter() - t0 < 0.2 and a.handle.pending == "sleep" and a.state is EngineState.ASLEEP
        b.wake()
        assert a.handle.pending is None and a.timings["sleep_s"] >= 0.3
        slept = next(end for what, _, end in a.rpc("toy_calls")[0][::-1] if what == "sleep")
        woke = next(start for what, start, _ in b.rpc("toy_calls")[0] if what == "wake_up weights")
        assert slept <= woke  # across processes: a's memory was released before b allocated
    finally:
        close_pool(pool)


def test_start_waves_put_disjoint_groups_together() -> None:
    groups = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]
    assert start_waves(groups, concurrent=True) == [[(0,), (1,), (2,), (3,)], [(0, 1), (2, 3)], [(0, 1, 2, 3)]]
    assert start_waves(groups, concurrent=False) == [[g] for g in groups]


def test_a_wake_that_cannot_fit_is_refused_before_it_starts(
    tiny_llama: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On 2×H200 a wake that ran out of memory halfway left vLLM with its weights awake and its KV asleep; now the
    # engine measures at start what a wake allocates and refuses one the GPU has no room for, touching nothing.
    others = tmp_path / "others-bytes"
    monkeypatch.setenv("NITSUM_TOY_OTHERS_FILE", str(others))
    monkeypatch.setenv("NITSUM_TOY_ENGINE_BYTES", "10e9")
    monkeypatch.setenv("NITSUM_TOY_GPU_BYTES", "80e9")
    pool = start_toy_vllm_pool(tiny_llama, tmp_path, SEED, groups=((0,),))
    try:
        engine = pool.engine((0,))
        assert isinstance(engine, VllmEngine) and engine.wake_bytes == (10_000_000_000,)
        others.write_text("75e9")  # another engine holds 75 GB of GPU 0: 5 GB free
        with pytest.raises(EngineCapacityError, match=r"needs 9\.3 GiB free on GPU 0 to wake and 4\.7 GiB are free"):
            engine.wake()
        assert engine.state is EngineState.ASLEEP
        report = TransitionExecutor(pool, tiny_llama).execute(None, pinned_plan([(0,)]))
        assert not report.ok and report.rolled_back and "GiB are free" in report.error
        others.write_text("0")
        assert TransitionExecutor(pool, tiny_llama).execute(None, pinned_plan([(0,)])).ok
        assert engine.state is EngineState.AWAKE
    finally:
        pool.sleep_all()
        close_pool(pool)
