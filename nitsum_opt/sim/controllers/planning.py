"""Planning helpers shared by the Nitsum controller and the oracle's tier-aware static plans: candidate configs,
the capacity table ``R[t,c]`` (memoised per tier row), per-instance tuning (SLO-safe seats, SLO-aware step
budgets, seats per tier mix), the role preference and filling idle GPUs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict

from nitsum_opt.admission import Counts, SharedRates
from nitsum_opt.assemble import assemble_plan
from nitsum_opt.evaluate import tier_capacity_rps
from nitsum_opt.models.spec import CapacityTable, LengthMix, Role, ServingConfig, SloTarget
from nitsum_opt.placement import PlacementError, place_instances
from nitsum_opt.plan import Plan
from nitsum_opt.sim.capacity import MixStats, interim_capacity_table, slo_safe_seqs, slo_token_budget
from nitsum_opt.sim.controllers.base import ControlContext
from nitsum_opt.spec import SHARED_TIER, PlanningInput, Tier

FALLBACK_MIX = LengthMix.single(1024, 256)
"""Length mix assumed for a tier that has not sent a request yet."""

SHARED_PD_ROLES: tuple[Role, ...] = (Role.COLOCATED, Role.PREFILL, Role.DECODE)
"""Roles the ``nitsum-shared-pd`` system lets shared instances take: a shared prefill + decode pair serves every
tier disaggregated (``benchmarks/RESULTS.md``, "Shared prefill and decode instances"). The ``nitsum`` system keeps
shared instances colocated."""

ROLE_PREFERENCE = 0.9
"""Default factor of :func:`prefer_roles`: the favoured role family wins unless the other one is more than ~11 %
better per GPU (measured on the default scenario: colocated and prefill/decode cells of the interactive tier are
within 4 % of each other per GPU, while prefill/decode served it and the requests spilled onto it far better,
``benchmarks/RESULTS.md``)."""


def candidate_configs(ctx: ControlContext) -> tuple[ServingConfig, ...]:
    """Every (tp, role) the planner may use: TP degrees the iteration model covers that fit a node."""
    return tuple(ServingConfig(tp=tp, role=role) for tp in ctx.tps for role in Role)


_TABLES: OrderedDict[str, tuple[object, CapacityTable]] = OrderedDict()
_TABLES_MAX = 64


def capacity_table(
    ctx: ControlContext, mixes: dict[str, LengthMix], configs: tuple[ServingConfig, ...] | None = None
) -> CapacityTable:
    """``R[t,c]`` for the tiers' current mixes: ``nitsum_opt.models.build_capacity_table`` (the latency models'
    queueing-based builder) when it is installed, else the INTERIM estimate of
    :func:`nitsum_opt.sim.capacity.interim_capacity_table`. Cells of different tiers are independent, so each tier's
    row is built on its own and memoised per process (least recently used, keyed by the model object, the tier, its
    mix, the configs and the engine knobs): systems that see the same mix share it, and a controller whose mix
    changed for one tier rebuilds one row. ``configs``: the cells to build (default: every candidate config)."""
    configs = candidate_configs(ctx) if configs is None else configs
    rows: dict[str, dict[str, float]] = {}
    source = ""
    for tier in ctx.tiers:
        mix = mixes.get(tier.name, FALLBACK_MIX)
        key = hashlib.sha256(
            json.dumps(
                [
                    tier.model_dump(mode="json"),
                    mix.model_dump(mode="json"),
                    [c.key for c in configs],
                    ctx.settings.engine.model_dump(mode="json"),
                    ctx.settings.capacity_percentile,
                    ctx.settings.switch.handoff_leave_ms,
                    ctx.settings.switch.handoff_arrive_ms,
                ],
                sort_keys=True,
            ).encode()
        ).hexdigest()
        hit = _TABLES.get(key)
        if hit is not None and hit[0] is ctx.model:
            _TABLES.move_to_end(key)
            row = hit[1]
        else:
            row = _build_table(ctx, {tier.name: mix}, tier, configs)
            _TABLES[key] = (ctx.model, row)
            while len(_TABLES) > _TABLES_MAX:
                _TABLES.popitem(last=False)
        rows[tier.name] = row.rates_rps[tier.name]
        source = row.source
    return CapacityTable(rates_rps=rows, source=source)


def shared_capacity_table(
    ctx: ControlContext,
    mixes: dict[str, LengthMix],
    role_preference: float,
    tpot_slack: float = 1.0,
    roles: tuple[Role, ...] = (Role.COLOCATED,),
) -> CapacityTable:
    """``R^s[t,c]`` for shared instances of the configs of ``roles``: each tier's mix at its own TTFT target and
    the strictest TPOT target of all tiers (colocated configs: times ``tpot_slack``; never looser than the tier's
    own), since a shared instance batches every tier's requests and its steps must keep the strictest tier's TPOT
    (memoised like :func:`capacity_table`); the role preference is applied as to ``R``. Shared decode instances
    are priced at the strictest TPOT itself: they run nothing but the strict tier's decode steps and the others'
    in one batch."""
    if tpot_slack < 1:
        raise ValueError(f"tpot_slack={tpot_slack} must be >= 1 (1: price shared tiers at the strictest TPOT)")
    rows: dict[str, dict[str, float]] = {t.name: {} for t in ctx.tiers}
    source = ""
    for slack, part in ((tpot_slack, (Role.COLOCATED,)), (1.0, (Role.PREFILL, Role.DECODE))):
        configs = tuple(c for c in candidate_configs(ctx) if c.role in roles and c.role in part)
        if not configs:
            continue
        strictest = slack * min(t.tpot_slo_ms for t in ctx.tiers)
        tightened = tuple(t.model_copy(update={"tpot_slo_ms": min(t.tpot_slo_ms, strictest)}) for t in ctx.tiers)
        table = capacity_table(dataclasses.replace(ctx, tiers=tightened), mixes, configs)
        source = table.source
        for name, row in table.rates_rps.items():
            rows[name].update(row)
    return prefer_roles(CapacityTable(rates_rps=rows, source=source), ctx.tiers, role_preference)


def planning_slo(ctx: ControlContext, tier: Tier) -> SloTarget:
    """The tier's SLO with the percentile raised to ``settings.capacity_percentile`` (never lowered)."""
    wanted = ctx.settings.capacity_percentile
    if wanted is None or wanted <= tier.slo_percentile:
        return tier.slo
    return tier.slo.model_copy(update={"slo_percentile": wanted})


