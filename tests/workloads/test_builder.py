"""WorkloadSpec and the builder: rate scaling, windows, offsets, length limits, YAML, the default workload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nitsum_opt.workloads import (
    DEFAULT_TIER_NAMES,
    PiecewiseArrivals,
    PoissonArrivals,
    RateSegment,
    SyntheticSource,
    TraceSource,
    WorkloadSpec,
    build_workload,
    build_workload_detailed,
    build_workload_file,
    default_tiers,
    default_workload,
    default_workload_spec,
    load_azure_2023,
)

FIXTURES = Path(__file__).parent / "fixtures"
CONV = "azure2023_conv_head.csv"


def _spec(**source_fields: object) -> WorkloadSpec:
    source = TraceSource(name="conv", tier="chat", path=CONV, format="azure2023", **source_fields)
    return WorkloadSpec(tiers=("chat",), sources=(source,))


def test_time_compression_two_doubles_the_rate() -> None:
    base = build_workload(_spec(), FIXTURES)
    fast = build_workload(_spec(time_compression=2.0), FIXTURES)
    assert len(fast) == len(base) == 12
    assert fast.mean_rate_rps == pytest.approx(2 * base.mean_rate_rps)
    np.testing.assert_allclose(fast.arrival_s, base.arrival_s / 2)
    scaled = build_workload(_spec().scaled(2.0), FIXTURES)
    assert scaled.mean_rate_rps == pytest.approx(2 * base.mean_rate_rps)


def test_target_mean_rate() -> None:
    built = build_workload_detailed(_spec(target_mean_rate_rps=5.0), FIXTURES)
    assert built.trace.mean_rate_rps == pytest.approx(5.0)
    assert built.sources[0].time_compression == pytest.approx(5.0 / (12 / 9.427468), rel=1e-6)
    with pytest.raises(ValueError, match="either time_compression or target_mean_rate_rps"):
        _spec(target_mean_rate_rps=5.0, time_compression=2.0)


def test_window_offset_and_duration() -> None:
    trace = build_workload(_spec(window_start_s=4.0, window_duration_s=2.0, offset_s=10.0), FIXTURES)
    raw = load_azure_2023(FIXTURES / CONV).trace
    expected = raw.arrival_s[(raw.arrival_s >= 4.0) & (raw.arrival_s < 6.0)] - 4.0 + 10.0
    np.testing.assert_allclose(trace.arrival_s, expected)
    assert (trace.start_s, trace.end_s) == (0.0, 12.0)
    cut = build_workload(WorkloadSpec.model_validate({**_spec().model_dump(), "duration_s": 5.0}), FIXTURES)
    assert cut.arrival_s.max() < 5.0 and cut.end_s == 5.0 and len(cut) == 4


def test_length_limit_clip_and_drop() -> None:
    clipped = build_workload_detailed(_spec(max_total_tokens=400), FIXTURES)
    totals = clipped.trace.input_tokens + clipped.trace.output_tokens
    assert totals.max() <= 400 and clipped.sources[0].clipped_requests == 8
    assert clipped.trace.output_tokens.tolist() == load_azure_2023(FIXTURES / CONV).trace.output_tokens.tolist()
    dropped = build_workload_detailed(_spec(max_total_tokens=400, overlong="drop"), FIXTURES)
    assert len(dropped.trace) == 4 and dropped.sources[0].dropped_requests == 8


def test_tiers_are_mixed_by_time_in_spec_order() -> None:
    spec = WorkloadSpec(
        tiers=("batch", "chat"),
        sources=(
            TraceSource(name="conv", tier="chat", path=CONV, format="azure2023"),
            SyntheticSource(
                name="docs",
                tier="batch",
                lengths_path="vidur_lengths_sample.csv",
                arrivals=PoissonArrivals(rate_rps=2.0),
                duration_s=20.0,
                offset_s=5.0,
            ),
        ),
        seed=3,
    )
    trace = build_workload(spec, FIXTURES)
    assert trace.tier_names == ("batch", "chat") and trace.source_names == ("conv", "docs")
    batch = trace.select_tier("batch")
    assert batch.arrival_s.min() >= 5.0 and batch.arrival_s.max() < 25.0 and 15 < len(batch) < 70
    assert set(batch.input_tokens.tolist()) <= {3772, 2015, 1500, 100}
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert build_workload(spec, FIXTURES).equals(trace)  # seeded
    other = build_workload(WorkloadSpec.model_validate({**spec.model_dump(), "seed": 4}), FIXTURES)
    assert not other.equals(trace)


def test_piecewise_schedule_shapes_the_rate() -> None:
    arrivals = PiecewiseArrivals(
        segments=(RateSegment(duration_s=100, rate_rps=1.0), RateSegment(duration_s=100, rate_rps=9.0))
    )
    times = arrivals.sample(400.0, np.random.default_rng(0))
    first, second = np.histogram(times, bins=[0, 100, 200, 300, 400])[0][:2]
    assert arrivals.mean_rate_rps == 5.0 and 60 < first < 140 and 800 < second < 1000


def test_yaml_round_trip(tmp_path: Path) -> None:
    spec = default_workload_spec(load_scale=1.5, duration_s=600.0, seed=9)
    text = spec.to_yaml()
    assert WorkloadSpec.from_yaml(text) == spec
    path = tmp_path / "w.yaml"
    spec.save(path)
    assert WorkloadSpec.load(path) == spec
    local = _spec().model_dump(mode="json")
    local["sources"][0]["path"] = str(FIXTURES / CONV)
    (tmp_path / "local.yaml").write_text(WorkloadSpec.model_validate(local).to_yaml())
    assert len(build_workload_file(tmp_path / "local.yaml").trace) == 12


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "tiers: [a]\nsources:\n- {kind: trace, name: s, tier: b, path: x, format: azure2023}\n",
            "not in tiers",
        ),
        ("tiers: [a]\nsources:\n- {kind: trace, name: s, tier: a, path: x, format: csv}\n", "format"),
        (
            "tiers: [a, a]\nsources:\n- {kind: trace, name: s, tier: a, path: x, format: azure2023}\n",
            "unique",
        ),
        ("tiers: [a]\nsources: []\n", "sources"),
        ("tiers: [a\n", "not valid YAML"),
        ("- 1\n", "mapping"),
    ],
)
def test_bad_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkloadSpec.from_yaml(text, origin="w.yaml")


def test_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        build_workload(
            _spec().model_copy(
                update={"sources": (TraceSource(name="x", tier="chat", path="missing.csv", format="azure2023"),)}
            ),
            tmp_path,
        )
    with pytest.raises(FileNotFoundError, match="bundled"):
        build_workload(
            WorkloadSpec(
                tiers=("a",),
                sources=(TraceSource(name="x", tier="a", path="bundled:nope.csv", format="azure2023"),),
            )
        )


def test_default_workload() -> None:
    built = build_workload_detailed(default_workload_spec())
    trace = built.trace
    assert trace.tier_names == DEFAULT_TIER_NAMES == tuple(t.name for t in default_tiers())
    counts = dict(zip(trace.tier_names, np.bincount(trace.tier).tolist(), strict=True))
    # the first 3,420 s of each bundled Azure file (checked against the files' own counts) + ~1 req/s
    assert counts["interactive"] == 19104 and counts["standard"] == 8623
    assert abs(counts["background"] - 3420) < 4 * np.sqrt(3420)
    assert trace.end_s == 3420.0 and (trace.input_tokens + trace.output_tokens).max() <= 8192
    assert [s.clipped_requests for s in built.sources] == [1, 0, 0]
    assert default_workload().equals(trace)
    double = default_workload(load_scale=2.0)
    assert double.end_s == 1710.0 and len(double) == len(trace)
