"""Capacity table ``R[t,c]``: the highest Poisson arrival rate one instance of config ``c = (tp, role)`` serves for
tier ``t``'s length mix while the tier's SLO percentile holds. Built from the iteration-time model, no simulation.

Method (``λ`` = arrival rate; ``τ(·)`` = the mean model's step time; ``p`` = the tier's SLO percentile;
``d_b = output_b − 1`` decode steps of length bucket ``b``). For each cell, ``R`` is found by bisection on ``λ``
(relative tolerance ``rate_rel_tol``) on the predicate "every constraint of the role holds at ``λ``":

* **prefill** (TTFT only): the engine batches every waiting prompt into the next (chunked) super-step. TTFT
  attainment comes from the gated-batch Markov chain of :mod:`.queueing` (queueing included); need ``≥ p``.
* **decode** (TPOT + KV memory): continuous batching of ``B`` running requests. Mean batch from Little's law as a
  fixed point, ``B̄ = λ·(E[d] + ½)·τ_dec(B̄)`` (the ½ step is the wait for the running step to end). A request of
  bucket ``b`` sees ``1 + Poisson(B̄)`` sequences (PASTA, M/G/∞); its TPOT is the mean step over its ``d_b`` steps:
  mean ``τ_dec(B̄+1)``, variance ``τ'² · Var[time-average of N over L_b]`` with the closed form for M/G/∞
  (``Var = 2λ/L_b² Σ_j p_j [L_b L_j m − (L_b+L_j) m²/2 + m³/3]``, ``m = min(L_b, L_j)``, ``L = residence``) plus the
  uniform wait; attainment ``Σ_b p_b Φ((S − μ_b)/σ_b) ≥ p``. KV memory: a request reserves ``input + output``
  tokens while resident; reserved tokens are compound Poisson and need ``mean + z_p·sd ≤ kv_cache_tokens(tp)``;
  likewise running sequences ``B̄ + z_p·√B̄ ≤ max_num_seqs``.
* **colocated** (both; chunked prefill mixed into decode steps): prompt ``b`` adds ``e_b = T_b − n_b·τ_dec(B)`` to
  the steps it rides in, so the mean step is ``τ̄ = τ_dec(B̄) / (1 − λ·E[e])`` (prefill takes a share ``λ·E[e]`` of
  the time) with ``B̄ = λ·E[d]·τ̄`` (fixed point). TPOT of bucket ``b``: mean ``τ̄``, variance from the batch as
  above plus the prefill work it absorbs, compound Poisson: ``λ·L_b·E[e²] / d_b²``. TTFT from the chain with
  decode-only steps of ``τ_dec(B̄)`` between super-steps and ``B̄`` decode tokens taken from each step's budget.
  Joint attainment ``TTFT_att · TPOT_att ≥ p`` (independence); KV and sequences as for decode.

Engine knobs: ``max_num_batched_tokens`` (token budget per step) and ``max_num_seqs`` come from the options, else
from the profile's engine args, else vLLM-like defaults (8192, 256). TTFT here excludes the P→D KV transfer.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.stats import norm
from threadpoolctl import threadpool_limits

from .features import FloatArray, attention_pairs
from .population import Population, tpot_attainment, window_population
from .queueing import Chain, PromptMix, TtftModel, additive_functional, window_moments
from .spec import CapacityTable, LengthMix, Role, ServingConfig, SloTarget, all_configs

DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256


class StepTimeSource(Protocol):
    """What the capacity builder and the request simulator need from a latency model."""

    def predict_batch_ms(self, composition: FloatArray, validate: bool = True) -> FloatArray:
        """Mean step time (ms) of every row (columns ``COMPOSITION_COLUMNS``); ``validate=False``: trusted input,
        no checks or range warnings."""
        ...

    def kv_cache_tokens(self, tp: int) -> int:
        """KV-cache capacity of one engine at TP ``tp``, tokens."""
        ...


class TierWorkload(BaseModel):
    """A tier as the capacity builder sees it: its SLO and its request-length mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
    """Tier name (row key of the capacity table)."""
    slo: SloTarget
    """TTFT/TPOT targets and the percentile that must meet them."""
    length_mix: LengthMix
    """Prompt/output length distribution of the tier's requests."""


