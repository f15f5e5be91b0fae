"""The decode population of one engine (how many sequences decode at once) and the TPOT it implies.

**Window law** (:func:`window_population`). A request stays ``d`` steps, so the batch ``B`` counts the
arrivals of the last ``E[d]·τ̄(B)`` ms (``τ̄(B)``: mean engine step with ``B`` decoding — decode-only, or with
the prefill share of a colocated engine): ``B = f(B) + ξ·√V(B)`` with ``f(B) = λ·E[d]·τ̄(B)``, ``V =
dispersion·f + extra_var`` and ``ξ`` standard normal, solved for each node of a normal quadrature. This keeps
the nonlinearity of a loaded engine (longer steps keep requests longer: linearised, ``Var B = V/(1 − g)²``
with ``g = f'(B̄)``, far above the Poisson ``B̄`` near the knee). With ``c`` seats (``max_num_seqs``, or as
many requests as their KV reservations fit) the mass beyond ``c`` queues as in a birth–death chain: ``π(c + j)
= π(c)·ρ^j`` with ``ρ = λ/μ(c)``, ``μ(c) = c/(E[d]·τ̄(c))``; ``ρ >= 1`` is overload (a miss).

**TPOT** (:func:`tpot_attainment`). A request of bucket ``b`` arriving to ``n`` others runs with ``min(n, c−1)
+ 1`` sequences; its TPOT is the mean step over its ``d_b`` steps, plus (decode role) its wait for a seat and
for the running step, divided by ``d_b``. Its lifetime ``L_b = d_b·τ̄`` averages the batch's wandering,
modelled as an Ornstein–Uhlenbeck process relaxing at ``κ = (1 − g)/L̄``: the time average over ``L_b`` keeps
a share ``r = 2/x·(1 − (1 − e^{−x})/x)`` (``x = κ·L_b``) of a deviation's variance, so the batch a request
effectively sees is ``B̄ + (B − B̄)·√r``. Fast noise (prefill work landing in the lifetime, the wait for the
running step) adds variance ``fast_var_b`` (normal, or gamma when ``skewed``):

    P(TPOT_b <= S) = Σ_n π(n) · F_b(S − τ̄(B_eff(n)) − wait(n)/d_b)

(A plain birth–death product form with exponential lifetimes gives ``Var B = B̄/(1 − g)``: with fixed
lifetimes it underestimates the batch's spread near the knee by far; the request simulator showed it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import gamma, norm

from .features import FloatArray

_TAIL = 1e-12
MAX_QUEUE = 20_000


@dataclass(frozen=True)
class Population:
    """Stationary law of the number of requests in an engine's decode stage."""

    probs: FloatArray
    """π(n), n = 0..len-1 (running + waiting for a seat)."""
    seats: int
    """Seats ``c``."""
    departure_rate_full: float
    """μ(c): departures per ms when every seat is taken."""
    overflow: float = 0.0
    """Probability that no stable batch exists below the seat limit (counted as SLO misses)."""

    @property
    def mean_running(self) -> float:
        """E[min(n, c)]."""
        n = np.arange(len(self.probs))
        return float(self.probs @ np.minimum(n, self.seats) / max(self.probs.sum(), 1e-300))

    @property
    def wait_probability(self) -> float:
        """P(an arrival finds every seat taken)."""
        return float(self.probs[self.seats :].sum()) + self.overflow


