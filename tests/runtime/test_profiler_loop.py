"""The profiler's experiment loop, run against a small engine that schedules like vLLM's v1 scheduler.

``ToyEngine`` (``tests/engine_factories.py``) is not a mock of vLLM: it implements the scheduling policy the
profiler relies on and reports what it scheduled the way ``InProcessVllmEngine.step`` does. That lets CI check
the labels, repeats and compositions the profiler records, and that its plan agrees with such a scheduler.
"""

from __future__ import annotations

import re
import time

import pytest
from engine_factories import ToyEngine

from nitsum_runtime.profile_grid import EngineLimits, build_grid
from nitsum_runtime.profile_schema import ExperimentKind, ProfileRow
from nitsum_runtime.profiler import Profiler


def _run(smoke: bool, kv: int, deadline: float = float("inf"), passes: int = 1) -> tuple[Profiler, list[ProfileRow]]:
    limits = EngineLimits(max_model_len=8192, max_num_batched_tokens=16384, max_num_seqs=512, kv_cache_tokens=kv)
    rows: list[ProfileRow] = []
    prof = Profiler(
        engine=ToyEngine(),
        grid=build_grid(limits, smoke=smoke),
        sink=rows.append,
        model="toy",
        gpu="CPU",
        tp=1,
        vocab_size=1000,
        max_model_len=8192,
        deadline=deadline,
        passes=passes,
    )
    prof.run()
    return prof, rows


def test_smoke_grid_plan_matches_the_schedule_and_rows_are_labelled() -> None:
    prof, rows = _run(smoke=True, kv=200_000)
    assert prof.mismatches == []
    assert prof.skipped == []
    assert prof.rows == len(rows) > 0
    assert {r.experiment for r in rows} == set(ExperimentKind)
    assert not any(r.config_id == "warmup" for r in rows)
    for r in rows:
        if m := re.fullmatch(r"prefill-n(\d+)-l(\d+)", r.config_id):
            n, length = map(int, m.groups())
            assert (r.num_prefill_seqs, r.prefill_tokens, r.num_decode_seqs) == (n, n * length, 0)
            assert r.prefill_attention_pairs == n * length * (length + 1) // 2
        elif m := re.fullmatch(r"decode-c(\d+)-b(\d+)", r.config_id):
            ctx, b = map(int, m.groups())
            assert r.experiment is ExperimentKind.DECODE and r.num_decode_seqs == b
            # every sequence attends at least its prompt and one generated token
            assert r.decode_context_tokens >= b * (ctx + 1)
        elif m := re.fullmatch(r"mixed-c(\d+)-b(\d+)-p(\d+)-k(\d+)-i(\d+)", r.config_id):
            _ctx, b, p, k, i = map(int, m.groups())
            assert r.experiment is ExperimentKind.MIXED and r.num_decode_seqs == b
            assert r.prefill_context_tokens == i * k
            assert r.prefill_tokens == min(k, p - i * k)
        elif m := re.fullmatch(r"chunked-p(\d+)-k(\d+)-i(\d+)", r.config_id):
            p, k, i = map(int, m.groups())
            assert r.experiment is ExperimentKind.PREFILL and r.prefill_context_tokens == i * k
    decode_ids = {r.config_id for r in rows if r.config_id.startswith("decode-")}
    assert decode_ids == {
        "decode-c128-b8",
        "decode-c128-b4",
        "decode-c128-b2",
        "decode-c128-b1",
        "decode-c1024-b4",
        "decode-c1024-b2",
        "decode-c1024-b1",
    }
    repeats = {r.repeat for r in rows if r.config_id == "decode-c128-b8"}
    assert repeats == {0, 1, 2, 3}


def test_full_grid_runs_without_a_single_mismatch() -> None:
    prof, rows = _run(smoke=False, kv=800_000)
    assert prof.mismatches == []
    assert prof.skipped == []
    decode = [r for r in rows if r.config_id == "decode-c128-b512"]
    assert len(decode) == 10 and all(r.num_decode_seqs == 512 for r in decode)


def test_deadline_skips_configurations_and_says_which() -> None:
    prof, rows = _run(smoke=True, kv=200_000, deadline=time.monotonic() - 1)
    assert rows == []
    assert "prefill-n1-l16" in prof.skipped
    assert any(s.startswith("decode-c128") for s in prof.skipped)


@pytest.mark.parametrize("kv", [20_000])
def test_small_cache_never_preempts(kv: int) -> None:
    prof, _rows = _run(smoke=False, kv=kv)
    assert prof.mismatches == []


def test_passes_repeat_the_grid_with_disjoint_repeat_labels() -> None:
    _, one = _run(smoke=True, kv=200_000)
    prof, two = _run(smoke=True, kv=200_000, passes=2)
    assert prof.mismatches == [] and prof.skipped == []
    assert len(two) == 2 * len(one)
    stride = build_grid(
        EngineLimits(max_model_len=8192, max_num_batched_tokens=16384, max_num_seqs=512, kv_cache_tokens=200_000),
        smoke=True,
    ).repeat_stride
    first = {(r.config_id, r.repeat) for r in one}
    labels = [(r.config_id, r.repeat) for r in two]
    assert len(set(labels)) == len(labels), "a (config, repeat) label was recorded twice"
    assert set(labels) == first | {(c, r + stride) for c, r in first}
    # the second pass measures the same compositions as the first
    key = lambda r: (r.config_id, r.repeat % stride, r.num_prefill_seqs, r.prefill_tokens, r.num_decode_seqs)  # noqa: E731
    assert sorted(map(key, two[: len(one)])) == sorted(map(key, two[len(one) :]))


def test_passes_below_one_are_refused() -> None:
    limits = EngineLimits(max_model_len=8192, max_num_batched_tokens=16384, max_num_seqs=512, kv_cache_tokens=10**5)
    with pytest.raises(ValueError, match="passes=0"):
        Profiler(ToyEngine(), build_grid(limits, smoke=True), lambda _r: None, "toy", "CPU", 1, 1000, 8192, passes=0)