class CapacityOptions(BaseModel):
    """Knobs of the capacity model (``None`` = take the engine's value from the profile, else the default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    """Token budget of one engine step (vLLM ``max_num_batched_tokens``)."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most sequences one engine runs at once (vLLM ``max_num_seqs``)."""
    rate_rel_tol: float = Field(default=0.01, gt=0, lt=0.5)
    """Relative tolerance of the bisection on the rate."""

    def resolved(self, engine_args: dict[str, object] | None = None) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) after falling back to engine args and defaults."""
        args = engine_args or {}

        def pick(value: int | None, key: str, default: int) -> int:
            if value is not None:
                return value
            found = args.get(key)
            return int(found) if isinstance(found, int | float) and found > 0 else default

        return (
            pick(self.max_num_batched_tokens, "max_num_batched_tokens", DEFAULT_MAX_NUM_BATCHED_TOKENS),
            pick(self.max_num_seqs, "max_num_seqs", DEFAULT_MAX_NUM_SEQS),
        )


class CellResult(BaseModel):
    """``R`` of one (tier, config) cell and what limits it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_rps: float = Field(ge=0)
    """Highest SLO-compliant arrival rate, requests/s."""
    binding: str
    """Constraint that fails just above ``rate_rps``: ttft, tpot, kv, max_num_seqs, stability or slo-unreachable."""
    batch_size: float = Field(ge=0)
    """Mean running decode sequences at ``rate_rps`` (0 for prefill)."""


@dataclass(frozen=True)
class _Mix:
    inp: FloatArray
    out: FloatArray
    dec: FloatArray
    probs: FloatArray
    pairs: FloatArray

    @classmethod
    def of(cls, mix: LengthMix) -> _Mix:
        inp = np.array([b.input_tokens for b in mix.buckets], dtype=float)
        out = np.array([b.output_tokens for b in mix.buckets], dtype=float)
        return cls(inp, out, out - 1.0, np.array(mix.probabilities), attention_pairs(inp))

    @property
    def prompts(self) -> PromptMix:
        return PromptMix(self.inp, self.pairs, self.probs)

    @property
    def mean_decode_steps(self) -> float:
        return float(self.probs @ self.dec)

    def decode_context(self) -> float:
        """Time-average KV length of a running decode sequence (weighted by time in the batch)."""
        w = self.probs * self.dec
        return float(w @ (self.inp + self.dec / 2.0) / w.sum()) if w.sum() > 0 else 0.0


