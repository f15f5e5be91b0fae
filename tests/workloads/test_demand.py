"""Per-epoch demand, length mixes and forecasters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitsum_opt.workloads import (
    EwmaForecaster,
    LastWindowForecaster,
    RequestTrace,
    default_workload,
    epoch_demand,
    forecast_error,
    length_mixes,
    observed_demand,
)


def _two_tier_trace() -> RequestTrace:
    return RequestTrace.from_arrays(
        [0.0, 5.0, 9.9, 10.0, 15.0, 25.0],
        [100, 200, 300, 400, 500, 600],
        [10, 20, 30, 40, 50, 60],
        tier=[0, 1, 0, 0, 1, 1],
        tier_names=("chat", "batch"),
        start_s=0.0,
        end_s=25.0,
    )


def test_epoch_counts_rates_and_partial_last_epoch() -> None:
    demand = epoch_demand(_two_tier_trace(), epoch_s=10.0)
    assert demand.num_epochs == 3 and demand.epoch_starts_s.tolist() == [0.0, 10.0, 20.0]
    assert demand.counts.tolist() == [[2, 1], [1, 1], [0, 1]]  # the arrival at end_s is in the last epoch
    assert demand.covered_s.tolist() == [10.0, 10.0, 5.0]
    np.testing.assert_allclose(demand.rates_rps, [[0.2, 0.1], [0.1, 0.1], [0.0, 0.2]])
    np.testing.assert_allclose(demand.tier_rates_rps("batch"), [0.1, 0.1, 0.2])
    demands = demand.tier_demands(2)
    assert [(d.tier, d.arrival_rate_rps) for d in demands] == [("chat", 0.0), ("batch", 0.2)]
    with pytest.raises(IndexError):
        demand.tier_demands(3)
    with pytest.raises(ValueError, match="epoch_s"):
        epoch_demand(_two_tier_trace(), 0.0)


@settings(max_examples=60, deadline=None)
@given(
    times=st.lists(st.floats(0, 1000, allow_nan=False), min_size=0, max_size=60),
    epoch_s=st.floats(0.5, 400),
    tiers=st.integers(1, 3),
)
def test_epoch_counts_always_sum_to_the_request_count(times: list[float], epoch_s: float, tiers: int) -> None:
    n = len(times)
    trace = RequestTrace.from_arrays(
        times,
        [1] * n,
        [1] * n,
        tier=[i % tiers for i in range(n)],
        tier_names=[f"t{i}" for i in range(tiers)],
    )
    demand = epoch_demand(trace, epoch_s)
    assert int(demand.counts.sum()) == n
    assert demand.counts.sum(axis=0).tolist() == np.bincount(trace.tier, minlength=tiers).tolist()


def test_default_workload_demand_sums_and_shows_the_background_burst() -> None:
    trace = default_workload()
    demand = epoch_demand(trace, 60.0)
    assert int(demand.counts.sum()) == len(trace) and demand.num_epochs == 57
    background = demand.tier_rates_rps("background")
    assert background[19:38].mean() > 3 * background[:19].mean()  # the 2 req/s burst over 0.5 req/s


def test_length_mixes_keep_means_exact() -> None:
    trace = default_workload(duration_s=600.0)
    mixes = length_mixes(trace)
    for name in trace.tier_names:
        tier = trace.select_tier(name)
        assert mixes[name].mean_input_tokens == pytest.approx(tier.input_tokens.mean(), rel=0.01)
        assert mixes[name].mean_output_tokens == pytest.approx(tier.output_tokens.mean(), rel=0.01)
        assert len(mixes[name].buckets) <= 32


def test_observed_demand_for_a_window() -> None:
    demands = observed_demand(_two_tier_trace(), 0.0, 10.0)
    chat, batch = demands
    assert chat.arrival_rate_rps == pytest.approx(0.2) and batch.arrival_rate_rps == pytest.approx(0.1)
    assert chat.length_mix.mean_input_tokens == 200 and batch.length_mix.mean_output_tokens == 20
    empty = observed_demand(_two_tier_trace(), 30.0, 40.0)
    assert all(d.arrival_rate_rps == 0 and d.length_mix is None for d in empty)


def test_last_window_forecaster() -> None:
    history = np.array([[1.0, 2.0], [3.0, 4.0]])
    forecaster = LastWindowForecaster(headroom=0.5)
    assert forecaster.forecast(history).tolist() == [4.5, 6.0]
    assert forecaster.forecast(np.zeros((0, 2))).tolist() == [0.0, 0.0]
    np.testing.assert_allclose(LastWindowForecaster().forecast_series(history), [[0, 0], [1, 2]])


def test_ewma_matches_its_recursion_and_series() -> None:
    rates = np.array([[4.0], [8.0], [2.0], [6.0]])
    forecaster = EwmaForecaster(alpha=0.25)
    level, expected = rates[0, 0], [0.0, rates[0, 0]]
    for value in rates[1:-1, 0]:
        level = 0.25 * value + 0.75 * level
        expected.append(level)
    np.testing.assert_allclose(forecaster.forecast_series(rates)[:, 0], expected)
    assert forecaster.forecast(rates[:3])[0] == pytest.approx(expected[3])
    assert EwmaForecaster(alpha=1.0).forecast(rates).tolist() == LastWindowForecaster().forecast(rates).tolist()
    assert forecast_error(LastWindowForecaster(), rates)[0] == pytest.approx((4 + 6 + 4) / 3)
    with pytest.raises(ValueError, match="shape"):
        forecaster.forecast(np.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        EwmaForecaster(alpha=0.0)
