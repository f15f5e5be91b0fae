"""The Nitsum controller: every epoch, forecast → capacity table → planner → stabilizer → deployment.

Per epoch it sees the requests of the epoch that just ended and

1. appends their per-tier arrival rate to its history and forecasts the next epoch: the ``forecaster`` (EWMA with
   headroom by default), but never below the last epoch's rate with headroom (``follow_rises``: a rise is
   followed at once, a fall is smoothed), times the tier's *burst factor* (how much burstier than Poisson its
   recent arrivals are at the time scale of its TTFT target; the capacity table assumes Poisson arrivals);
2. takes each tier's length mix from the requests of the last ``mix_window_s`` seconds and rebuilds ``R[t,c]``
   only when a tier's mean prompt or output length moved by more than ``mix_tolerance`` since the cached table
   (the table comes from :func:`capacity_table` — INTERIM until the latency models' builder is on main);
3. plans with the planner (``MilpPlanner``: ``nitsum``; ``GreedyPlanner``: ``nitsum-greedy``) against the running
   plan (churn priced with the switch cost), gives GPUs the plan leaves idle to the most loaded tiers
   (:func:`fill_idle_gpus`), and lets :func:`~nitsum_opt.planners.stabilize` decide between it and the running
   plan (re-admitted for the new forecast);
4. deploys the result with the multi-tier scheduler: admission at the plan's ``y_t``, tier priority, spill-over
   and the central queue; each instance gets its tier's SLO-safe capacity and an SLO-aware step token budget
   (the chunk size that keeps a prefill chunk from breaking the tier's TPOT), both from the iteration model.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np

from nitsum_opt.assemble import assemble_plan
from nitsum_opt.evaluate import tier_capacity_rps
from nitsum_opt.models.spec import CapacityTable, LengthMix, Role, ServingConfig, SloTarget
from nitsum_opt.placement import PlacementError, place_instances
from nitsum_opt.plan import Plan
from nitsum_opt.planners import Planner, StabilizerSettings, StabilizerState, stabilize
from nitsum_opt.sim.capacity import MixStats, interim_capacity_table, slo_safe_seqs, slo_token_budget
from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.deployment import Deployment, deployment_from_plan
from nitsum_opt.spec import ObjectiveSettings, PlanningInput, Tier, TierDemand
from nitsum_opt.workloads.demand import length_mixes
from nitsum_opt.workloads.forecast import EwmaForecaster, LastWindowForecaster
from nitsum_opt.workloads.trace import RequestTrace

FALLBACK_MIX = LengthMix.single(1024, 256)
"""Length mix assumed for a tier that has not sent a request yet."""


def candidate_configs(ctx: ControlContext) -> tuple[ServingConfig, ...]:
    """Every (tp, role) the planner may use: TP degrees the iteration model covers that fit a node."""
    return tuple(ServingConfig(tp=tp, role=role) for tp in ctx.tps for role in Role)


_TABLES: OrderedDict[str, tuple[object, CapacityTable]] = OrderedDict()
_TABLES_MAX = 64


def capacity_table(ctx: ControlContext, mixes: dict[str, LengthMix]) -> CapacityTable:
    """``R[t,c]`` for the tiers' current mixes: ``nitsum_opt.models.build_capacity_table`` (the latency models'
    queueing-based builder) when it is installed, else the INTERIM estimate of
    :func:`nitsum_opt.sim.capacity.interim_capacity_table`. Cells of different tiers are independent, so each tier's
    row is built on its own and memoised per process (least recently used, keyed by the model object, the tier, its
    mix, the configs and the engine knobs): systems that see the same mix share it, and a controller whose mix
    changed for one tier rebuilds one row."""
    rows: dict[str, dict[str, float]] = {}
    source = ""
    for tier in ctx.tiers:
        mix = mixes.get(tier.name, FALLBACK_MIX)
        key = hashlib.sha256(
            json.dumps(
                [
                    tier.model_dump(mode="json"),
                    mix.model_dump(mode="json"),
                    [c.key for c in candidate_configs(ctx)],
                    ctx.settings.engine.model_dump(mode="json"),
                    ctx.settings.capacity_percentile,
                ],
                sort_keys=True,
            ).encode()
        ).hexdigest()
        hit = _TABLES.get(key)
        if hit is not None and hit[0] is ctx.model:
            _TABLES.move_to_end(key)
            row = hit[1]
        else:
            row = _build_table(ctx, {tier.name: mix}, tier)
            _TABLES[key] = (ctx.model, row)
            while len(_TABLES) > _TABLES_MAX:
                _TABLES.popitem(last=False)
        rows[tier.name] = row.rates_rps[tier.name]
        source = row.source
    return CapacityTable(rates_rps=rows, source=source)


def planning_slo(ctx: ControlContext, tier: Tier) -> SloTarget:
    """The tier's SLO with the percentile raised to ``settings.capacity_percentile`` (never lowered)."""
    wanted = ctx.settings.capacity_percentile
    if wanted is None or wanted <= tier.slo_percentile:
        return tier.slo
    return tier.slo.model_copy(update={"slo_percentile": wanted})


