"""Capacity estimates the controllers need, computed from the iteration-time model (never from simulation).

* :func:`slo_safe_seqs` — the scheduler's per-instance bound: how many requests of a tier one engine can hold at
  once while its steps stay within the tier's TPOT target (decode, colocated) or its prompts within the TTFT
  target (prefill).
* :func:`interim_capacity_table` — ``R[t,c]`` for the planner. **INTERIM, to be replaced** by
  ``nitsum_opt.models.build_capacity_table`` (the latency-model helper's queueing-based builder) when it is on
  main; it is deliberately small: a mean-value model with a safety margin, no percentile queueing.

Notation: ``τ_d(B)`` = decode step with ``B`` sequences at the mix's mean context; ``τ_p`` = prefill of the mean
prompt alone; ``I``, ``O`` = mean prompt and output tokens.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from nitsum_opt.models.spec import CapacityTable, LengthMix, Role, ServingConfig, SloTarget
from nitsum_opt.sim.settings import EngineSettings
from nitsum_opt.sim.timing import IterationTimeModel

P = ParamSpec("P")
T = TypeVar("T")

SAFETY = 0.85
"""Share of an SLO target the estimates plan for (the rest absorbs variance the mean model does not see)."""
MAX_PREFILL_SHARE = 0.7
"""Highest share of an engine's time the estimates let prefill take (bursty arrivals queue long above it)."""


@dataclass(frozen=True)
class MixStats:
    """The two numbers of a length mix the estimates use."""

    mean_input_tokens: float
    """``I``."""
    mean_output_tokens: float
    """``O``."""

    @classmethod
    def of(cls, mix: LengthMix | MixStats) -> MixStats:
        """Means of ``mix`` (computed once: ``LengthMix`` recomputes them on every access)."""
        if isinstance(mix, MixStats):
            return mix
        return cls(mix.mean_input_tokens, mix.mean_output_tokens)


def _decode_ms(model: IterationTimeModel, tp: int, batch: int, mix: MixStats) -> float:
    ctx = mix.mean_input_tokens + mix.mean_output_tokens / 2.0
    return model.predict_ms(tp, 0, 0, 0, batch, int(batch * ctx))


