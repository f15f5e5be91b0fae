"""Engine semantics: an M/D/1 known answer, exactness of the fast-forward, preemption, P→D hand-off, the roofline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nitsum_opt.models.spec import Role
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.sim.engine import steps_reached
from nitsum_opt.sim.results import Outcome
from nitsum_opt.sim.settings import EngineSettings, SimSettings
from nitsum_opt.sim.timing import ConstantStepModel
from nitsum_opt.spec import Tier
from nitsum_opt.workloads.trace import RequestTrace

from sim_factories import LLAMA, ROOFLINE, SmallCache, colocated, poisson_trace, run


def test_md1_mean_wait_matches_the_closed_form() -> None:
    """Poisson arrivals, one engine, one 100-token prompt per 10 ms step, one output token: an M/D/1 queue whose
    mean wait is ρ/(2μ(1−ρ))."""
    step_s, rate = 0.010, 70.0
    rng = np.random.default_rng(7)
    arrival = np.cumsum(rng.exponential(1.0 / rate, 40_000))
    trace = RequestTrace.from_arrays(
        arrival,
        np.full(arrival.size, 100),
        np.ones(arrival.size, dtype=int),
        tier_names=("chat",),
        start_s=0.0,
        end_s=float(arrival[-1]),
    )
    dep = Deployment(instances=colocated(1, max_num_batched_tokens=100))
    tiers = (Tier(name="chat", ttft_slo_ms=1e4, tpot_slo_ms=1e4),)
    res = run(trace, dep, gpus=1, model=ConstantStepModel(step_s * 1000), tiers=tiers)
    assert (res.outcome == Outcome.COMPLETED).all()
    rho = rate * step_s
    expected_wait = rho * step_s / (2 * (1 - rho))
    measured_wait = float(np.mean(res.ttft_s)) - step_s
    assert measured_wait == pytest.approx(expected_wait, rel=0.05)
    assert res.ttft_s.min() >= step_s - 1e-12


def test_fast_forward_equals_step_by_step() -> None:
    """Jumps are exact for a model affine in the decode context: the same run with one step per event agrees."""
    trace = poisson_trace(rate_rps=6.0, duration_s=30.0, seed=3, output_range=(2, 200))
    dep = Deployment(instances=colocated(2))
    fast = run(trace, dep, gpus=2)
    slow = run(trace, dep, gpus=2, settings=SimSettings(max_jump_steps=1))
    assert fast.events < slow.events / 5
    assert fast.steps_simulated == slow.steps_simulated
    np.testing.assert_allclose(fast.finish_s, slow.finish_s, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast.ttft_s, slow.ttft_s, rtol=1e-9, atol=1e-9)


def test_steps_reached_inverts_the_jump_clock() -> None:
    alpha, beta = 0.007, 1e-5
    for j in (1, 2, 17, 300):
        t = j * alpha + beta * j * (j - 1) / 2
        assert steps_reached(alpha, beta, t) == j
        assert steps_reached(alpha, beta, t + 1e-9) == j + 1
    assert steps_reached(alpha, 0.0, 0.0) == 1


def test_preemption_recomputes_and_everything_still_completes() -> None:
    trace = poisson_trace(rate_rps=8.0, duration_s=20.0, seed=5, input_range=(500, 1500), output_range=(200, 600))
    res = run(
        trace, Deployment(instances=colocated(1)), gpus=1, model=SmallCache(12_000), settings=SimSettings(drain_s=600)
    )
    assert res.preemptions.sum() > 0
    assert (res.outcome == Outcome.COMPLETED).all()
    assert np.all(res.finish_s >= res.arrival_s + res.ttft_s - 1e-12)


def test_prefill_decode_handoff_pays_the_kv_transfer() -> None:
    """One prefill engine hands every request to one decode engine; TPOT includes the transfer."""
    trace = RequestTrace.from_arrays([0.0], [4000], [3], tier_names=("chat", "batch"), start_s=0.0, end_s=1.0)
    dep = Deployment(
        instances=(
            DeployedInstance(tier=None, tp=1, role=Role.PREFILL, gpu_ids=(0,)),
            DeployedInstance(tier=None, tp=1, role=Role.DECODE, gpu_ids=(1,)),
        )
    )
    slow_link = SimSettings().switch.model_copy(update={"kv_migration_gb_s": 1.0})
    fast = run(trace, dep, gpus=2)
    slow = run(trace, dep, gpus=2, settings=SimSettings(switch=slow_link))
    kv_gb = 4001 * LLAMA.kv_bytes_per_token / 1e9
    assert fast.ttft_s[0] == pytest.approx(slow.ttft_s[0])
    # two decode steps after the first token: the slow link adds (kv_gb / 1 GB/s − kv_gb / default GB/s) to them
    extra = (slow.tpot_s[0] - fast.tpot_s[0]) * 2
    assert extra == pytest.approx(kv_gb * (1 - 1 / SimSettings().switch.kv_migration_gb_s), rel=0.01)


def test_hand_off_pauses_delay_the_next_prefill_and_the_decode_start() -> None:
    """Known answers for the measured hand-off pauses: the prefill engine pauses ``leave`` after the step that hands
    a request off (a second prompt waiting behind it gets its first token that much later), the decode engine pauses
    ``arrive`` before admitting arrived KV (the first request finishes that much later); first tokens handed off in
    the same step are not delayed."""
    trace = RequestTrace.from_arrays(
        [0.0, 0.0], [6000, 6000], [3, 3], tier_names=("chat", "batch"), start_s=0.0, end_s=1.0
    )  # 8,192-token steps: the first prompt ends in step 1, the second in step 2
    dep = Deployment(
        instances=(
            DeployedInstance(tier=None, tp=1, role=Role.PREFILL, gpu_ids=(0,)),
            DeployedInstance(tier=None, tp=1, role=Role.DECODE, gpu_ids=(1,)),
        )
    )

    def with_pauses(leave_ms: float, arrive_ms: float) -> SimSettings:
        costs = {"handoff_leave_ms": leave_ms, "handoff_arrive_ms": arrive_ms}
        return SimSettings(switch=SimSettings().switch.model_copy(update=costs))

    base = run(trace, dep, gpus=2, settings=with_pauses(0, 0))
    leave = run(trace, dep, gpus=2, settings=with_pauses(50, 0))
    arrive = run(trace, dep, gpus=2, settings=with_pauses(0, 30))
    assert leave.ttft_s[0] == pytest.approx(base.ttft_s[0]) and arrive.ttft_s[0] == pytest.approx(base.ttft_s[0])
    assert leave.ttft_s[1] - base.ttft_s[1] == pytest.approx(0.050)
    assert arrive.finish_s[0] - base.finish_s[0] == pytest.approx(0.030)
    assert arrive.ttft_s[1] == pytest.approx(base.ttft_s[1])  # the prefill engine does not wait for the decode one


def test_over_long_requests_are_rejected_with_a_reason() -> None:
    trace = RequestTrace.from_arrays([0.0, 0.1], [8000, 100], [500, 10], tier_names=("chat", "batch"), end_s=1.0)
    res = run(trace, Deployment(instances=colocated(1)), gpus=1)
    assert res.outcome.tolist() == [Outcome.REJECTED, Outcome.COMPLETED]
    assert res.reject_reason[0] == 1


def test_roofline_is_affine_in_context_and_sizes_the_kv_cache() -> None:
    m = ROOFLINE
    a, b, c = (m.predict_ms(1, 0, 0, 0, 32, ctx) for ctx in (10_000, 20_000, 30_000))
    assert b - a == pytest.approx(c - b)
    assert m.predict_ms(2, 0, 0, 0, 1, 1000) < m.predict_ms(1, 0, 0, 0, 1, 1000)  # smaller weight slice per GPU
    assert m.kv_cache_tokens(2) > 2 * m.kv_cache_tokens(1)  # the weights take less of each GPU
    # Llama-3.1-8B on an H200: ~16 GB of weights, 128 KiB of KV per token → ~0.9 M tokens at TP 1
    assert 800_000 < m.kv_cache_tokens(1) < 950_000
    assert math.isclose(ConstantStepModel(5.0).predict_ms(8, 1, 2, 3, 4, 5), 5.0)


def test_engine_settings_follow_vllm_defaults() -> None:
    e = EngineSettings()
    assert (e.max_num_batched_tokens, e.max_num_seqs) == (8192, 1024)


def test_vectorised_roofline_matches_the_scalar_one() -> None:
    rng = np.random.default_rng(0)
    rows = np.column_stack(
        [
            rng.choice([1, 2, 4, 8], 50),
            rng.integers(0, 4, 50),
            rng.integers(0, 8192, 50),
            rng.integers(0, 10**7, 50),
            rng.integers(0, 256, 50),
            rng.integers(0, 10**6, 50),
        ]
    )
    expected = [ROOFLINE.predict_ms(*(int(v) for v in r)) for r in rows]
    np.testing.assert_allclose(ROOFLINE.predict_batch_ms(rows), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="6 columns"):
        ROOFLINE.predict_batch_ms(np.ones((2, 5)))