def _build_table(ctx: ControlContext, mixes: dict[str, LengthMix], tier: Tier) -> CapacityTable:
    try:
        from nitsum_opt.models import CapacityOptions, TierWorkload, build_capacity_table
    except ImportError:  # a models package without the capacity builder
        rows = {tier.name: (planning_slo(ctx, tier), mixes[tier.name])}
        return interim_capacity_table(ctx.model, rows, candidate_configs(ctx), ctx.settings.engine)
    engine = ctx.settings.engine
    return build_capacity_table(
        ctx.model,  # type: ignore[arg-type]
        [TierWorkload(name=tier.name, slo=planning_slo(ctx, tier), length_mix=mixes[tier.name])],
        configs=candidate_configs(ctx),
        options=CapacityOptions(max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=engine.max_num_seqs),
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
                ctx.settings.engine.max_num_batched_tokens, slo_token_budget(ctx.model, tp, t.tpot_slo_ms, mix)
            )
            for role in Role:
                seqs = slo_safe_seqs(ctx.model, tp, role, t.slo, mix, ctx.settings.engine)
                out[t.name, tp, role] = (seqs, None if role is Role.PREFILL else budget)
    return out


def _weighted_load(inp: PlanningInput, counts: dict[tuple[str, ServingConfig], int], tier: str) -> float:
    cap = min(tier_capacity_rps(inp, counts, tier))
    return inp.tier(tier).weight * inp.demand_rps(tier) / max(cap, 1e-9)


def fill_idle_gpus(inp: PlanningInput, plan: Plan) -> Plan:
    """Give the GPUs ``plan`` leaves idle to the tiers, one instance at a time: the tier with the highest
    weighted load (demand / capacity) gets its best per-GPU colocated config that still fits."""
    counts = dict(plan.counts())
    free = inp.cluster.total_gpus - plan.gpus_used
    colocated = [c for c in inp.candidate_configs if c.role is Role.COLOCATED]
    changed = False
    while free > 0:
        tier = max((t.name for t in inp.tiers), key=lambda name, c=counts: _weighted_load(inp, c, name))
        options = sorted(
            (c for c in colocated if c.gpus <= free and inp.capacity.rate_rps(tier, c) > 0),
            key=lambda c: (-inp.capacity.rate_rps(tier, c) / c.gpus, c.tp),
        )
        placed = False
        for c in options:
            trial = {**counts, (tier, c): counts.get((tier, c), 0) + 1}
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


def _erfinv(y: float) -> float:
    """Inverse error function (Giles' single-precision approximation, |error| < 4e-7 on (-1, 1))."""
    w = -np.log((1.0 - y) * (1.0 + y))
    if w < 5.0:
        w -= 2.5
        coeffs = (
            2.81022636e-08,
            3.43273939e-07,
            -3.5233877e-06,
            -4.39150654e-06,
            0.00021858087,
            -0.00125372503,
            -0.00417768164,
            0.246640727,
            1.50140941,
        )
    else:
        w = np.sqrt(w) - 3.0
        coeffs = (
            -0.000200214257,
            0.000100950558,
            0.00134934322,
            -0.00367342844,
            0.00573950773,
            -0.0076224613,
            0.00943887047,
            1.00167406,
            2.83297682,
        )
    p = coeffs[0]
    for c in coeffs[1:]:
        p = c + p * w
    return float(p * y)


def _means(mix: LengthMix) -> tuple[float, float]:
    return mix.mean_input_tokens, mix.mean_output_tokens


