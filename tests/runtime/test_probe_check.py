"""compare_probe_runs: identical runs, and the four ways two runs of the same probes can differ."""

from __future__ import annotations

import pytest

from nitsum_runtime.probe_check import compare_probe_runs

A = [
    [(5, (5, 9, 2), (-0.5, -1.25, -3.0)), (9, (9, 5, 7), (-0.25, -2.0, -2.0))],
    [(1, (1, 3, 4), (-0.1, -2.5, -4.0))],
]


def test_identical_runs() -> None:
    c = compare_probe_runs(A, [list(r) for r in A], ["p0", "p1"])
    assert c.identical and c.kind == "" and c.first_difference == ""
    assert (c.requests, c.steps, c.differing_requests, c.max_logprob_diff) == (2, 3, 0, 0.0)


def test_tied_entries_in_another_order() -> None:
    b = [list(A[0]), list(A[1])]
    b[0][1] = (9, (9, 7, 5), (-0.25, -2.0, -2.0))  # ids 5 and 7 tie at -2.0: only their order changed
    c = compare_probe_runs(A, b, ["p0", "p1"])
    assert not c.identical and c.kind == "tie-order" and c.max_logprob_diff == 0.0
    assert c.first_difference.startswith("request p0 step 1: token 9 vs 9; top ids [9, 5, 7] vs [9, 7, 5]")


def test_log_probabilities_that_moved() -> None:
    b = [list(A[0]), [(1, (1, 3, 4), (-0.1, -2.5, -4.0 + 2**-20))]]
    c = compare_probe_runs(A, b)
    assert c.kind == "logprobs" and c.differing_requests == 1
    assert c.max_logprob_diff == pytest.approx(2**-20)
    assert c.first_difference.startswith("request 1 step 0")


def test_greedy_token_that_changed_and_different_lengths() -> None:
    b = [[(9, (9, 5, 2), (-0.5, -0.5, -3.0))], list(A[1])]
    c = compare_probe_runs(A, b)
    assert c.kind == "token" and "token 5 vs 9" in c.first_difference
    c = compare_probe_runs(A, [A[0][:1], A[1]])
    assert c.kind == "length" and c.first_difference == "request 0: 2 vs 1 steps"
    with pytest.raises(ValueError, match="2 requests, run b 1"):
        compare_probe_runs(A, A[:1])