def _build_table(
    ctx: ControlContext, mixes: dict[str, LengthMix], tier: Tier, configs: tuple[ServingConfig, ...]
) -> CapacityTable:
    try:
        from nitsum_opt.models import CapacityOptions, TierWorkload, build_capacity_table
    except ImportError:  # a models package without the capacity builder
        rows = {tier.name: (planning_slo(ctx, tier), mixes[tier.name])}
        return interim_capacity_table(ctx.model, rows, configs, ctx.settings.engine)
    engine = ctx.settings.engine
    return build_capacity_table(
        ctx.model,  # type: ignore[arg-type]
        [TierWorkload(name=tier.name, slo=planning_slo(ctx, tier), length_mix=mixes[tier.name])],
        configs=configs,
        options=CapacityOptions(
            max_num_batched_tokens=engine.max_num_batched_tokens,
            max_num_seqs=engine.max_num_seqs,
            handoff_leave_ms=ctx.settings.switch.handoff_leave_ms,
            handoff_arrive_ms=ctx.settings.switch.handoff_arrive_ms,
        ),
    )


def tuning_table(
    ctx: ControlContext, mixes: dict[str, LengthMix]
) -> dict[tuple[str, int, Role], tuple[int, int | None]]:
    """Per (tier, tp, role): the SLO-safe capacity and the SLO-aware step token budget of an instance serving the
    tier (prefill-only instances keep the engine default: no decode step to protect)."""
    out: dict[tuple[str, int, Role], tuple[int, int | None]] = {}
    for t in ctx.tiers:
        mix = MixStats.of(mixes.get(t.name, FALLBACK_MIX))
        for tp in ctx.tps:
            budget = min(
                ctx.settings.engine.max_num_batched_tokens,
                slo_token_budget(ctx.model, tp, t.tpot_slo_ms, mix, ctx.settings.seat_safety),
            )
            for role in Role:
                seqs = slo_safe_seqs(ctx.model, tp, role, t.slo, mix, ctx.settings.engine, ctx.settings.seat_safety)
                out[t.name, tp, role] = (seqs, None if role is Role.PREFILL else budget)
    return out