def tpot_attainment(
    pop: Population,
    rate_per_ms: float,
    step_ms: FloatArray,
    decode_steps: FloatArray,
    bucket_probs: FloatArray,
    slo_ms: float,
    fast_var: FloatArray,
    seat_wait: bool,
    offset_ms: FloatArray | None = None,
    skewed: bool = False,
) -> float:
    """Share of requests (buckets with ``d >= 1``) whose TPOT is at most ``slo_ms`` (see the module
    docstring).

    ``step_ms[B]`` = τ̄(B) for B = 0..seats; ``fast_var`` per bucket (ms²); ``seat_wait`` adds the wait for a
    seat to TPOT (decode role; a colocated engine waits before prefill, which is TTFT's business);
    ``offset_ms`` shifts each bucket's mean TPOT (e.g. the colocated transient after its own prefill);
    ``skewed`` takes the fast noise as a gamma law with that mean shift's scale (a sum of positive step times
    is right-skewed) instead of a normal one.
    """
    has = decode_steps >= 1
    if not has.any():
        return 1.0
    c = pop.seats
    n = np.arange(len(pop.probs), dtype=float)
    seen = np.minimum(n, c - 1) + 1.0
    mean_b = pop.mean_running
    grid = np.arange(len(step_ms), dtype=float)
    mean_steps = float(bucket_probs @ decode_steps)
    tau_bar = float(np.interp(mean_b, grid, step_ms))
    slope = float(np.interp(mean_b, grid[1:-1], np.gradient(step_ms, grid)[1:-1])) if len(grid) > 2 else 0.0
    gain = min(rate_per_ms * mean_steps * slope, 0.999)
    kappa = (1.0 - gain) / max(mean_steps * tau_bar, 1e-9)
    x = np.maximum(kappa * decode_steps[has] * tau_bar, 1e-9)
    shrink = np.sqrt(2.0 / x * (1.0 - (1.0 - np.exp(-x)) / x))  # (buckets,)
    b_eff = mean_b + (seen[None, :] - mean_b) * shrink[:, None]  # (buckets, n)
    tpot = np.interp(b_eff, grid, step_ms)
    if offset_ms is not None:
        tpot = tpot + offset_ms[has, None]
    if seat_wait:
        wait = np.maximum(n - c + 1.0, 0.0) / pop.departure_rate_full
        tpot = tpot + wait[None, :] / decode_steps[has, None]
    var = np.maximum(fast_var[has], 1e-18)[:, None]
    if skewed:  # gamma with mean = the bucket's TPOT at the mean batch and the fast variance
        center = np.interp(mean_b, grid, step_ms) + (offset_ms[has, None] if offset_ms is not None else 0.0)
        shape, scale = center**2 / var, var / center
        att = gamma.cdf(slo_ms - (tpot - center), shape, scale=scale) @ pop.probs
    else:
        att = norm.cdf((slo_ms - tpot) / np.sqrt(var)) @ pop.probs  # overflow mass (not in probs) counts as a miss
    return float(bucket_probs[has] @ att / bucket_probs[has].sum())


_XI = np.linspace(-6.0, 6.0, 97)
_XI_W = norm.pdf(_XI) / norm.pdf(_XI).sum()


def window_population(
    rate_per_ms: float,
    steps_per_request: float,
    step_ms: FloatArray,
    seats: int,
    dispersion: float = 1.0,
    extra_var: float = 0.0,
) -> Population | None:
    """Law of the decode batch when every request stays a fixed number of steps (the window model).

    The batch counts the arrivals of the last ``E[d]·τ̄(B)`` ms: ``B = f(B) + ξ·√V(B)`` with ``f(B) =
    λ·E[d]·τ̄(B)``, ``V = dispersion·f + extra_var`` (``dispersion``: index of dispersion of arrivals, > 1
    when they come in groups; ``extra_var``: variance the window length adds) and ``ξ`` standard normal.
    Linearised this is ``Var B = V / (1 − g)²`` — the feedback of a loaded engine (longer steps keep requests
    longer). Each quadrature node ``ξ`` is solved on the seat grid; no root below the seat limit = overflow (a
    miss). None when even the mean has no root.
    """
    if seats < 1:
        return None
    grid = np.arange(seats + 1, dtype=float)
    f = rate_per_ms * steps_per_request * step_ms[: seats + 1]
    if not np.isfinite(f).all():
        return None
    v = dispersion * f + extra_var
    h = f[None, :] + _XI[:, None] * np.sqrt(v)[None, :] - grid[None, :]
    below = h <= 0
    has_root = below.any(axis=1)
    if not has_root[len(_XI) // 2]:
        return None
    first = np.argmax(below, axis=1)
    prev = np.maximum(first - 1, 0)
    h0 = h[np.arange(len(_XI)), prev]
    h1 = h[np.arange(len(_XI)), first]
    frac = np.where(first > 0, h0 / np.maximum(h0 - h1, 1e-12), 0.0)
    root = np.where(first > 0, prev + frac, 0.0)
    probs = np.zeros(seats + 1)
    lo = np.floor(root).astype(int)
    w_hi = root - lo
    ok = has_root & (root < seats)
    np.add.at(probs, lo[ok], _XI_W[ok] * (1 - w_hi[ok]))
    np.add.at(probs, np.minimum(lo[ok] + 1, seats), _XI_W[ok] * w_hi[ok])
    mu_full = seats / (steps_per_request * float(step_ms[seats]))
    overflow = float(_XI_W[~ok].sum())
    ratio = rate_per_ms / mu_full
    if overflow > 0 and ratio < 1:
        # Every seat taken: the rest queue. As in a birth–death chain, the queue continues the law at the
        # boundary geometrically, π(c + j) = π(c)·ρ^j (ρ = λ/μ(c)), so its mass grows like ρ/(1 − ρ) near
        # saturation; the boundary carries the window law's mass at c plus its overflow.
        queue = min(MAX_QUEUE, math.ceil(math.log(_TAIL) / math.log(max(ratio, 1e-300))) + 1)
        boundary = probs[seats] + overflow
        tail = boundary * ratio ** np.arange(1, queue)
        probs = np.concatenate([probs[:seats], [boundary], tail])
        probs /= probs.sum()
        overflow = 0.0
    return Population(probs=probs, seats=seats, departure_rate_full=mu_full, overflow=overflow)
