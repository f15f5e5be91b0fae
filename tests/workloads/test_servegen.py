"""ServeGen sampling: window rates, burstiness, lengths, the missing-client policies, seeding, bad input."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nitsum_opt.workloads import TraceFormatError, load_servegen
from nitsum_opt.workloads.servegen import sample_servegen
from nitsum_opt.workloads.servegen_data import read_servegen_datasets, read_servegen_windows

FIXTURES = Path(__file__).parent / "fixtures"
WINDOWS = FIXTURES / "toy_client_windows.csv"


def _load(**options: object):
    return load_servegen(WINDOWS, **options)


def _window_counts(arrival_s: np.ndarray, windows: int) -> list[int]:
    return np.bincount((arrival_s // 600).astype(int), minlength=windows).tolist()


def test_window_rates_are_reproduced_exactly_at_scale_one() -> None:
    trace, report = _load(duration_s=1800.0)
    # window 0: clients 0, 1, 2 at 2 + 1 + 3 req/s; window 600: client 1 at 1; window 1200: client 0 at 0.5
    assert _window_counts(trace.arrival_s, 3) == [3600, 600, 300]
    assert (trace.start_s, trace.end_s) == (0.0, 1800.0) and report.requests == 4500


def test_scaled_rates_are_reproduced_within_rounding() -> None:
    trace, _ = _load(duration_s=1800.0, rate_scale=0.37)
    for got, want in zip(_window_counts(trace.arrival_s, 3), [3600 * 0.37, 600 * 0.37, 300 * 0.37], strict=True):
        assert abs(got - want) <= 3  # one stochastic rounding per client window


def test_span_is_cut_and_rebased() -> None:
    trace, _ = _load(start_s=300.0, duration_s=600.0)
    assert trace.arrival_s.min() >= 0.0 and trace.arrival_s.max() < 600.0 and trace.end_s == 600.0
    # expected: half of window 0 (1800) + half of window 600 (300)
    assert abs(len(trace) - 2100) < 150


def test_sampling_is_seeded() -> None:
    first, _ = _load(duration_s=1800.0, seed=7)
    again, _ = _load(duration_s=1800.0, seed=7)
    other, _ = _load(duration_s=1800.0, seed=8)
    assert first.equals(again)
    assert not np.array_equal(first.arrival_s, other.arrival_s)


def _single_window_file(tmp_path: Path, dist: str, shape: float, scale: float, rate: float = 20.0) -> Path:
    path = tmp_path / "one_client_windows.csv"
    path.write_text(
        f"client_id,window_start_s,rate_rps,iat_cv,iat_dist,iat_shape,iat_scale\n0,0,{rate},0,{dist},{shape},{scale}\n"
    )
    return path


@pytest.mark.parametrize(
    ("dist", "shape", "expected_cv"),
    [
        ("Gamma", 0.25, 2.0),  # CV of Gamma gaps = 1/sqrt(shape)
        ("Weibull", 0.6, math.sqrt(math.gamma(1 + 2 / 0.6) / math.gamma(1 + 1 / 0.6) ** 2 - 1)),
    ],
)
def test_fitted_burstiness_is_kept(tmp_path: Path, dist: str, shape: float, expected_cv: float) -> None:
    windows = read_servegen_windows(_single_window_file(tmp_path, dist, shape, 1.0))
    datasets = read_servegen_datasets(FIXTURES / "toy_client_datasets.json.gz")
    trace, _ = sample_servegen(windows, datasets, duration_s=600.0, seed=3)
    gaps = np.diff(trace.arrival_s)
    assert len(trace) == 12_000
    assert gaps.std() / gaps.mean() == pytest.approx(expected_cv, rel=0.15)


def test_lengths_follow_client_distributions_and_pool_for_missing_clients() -> None:
    trace, report = _load(duration_s=1800.0)
    inputs = trace.input_tokens
    assert set(np.unique(inputs).tolist()) == {100, 200, 1000}
    # client 1 (1,200 requests) always asks 1,000 tokens; client 2 (1,800, no length data) borrows from the
    # pool weighted by volume in the 6-h window: client 1 has 1,200 of the 2,700 present requests.
    expected_share = (1200 + 1800 * 1200 / 2700) / 4500
    assert np.mean(inputs == 1000) == pytest.approx(expected_share, abs=0.03)
    pooled = next(note for note in report.notes if "pool" in note)
    assert "[2]" in pooled and "1800 requests (40.0%)" in pooled
    assert any("raised to 1" in note for note in report.notes)  # client 1's 0-token outputs
    assert trace.output_tokens.min() == 1


def test_empty_six_hour_window_falls_back_to_the_earlier_one() -> None:
    trace, _ = _load(start_s=21600.0, duration_s=600.0)
    assert len(trace) == 900 and set(np.unique(trace.input_tokens).tolist()) <= {100, 200}


def test_missing_client_policies() -> None:
    dropped, report = _load(duration_s=1800.0, missing_lengths="drop")
    assert len(dropped) == 4500 - 1800 and any("dropped" in note for note in report.notes)
    with pytest.raises(ValueError, match="client 2 has no length data"):
        _load(duration_s=1800.0, missing_lengths="error")
    only_present, _ = _load(duration_s=1800.0, clients=[0, 1], missing_lengths="error")
    assert len(only_present) == 2700


def test_client_selection() -> None:
    top, _ = _load(duration_s=1800.0, top_clients=1)  # client 2 is the busiest (1,800 requests)
    assert len(top) == 1800
    with pytest.raises(ValueError, match="do not appear"):
        _load(clients=[42])


def test_multimodal_input_adds_item_tokens(tmp_path: Path) -> None:
    windows = _single_window_file(tmp_path, "Gamma", 1.0, 1.0, rate=1.0)
    cells = {
        "text_tokens": "{10: 1.0}",
        "image_tokens": "{100: 1.0}",
        "audio_tokens": "{}",
        "video_tokens": "{}",
        "image_count": "{0: 0.5, 2: 0.5}",
        "audio_count": "{0: 1.0}",
        "video_count": "{0: 1.0}",
        "output_tokens": "{5: 1.0}",
    }
    datasets = tmp_path / "mm.json"
    datasets.write_text(json.dumps({"0": {"0": {k: v for k, v in cells.items() if v != "{}"}}}))
    trace, _ = load_servegen(windows, datasets, duration_s=600.0)
    assert set(np.unique(trace.input_tokens).tolist()) == {10, 210}


def test_bad_window_rows_and_unsafe_literals(tmp_path: Path) -> None:
    bad = tmp_path / "bad_client_windows.csv"
    bad.write_text(
        "client_id,window_start_s,rate_rps,iat_cv,iat_dist,iat_shape,iat_scale\n"
        "0,0,1.0,1.0,Gamma,1.0,1.0\n"
        "0,600,1.0,1.0,Pareto,1.0,1.0\n"
        "0,1200,2.0,1.0,,0,0\n"
        "0,1300,1.0,1.0,Gamma,1.0,1.0\n"
    )
    with pytest.raises(TraceFormatError) as caught:
        read_servegen_windows(bad)
    assert (caught.value.line, caught.value.column, caught.value.value) == (3, "iat_dist", "Pareto")
    windows = read_servegen_windows(bad, skip_bad_rows=True)
    assert len(windows) == 1 and windows.rows_skipped == 3
    evil = tmp_path / "evil.json.gz"
    with gzip.open(evil, "wt") as handle:
        json.dump({"0": {"0": {"input_tokens": "__import__('os').getcwd()", "output_tokens": "{1: 1.0}"}}}, handle)
    with pytest.raises(TraceFormatError, match=r"\[0\]\[0\]\[input_tokens\]"):
        load_servegen(WINDOWS, evil, duration_s=600.0, clients=[0])