def _weighted_load(inp: PlanningInput, counts: Counts, shared_rps: SharedRates, tier: str) -> float:
    cap = min(tier_capacity_rps(inp, counts, tier, shared_rps))
    return inp.tier(tier).weight * inp.demand_rps(tier) / max(cap, 1e-9)


def fill_idle_gpus(inp: PlanningInput, plan: Plan, shared: bool = False) -> Plan:
    """Give the GPUs ``plan`` leaves idle to the tiers, one instance at a time: the tier with the highest
    weighted load (demand / capacity, its shared rate included) gets its best per-GPU colocated config that still
    fits, as an instance of its own or (``shared``) as a shared instance that serves every tier."""
    counts = dict(plan.counts())
    shared_rps = plan.shared_rates()
    free = inp.cluster.total_gpus - plan.gpus_used
    colocated = [c for c in inp.candidate_configs if c.role is Role.COLOCATED]
    changed = False
    while free > 0:
        tier = max((t.name for t in inp.tiers), key=lambda name, c=counts: _weighted_load(inp, c, shared_rps, name))
        options = sorted(
            (c for c in colocated if c.gpus <= free and inp.capacity.rate_rps(tier, c) > 0),
            key=lambda c: (-inp.capacity.rate_rps(tier, c) / c.gpus, c.tp),
        )
        owner = SHARED_TIER if shared else tier
        placed = False
        for c in options:
            trial = {**counts, (owner, c): counts.get((owner, c), 0) + 1}
            try:
                place_instances(inp.cluster, trial)
            except PlacementError:
                continue
            counts, free, placed, changed = trial, free - c.gpus, True, True
            break
        if not placed:
            break
    if not changed:
        return plan
    return assemble_plan(
        inp,
        counts,
        status=plan.status,
        planner=f"{plan.provenance.planner} + fill-idle",
        solve_time_ms=plan.solve_time_ms,
        message=plan.message,
    )


def seats_table(ctx: ControlContext, mixes: dict[str, LengthMix]) -> dict[tuple[str, int, Role], dict[str, int]]:
    """Per (host tier, tp, role): how many requests of each tier's length mix one instance holds while the *host*
    tier's SLO still holds (:func:`~nitsum_opt.sim.capacity.slo_safe_seqs` at the host's SLO on the other tier's
    mix). The scheduler counts a spilled-in request as ``own seats / seats of its mix``, so a tier whose requests
    are heavier (longer prompts, longer contexts) takes more of a strict tier's room than one of its own."""
    stats = {t.name: MixStats.of(mixes.get(t.name, FALLBACK_MIX)) for t in ctx.tiers}
    out: dict[tuple[str, int, Role], dict[str, int]] = {}
    for host in ctx.tiers:
        for tp in ctx.tps:
            for role in Role:
                out[host.name, tp, role] = {
                    u.name: slo_safe_seqs(
                        ctx.model, tp, role, host.slo, stats[u.name], ctx.settings.engine, ctx.settings.seat_safety
                    )
                    for u in ctx.tiers
                }
    return out


def prefer_roles(capacity: CapacityTable, tiers: tuple[Tier, ...], factor: float) -> CapacityTable:
    """The table with the role family each tier's TPOT target favours preferred when cells nearly tie: for the
    tier(s) with the strictest TPOT target, colocated cells × ``factor`` (prefill/decode keeps decode steps free of
    prefill chunks, including those of requests spilled in from other tiers); for the others, prefill and decode
    cells × ``factor`` (colocated instances pool prefill and decode work). ``factor = 1`` changes nothing.
    Single-tier tables are returned unchanged."""
    if factor >= 1.0 or len(tiers) < 2:
        return capacity
    strictest = min(t.tpot_slo_ms for t in tiers)
    tight = {t.name for t in tiers if t.tpot_slo_ms <= strictest}
    rows: dict[str, dict[str, float]] = {}
    for name, row in capacity.rates_rps.items():
        disfavoured = Role.COLOCATED.value if name in tight else None
        rows[name] = {}
        for key, rate in row.items():
            role = key.split("-", 1)[1]
            hit = role == disfavoured if disfavoured is not None else role != Role.COLOCATED.value
            rows[name][key] = rate * factor if hit else rate
    return CapacityTable(rates_rps=rows, source=capacity.source)
