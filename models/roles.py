"""Per-cell queueing logic of the capacity table: one role's constraints at one arrival rate (see
:mod:`.capacity` for the method)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .features import FloatArray, attention_pairs
from .population import Population, tpot_attainment, window_population
from .queueing import Chain, PromptMix, TtftModel, additive_functional, window_moments
from .spec import LengthMix
from .tiers import StepTimeSource, TierWorkload


@dataclass(frozen=True)
class Mix:
    inp: FloatArray
    out: FloatArray
    dec: FloatArray
    probs: FloatArray
    pairs: FloatArray

    @classmethod
    def of(cls, mix: LengthMix) -> Mix:
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


class Cell:
    """Everything one (tier, tp, role) cell needs, with the λ-independent step times precomputed."""

    def __init__(
        self,
        source: StepTimeSource,
        tp: int,
        tier: TierWorkload,
        budget: int,
        max_seqs: int,
        leave_ms: float = 0.0,
        arrive_ms: float = 0.0,
    ) -> None:
        self.source, self.tp, self.slo = source, tp, tier.slo
        self.leave_ms, self.arrive_ms = leave_ms, arrive_ms  # hand-off pauses (prefill after, decode before a step)
        self.mix = Mix.of(tier.length_mix)
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

    def _predict(
        self, n_pre: FloatArray, tok: FloatArray, pairs: FloatArray, n_dec: FloatArray, ctx: FloatArray
    ) -> FloatArray:
        n_pre, tok, pairs, n_dec, ctx = np.broadcast_arrays(n_pre, tok, pairs, n_dec, ctx)
        comp = np.column_stack(
            [
                np.full(n_pre.size, float(self.tp)),
                n_pre.ravel(),
                tok.ravel(),
                pairs.ravel(),
                n_dec.ravel(),
                ctx.ravel(),
            ]
        )
        return self.source.predict_batch_ms(comp, validate=False).reshape(n_pre.shape)

    def _decode_step(self, batch: FloatArray) -> FloatArray:
        """Decode-only step time with ``batch`` sequences (at 0: the limit of a vanishing batch)."""
        b = np.maximum(np.asarray(batch, dtype=float), 1e-9)
        return self._predict(np.zeros_like(b), np.zeros_like(b), np.zeros_like(b), b, b * max(self.ctx, 1.0))

    def superstep(self, n: FloatArray, tok: FloatArray, pairs: FloatArray, n_dec: float) -> FloatArray:
        """Duration of prefilling ``n`` prompts (``tok`` tokens) in chunked steps next to ``n_dec`` decodes."""
        steps = self._steps(tok, n_dec)
        t = self._predict(
            np.asarray(n) / steps,
            np.asarray(tok) / steps,
            np.asarray(pairs) / steps,
            np.full(np.shape(tok), n_dec),
            np.full(np.shape(tok), n_dec * self.ctx),
        )
        return steps * t

    # -- decode population ----------------------------------------------------------------------------------
    @property
    def seats(self) -> int:
        """Requests that can run at once: ``max_num_seqs``, or fewer when their KV reservations fill the
        cache.
        """
        m = self.mix
        w = m.probs * np.maximum(m.dec, 1.0)  # time-weighted: long requests hold their seat longer
        reserve = float(w @ (m.inp + m.out) / w.sum())
        return int(min(self.max_seqs, self.kv_tokens // max(reserve, 1.0)))

    def _seat_label(self) -> str:
        return "kv" if self.seats < self.max_seqs else "max_num_seqs"

    def _judge(
        self, lam_ms: float, step: FloatArray, fast_var: Callable[[float], FloatArray], seat_wait: bool
    ) -> tuple[float, Population | None]:
        """(TPOT attainment, population) with mean step ``step[B]`` on the seat grid; ``fast_var(mean batch)``
        gives the per-bucket variance of the fast noise."""
        c = self.seats
        pop = window_population(lam_ms, max(self.mix.mean_decode_steps, 1e-9), step[: c + 1], c)
        if pop is None:
            return 0.0, None
        att = tpot_attainment(
            pop,
            lam_ms,
            step[: c + 1],
            self.mix.dec,
            self.mix.probs,
            self.slo.tpot_slo_ms,
            fast_var(pop.mean_running),
            seat_wait,
        )
        return att, pop

    # -- roles ----------------------------------------------------------------------------------------------
    def check_prefill(self, lam_ms: float) -> tuple[str | None, float]:
        if self._prefill_ttft is None:
            self._prefill_ttft = TtftModel(self._handing_off_superstep, self.mix.prompts, None)
        att = self._prefill_ttft.attainment(lam_ms, self.slo.ttft_slo_ms)
        return (None if att >= self.target else "ttft"), 0.0

    def _handing_off_superstep(self, n: FloatArray, tok: FloatArray, pairs: FloatArray) -> FloatArray:
        """A prefill instance's super-step: its chunked steps, each followed by the hand-off pause."""
        return self.superstep(n, tok, pairs, 0.0) + self._steps(tok, 0.0) * self.leave_ms

    def check_decode(self, lam_ms: float) -> tuple[str | None, float]:
        if self.seats < 1:
            return "kv", 0.0
        d = np.maximum(self.mix.dec, 1.0)
        # the pause before a step in which at least one request arrives: arrivals over the step and its own pause
        paused = -np.expm1(-lam_ms * (self.tau_dec + self.arrive_ms))
        step = self.tau_dec + self.arrive_ms * paused
        pause_var = self.arrive_ms**2 * paused * (1.0 - paused)  # per step: a pause or not

        def fast_var(batch: float) -> FloatArray:  # the wait for the running step before joining, and the pauses
            wait = float(np.interp(batch, self.grid, step)) ** 2 / 12.0
            return wait / d**2 + float(np.interp(batch, self.grid, pause_var)) / d

        att, pop = self._judge(lam_ms, step, fast_var, seat_wait=True)
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
        t = self._predict(
            1.0 / steps,
            tok / steps,
            m.pairs[:, None] / steps,
            np.broadcast_to(self.grid, (n_b, g)),
            np.broadcast_to(self.grid * self.ctx, (n_b, g)),
        )
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

        With ``B`` decoding, the mean engine step is ``τ_dec(B) / (1 − s(B))`` (``s``: the prefill share of
        time, per prompt taken from the chain's batches). A request decodes from the end of its own prefill
        super-step on: the next super-steps hold the prompts that arrived meanwhile, so its TPOT is the exact
        mean and variance of the chain's durations over its window of ``d_b`` steps from that state (Markov
        additive functional), as a gamma law. The batch ``B`` follows the window law of :mod:`.population`
        (Little's law with feedback; prompts leave prefill in groups: index of dispersion from the chain) — a
        fixed point in ``B``, warm-started from the previous rate of the bisection.
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
                lam_ms,
                max(m.mean_decode_steps, 1e-9),
                (step + bias / max(m.mean_decode_steps, 1e-9))[: c + 1],
                c,
                dispersion=float(pi[pre] @ n_pre**2 / (pi[pre] @ n_pre)),  # prompts finish prefill in groups
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
        att_tpot = tpot_attainment(
            pop,
            lam_ms,
            step[: c + 1],
            m.dec,
            m.probs,
            self.slo.tpot_slo_ms,
            window_var / d**2,
            seat_wait=False,
            offset_ms=offset,
            skewed=True,
        )
        att_ttft = model.attainment(lam_ms, self.slo.ttft_slo_ms, chain) * (1.0 - pop.wait_probability)
        if att_ttft * att_tpot >= self.target:
            return None, batch
        if pop.wait_probability >= 1 - self.target:
            return self._seat_label(), batch
        return ("ttft" if att_ttft < att_tpot else "tpot"), batch

    def _steps(self, tokens: FloatArray, n_dec: float) -> FloatArray:
        """Engine steps a super-step of ``tokens`` prompt tokens takes next to ``n_dec`` decodes."""
        return np.maximum(np.ceil(np.asarray(tokens) / max(self.budget - n_dec, 1.0)), 1.0)
