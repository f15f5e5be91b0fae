"""The small request-level simulator: conservation and hand-checkable timing."""

from __future__ import annotations

import numpy as np
import pytest

from nitsum_opt.models.reqsim import sample_requests, simulate_instance
from nitsum_opt.models.spec import LengthMix, Role


class Constant:
    def __init__(self, step_ms: float, kv: int = 10**9) -> None:
        self.step_ms, self.kv = step_ms, kv
        self.calls: list[tuple[int, ...]] = []

    def predict_ms(self, *args: int) -> float:
        self.calls.append(args)
        return self.step_ms

    def kv_cache_tokens(self, tp: int) -> int:
        return self.kv


def test_every_request_finishes_once_and_prefill_alone_takes_one_step() -> None:
    clock = Constant(10.0)
    res = simulate_instance(
        clock,
        1,
        Role.PREFILL,
        LengthMix.single(100, 5),
        rate_rps=1.0,
        n_requests=200,
        seed=0,
        warmup_fraction=0.0,
    )
    assert res.ttft_ms.shape == (200,) and np.isfinite(res.ttft_ms).all()
    assert np.isnan(res.tpot_ms).all()
    # At 1 req/s and 10 ms steps almost every prompt finds the engine idle: TTFT = one step.
    assert np.median(res.ttft_ms) == pytest.approx(10.0)
    assert all(c[2] % 100 == 0 and c[3] == c[1] * 5050 for c in clock.calls)  # whole prompts, exact pairs


def test_decode_tpot_is_one_step_plus_the_wait_to_join() -> None:
    res = simulate_instance(
        Constant(10.0),
        1,
        Role.DECODE,
        LengthMix.single(100, 51),
        rate_rps=20.0,
        n_requests=500,
        seed=0,
        warmup_fraction=0.0,
    )
    # 50 steps of 10 ms after waiting at most one running step: TPOT in [10, 10.2] ms.
    assert np.isnan(res.ttft_ms).all()
    assert (res.tpot_ms >= 10.0 - 1e-9).all() and (res.tpot_ms <= 10.0 * (1 + 1 / 50) + 1e-9).all()


def test_kv_reservation_limits_concurrency() -> None:
    clock = Constant(10.0, kv=3 * 200)  # three requests of 100 + 100 tokens fit
    simulate_instance(clock, 1, Role.COLOCATED, LengthMix.single(100, 100), rate_rps=500.0, n_requests=50, seed=0)
    assert max(c[1] + c[4] for c in clock.calls) <= 3


def test_chunked_prefill_respects_the_token_budget() -> None:
    clock = Constant(10.0)
    simulate_instance(
        clock,
        1,
        Role.COLOCATED,
        LengthMix.single(3000, 20),
        rate_rps=50.0,
        n_requests=100,
        seed=0,
        max_num_batched_tokens=1024,
    )
    assert max(c[2] + c[4] for c in clock.calls) <= 1024
    assert any(0 < c[2] < 1024 and c[4] > 0 for c in clock.calls)  # chunks share steps with decodes


def test_sampling_is_seeded() -> None:
    mix = LengthMix.single(10, 10)
    a, b = sample_requests(mix, 5.0, 100, 3), sample_requests(mix, 5.0, 100, 3)
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="rate_rps"):
        simulate_instance(Constant(1.0), 1, Role.PREFILL, mix, 0.0)
