"""Open-loop replay (:mod:`nitsum_runtime.replay`) on an engine that schedules like vLLM's, on a virtual clock:
known answers for TTFT / TPOT, queueing, chunked prompts, the drain limit, and the measured-file round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from engine_factories import ToyEngine, VirtualClock

from nitsum_opt.sim.fidelity import read_measured
from nitsum_opt.sim.slices import TraceSlice
from nitsum_runtime.bench_fidelity import requests_of, slice_summary, write_rows
from nitsum_runtime.replay import ReplayRequest, replay

STEP_S = 1e-3
PER_TOKEN_S = 1e-7


def _replay(requests: list[ReplayRequest], drain_s: float = 120.0, **engine: int):
    clock = VirtualClock()
    toy = ToyEngine(clock=clock, **engine)
    result = replay(toy, requests, vocab_size=1000, max_model_len=8192, drain_s=drain_s, clock=clock, sleep=clock.sleep)
    return result, clock


def test_single_request_known_answer() -> None:
    result, _ = _replay([ReplayRequest(0.5, 1000, 3)])
    (t,) = result.timings
    prefill = STEP_S + 1000 * PER_TOKEN_S
    decode = STEP_S + PER_TOKEN_S
    assert t.ttft_s == pytest.approx(prefill)
    assert t.tpot_s == pytest.approx(decode)  # two decode steps for tokens 2 and 3
    assert t.finish_s == pytest.approx(0.5 + prefill + 2 * decode)
    assert result.steps == 3 and result.aborted == 0
    assert result.late_adds == [0.0]


def test_chunked_prompt_takes_two_steps_and_one_token_has_no_tpot() -> None:
    result, _ = _replay([ReplayRequest(0.0, 1000, 1)], budget=600)
    (t,) = result.timings
    assert t.ttft_s == pytest.approx(2 * STEP_S + 1000 * PER_TOKEN_S)
    assert math.isnan(t.tpot_s)
    assert t.finish_s == pytest.approx(t.ttft_s)


def test_queueing_counts_from_arrival() -> None:
    # one sequence at a time: the second request waits for the first to finish
    reqs = [ReplayRequest(0.0, 100, 5), ReplayRequest(0.0, 100, 5)]
    result, _ = _replay(reqs, max_seqs=1)
    first, second = result.timings
    one_request_s = (STEP_S + 100 * PER_TOKEN_S) + 4 * (STEP_S + PER_TOKEN_S)
    assert first.finish_s == pytest.approx(one_request_s)
    assert second.ttft_s == pytest.approx(one_request_s + STEP_S + 100 * PER_TOKEN_S)
    assert second.tpot_s == pytest.approx(first.tpot_s)


def test_arrival_during_a_step_is_added_after_it() -> None:
    # request 2 arrives while request 1's 8000-token prefill step (1.8 ms) runs
    reqs = [ReplayRequest(0.0, 8000, 2), ReplayRequest(0.001, 10, 2)]
    result, _ = _replay(reqs)
    assert result.late_adds[1] == pytest.approx(STEP_S + 8000 * PER_TOKEN_S - 0.001)
    assert result.timings[1].ttft_s > result.late_adds[1]


def test_drain_limit_aborts_and_reports_unfinished() -> None:
    reqs = [ReplayRequest(0.0, 10, 2), ReplayRequest(0.0, 10, 5000)]
    result, clock = _replay(reqs, drain_s=1.0)
    short, long = result.timings
    assert not math.isnan(short.finish_s)
    assert not math.isnan(long.ttft_s) and math.isnan(long.finish_s) and math.isnan(long.tpot_s)
    assert result.aborted == 1
    assert 1.0 < clock.now_s < 1.01


@pytest.mark.parametrize(
    ("requests", "match"),
    [
        ([ReplayRequest(1.0, 10, 2), ReplayRequest(0.5, 10, 2)], "not before request 0"),
        ([ReplayRequest(0.0, 0, 2)], "must be ≥ 1"),
        ([ReplayRequest(0.0, 8000, 500)], "exceed max_model_len=8192"),
        ([ReplayRequest(math.nan, 10, 2)], "finite"),
    ],
)
def test_bad_requests_are_refused(requests: list[ReplayRequest], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _replay(requests)


def test_measured_file_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(3)
    n = 40
    piece = TraceSlice(
        name="rate-20",
        arrival_s=np.sort(rng.uniform(0, 2.0, n)),
        input_tokens=rng.integers(1, 3000, n),
        output_tokens=rng.integers(1, 50, n),
        tier=tuple(rng.choice(["interactive", "standard"], n)),
        duration_s=2.0,
    )
    clock = VirtualClock()
    result = replay(
        ToyEngine(clock=clock, budget=4096),
        requests_of(piece),
        vocab_size=1000,
        max_model_len=8192,
        clock=clock,
        sleep=clock.sleep,
    )
    path = tmp_path / "measured.csv"
    write_rows(path, piece.name, result)
    (timings,) = read_measured(path, [piece]).values()
    np.testing.assert_allclose(timings.ttft_s, [t.ttft_s for t in result.timings], atol=1e-6)
    np.testing.assert_allclose(timings.tpot_s, [t.tpot_s for t in result.timings], atol=1e-6)
    assert timings.completed.all()
    summary = slice_summary(piece, result)
    assert summary["requests"] == n and summary["aborted"] == 0 and summary["steps"] == result.steps


def test_step_log_composition_and_model_check(tmp_path) -> None:
    from nitsum_opt.sim.fidelity import read_steps, step_errors
    from nitsum_runtime.bench_fidelity import write_steps

    clock = VirtualClock()
    reqs = [ReplayRequest(0.0, 1000, 3), ReplayRequest(0.0, 300, 2)]
    result = replay(
        ToyEngine(clock=clock, budget=1200),
        reqs,
        vocab_size=1000,
        max_model_len=8192,
        clock=clock,
        sleep=clock.sleep,
        log_steps=True,
    )
    first, second, third = (
        (r.num_prefill_seqs, r.prefill_tokens, r.prefill_attention_pairs, r.num_decode_seqs, r.decode_context_tokens)
        for r in result.step_log[:3]
    )
    # step 1: request 0's prompt whole, request 1's first 200 tokens; step 2: request 1's last 100 after 200
    # cached while request 0 decodes its 2nd token (1000 cached + the new one = 1001 keys); step 3: both decode
    assert first == (2, 1200, 1000 * 1001 // 2 + 200 * 201 // 2, 0, 0)
    assert second == (1, 100, 100 * 200 + 100 * 101 // 2, 1, 1001)
    assert third == (0, 0, 0, 2, 1002 + 301)
    path = tmp_path / "steps.csv.gz"
    write_steps(path, result.step_log)
    times, comps = read_steps(path)
    assert len(times) == result.steps and comps.shape == (result.steps, 5)

    class Exact:  # the toy engine's own step-time law, as a latency model
        def predict_ms(self, tp, n_pre, tokens, pairs, n_dec, ctx):
            return 1.0 + (tokens + n_dec) * 1e-4

        def kv_cache_tokens(self, tp):
            return 10**6

    errors = step_errors(Exact(), 1, times, comps)
    assert errors["all_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert errors["all_mape_pct"] < 1e-3
    assert errors["decode_steps"] == 1 and result.steps == 3


def test_bench_fidelity_refuses_unknown_slices_before_touching_the_output(tmp_path) -> None:
    from nitsum_runtime.bench_fidelity import parse_args, run

    out = tmp_path / "out"
    out.mkdir()
    (out / "measured.csv").write_text("kept\n", encoding="utf-8")
    slices = str(Path(__file__).resolve().parents[2] / "benchmarks/gpu/fidelity/slices.csv")
    with pytest.raises(SystemExit, match=r"--only nope: no such slice .* it has \['mean-4rps'"):
        run(parse_args(["--slices", slices, "--out", str(out), "--only", "nope,mean-4rps"]))
    assert (out / "measured.csv").read_text(encoding="utf-8") == "kept\n"