class NitsumController(Controller):
    """See the module docstring."""

    def __init__(
        self,
        name: str,
        planner: Planner,
        forecaster: EwmaForecaster | LastWindowForecaster | None = None,
        stabilizer: StabilizerSettings | None = None,
        mix_window_s: float = 300.0,
        mix_tolerance: float = 0.15,
        fill_idle: bool = True,
        follow_rises: bool = True,
        burst_quantile: float | None = 0.9,
        max_burst_factor: float = 2.0,
    ) -> None:
        self.name = name
        self.planner = planner
        self.forecaster = forecaster or EwmaForecaster(alpha=0.5, headroom=0.1)
        self.stabilizer = stabilizer or StabilizerSettings()
        self.mix_window_s = mix_window_s
        self.mix_tolerance = mix_tolerance
        self.fill_idle = fill_idle
        self.follow_rises = follow_rises
        self.burst_quantile = burst_quantile
        self.max_burst_factor = max_burst_factor
        self._burst = np.ones(0)
        self._ttft_s: list[float] = []
        self.history: list[np.ndarray] = []
        self.windows: list[RequestTrace] = []
        self.plan: Plan | None = None
        self.state = StabilizerState()
        self._planned_mixes: dict[str, LengthMix] = {}
        self._mixes: dict[str, LengthMix] = {}
        self.plans_made = 0
        self.plan_time_ms = 0.0
        self.capacity_builds = 0

    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        return self._step(ctx, warmup.start_s, warmup)

    def on_epoch(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment | None:
        return self._step(ctx, now_s, window)

    # ------------------------------------------------------------------ one epoch
    def _observe(self, window: RequestTrace) -> None:
        span = max(window.duration_s, 1e-9)
        self.history.append(np.bincount(window.tier, minlength=len(window.tier_names)) / span)
        self.windows.append(window)
        kept, covered = [], 0.0
        for w in reversed(self.windows):
            if covered >= self.mix_window_s:
                break
            kept.append(w)
            covered += w.duration_s
        self.windows = kept[::-1]
        recent = RequestTrace.merge(self.windows, tier_names=window.tier_names) if len(self.windows) > 1 else window
        self._mixes.update(length_mixes(recent))
        self._burst = self._burst_factors(recent, window.tier_names)

    def _burst_factors(self, recent: RequestTrace, tier_names: tuple[str, ...]) -> np.ndarray:
        """Per tier, how much burstier than Poisson the recent arrivals are: the ``burst_quantile`` of the counts
        in windows of ``max(5 s, 4 × TTFT target)`` over the same quantile of a Poisson count with their mean
        (normal approximation), in ``[1, max_burst_factor]``. The capacity table assumes Poisson arrivals; this
        factor is the headroom a burstier tier needs."""
        out = np.ones(len(tier_names))
        if self.burst_quantile is None or recent.duration_s <= 0:
            return out
        z = float(np.sqrt(2.0) * _erfinv(2.0 * self.burst_quantile - 1.0))
        for k in range(len(tier_names)):
            arrivals = recent.arrival_s[recent.tier == k]
            window = max(5.0, 4.0 * self._ttft_s[k]) if k < len(self._ttft_s) else 5.0
            bins = int(recent.duration_s // window)
            if bins < 4 or arrivals.size == 0:
                continue
            counts = np.bincount(((arrivals - recent.start_s) // window).astype(int).clip(0, bins - 1), minlength=bins)
            mean = counts.mean()
            poisson_q = mean + z * np.sqrt(mean)
            out[k] = min(self.max_burst_factor, max(1.0, float(np.quantile(counts, self.burst_quantile)) / poisson_q))
        return out

    def _capacity_for(self, ctx: ControlContext) -> CapacityTable:
        """The table for the current mixes; a tier whose mean prompt and output lengths stayed within
        ``mix_tolerance`` of the mix its row was built for keeps that mix (and its memoised row)."""
        for name, mix in self._mixes.items():
            planned = self._planned_mixes.get(name)
            if planned is not None:
                (i0, o0), (i1, o1) = _means(planned), _means(mix)
                if abs(i1 - i0) <= self.mix_tolerance * i0 and abs(o1 - o0) <= self.mix_tolerance * o0:
                    continue
            self._planned_mixes[name] = mix
            self.capacity_builds += 1
        return capacity_table(ctx, self._planned_mixes)

    def _step(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment:
        self._ttft_s = [t.ttft_slo_ms / 1000.0 for t in ctx.tiers]
        self._observe(window)
        forecast = self.forecaster.forecast(np.asarray(self.history))
        if self.follow_rises or len(self.history) == 1:
            forecast = np.maximum(forecast, self.history[-1] * (1.0 + self.forecaster.headroom))
        forecast = forecast * self._burst
        sw = ctx.settings.switch
        inp = PlanningInput(
            cluster=ctx.cluster,
            tiers=ctx.tiers,
            demand=tuple(TierDemand(tier=t.name, arrival_rate_rps=float(forecast[k])) for k, t in enumerate(ctx.tiers)),
            capacity=self._capacity_for(ctx),
            configs=candidate_configs(ctx),
            objective=ObjectiveSettings(switch_cost_s=sw.switch_s, plan_horizon_s=max(60.0, 2 * ctx.settings.epoch_s)),
            current_plan=None if self.plan is None else self.plan.as_current(),
            model=ctx.model_spec,
        )
        candidate = self.planner.plan(inp)
        if self.fill_idle:
            candidate = fill_idle_gpus(inp, candidate)
        decision = stabilize(inp, candidate, now_s, self.state, self.stabilizer)
        self.state = decision.state
        self.plan = decision.plan
        self.plans_made += 1
        self.plan_time_ms += candidate.solve_time_ms
        label = f"{self.name} ({decision.plan.status.value})"
        return deployment_from_plan(decision.plan, tuning_table(ctx, self._planned_mixes), label=label)
