"""Admission for given instance counts: the best ``y_t`` and, with shared instances, each tier's share ``x[t,c]``.

Without shared instances every tier is independent: ``y_t = min(λ_t, prefill side, decode side)``. Shared
instances couple the tiers through the time-sharing rows ``Σ_t x[t,c] / R^s[t,c] <= s[c]``; the best admissions are
then the small linear program

    max Σ_t w_t y_t   s.t.   m_t λ_t <= y_t <= λ_t,   y_t − Σ_{c ∈ P ∪ Co} x[t,c] <= P_t + Co_t,
                             y_t − Σ_{c ∈ D ∪ Co} x[t,c] <= D_t + Co_t,
                             Σ_t x[t,c] / R^s[t,c] <= s[c],   x >= 0

(the MILP's rows with the counts fixed), solved with HiGHS through SciPy. When the minimum admissions cannot all be
met, it is solved without them (the plan then breaks them, and ``evaluate_plan`` says so). Each tier's shared rate
is finally trimmed to what its admission needs beyond its dedicated capacity on each side, so a plan's ``x`` never
claims shared capacity a tier does not use. (With only colocated shared instances the two side rows are one,
``y_t − Σ_c x[t,c] <= min(P_t, D_t) + Co_t``.)

:func:`prefer_dedicated` turns a solution's shared instances into dedicated ones where that costs nothing (the tie
between a dedicated instance and a shared one serving the same tier is broken after the solve, not by the solver).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from nitsum_opt.models.spec import Role, ServingConfig
from nitsum_opt.spec import SHARED_TIER, PlanningInput

Counts = Mapping[tuple[str, ServingConfig], int]
SharedRates = Mapping[str, Mapping[ServingConfig, float]]
"""``x[t,c]``: tier → shared config → rate (req/s)."""

#: Shared rates below this (req/s) are dropped as solver noise.
_NOISE_RPS = 1e-9

_SIDES = ((Role.PREFILL, Role.COLOCATED), (Role.DECODE, Role.COLOCATED))
"""Roles on the prefill side and on the decode side of a tier's capacity."""


def dedicated_capacity_rps(inp: PlanningInput, counts: Counts, tier: str) -> tuple[float, float]:
    """(prefill-side, decode-side) capacity of ``tier``'s dedicated instances: Σ R·n over prefill+colocated and
    decode+colocated (shared instances are not counted)."""
    prefill = decode = 0.0
    for (t, config), count in counts.items():
        if t != tier or count == 0:
            continue
        rate = inp.capacity.rate_rps(tier, config) * count
        if config.role in (Role.PREFILL, Role.COLOCATED):
            prefill += rate
        if config.role in (Role.DECODE, Role.COLOCATED):
            decode += rate
    return prefill, decode


def shared_counts(counts: Counts) -> dict[ServingConfig, int]:
    """``s[c]``: shared instances per config (positive entries)."""
    return {c: k for (t, c), k in counts.items() if t == SHARED_TIER and k > 0}


def best_admission(
    inp: PlanningInput, counts: Counts
) -> tuple[dict[str, float], dict[str, dict[ServingConfig, float]]]:
    """The admissions ``y_t`` that maximise ``Σ w_t y_t`` for ``counts``, and the shared rates ``x[t,c]`` that carry
    them (trimmed; see the module docstring)."""
    sides = {t.name: dedicated_capacity_rps(inp, counts, t.name) for t in inp.tiers}
    base = {name: min(side) for name, side in sides.items()}
    shared = shared_counts(counts)
    if not shared:
        return {t.name: min(inp.demand_rps(t.name), base[t.name]) for t in inp.tiers}, {}
    y, x = (
        _solve_lp(inp, sides, shared, with_minimum=True)
        or _solve_lp(inp, sides, shared, with_minimum=False)
        or (
            {t.name: min(inp.demand_rps(t.name), base[t.name]) for t in inp.tiers},
            {},
        )
    )
    return y, trim_shared_rates(inp, counts, y, x)


def trim_shared_rates(
    inp: PlanningInput, counts: Counts, admitted_rps: Mapping[str, float], shared_rps: SharedRates
) -> dict[str, dict[ServingConfig, float]]:
    """``shared_rps`` scaled down per tier to what its admission needs beyond its dedicated capacity on each side
    (prefill: shared prefill + colocated rates; decode: shared decode + colocated rates; one factor for all, the
    larger side's, so both sides stay covered and every time-sharing row stays feasible); entries below solver
    noise dropped."""
    out: dict[str, dict[ServingConfig, float]] = {}
    for tier, row in shared_rps.items():
        total = sum(v for v in row.values() if v > 0)
        if total <= _NOISE_RPS:
            continue
        admitted = admitted_rps.get(tier, 0.0)
        scale = 0.0
        for side, capacity in zip(_SIDES, dedicated_capacity_rps(inp, counts, tier), strict=True):
            side_total = sum(v for c, v in row.items() if v > 0 and c.role in side)
            need = max(0.0, admitted - capacity)
            if need > 0:
                scale = max(scale, need / side_total if side_total > _NOISE_RPS else 1.0)
        scale = min(1.0, scale)
        kept = {c: v * scale for c, v in row.items() if v * scale > _NOISE_RPS}
        if kept:
            out[tier] = kept
    return out


