"""TTFT of a continuously batching engine under Poisson arrivals: a gated-batch Markov chain.

Engine semantics (shared with :mod:`.reqsim`): when a step ends, the next step takes the waiting prompts in
arrival order up to the token budget, chunking the last one; with a backlog the engine therefore works through
it in full steps. We group the prompts that arrive during one *super-step* (the steps that clear the prompts
present when it began) into the next super-step. A prompt that arrives while the engine has no prefill work
either starts a step at once (prefill role: the engine is idle) or waits for the running decode-only step to
end (colocated role). Its first token appears when its super-step ends.

Chain states are kinds of super-step: ``D`` (no prefill: idle or a decode-only step), ``1_b`` (one prompt of
length bucket ``b``) and ``(n, z)`` (``n >= 2`` prompts whose total work sits at quadrature node ``z`` of its
distribution: tokens ``~ N(n·μ, n·σ²)`` over the mix, attention pairs regressed on tokens; 3-point
Gauss–Hermite). From a state of duration ``τ`` the arrivals are Poisson(``λτ``) and fix the next state (0 ->
``D``). The stationary law of the chain, weighted by durations, gives where a Poisson arrival lands (PASTA).
An arrival landing in a super-step of duration ``τ_j`` waits its uniform residual ``U·τ_j``, then runs with
the ``K ~ Poisson(λτ_j)`` others that arrived during ``τ_j``:

    P(TTFT <= S) = Σ_j w_j Σ_k Pois(k; λτ_j) Σ_b p_b Σ_z w_z · clip((S − T_b(1+k, z)) / τ_j, 0, 1)

(``T_b(1+k, z)``: super-step of the tagged prompt of bucket ``b`` plus ``k`` others with work at node ``z``;
an arrival to an idle prefill engine gets ``T_b(1)``). Batches above ``EXACT_BATCHES`` prompts are grouped
into ~12 % wide bins; batches whose super-step alone exceeds the SLO are lumped into one state (all their
prompts miss). Approximations: the quadrature for the length mix of a batch, and a batch finishing together
(its first prompts in fact finish up to one step earlier).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from .features import FloatArray

#: Largest batch (prompts per super-step) the chain tracks.
MAX_CHAIN_BATCH = 512
#: The chain is first built up to this batch and enlarged only when that batch holds stationary mass.
FIRST_CHAIN_BATCH = 48
#: Batch sizes up to this are chain states of their own; larger ones are grouped in ~12 % wide bins.
EXACT_BATCHES = 8
_BIN_EDGES = np.unique(
    np.concatenate(
        [
            np.arange(2, EXACT_BATCHES + 1),
            np.round(EXACT_BATCHES * 1.12 ** np.arange(1, 80)).astype(int),
        ]
    )
)
_BIN_EDGES = _BIN_EDGES[_BIN_EDGES <= MAX_CHAIN_BATCH].astype(float)
#: Batch sizes at which super-steps are evaluated (bin edges and middles; interpolated in between).
_MULTI_GRID = np.unique(
    np.concatenate(
        [
            _BIN_EDGES,
            (_BIN_EDGES[:-1] + _BIN_EDGES[1:] - 1) // 2,
            [MAX_CHAIN_BATCH],
        ]
    )
).astype(float)
#: 3-point Gauss–Hermite rule for a standard normal.
_NODES = np.array([-np.sqrt(3.0), 0.0, np.sqrt(3.0)])
_NODE_WEIGHTS = np.array([1.0, 4.0, 1.0]) / 6.0

SuperstepFn = Callable[[FloatArray, FloatArray, FloatArray], FloatArray]
"""(prompts, prompt tokens, attention pairs) -> super-step duration in ms, element-wise."""


@dataclass(frozen=True)
class PromptMix:
    """Prompt-length distribution of a tier as arrays (one entry per length bucket)."""

    input_tokens: FloatArray
    pairs: FloatArray
    probs: FloatArray

    @property
    def mean_tokens(self) -> float:
        return float(self.probs @ self.input_tokens)

    @property
    def mean_pairs(self) -> float:
        return float(self.probs @ self.pairs)

    @property
    def nodes(self) -> tuple[FloatArray, FloatArray]:
        """Quadrature nodes and weights for the work of a batch (one node when every prompt has one length)."""
        if float(self.probs @ (self.input_tokens - self.mean_tokens) ** 2) == 0.0:
            return np.zeros(1), np.ones(1)
        return _NODES, _NODE_WEIGHTS

    def work_of_others(self, k: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(tokens, pairs) of ``k`` random prompts at each quadrature node: arrays of shape ``k.shape +
        (nodes,)``."""
        mu_t, mu_p = self.mean_tokens, self.mean_pairs
        var_t = float(self.probs @ (self.input_tokens - mu_t) ** 2)
        cov = float(self.probs @ ((self.input_tokens - mu_t) * (self.pairs - mu_p)))
        slope = cov / var_t if var_t > 0 else 0.0
        k = np.asarray(k, dtype=float)[..., None]
        dev = self.nodes[0] * np.sqrt(k * var_t)
        tokens = np.maximum(k * mu_t + dev, k)
        pairs = np.maximum(k * mu_p + slope * (tokens - k * mu_t), tokens)
        return tokens, pairs


