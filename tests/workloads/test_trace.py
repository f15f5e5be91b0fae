"""RequestTrace: construction, validation, selection, time transforms, merging, summaries."""

from __future__ import annotations

import numpy as np
import pytest

from nitsum_opt.workloads import RequestTrace


def _trace(times, tier=0, tier_names=("a",), source_names=("s",)) -> RequestTrace:
    n = len(times)
    return RequestTrace.from_arrays(
        times,
        np.arange(1, n + 1) * 10,
        np.arange(1, n + 1),
        tier=tier,
        tier_names=tier_names,
        source_names=source_names,
    )


def test_from_arrays_sorts_stably_and_freezes_columns() -> None:
    arrivals = np.array([3.0, 1.0, 1.0, 2.0])
    trace = RequestTrace.from_arrays(arrivals, [30, 10, 11, 20], [3, 1, 2, 2])
    assert trace.arrival_s.tolist() == [1.0, 1.0, 2.0, 3.0]
    assert trace.input_tokens.tolist() == [10, 11, 20, 30]  # tie keeps input order
    assert len(trace) == 4 and (trace.start_s, trace.end_s) == (1.0, 3.0)
    with pytest.raises(ValueError):
        trace.arrival_s[0] = 5.0
    arrivals[0] = 99.0  # the caller's array is neither frozen nor aliased
    assert arrivals.flags.writeable and trace.arrival_s.max() == 3.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arrival_s": [2.0, 1.0], "sort": False}, "not sorted"),
        ({"arrival_s": [-1.0, 1.0]}, "negative"),
        ({"arrival_s": [0.0, np.nan]}, "non-finite"),
        ({"input_tokens": [0, 5]}, "input_tokens"),
        ({"output_tokens": [1, -2]}, "output_tokens"),
        ({"tier": [0, 3]}, "tier"),
        ({"tier_names": ("x", "x")}, "unique"),
        ({"input_tokens": [1, 2, 3]}, "entries"),
        ({"end_s": 0.5}, "outside the interval"),
    ],
)
def test_invalid_traces_are_rejected(kwargs: dict, message: str) -> None:
    base = {"arrival_s": [0.0, 1.0], "input_tokens": [4, 5], "output_tokens": [1, 2]}
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RequestTrace.from_arrays(base.pop("arrival_s"), base.pop("input_tokens"), base.pop("output_tokens"), **base)


def test_window_selects_half_open_interval_and_rebases() -> None:
    trace = _trace([0.0, 1.0, 2.0, 3.0, 4.0])
    part = trace.window(1.0, 3.0)
    assert part.arrival_s.tolist() == [1.0, 2.0]
    assert (part.start_s, part.end_s, part.duration_s) == (1.0, 3.0, 2.0)
    rebased = trace.window(1.0, 3.0, rebase=True)
    assert rebased.arrival_s.tolist() == [0.0, 1.0] and rebased.end_s == 2.0
    assert part.mean_rate_rps == pytest.approx(1.0)
    assert len(trace.window(10.0, 20.0)) == 0


def test_compress_time_doubles_rate_and_shift_moves_interval() -> None:
    trace = _trace([0.0, 2.0, 4.0, 8.0])
    fast = trace.compress_time(2.0)
    assert fast.arrival_s.tolist() == [0.0, 1.0, 2.0, 4.0]
    assert fast.mean_rate_rps == pytest.approx(2 * trace.mean_rate_rps)
    moved = trace.shift(5.0)
    assert moved.arrival_s[0] == 5.0 and (moved.start_s, moved.end_s) == (5.0, 13.0)
    with pytest.raises(ValueError, match="compression"):
        trace.compress_time(0.0)


def test_merge_interleaves_by_time_and_unions_names() -> None:
    first = _trace([0.0, 2.0, 4.0], tier_names=("chat",), source_names=("conv",))
    second = _trace([1.0, 2.0, 3.0], tier_names=("code",), source_names=("code",))
    merged = RequestTrace.merge([first, second], tier_names=("code", "chat"))
    assert merged.arrival_s.tolist() == [0.0, 1.0, 2.0, 2.0, 3.0, 4.0]
    assert merged.tier_names == ("code", "chat") and merged.source_names == ("conv", "code")
    assert merged.tier_labels().tolist() == ["chat", "code", "chat", "code", "code", "chat"]
    assert merged.select_tier("code").input_tokens.tolist() == [10, 20, 30]
    assert first.concat(second).equals(RequestTrace.merge([first, second]))
    with pytest.raises(ValueError, match="not among"):
        RequestTrace.merge([first, second], tier_names=("chat",))


def test_take_with_mask_and_rows_iterator() -> None:
    trace = _trace([0.0, 1.0, 2.0], tier=[0, 1, 0], tier_names=("a", "b"))
    picked = trace.take(trace.tier == 0)
    assert picked.arrival_s.tolist() == [0.0, 2.0] and not picked.tier.flags.writeable
    assert list(trace.rows()) == [(0.0, 10, 1, 0), (1.0, 20, 2, 1), (2.0, 30, 3, 0)]
    with pytest.raises(KeyError, match="tiers"):
        trace.tier_index("zzz")


def test_summary_statistics() -> None:
    trace = RequestTrace.from_arrays(
        [0.0, 1.0, 2.0, 3.0],
        [10, 20, 30, 40],
        [1, 1, 1, 5],
        tier=[0, 0, 1, 1],
        tier_names=("x", "y"),
        start_s=0.0,
        end_s=4.0,
    )
    summary = trace.summary(peak_window_s=2.0)
    assert summary.requests == 4 and summary.mean_rate_rps == 1.0 and summary.span_s == 3.0
    assert summary.peak_rate_rps == 1.0
    assert summary.interarrival_cv == pytest.approx(0.0)
    assert summary.input_tokens.mean == 25.0 and summary.output_tokens.max == 5
    assert summary.tiers["y"].requests == 2 and summary.tiers["y"].input_tokens.p50 == 35.0
    assert summary.sources == {"unknown": 4}


def test_empty_trace() -> None:
    empty = RequestTrace.empty(tier_names=("a", "b"))
    assert len(empty) == 0 and empty.mean_rate_rps == 0.0
    assert empty.summary().input_tokens is None
    merged = RequestTrace.merge([empty, _trace([1.0], tier_names=("b",))])
    assert merged.tier_names == ("a", "b") and merged.tier.tolist() == [1]


def test_thin_keeps_the_timeline_and_scales_the_rate() -> None:
    trace = RequestTrace.from_arrays(np.linspace(0, 100, 10_000), [5] * 10_000, [1] * 10_000)
    thinned = trace.thin(0.25, seed=1)
    assert thinned.end_s == trace.end_s and abs(len(thinned) - 2500) < 150
    assert thinned.equals(trace.thin(0.25, seed=1))
    with pytest.raises(ValueError, match="keep_fraction"):
        trace.thin(0.0)
