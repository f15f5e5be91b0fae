"""Capacity table: hand-checkable answers with a constant step time, and R vs 1.2·R in the request
simulator."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.optimize import brentq

from nitsum_opt.models.capacity import (
    CapacityOptions,
    TierWorkload,
    build_capacity_cells,
    build_capacity_table,
    capacity_cell,
    load_tiers_file,
)
from nitsum_opt.models.reqsim import simulate_instance
from nitsum_opt.models.spec import CapacityTable, LengthMix, Role, ServingConfig, SloTarget


class ConstantStep:
    """Every engine step takes ``step_ms``, whatever the batch (a hand-checkable latency model)."""

    def __init__(self, step_ms: float, kv_tokens: int = 10**9) -> None:
        self.step_ms, self.kv_tokens = step_ms, kv_tokens

    def predict_batch_ms(self, composition, validate: bool = True):
        return np.full(np.asarray(composition).shape[0], self.step_ms)

    def predict_ms(self, *args) -> float:
        return self.step_ms

    def kv_cache_tokens(self, tp: int) -> int:
        return self.kv_tokens


def prefill_attainment_constant_step(rate_rps: float, step_ms: float, slo_ms: float) -> float:
    """Known answer: a batching prefill engine whose steps all take D. An arrival to an idle engine gets TTFT
    D;
    one to a busy engine waits the residual U·D of the running step, then D. Idle time share (steps end idle
    with
    probability e^{-λD}, idle spells last 1/λ): f = e^{-λD} / (e^{-λD} + λD)."""
    x = rate_rps * step_ms / 1000.0
    idle = math.exp(-x) / (math.exp(-x) + x)
    return idle * (step_ms <= slo_ms) + (1 - idle) * min(max((slo_ms - step_ms) / step_ms, 0.0), 1.0)


SHORT = LengthMix.single(16, 2)
PREFILL_TIER = TierWorkload(name="t", slo=SloTarget(ttft_slo_ms=12.0, tpot_slo_ms=100.0), length_mix=SHORT)


def test_prefill_known_answer_with_constant_steps() -> None:
    clock = ConstantStep(10.0)
    expected = brentq(lambda lam: prefill_attainment_constant_step(lam, 10.0, 12.0) - 0.9, 1e-3, 1e3)
    cell = capacity_cell(clock, ServingConfig.parse("tp1-prefill"), PREFILL_TIER)
    # f + (1 - f)·0.2 = 0.9  <=>  f = 0.875  <=>  e^{-x} = 7x  at x = λD = 0.12595, λ = 12.595 req/s
    assert expected == pytest.approx(12.595, abs=0.005)
    assert cell.rate_rps == pytest.approx(expected, rel=0.015) and cell.binding == "ttft"
    # The simulator agrees with the formula at R and below it at 1.2·R.
    for factor in (1.0, 1.2):
        sim = simulate_instance(clock, 1, Role.PREFILL, SHORT, cell.rate_rps * factor, n_requests=20_000, seed=1)
        formula = prefill_attainment_constant_step(cell.rate_rps * factor, 10.0, 12.0)
        assert sim.attainment(PREFILL_TIER.slo, Role.PREFILL) == pytest.approx(formula, abs=0.01)
    assert prefill_attainment_constant_step(1.2 * cell.rate_rps, 10.0, 12.0) < 0.9


def test_decode_known_bound_when_kv_memory_binds() -> None:
    """100 decode steps of 10 ms per request, 201 KV tokens reserved each, 5,050 tokens of cache: 25 seats, so
    no more than 25 / (100 × 10 ms) = 25 req/s; with a loose TPOT the rate sits just under that."""
    clock = ConstantStep(10.0, kv_tokens=5050)
    tier = TierWorkload(
        name="t", slo=SloTarget(ttft_slo_ms=1e4, tpot_slo_ms=100.0), length_mix=LengthMix.single(100, 101)
    )
    cell = capacity_cell(clock, ServingConfig.parse("tp1-decode"), tier)
    assert 23.5 <= cell.rate_rps <= 25.0 and cell.binding == "kv"
    tight = tier.model_copy(update={"slo": SloTarget(ttft_slo_ms=1e4, tpot_slo_ms=10.05)})
    assert capacity_cell(clock, ServingConfig.parse("tp1-decode"), tight).rate_rps < cell.rate_rps


def test_hand_off_pauses_known_answers() -> None:
    """A prefill instance that pauses 2 ms after each 10 ms step is a constant-step instance of 12 ms (the same
    closed form); a KV-bound decode instance that pauses 5 ms before each step in which a request arrives serves
    at most seats / (steps · (10 + 5·(1 − e^{−λ·15 ms}))), a fixed point in λ (arrivals over the step and its
    pause)."""
    clock = ConstantStep(10.0)
    tier = PREFILL_TIER.model_copy(update={"slo": SloTarget(ttft_slo_ms=14.0, tpot_slo_ms=100.0)})
    paused = CapacityOptions(handoff_leave_ms=2.0)
    cell = capacity_cell(clock, ServingConfig.parse("tp1-prefill"), tier, paused)
    expected = brentq(lambda lam: prefill_attainment_constant_step(lam, 12.0, 14.0) - 0.9, 1e-3, 1e3)
    assert cell.rate_rps == pytest.approx(expected, rel=0.015) and cell.binding == "ttft"
    free = capacity_cell(clock, ServingConfig.parse("tp1-prefill"), tier)
    assert free.rate_rps > 1.1 * cell.rate_rps

    kv_clock = ConstantStep(10.0, kv_tokens=5050)  # 25 seats of 201 tokens, 100 decode steps per request
    dec = TierWorkload(
        name="t", slo=SloTarget(ttft_slo_ms=1e4, tpot_slo_ms=100.0), length_mix=LengthMix.single(100, 101)
    )
    bound_ms = brentq(lambda lam: lam - 25 / (100 * (10 + 5 * -math.expm1(-lam * 15))), 1e-6, 1.0)
    cell = capacity_cell(kv_clock, ServingConfig.parse("tp1-decode"), dec, CapacityOptions(handoff_arrive_ms=5.0))
    assert 0.94 * bound_ms * 1000 <= cell.rate_rps <= bound_ms * 1000 and cell.binding == "kv"
    assert capacity_cell(kv_clock, ServingConfig.parse("tp1-decode"), dec).rate_rps > 23.5  # 25 req/s bound, free
    colo = ServingConfig.parse("tp1-colocated")  # colocated instances hand nothing off
    assert capacity_cell(kv_clock, colo, dec, CapacityOptions(handoff_arrive_ms=5.0)) == capacity_cell(
        kv_clock, colo, dec
    )


def test_unreachable_slo_gives_zero() -> None:
    tier = PREFILL_TIER.model_copy(update={"slo": SloTarget(ttft_slo_ms=5.0, tpot_slo_ms=100.0)})
    cell = capacity_cell(ConstantStep(10.0), ServingConfig.parse("tp1-prefill"), tier)
    assert cell.rate_rps == 0.0 and cell.binding == "slo-unreachable"


def test_table_shape_monotonicity_and_speed(h, public_model) -> None:
    request = load_tiers_file(h.EXAMPLE_TIERS)
    configs = request.serving_configs(public_model.tps)
    assert len(configs) == 12
    start = time.process_time()
    table = build_capacity_table(public_model, request.tiers, configs, request.options, source_label="test")
    elapsed = time.process_time() - start
    assert isinstance(table, CapacityTable) and table.source == "test"
    assert table.missing_cells([t.name for t in request.tiers], configs) == []
    assert elapsed < 3.0, f"capacity table took {elapsed:.2f} s CPU"  # ~0.6 s on an idle core
    inter = request.tiers[0]
    looser = inter.model_copy(update={"name": "looser", "slo": inter.slo.model_copy(update={"ttft_slo_ms": 1200})})
    cells = build_capacity_cells(public_model, [inter, looser], [ServingConfig.parse("tp2-prefill")])
    assert cells["looser"]["tp2-prefill"].rate_rps > cells["interactive"]["tp2-prefill"].rate_rps
    with pytest.raises(ValueError, match="unique"):
        build_capacity_cells(public_model, [inter, inter], configs)


def test_options_fall_back_to_engine_args_then_defaults() -> None:
    assert CapacityOptions().resolved({"max_num_batched_tokens": 4096}) == (4096, 256)
    assert CapacityOptions(max_num_seqs=64).resolved({"max_num_seqs": 512}) == (8192, 64)


CELLS = [  # (tier, tpot override, config, requests): one per role, each with a different binding constraint
    ("interactive", None, "tp4-prefill", 20_000),  # TTFT with queueing
    ("interactive", 5.0, "tp4-decode", 6_000),  # TPOT
    ("agents", None, "tp8-colocated", 8_000),  # TTFT x TPOT, chunked prefill
]


def _tier(h, name: str, tpot: float | None):
    tier = next(t for t in load_tiers_file(h.EXAMPLE_TIERS).tiers if t.name == name)
    if tpot is None:
        return tier
    return tier.model_copy(update={"slo": tier.slo.model_copy(update={"tpot_slo_ms": tpot})})


def _assert_holds_at_r_breaks_at_1_2r(model, config, tier, rate: float, requests: int, **pause: float) -> None:
    """The request simulator (two seeds) meets the tier's SLO percentile at ``rate`` (within a finite run's sampling
    tolerance of 1 point) and misses it at ``1.2·rate``."""

    def attainment(factor: float) -> float:
        runs = [
            simulate_instance(
                model, config.tp, config.role, tier.length_mix, rate * factor, n_requests=requests, seed=seed, **pause
            )
            for seed in (0, 1)
        ]
        return float(np.mean([r.attainment(tier.slo, config.role) for r in runs])) * 100

    target = tier.slo.slo_percentile
    assert attainment(1.0) >= target - 1.0
    assert attainment(1.2) < target


@pytest.mark.parametrize(("tier_name", "tpot", "key", "requests"), CELLS)
def test_slo_holds_at_r_and_breaks_at_1_2r(h, public_model, tier_name, tpot, key, requests) -> None:
    tier = _tier(h, tier_name, tpot)
    config = ServingConfig.parse(key)
    rate = capacity_cell(public_model, config, tier).rate_rps
    _assert_holds_at_r_breaks_at_1_2r(public_model, config, tier, rate, requests)


@pytest.mark.parametrize(
    ("key", "tpot", "pause"),
    [("tp4-decode", 5.0, {"handoff_arrive_ms": 2.0}), ("tp4-prefill", None, {"handoff_leave_ms": 20.0})],
)
def test_slo_holds_at_r_and_breaks_at_1_2r_with_hand_off_pauses(h, public_model, key, tpot, pause) -> None:
    """The capacity model's hand-off pauses against the request simulator with the same pauses: the SLO holds at
    ``R`` and breaks at ``1.2·R``; and the pauses cost capacity."""
    tier = _tier(h, "interactive", tpot)
    config = ServingConfig.parse(key)
    rate = capacity_cell(public_model, config, tier, CapacityOptions(**pause)).rate_rps
    assert rate < 0.97 * capacity_cell(public_model, config, tier).rate_rps
    _assert_holds_at_r_breaks_at_1_2r(public_model, config, tier, rate, 8_000, **pause)