def _poisson_rows(means: FloatArray, n_max: int) -> FloatArray:
    """Pois(k; m) for k = 0..n_max-1 and the tail P(K >= n_max) in column n_max; one row per mean."""
    k = np.arange(n_max, dtype=float)
    m = np.maximum(means, 1e-300)[:, None]
    pmf = np.exp(k[None, :] * np.log(m) - m - gammaln(k + 1.0)[None, :])
    tail = np.clip(1.0 - pmf.sum(axis=1), 0.0, 1.0)
    return np.column_stack([pmf, tail])


class TtftModel:
    """TTFT attainment of one engine (fixed step-time function); λ-independent step times are cached."""

    def __init__(self, superstep_ms: SuperstepFn, mix: PromptMix, idle_step_ms: float | None) -> None:
        self.superstep_ms, self.mix, self.idle_step_ms = superstep_ms, mix, idle_step_ms
        nb = len(mix.probs)
        self.single = superstep_ms(np.ones(nb), mix.input_tokens, mix.pairs)
        n = _MULTI_GRID
        tok, pairs = mix.work_of_others(n)
        self._multi_grid = superstep_ms(np.broadcast_to(n[:, None], tok.shape), tok, pairs)  # (grid, z)
        self.multi_mean = self._multi_grid @ mix.nodes[1]
        self.node_weights = mix.nodes[1]
        self._tagged = np.empty((0, nb, len(self.node_weights)))

    def tagged(self, n_max: int) -> FloatArray:
        """``T[k, b, z]`` for k = 0..n_max-1: super-step of a bucket-b prompt with k others at node z."""
        have = self._tagged.shape[0]
        if have < n_max:
            k = np.arange(have, max(n_max, 2 * have), dtype=float)
            tok, pairs = self.mix.work_of_others(k)  # (k, z)
            m = self.mix
            more = self.superstep_ms(
                np.broadcast_to((1.0 + k)[:, None, None], (len(k), len(m.probs), len(self.node_weights))),
                tok[:, None, :] + m.input_tokens[None, :, None],
                pairs[:, None, :] + m.pairs[None, :, None],
            )
            self._tagged = np.concatenate([self._tagged, more])
        return self._tagged[:n_max]

    def multi(self, n: FloatArray) -> FloatArray:
        """Super-step of ``n`` prompts at each node, shape ``(len(n), z)`` (interpolated on the bin grid)."""
        return np.column_stack([np.interp(n, _MULTI_GRID, col) for col in self._multi_grid.T])

    def chain_size(self, lam: float, slo_ms: float) -> int | None:
        """Largest batch the chain must track at rate ``lam`` (per ms), or None when the queue is unstable
        (arrivals during the largest tracked super-step outnumber its prompts).

        The chain stops at the first batch size ``n`` that no Poisson burst can exceed (mean + 6 sd + 6), or
        at the first ``n`` whose super-step alone exceeds the SLO: a prompt in a larger batch misses its TTFT
        whatever happens, so larger batches are lumped into that state and counted as misses.
        """
        n = _MULTI_GRID
        mean = lam * np.maximum(self.multi_mean, self.single.max())
        closed = np.flatnonzero(mean + 6.0 * np.sqrt(mean) + 6.0 <= n)
        too_slow = np.flatnonzero(self._multi_grid.min(axis=1) > slo_ms)
        candidates = [int(n[i[0]]) for i in (closed, too_slow) if i.size]
        if candidates:
            return max(min(candidates), 2)
        return MAX_CHAIN_BATCH if mean[-1] < n[-1] else None

    def chain(self, rate_per_ms: float, slo_ms: float) -> Chain | None:
        """The stationary super-step chain at ``rate_per_ms``; None when the queue is unstable.

        It is built small first (batches up to ``FIRST_CHAIN_BATCH``) and rebuilt at full size only when its
        largest batch holds stationary mass."""
        n_max = self.chain_size(float(rate_per_ms), slo_ms)
        if n_max is None:
            return None
        if n_max > FIRST_CHAIN_BATCH:
            small = self._build(float(rate_per_ms), FIRST_CHAIN_BATCH)
            if small.step_probs[-len(self.node_weights) :].sum() < 1e-7:
                return small
        return self._build(float(rate_per_ms), n_max)

    def _build(self, lam: float, n_max: int) -> Chain:
        mix = self.mix
        nb = len(mix.probs)
        idle_ms = 1.0 / lam if self.idle_step_ms is None else max(self.idle_step_ms, 1e-6)
        lower = _BIN_EDGES[n_max >= _BIN_EDGES]
        upper = np.append(lower[1:], n_max + 1)
        middle = ((lower + upper - 1) // 2).astype(int)
        # States: 0 = D, 1..nb = a single prompt of bucket b, then (batch bin, node) pairs.
        dur = np.concatenate([[idle_ms], self.single, self.multi(middle.astype(float)).ravel()])
        arrivals = _poisson_rows(lam * dur, n_max + 1)  # k = 0..n_max, then the tail (> n_max)
        s = len(dur)
        trans = np.empty((s, s))
        trans[:, 0] = arrivals[:, 0]
        trans[:, 1 : nb + 1] = arrivals[:, [1]] * mix.probs[None, :]
        into_bins = np.add.reduceat(arrivals[:, 2 : n_max + 1], (lower - 2).astype(int), axis=1)
        into_bins[:, -1] += arrivals[:, n_max + 1]  # (negligible) overflow lumps into the largest batch
        trans[:, nb + 1 :] = (into_bins[:, :, None] * self.node_weights[None, None, :]).reshape(s, -1)
        if self.idle_step_ms is None:  # an idle prefill engine starts the next arrival's step at once
            trans[0, :] = 0.0
            trans[0, 1 : nb + 1] = mix.probs
        tok, pairs = mix.work_of_others(middle.astype(float))
        return Chain(
            transition=trans,
            step_probs=_stationary(trans),
            duration_ms=dur,
            arrivals=arrivals[:, :n_max],
            n_max=n_max,
            prompts=np.concatenate([[0.0], np.ones(nb), np.repeat(middle.astype(float), len(self.node_weights))]),
            tokens=np.concatenate([[0.0], mix.input_tokens, tok.ravel()]),
            pairs=np.concatenate([[0.0], mix.pairs, pairs.ravel()]),
        )

    def attainment(self, rate_per_ms: float, slo_ms: float, chain: Chain | None = None) -> float:
        """Share of prompts whose TTFT is at most ``slo_ms`` at arrival rate ``rate_per_ms`` (per ms)."""
        mix = self.mix
        if rate_per_ms <= 0:
            wait = self.idle_step_ms or 0.0
            u = np.clip((slo_ms - self.single) / wait, 0, 1) if wait > 0 else (self.single <= slo_ms).astype(float)
            return float(mix.probs @ u)
        chain = chain or self.chain(rate_per_ms, slo_ms)
        if chain is None:
            return 0.0
        dur = chain.duration_ms
        weights = chain.step_probs * dur
        weights /= weights.sum()
        live = weights > 1e-12 * weights.max()  # states with no stationary weight contribute nothing
        dur, weights = dur[live], weights[live]
        arrivals = chain.arrivals[live]
        k_used = int(np.flatnonzero(arrivals.max(axis=0) > 1e-12).max()) + 1  # others beyond: negligible mass
        tagged = (
            self.tagged(chain.n_max)[:k_used] @ self.node_weights
            if len(self.node_weights) == 1
            else (self.tagged(chain.n_max)[:k_used])
        )
        if tagged.ndim == 2:
            frac = np.clip((slo_ms - tagged[None]) / dur[:, None, None], 0.0, 1.0)  # (s, k, b)
            per_state = np.einsum("skb,b,sk->s", frac, mix.probs, arrivals[:, :k_used])
        else:
            frac = np.clip((slo_ms - tagged[None]) / dur[:, None, None, None], 0.0, 1.0)  # (s, k, b, z)
            per_state = np.einsum("skbz,b,z,sk->s", frac, mix.probs, self.node_weights, arrivals[:, :k_used])
        if self.idle_step_ms is None and live[0]:
            per_state[0] = float(mix.probs @ (self.single <= slo_ms))
        return float(weights @ per_state)


@dataclass(frozen=True)
class Chain:
    """Stationary super-step chain (state 0 = no prefill)."""

    transition: FloatArray
    """Row-stochastic transition matrix."""
    step_probs: FloatArray
    """Share of super-steps in each state."""
    duration_ms: FloatArray
    """Duration of each state."""
    arrivals: FloatArray
    """Pois(k; λ·duration) for k < n_max, per state."""
    n_max: int
    """Largest batch tracked."""
    prompts: FloatArray
    """Prompts per state."""
    tokens: FloatArray
    """Prompt tokens per state."""
    pairs: FloatArray
    """Attention pairs per state."""


def ttft_attainment(
    rate_per_ms: float,
    slo_ms: float,
    superstep_ms: SuperstepFn,
    mix: PromptMix,
    idle_step_ms: float | None,
) -> float:
    """Share of prompts whose TTFT is at most ``slo_ms`` at arrival rate ``rate_per_ms`` (per ms).

    ``idle_step_ms`` is ``None`` for a prefill-only engine (idle until a prompt arrives) or the duration of
    the decode-only step a colocated engine runs while no prompt waits.
    """
    return TtftModel(superstep_ms, mix, idle_step_ms).attainment(rate_per_ms, slo_ms)


def _stationary(trans: FloatArray) -> FloatArray:
    """Stationary distribution of a row-stochastic matrix."""
    s = trans.shape[0]
    a = trans.T - np.eye(s)
    a[-1, :] = 1.0
    b = np.zeros(s)
    b[-1] = 1.0
    try:
        pi = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        pi = np.linalg.lstsq(a, b, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def additive_functional(chain: Chain, value: FloatArray, start: FloatArray) -> tuple[float, float]:
    """For ``f = value − π·value`` along the chain: (E[Σ_{t>=0} f(X_t)] from ``start``, i.e. the transient
    bias ``start·h`` with ``h = (I − P + 1π)⁻¹ f``; and the asymptotic variance per step ``2π(f∘h) − π(f²)``).
    """
    pi, p = chain.step_probs, chain.transition
    f = value - pi @ value
    fundamental = np.eye(len(pi)) - p + np.outer(np.ones(len(pi)), pi)
    h = np.linalg.solve(fundamental, f)
    return float(start @ h), float(max(2.0 * pi @ (f * h) - pi @ (f * f), 0.0))


#: Window moments are exact up to this many super-steps and extrapolated linearly (asymptotic rates) beyond.
EXACT_WINDOW = 64


def window_moments(
    chain: Chain, value: FloatArray, start: FloatArray, lengths: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Mean and variance of ``Σ_{t<m} value(X_t)`` from ``X_0 ~ start`` for every (fractional) ``m`` in
    ``lengths``, by the recursions ``a_{t+1} = v + P a_t`` and ``b_{t+1} = v² + 2 v∘(P a_t) + P b_t`` up to
    ``EXACT_WINDOW`` steps (linear interpolation between whole steps) and beyond that linearly with the
    asymptotic rates ``π·v`` and ``2π(f∘h) − π(f²)`` per step."""
    p = chain.transition
    m_max = min(int(np.ceil(max(float(np.max(lengths)), 1.0))), EXACT_WINDOW)
    a = np.zeros(len(value))
    b = np.zeros(len(value))
    means, seconds = [0.0], [0.0]
    for _ in range(m_max):
        pa = p @ a
        b = value**2 + 2.0 * value * pa + p @ b
        a = value + pa
        means.append(float(start @ a))
        seconds.append(float(start @ b))
    t = np.arange(m_max + 1, dtype=float)
    inside = np.minimum(lengths, m_max)
    mean = np.interp(inside, t, means)
    var = np.maximum(np.interp(inside, t, seconds) - mean**2, 0.0)
    beyond = np.maximum(np.asarray(lengths, dtype=float) - m_max, 0.0)
    if beyond.any():
        _, rate_var = additive_functional(chain, value, start)
        mean = mean + beyond * float(chain.step_probs @ value)
        var = var + beyond * rate_var
    return mean, var