def _prefill_ms(model: IterationTimeModel, tp: int, mix: MixStats) -> float:
    tokens = max(1, round(mix.mean_input_tokens))
    return model.predict_ms(tp, 1, tokens, tokens * (tokens + 1) // 2, 0, 0)


def _kv_seqs(model: IterationTimeModel, tp: int, mix: MixStats) -> int:
    return max(1, int(model.kv_cache_tokens(tp) // (mix.mean_input_tokens + mix.mean_output_tokens)))


def colocated_step_ms(model: IterationTimeModel, tp: int, batch: int, mix: MixStats) -> float:
    """Mean step of a colocated engine holding ``batch`` requests: the decode step plus the prefill work that
    arrives per step (``batch / O`` prompts per step at steady state, Little's law)."""
    return _decode_ms(model, tp, batch, mix) + batch / max(1.0, mix.mean_output_tokens) * _prefill_ms(model, tp, mix)


def _quiet(fn: Callable[P, T]) -> Callable[P, T]:
    """Run a capacity probe with warnings silenced: the searches probe far outside any profile on purpose."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return fn(*args, **kwargs)

    return wrapper


@_quiet
def slo_safe_seqs(
    model: IterationTimeModel,
    tp: int,
    role: Role,
    slo: SloTarget,
    mix: LengthMix | MixStats,
    engine: EngineSettings,
    safety: float = SAFETY,
) -> int:
    """Largest number of requests one engine holds at once with its mean step within ``safety`` of the TPOT
    target (decode, colocated: the colocated step includes the prefill work of its batch) or its queued prompts
    within ``safety`` of the TTFT target (prefill); capped by the KV cache and ``max_num_seqs``; at least 1."""
    mix = MixStats.of(mix)
    cap = min(engine.max_num_seqs, _kv_seqs(model, tp, mix))
    if role is Role.PREFILL:
        return max(1, min(engine.max_num_seqs, int(safety * slo.ttft_slo_ms / _prefill_ms(model, tp, mix))))
    target = safety * slo.tpot_slo_ms
    step = _decode_ms if role is Role.DECODE else colocated_step_ms
    lo, hi = 1, cap
    if step(model, tp, 1, mix) > target:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step(model, tp, mid, mix) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


@_quiet
def slo_token_budget(
    model: IterationTimeModel, tp: int, tpot_slo_ms: float, mix: LengthMix | MixStats, safety: float = SAFETY
) -> int:
    """Largest step token budget (a multiple of 256, at least 512) whose step — one prefill chunk of that many
    tokens at the mix's mean prompt offset plus 16 decoding requests at the mean context — stays within
    ``safety`` of ``tpot_slo_ms``: the chunk size that keeps one prefill from breaking the tier's TPOT."""
    mix = MixStats.of(mix)
    ctx = int(16 * (mix.mean_input_tokens + mix.mean_output_tokens / 2.0))
    offset = mix.mean_input_tokens / 2.0

    def step_ms(tokens: int) -> float:
        pairs = int(tokens * offset + tokens * (tokens + 1) / 2)
        return model.predict_ms(tp, 1, tokens, pairs, 16, ctx)

    budget = 512
    while budget < 65536 and step_ms(budget + 256) <= safety * tpot_slo_ms:
        budget += 256
    return budget


def _rate(
    model: IterationTimeModel, tp: int, role: Role, slo: SloTarget, mix: MixStats, engine: EngineSettings
) -> float:
    prefill_s = _prefill_ms(model, tp, mix) / 1000.0
    if role is Role.PREFILL:
        if prefill_s * 1000.0 > SAFETY * slo.ttft_slo_ms:
            return 0.0
        # M/D/1: mean wait ρS/(2(1−ρ)); plan for S + 2·wait ≤ SAFETY·TTFT (2× the mean covers ~p90 of the wait).
        slack = (SAFETY * slo.ttft_slo_ms / 1000.0 - prefill_s) / prefill_s
        rho = min(MAX_PREFILL_SHARE, slack / (1.0 + slack))
        return rho / prefill_s
    if role is Role.DECODE:
        batch = slo_safe_seqs(model, tp, role, slo, mix, engine)
        step_ms = _decode_ms(model, tp, batch, mix)
        return batch / (max(1.0, mix.mean_output_tokens) * step_ms / 1000.0)
    if prefill_s * 1000.0 > SAFETY * slo.ttft_slo_ms:
        return 0.0
    return _colocated_rate(model, tp, slo, mix, engine, prefill_s)


def _colocated_rate(
    model: IterationTimeModel, tp: int, slo: SloTarget, mix: MixStats, engine: EngineSettings, prefill_s: float
) -> float:
    """Bisection on ``λ``: the steady step is ``τ = τ_d(B)/(1 − λ·τ_p)`` (prefill takes the share ``λ·τ_p`` of the
    time) with ``B = λ·O·τ`` (fixed point); need ``τ ≤ SAFETY·TPOT``, ``λ·τ_p ≤ MAX_PREFILL_SHARE`` and the
    batch within the KV cache and ``max_num_seqs``."""
    out = max(1.0, mix.mean_output_tokens)
    cap = min(engine.max_num_seqs, _kv_seqs(model, tp, mix))

    def feasible(lam: float) -> bool:
        share = lam * prefill_s
        if share >= MAX_PREFILL_SHARE:
            return False
        step_s = _decode_ms(model, tp, 1, mix) / 1000.0
        for _ in range(12):
            batch = max(1, math.ceil(lam * out * step_s))
            if batch > cap:
                return False
            step_s = _decode_ms(model, tp, batch, mix) / 1000.0 / (1.0 - share)
        return step_s * 1000.0 <= SAFETY * slo.tpot_slo_ms

    lo, hi = 0.0, MAX_PREFILL_SHARE / prefill_s
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


@_quiet
def interim_capacity_table(
    model: IterationTimeModel,
    tiers: dict[str, tuple[SloTarget, LengthMix]],
    configs: tuple[ServingConfig, ...],
    engine: EngineSettings,
) -> CapacityTable:
    """``R[t,c]`` (INTERIM, see the module docstring): decode/colocated from Little's law at the SLO-safe batch,
    ``R = B / (O · τ(B))``; prefill from an M/D/1 bound on the TTFT target."""
    rates: dict[str, dict[str, float]] = {}
    for name, (slo, length_mix) in tiers.items():
        mix = MixStats.of(length_mix)
        row = {}
        for c in configs:
            r = _rate(model, c.tp, c.role, slo, mix, engine)
            row[c.key] = r if math.isfinite(r) else 0.0
        rates[name] = row
    return CapacityTable(rates_rps=rates, source="interim mean-value estimate (nitsum_opt.sim.capacity)")


__all__ = ["SAFETY", "colocated_step_ms", "interim_capacity_table", "slo_safe_seqs", "slo_token_budget"]