class _Cell:
    """Everything one (tier, tp, role) cell needs, with the λ-independent step times precomputed."""

    def __init__(self, source: StepTimeSource, tp: int, tier: TierWorkload, budget: int, max_seqs: int) -> None:
        self.source, self.tp, self.slo = source, tp, tier.slo
        self.mix = _Mix.of(tier.length_mix)
        self.budget, self.max_seqs = budget, max_seqs
        self.kv_tokens = source.kv_cache_tokens(tp)
        self.z = float(norm.ppf(tier.slo.slo_percentile / 100.0))
        self.target = tier.slo.slo_percentile / 100.0
        self.ctx = self.mix.decode_context()
        self.grid = np.linspace(0.0, float(max_seqs), max_seqs + 1)
        self.tau_dec = self._decode_step(self.grid)
        self._prefill_ttft: TtftModel | None = None
        self._extra_cache: tuple[FloatArray, FloatArray] | None = None
        self._warm_batch: float | None = None
        self._ttft_models: dict[int, TtftModel] = {}

    @property
    def _extra_single(self) -> tuple[FloatArray, FloatArray]:
        if self._extra_cache is None:
            self._extra_cache = self.prefill_extra()
        return self._extra_cache

    def _predict(self, n_pre: FloatArray, tok: FloatArray, pairs: FloatArray, n_dec: FloatArray,
                 ctx: FloatArray) -> FloatArray:
        n_pre, tok, pairs, n_dec, ctx = np.broadcast_arrays(n_pre, tok, pairs, n_dec, ctx)
        comp = np.column_stack([np.full(n_pre.size, float(self.tp)), n_pre.ravel(), tok.ravel(), pairs.ravel(),
                                n_dec.ravel(), ctx.ravel()])
        return self.source.predict_batch_ms(comp, validate=False).reshape(n_pre.shape)

    def _decode_step(self, batch: FloatArray) -> FloatArray:
        """Decode-only step time with ``batch`` sequences (at 0: the limit of a vanishing batch)."""
        b = np.maximum(np.asarray(batch, dtype=float), 1e-9)
        return self._predict(np.zeros_like(b), np.zeros_like(b), np.zeros_like(b), b, b * max(self.ctx, 1.0))

    def superstep(self, n: FloatArray, tok: FloatArray, pairs: FloatArray, n_dec: float) -> FloatArray:
        """Duration of prefilling ``n`` prompts (``tok`` tokens) in chunked steps next to ``n_dec`` decodes."""
        steps = self._steps(tok, n_dec)
        t = self._predict(np.asarray(n) / steps, np.asarray(tok) / steps, np.asarray(pairs) / steps,
                          np.full(np.shape(tok), n_dec), np.full(np.shape(tok), n_dec * self.ctx))
        return steps * t

    # -- decode population ----------------------------------------------------------------------------------
    @property
    def seats(self) -> int:
        """Requests that can run at once: ``max_num_seqs``, or fewer when their KV reservations fill the cache."""
        m = self.mix
        w = m.probs * np.maximum(m.dec, 1.0)  # time-weighted: long requests hold their seat longer
        reserve = float(w @ (m.inp + m.out) / w.sum())
        return int(min(self.max_seqs, self.kv_tokens // max(reserve, 1.0)))

    def _seat_label(self) -> str:
        return "kv" if self.seats < self.max_seqs else "max_num_seqs"

    def _judge(self, lam_ms: float, step: FloatArray, fast_var: Callable[[float], FloatArray], seat_wait: bool
               ) -> tuple[float, Population | None]:
        """(TPOT attainment, population) with mean step ``step[B]`` on the seat grid; ``fast_var(mean batch)``
        gives the per-bucket variance of the fast noise."""
        c = self.seats
        pop = window_population(lam_ms, max(self.mix.mean_decode_steps, 1e-9), step[: c + 1], c)
        if pop is None:
            return 0.0, None
        att = tpot_attainment(pop, lam_ms, step[: c + 1], self.mix.dec, self.mix.probs, self.slo.tpot_slo_ms,
                              fast_var(pop.mean_running), seat_wait)
        return att, pop

    # -- roles ----------------------------------------------------------------------------------------------
    def check_prefill(self, lam_ms: float) -> tuple[str | None, float]:
        if self._prefill_ttft is None:
            self._prefill_ttft = TtftModel(lambda n, t, p: self.superstep(n, t, p, 0.0), self.mix.prompts, None)
        att = self._prefill_ttft.attainment(lam_ms, self.slo.ttft_slo_ms)
        return (None if att >= self.target else "ttft"), 0.0

    def check_decode(self, lam_ms: float) -> tuple[str | None, float]:
        if self.seats < 1:
            return "kv", 0.0
        d = np.maximum(self.mix.dec, 1.0)

        def fast_var(batch: float) -> FloatArray:  # the uniform wait for the running step before joining
            return (float(np.interp(batch, self.grid, self.tau_dec)) ** 2 / 12.0) / d**2

        att, pop = self._judge(lam_ms, self.tau_dec, fast_var, seat_wait=True)
        if pop is None:
            return self._seat_label(), float(self.seats)
        if att >= self.target:
            return None, pop.mean_running
        return ("tpot" if pop.wait_probability < 1 - self.target else self._seat_label()), pop.mean_running

    def prefill_extra(self) -> tuple[FloatArray, FloatArray]:
        """Per grid batch B: (E[e], E[e²]) of the extra time a prompt adds to decode steps."""
        m = self.mix
        n_b, g = len(m.probs), len(self.grid)
        tok = np.broadcast_to(m.inp[:, None], (n_b, g))
        per_step = np.maximum(self.budget - self.grid[None, :], 1.0)
        steps = np.maximum(np.ceil(tok / per_step), 1.0)
        t = self._predict(1.0 / steps, tok / steps, m.pairs[:, None] / steps, np.broadcast_to(self.grid, (n_b, g)),
                          np.broadcast_to(self.grid * self.ctx, (n_b, g)))
        decode_only = np.where(self.grid > 0, self.tau_dec, 0.0)
        extra = np.maximum(steps * t - steps * decode_only[None, :], 0.0)
        return m.probs @ extra, m.probs @ extra**2

    def _colocated_chain(self, lam_ms: float, batch: float) -> tuple[TtftModel, Chain | None, FloatArray]:
        """TTFT model, super-step chain and engine steps per chain state with ``batch`` decodes running."""
        key = round(math.log1p(batch) / math.log(1.01))  # batches within 1 % share their step times
        model = self._ttft_models.get(key)
        if model is None:
            b = math.expm1(key * math.log(1.01))
            idle = float(np.interp(b, self.grid, self.tau_dec))
            model = TtftModel(lambda n, t, p: self.superstep(n, t, p, b), self.mix.prompts, idle)
            self._ttft_models[key] = model
        chain = model.chain(lam_ms, self.slo.ttft_slo_ms)
        steps = np.ones(1) if chain is None else np.where(chain.prompts > 0, self._steps(chain.tokens, batch), 1.0)
        return model, chain, steps

    def check_colocated(self, lam_ms: float) -> tuple[str | None, float]:
        """Colocated: decode steps interleave with the (chunked) prefill super-steps of the TTFT chain.

        With ``B`` decoding, the mean engine step is ``τ_dec(B) / (1 − s(B))`` (``s``: the prefill share of time,
        per prompt taken from the chain's batches). A request decodes from the end of its own prefill super-step
        on: the next super-steps hold the prompts that arrived meanwhile, so its TPOT is the exact mean and
        variance of the chain's durations over its window of ``d_b`` steps from that state (Markov additive
        functional), as a gamma law. The batch ``B`` follows the window law of :mod:`.population` (Little's law
        with feedback; prompts leave prefill in groups: index of dispersion from the chain) — a fixed point in
        ``B``, warm-started from the previous rate of the bisection.
        """
        c, m = self.seats, self.mix
        if c < 1:
            return "kv", 0.0
        d = np.maximum(m.dec, 1.0)
        e1 = self._extra_single[0]
        batch = self._warm_batch or min(float(c), lam_ms * m.mean_decode_steps * float(self.tau_dec[1]))
        for _ in range(6):
            model, chain, steps = self._colocated_chain(lam_ms, batch)
            if chain is None:
                return "stability", batch
            pi, pre = chain.step_probs, chain.prompts > 0
            tau_d = float(np.interp(batch, self.grid, self.tau_dec))
            per_prompt = float(pi[pre] @ (chain.duration_ms[pre] - steps[pre] * tau_d) / (pi[pre] @ chain.prompts[pre]))
            share = lam_ms * e1 * (per_prompt / max(float(np.interp(batch, self.grid, e1)), 1e-9))
            if (share[1 : c + 1] >= 1).any():
                return "stability", batch
            step = self.tau_dec / (1.0 - np.minimum(share, 0.999))  # mean engine step with B decoding
            start = pi * chain.prompts
            start = (start / start.sum()) @ chain.transition  # where a request's decoding begins
            per_super = float(pi @ steps)  # engine steps per super-step
            excess = chain.duration_ms - float(pi @ chain.duration_ms) / per_super * steps
            bias, var_chain = additive_functional(chain, excess, start)  # ms of transient excess; ms² per step
            n_pre = chain.prompts[pre]
            pop = window_population(
                lam_ms, max(m.mean_decode_steps, 1e-9), (step + bias / max(m.mean_decode_steps, 1e-9))[: c + 1],
                c, dispersion=float(pi[pre] @ n_pre**2 / (pi[pre] @ n_pre)),  # prompts finish prefill in groups
                extra_var=lam_ms**2 * m.mean_decode_steps * var_chain / per_super,  # the window's length varies
            )
            if pop is None:
                return self._seat_label(), float(c)
            converged = abs(pop.mean_running - batch) < 0.05 * max(batch, 1.0)
            batch = pop.mean_running if converged else 0.5 * (batch + pop.mean_running)
            if converged:
                break
        self._warm_batch = batch
        window_mean, window_var = window_moments(chain, chain.duration_ms, start, d / per_super)
        offset = window_mean / d - float(np.interp(pop.mean_running, self.grid, step))
        att_tpot = tpot_attainment(pop, lam_ms, step[: c + 1], m.dec, m.probs, self.slo.tpot_slo_ms,
                                   window_var / d**2, seat_wait=False, offset_ms=offset, skewed=True)
        att_ttft = model.attainment(lam_ms, self.slo.ttft_slo_ms, chain) * (1.0 - pop.wait_probability)
        if att_ttft * att_tpot >= self.target:
            return None, batch
        if pop.wait_probability >= 1 - self.target:
            return self._seat_label(), batch
        return ("ttft" if att_ttft < att_tpot else "tpot"), batch

    def _steps(self, tokens: FloatArray, n_dec: float) -> FloatArray:
        """Engine steps a super-step of ``tokens`` prompt tokens takes next to ``n_dec`` decodes."""
        return np.maximum(np.ceil(np.asarray(tokens) / max(self.budget - n_dec, 1.0)), 1.0)


def _upper_rate_per_ms(cell: _Cell, role: Role) -> float:
    """A rate no instance can sustain (start of the bisection), per ms: just above the throughput with full
    steps (prefill: token budget; decode: every seat)."""
    full = max(cell.budget / max(cell.mix.prompts.mean_tokens, 1.0), 1.0)
    prefill_bound = full / float(cell.superstep(np.array([full]), np.array([cell.budget]),
                                                np.array([full * cell.mix.prompts.mean_pairs]), 0.0)[0])
    seats = max(cell.seats, 1)
    decode_bound = seats / (max(cell.mix.mean_decode_steps, 0.5) * max(float(cell.tau_dec[seats]), 1e-6))
    if role is Role.PREFILL:
        return 1.02 * prefill_bound
    if role is Role.DECODE:
        return 1.02 * decode_bound
    return 1.02 * min(prefill_bound, decode_bound)


def capacity_cell(
    source: StepTimeSource,
    config: ServingConfig,
    tier: TierWorkload,
    options: CapacityOptions | None = None,
    engine_args: dict[str, object] | None = None,
) -> CellResult:
    """``R[tier, config]`` with the binding constraint (see the module docstring for the method)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _capacity_cell(source, config, tier, options, engine_args)


def _capacity_cell(
    source: StepTimeSource,
    config: ServingConfig,
    tier: TierWorkload,
    options: CapacityOptions | None,
    engine_args: dict[str, object] | None,
) -> CellResult:
    budget, max_seqs = (options or CapacityOptions()).resolved(engine_args)
    tol = (options or CapacityOptions()).rate_rel_tol
    cell = _Cell(source, config.tp, tier, budget, max_seqs)
    role = config.role

    def check(lam_ms: float) -> tuple[str | None, float]:
        if role is Role.PREFILL:
            return cell.check_prefill(lam_ms)
        if role is Role.DECODE:
            return cell.check_decode(lam_ms)
        return cell.check_colocated(lam_ms)

    floor, batch0 = check(1e-12)
    if floor is not None:
        return CellResult(rate_rps=0.0, binding="slo-unreachable", batch_size=batch0)
    lo, hi = 0.0, _upper_rate_per_ms(cell, role)
    binding, _ = check(hi)
    while binding is None:  # the start was not high enough
        lo, hi = hi, 2 * hi
        binding, _ = check(hi)
    batch = 0.0
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        failed, b = check(mid)
        if failed is None:
            lo, batch = mid, b
        else:
            hi, binding = mid, failed
    return CellResult(rate_rps=lo * 1000.0, binding=binding or "none", batch_size=batch)


def build_capacity_cells(
    source: StepTimeSource,
    tiers: Sequence[TierWorkload],
    configs: Iterable[ServingConfig] | None = None,
    options: CapacityOptions | None = None,
    engine_args: dict[str, object] | None = None,
) -> dict[str, dict[str, CellResult]]:
    """Every cell with its binding constraint, ``{tier: {config_key: CellResult}}``."""
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ValueError(f"tier names must be unique; got {names}")
    config_list = list(configs) if configs is not None else list(all_configs())
    out: dict[str, dict[str, CellResult]] = {}
    # Small dense solves: one BLAS thread is 10x faster than many (scoped to this call).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", UserWarning)  # the bisection probes far outside any profile
        for tier in tiers:
            out[tier.name] = {c.key: _capacity_cell(source, c, tier, options, engine_args) for c in config_list}
    return out


def build_capacity_table(
    source: StepTimeSource,
    tiers: Sequence[TierWorkload],
    configs: Iterable[ServingConfig] | None = None,
    options: CapacityOptions | None = None,
    engine_args: dict[str, object] | None = None,
    source_label: str = "",
) -> CapacityTable:
    """``R[t,c]`` for every tier and config (default: every supported ``(tp, role)`` the model covers)."""
    cells = build_capacity_cells(source, tiers, configs, options, engine_args)
    return CapacityTable(
        rates_rps={t: {k: c.rate_rps for k, c in row.items()} for t, row in cells.items()},
        source=source_label,
    )


def timed_build(source: StepTimeSource, tiers: Sequence[TierWorkload], configs: Iterable[ServingConfig],
                repeats: int = 5, **kwargs: object) -> tuple[CapacityTable, float]:
    """Build the table ``repeats`` times; returns it with the median build time in seconds."""
    config_list = list(configs)
    times, table = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        table = build_capacity_table(source, tiers, config_list, **kwargs)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    assert table is not None
    return table, float(np.median(times))


class TiersFile(BaseModel):
    """A capacity-table request file (YAML or JSON): tiers, optional engine knobs and configs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: tuple[TierWorkload, ...] = Field(min_length=1)
    """Tiers, each with its SLO and length mix."""
    options: CapacityOptions = CapacityOptions()
    """Engine knobs and solver tolerance."""
    configs: tuple[str, ...] | None = None
    """Config keys to build (``tp2-decode``, ...); default every supported config the model covers."""

    def serving_configs(self, tps: Iterable[int]) -> list[ServingConfig]:
        """Requested configs, or every ``(tp, role)`` with a profiled ``tp``."""
        if self.configs is not None:
            return [ServingConfig.parse(k) for k in self.configs]
        allowed = set(tps)
        return [c for c in all_configs() if c.tp in allowed]


def load_tiers_file(path: str | Path) -> TiersFile:
    """Read and validate a tiers file; errors name the file and the offending field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tiers file {p}: no such file (see examples/capacity/tiers.yaml)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"tiers file {p}: not valid YAML: {exc}") from None
    try:
        return TiersFile.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"tiers file {p}: {exc}") from None
