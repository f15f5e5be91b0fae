"""Capacity table ``R[t,c]``: the highest Poisson arrival rate one instance of config ``c = (tp, role)``
serves for tier ``t``'s length mix while the tier's SLO percentile holds, computed from the iteration-time
model (no simulation; the request-level simulator in :mod:`.reqsim` checks it).

Each cell is a bisection on the rate ``λ`` (from the engine's full-step throughput down, relative tolerance
``rate_rel_tol``) on the predicate "the role's constraints hold at ``λ``". ``τ(·)`` is the mean step time of
the latency model, ``p`` the tier's percentile, ``d_b = output_b − 1`` the decode steps of length bucket
``b``.

* **prefill** (TTFT, queueing included). The engine batches every waiting prompt (FCFS, chunked to the token
  budget). :mod:`.queueing` models it as a gated-batch Markov chain over *super-steps* (the steps that clear
  the prompts present when they began); a Poisson arrival lands in a super-step, waits its residual and runs
  with those who arrived meanwhile. Need ``P(TTFT <= S) >= p``.
* **decode** (TPOT, KV memory, seats). Each request stays ``d_b`` steps, so the batch ``B`` counts the
  arrivals of the last ``E[d]·τ(B)`` ms: :mod:`.population` solves ``B = f(B) + ξ·√V`` on normal quadrature
  nodes ``ξ`` (the *window law*; it carries the feedback of a loaded engine, ``Var B ≈ V/(1 − g)²``). Seats
  ``c = min(max_num_seqs, KV cache / reservation)`` (a request reserves ``input + output`` tokens); above
  ``c`` requests queue as in a birth–death chain (``π(c+j) = π(c)·ρ^j``). A request's TPOT is the step at the
  batch it sees (its lifetime averages the batch's wandering, an Ornstein–Uhlenbeck window) plus its seat wait
  and the running step's residual over ``d_b``. Need ``Σ_b p_b P(TPOT_b <= S) >= p``.
* **colocated** (both; chunked prefill rides in decode steps). With ``B`` decoding, the mean engine step is
  ``τ_dec(B)/(1 − s(B))``; the prefill share ``s`` comes from the super-step chain (with ``B`` decode tokens
  taking budget and decode-only steps between super-steps). A request decodes from the end of its own prefill
  super-step, when the next super-steps carry the prompts that arrived meanwhile: its TPOT is the exact mean
  and variance of the chain's durations over its ``d_b`` steps from there (Markov additive functional), as a
  gamma law. ``B`` follows the window law (prompts leave prefill in groups: index of dispersion from the
  chain) in a fixed point. Need ``TTFT_att·(1 − P(wait for a seat))·TPOT_att >= p`` (independence).

Hand-off pauses (options ``handoff_leave_ms`` ``l``, ``handoff_arrive_ms`` ``a``; 0 by default): a prefill
instance pauses ``l`` after each of its steps (its super-steps last ``steps·(τ + l)``); a decode instance pauses
``a`` before a step in which requests arrive: with Poisson arrivals over the step and its pause, a step pauses
with probability ``q = 1 − e^{−λ·(τ(B) + a)}``, so its mean is ``τ(B) + a·q`` and the pauses add ``a²·q·(1 − q)/d``
to the variance of a ``d``-step request's TPOT.

Engine knobs: ``max_num_batched_tokens`` and ``max_num_seqs`` come from the options, else from the profile's
engine args, else vLLM-like defaults (8192, 256). Not modelled: the P→D KV transfer (TTFT), preemption (KV is
reserved up front), iteration-time jitter (the mean model times every step). Validation: for every cell of
``examples/capacity/tiers.yaml`` the simulator meets the SLO at ``R`` and misses it at ``1.2·R``
(``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from .roles import Cell
from .spec import CapacityTable, Role, ServingConfig, all_configs
from .tiers import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    CapacityOptions,
    CellResult,
    StepTimeSource,
    TiersFile,
    TierWorkload,
    load_tiers_file,
)


def _upper_rate_per_ms(cell: Cell, role: Role) -> float:
    """A rate no instance can sustain (start of the bisection), per ms: just above the throughput with full
    steps (prefill: token budget; decode: every seat)."""
    full = max(cell.budget / max(cell.mix.prompts.mean_tokens, 1.0), 1.0)
    prefill_bound = full / float(
        cell.superstep(np.array([full]), np.array([cell.budget]), np.array([full * cell.mix.prompts.mean_pairs]), 0.0)[
            0
        ]
    )
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
    opts = options or CapacityOptions()
    budget, max_seqs = opts.resolved(_engine_args(source, engine_args))
    tol = opts.rate_rel_tol
    cell = Cell(source, config.tp, tier, budget, max_seqs, opts.handoff_leave_ms, opts.handoff_arrive_ms)
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
    if configs is not None:
        config_list = list(configs)
    else:  # every supported config whose TP the model covers
        tps = set(getattr(source, "tps", ()) or (c.tp for c in all_configs()))
        config_list = [c for c in all_configs() if c.tp in tps]
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
    source_label: str | None = None,
) -> CapacityTable:
    """``R[t,c]`` for every tier and config (default: every supported ``(tp, role)`` the model covers).

    ``engine_args`` default to ``source.engine_args`` and ``source_label`` to ``source.label`` when the source
    (a :class:`~nitsum_opt.models.bundle.PerformanceModel`) has them."""
    cells = build_capacity_cells(source, tiers, configs, options, engine_args)
    return CapacityTable(
        rates_rps={t: {k: c.rate_rps for k, c in row.items()} for t, row in cells.items()},
        source=source_label if source_label is not None else str(getattr(source, "label", "")),
    )


def _engine_args(source: StepTimeSource, engine_args: dict[str, object] | None) -> dict[str, object] | None:
    """Explicit engine args, else the source's (a PerformanceModel records its profile's)."""
    if engine_args is not None:
        return engine_args
    found = getattr(source, "engine_args", None)
    return found if isinstance(found, dict) else None


def timed_build(
    source: StepTimeSource,
    tiers: Sequence[TierWorkload],
    configs: Iterable[ServingConfig],
    repeats: int = 5,
    **kwargs: object,
) -> tuple[CapacityTable, float]:
    """Build the table ``repeats`` times; returns it with the median build time in seconds."""
    config_list = list(configs)
    times, table = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        table = build_capacity_table(source, tiers, config_list, **kwargs)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    assert table is not None
    return table, float(np.median(times))


__all__ = [
    "DEFAULT_MAX_NUM_BATCHED_TOKENS",
    "DEFAULT_MAX_NUM_SEQS",
    "CapacityOptions",
    "CellResult",
    "StepTimeSource",
    "TierWorkload",
    "TiersFile",
    "build_capacity_cells",
    "build_capacity_table",
    "capacity_cell",
    "load_tiers_file",
    "timed_build",
]