def _solve_lp(
    inp: PlanningInput,
    sides: dict[str, tuple[float, float]],
    shared: dict[ServingConfig, int],
    with_minimum: bool,
) -> tuple[dict[str, float], dict[str, dict[ServingConfig, float]]] | None:
    from scipy.optimize import linprog  # imported here: `import nitsum_opt` stays light

    tiers = [t.name for t in inp.tiers]
    cells = [(t, c) for c in sorted(shared, key=lambda c: c.tp) for t in tiers if inp.shared_rate_rps(t, c) > 0]
    nt, nx = len(tiers), len(cells)
    cost = np.concatenate([[-inp.tier(t).weight for t in tiers], np.zeros(nx)])
    rows, rhs = [], []
    colocated_only = all(c.role is Role.COLOCATED for c in shared)
    for k, t in enumerate(tiers):  # per side: y_t − Σ_{c on the side} x[t,c] <= dedicated capacity of the side
        side_rows = list(zip(_SIDES, sides[t], strict=True))
        if colocated_only:  # both rows subtract the same x: one row at the smaller side
            side_rows = [(_SIDES[0] + _SIDES[1], min(sides[t]))]
        for roles, capacity in side_rows:
            row = np.zeros(nt + nx)
            row[k] = 1.0
            for j, (tier, c) in enumerate(cells):
                if tier == t and c.role in roles:
                    row[nt + j] = -1.0
            rows.append(row)
            rhs.append(capacity)
    for c, count in shared.items():  # Σ_t x[t,c] / R^s[t,c] <= s[c]
        row = np.zeros(nt + nx)
        for j, (tier, cc) in enumerate(cells):
            if cc == c:
                row[nt + j] = 1.0 / inp.shared_rate_rps(tier, c)
        rows.append(row)
        rhs.append(float(count))
    bounds = [
        ((inp.tier(t).min_admission * inp.demand_rps(t)) if with_minimum else 0.0, inp.demand_rps(t)) for t in tiers
    ] + [(0.0, None)] * nx
    result = linprog(cost, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
    if result.status != 0:
        return None
    values = result.x
    y = {t: max(0.0, min(inp.demand_rps(t), float(values[k]))) for k, t in enumerate(tiers)}
    x: dict[str, dict[ServingConfig, float]] = {}
    for j, (t, c) in enumerate(cells):
        if values[nt + j] > _NOISE_RPS:
            x.setdefault(t, {})[c] = float(values[nt + j])
    return y, x


def prefer_dedicated(
    inp: PlanningInput, counts: Counts, shared_rps: SharedRates
) -> tuple[dict[tuple[str, ServingConfig], int], dict[str, dict[ServingConfig, float]]]:
    """``counts`` and ``shared_rps`` with shared instances dedicated wherever that keeps every tier's capacity and
    does not raise the objective: while a config has more shared instances than run now (so dropping one saves
    the shared churn price ``β[*,c] >= β[t,c]``), an idle one is dropped, and one that a tier uses whole
    (``x[t,c] >= R^s[t,c]``) or alone becomes a dedicated instance of that tier (``R[t,c] >= R^s[t,c]``). Only when
    a shared GPU costs at least a dedicated one (``ε_s >= ε``); the admissions stay what they were."""
    out = {k: v for k, v in counts.items() if v > 0}
    rates = {t: dict(row) for t, row in shared_rps.items()}
    if inp.shared_gpu_cost < inp.objective.gpu_cost:
        return out, rates
    for c in sorted(shared_counts(out), key=lambda c: c.tp):
        running = inp.current_plan.count(SHARED_TIER, c) if inp.current_plan else 0
        while out.get((SHARED_TIER, c), 0) > running:
            if not _dedicate_one(inp, out, rates, c):
                break
    return out, rates


def _dedicate_one(
    inp: PlanningInput, counts: dict[tuple[str, ServingConfig], int], rates: dict[str, dict[ServingConfig, float]], c
) -> bool:
    """One step of :func:`prefer_dedicated` on config ``c``; False when none applies."""
    have = counts[SHARED_TIER, c]
    use = {
        t.name: rates.get(t.name, {}).get(c, 0.0) / inp.shared_rate_rps(t.name, c)
        for t in inp.tiers
        if rates.get(t.name, {}).get(c, 0.0) > _NOISE_RPS
    }
    if sum(use.values()) <= have - 1 + 1e-9:  # an idle shared instance
        _set(counts, (SHARED_TIER, c), have - 1)
        return True
    for tier, share in use.items():
        whole = share >= 1 - 1e-9 or len(use) == 1
        if whole and inp.capacity.rate_rps(tier, c) >= inp.shared_rate_rps(tier, c):
            _set(counts, (SHARED_TIER, c), have - 1)
            counts[tier, c] = counts.get((tier, c), 0) + 1
            left = rates[tier][c] - min(share, 1.0) * inp.shared_rate_rps(tier, c)
            if left > _NOISE_RPS:
                rates[tier][c] = left
            else:
                del rates[tier][c]
            return True
    return False


def _set(counts: dict[tuple[str, ServingConfig], int], key: tuple[str, ServingConfig], value: int) -> None:
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)
