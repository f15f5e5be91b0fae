"""Engine pool: candidate TP groups, and a ledger that catches lost, duplicated and out-of-order tokens."""

from __future__ import annotations

import pytest

from nitsum_runtime.engine import GenerationRequest, TokenEvent
from nitsum_runtime.pool import EnginePool, LedgerError, candidate_groups
from nitsum_runtime.ref_model import TopK


def test_candidate_groups_are_aligned() -> None:
    assert candidate_groups(4, (1, 2, 4)) == ((0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3))
    assert candidate_groups(8, (8,)) == (tuple(range(8)),)
    assert candidate_groups(2, (4,)) == ()


def _event(rid: str, index: int, finished: bool = False) -> TokenEvent:
    return TokenEvent(
        request_id=rid,
        index=index,
        token_id=1,
        top=TopK(token_ids=(1,), logprobs=(-0.1,)),
        finished=finished,
        engine_id="e",
    )


def test_ledger_rejects_duplicates_gaps_and_late_tokens() -> None:
    pool = EnginePool([])
    pool.requests["a"] = GenerationRequest(request_id="a", prompt_token_ids=(1,), max_tokens=2)
    pool.outputs["a"], pool.tier_of["a"] = [], "chat"
    pool.record(_event("a", 0))
    with pytest.raises(LedgerError, match=r"token index 0 .* expected 1"):
        pool.record(_event("a", 0))
    with pytest.raises(LedgerError, match=r"token index 2 .* expected 1"):
        pool.record(_event("a", 2))
    pool.record(_event("a", 1, finished=True))
    with pytest.raises(LedgerError, match="after it finished"):
        pool.record(_event("a", 2))
    with pytest.raises(LedgerError, match="unknown request"):
        pool.record(_event("b", 0))
    assert pool.records()[0].tokens == (1, 1) and pool.records()[0].finished


def test_submit_needs_a_live_instance_of_the_tier() -> None:
    with pytest.raises(KeyError, match="no live instance serves tier 'chat'"):
        EnginePool([]).submit("chat", GenerationRequest(request_id="x", prompt_token_ids=(1,), max_tokens=1))
