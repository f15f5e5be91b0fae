"""Conversion of vLLM's cumulative outputs into the tokens not reported yet (the engine process's side)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nitsum_runtime.vllm_protocol import NO_TOP, new_tokens, top_of


def lp(**by_token: float) -> dict[int, SimpleNamespace]:
    """A vLLM log-probability dict: token id -> object with ``.logprob``."""
    return {int(t.removeprefix("t")): SimpleNamespace(logprob=v) for t, v in by_token.items()}


def test_top_of_sorts_and_cuts_the_sampled_extra_entry() -> None:
    # vLLM adds the sampled token when it is not among the top k: k + 1 entries, in no particular order.
    top = top_of(lp(t9=-3.0, t4=-0.5, t7=-1.25), 2)
    assert top.token_ids == (4, 7) and top.logprobs == (-0.5, -1.25)
    assert top_of(None, 3).token_ids == ()


def test_new_tokens_hands_out_each_token_once_and_the_prompt_top_first() -> None:
    rows = [lp(t5=-0.1, t6=-2.0), lp(t8=-0.2, t5=-1.0), lp(t1=-0.3, t2=-0.9)]
    prompt = [None, lp(t3=-1.0, t4=-2.0), lp(t4=-0.5, t3=-0.7)]
    first = new_tokens("r", [5, 8], rows[:2], prompt, reported=0, k=2, finished=False)
    assert first.token_ids == (5, 8) and [t.token_ids for t in first.top] == [(5, 6), (8, 5)]
    assert [t.token_ids for t in first.prompt_top] == [(3, 4), (4, 3)]  # one per prompt position but the last
    later = new_tokens("r", [5, 8, 1], rows, prompt, reported=2, k=2, finished=True)
    assert later.token_ids == (1,) and later.top[0].logprobs == (-0.3, -0.9) and later.prompt_top == ()
    assert later.finished


def test_new_tokens_refuses_inconsistent_outputs() -> None:
    with pytest.raises(ValueError, match="added with logprobs=k"):
        new_tokens("r", [5], None, None, reported=0, k=2, finished=False)
    with pytest.raises(ValueError, match="3 tokens reported, the engine has 1"):
        new_tokens("r", [5], [lp(t5=-0.1)], None, reported=3, k=2, finished=False)


def test_requests_without_log_probabilities_get_empty_tops() -> None:
    ev = new_tokens("r", [5, 8, 1], None, None, reported=1, k=0, finished=True)
    assert ev.token_ids == (8, 1) and ev.top == (NO_TOP, NO_TOP) and ev.finished
    with pytest.raises(ValueError, match="3 tokens reported"):
        new_tokens("r", [5], None, None, reported=3, k=0, finished=False)
