"""compose_step: prefill/decode classification and the CSV sums, from a schedule."""

from __future__ import annotations

import pytest

from nitsum_runtime.composition import ScheduledRequest, attention_pairs, compose_step
from nitsum_runtime.profile_schema import ExperimentKind


def test_attention_pairs_counts_causal_pairs_by_brute_force() -> None:
    for chunk, ctx in [(1, 0), (5, 0), (4, 3), (7, 11)]:
        # query at absolute position p attends keys 0..p
        brute = sum(p + 1 for p in range(ctx, ctx + chunk))
        assert attention_pairs(chunk, ctx) == brute


def test_attention_pairs_rejects_negative() -> None:
    with pytest.raises(ValueError, match="chunk_tokens=-1"):
        attention_pairs(-1, 0)


def test_mixed_step_sums_prefill_chunks_and_decode_contexts() -> None:
    prompts = {"a": 100, "b": 100, "c": 3000, "d": 50}
    step = [
        ScheduledRequest("a", 1, 100),  # first decode after a 100-token prompt: attends 101 keys
        ScheduledRequest("b", 1, 120),  # 20 tokens generated so far
        ScheduledRequest("c", 1000, 2000),  # third chunk of a chunked prefill
        ScheduledRequest("d", 50, 0),  # whole short prompt
    ]
    comp = compose_step(step, prompts)
    assert comp.num_decode_seqs == 2
    assert comp.decode_context_tokens == 101 + 121
    assert comp.num_prefill_seqs == 2
    assert comp.prefill_tokens == 1050
    assert comp.prefill_context_tokens == 2000
    assert comp.prefill_attention_pairs == 1000 * 2000 + 1000 * 1001 // 2 + 50 * 51 // 2
    assert comp.experiment is ExperimentKind.MIXED
    assert comp.counts() == (2, 1050, 2)
    assert comp.total_tokens == 1052


def test_pure_kinds() -> None:
    assert compose_step([ScheduledRequest("a", 10, 0)], {"a": 10}).experiment is ExperimentKind.PREFILL
    assert compose_step([ScheduledRequest("a", 1, 10)], {"a": 10}).experiment is ExperimentKind.DECODE
    with pytest.raises(ValueError, match="empty step"):
        _ = compose_step([], {}).experiment


def test_unknown_request_and_overlong_chunk_and_multi_token_decode_fail() -> None:
    with pytest.raises(KeyError, match="did not submit"):
        compose_step([ScheduledRequest("x", 1, 0)], {"a": 10})
    with pytest.raises(ValueError, match="runs past"):
        compose_step([ScheduledRequest("a", 8, 5)], {"a": 10})
    with pytest.raises(ValueError, match="exactly one token"):
        compose_step([ScheduledRequest("a", 2, 10)], {"a": 10})
