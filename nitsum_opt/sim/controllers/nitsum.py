"""The Nitsum controller: every epoch, forecast → capacity table → planner → stabilizer → deployment.

Per epoch it sees the requests of the epoch that just ended and

1. appends their per-tier arrival rate to its history and forecasts the next epoch: the ``forecaster`` (EWMA with
   headroom by default), but never below the last epoch's rate with headroom (``follow_rises``: a rise is
   followed at once, a fall is smoothed), times the tier's *burst factor* (how much burstier than Poisson its
   recent arrivals are at the time scale of its TTFT target; the capacity table assumes Poisson arrivals);
2. takes each tier's length mix from the requests of the last ``mix_window_s`` seconds and rebuilds ``R[t,c]``
   only when a tier's mean prompt or output length moved by more than ``mix_tolerance`` since the cached table
   (:func:`~nitsum_opt.sim.controllers.planning.capacity_table`), then applies the *role preference*
   (:func:`~nitsum_opt.sim.controllers.planning.prefer_roles`, ``role_preference``): prefill/decode for the tier
   with the strictest TPOT target, colocated for the others, unless the other family is clearly better per GPU;
3. plans with the planner (``MilpPlanner``: ``nitsum``; ``GreedyPlanner``: ``nitsum-greedy``) against the running
   plan (churn priced with the switch cost), gives GPUs the plan leaves idle to the most loaded tiers
   (:func:`~nitsum_opt.sim.controllers.planning.fill_idle_gpus`), and lets :func:`~nitsum_opt.planners.stabilize`
   decide between it and the running plan (re-admitted for the new forecast);
4. deploys the result with the multi-tier scheduler: admission at the plan's ``y_t``, tier priority, spill-over
   and the central queue; each instance gets its tier's SLO-safe capacity and an SLO-aware step token budget
   (the chunk size that keeps a prefill chunk from breaking the tier's TPOT), both from the iteration model, and
   (``weighted_seats``) the seats a request of every tier's mix takes on it
   (:func:`~nitsum_opt.sim.controllers.planning.seats_table`), so requests spilled in from tiers with heavier
   requests cannot push it past its own tier's SLO.

With a planner that allows them (``MilpPlanner``'s default) plans may hold *shared* colocated instances, which
serve every tier with tier priority, deployed tuned for the strictest tier
(:func:`~nitsum_opt.sim.deployment.shared_host_tier`) and priced in the MILP at twice the strictest TPOT
(:data:`SHARED_TPOT_SLACK`): a tier whose own target is much looser pays for sharing batches with a strict one.
The controller prices a shared GPU a little *below* a dedicated one (:data:`POOL_ON_TIES`): where the MILP's
time-sharing model sees no difference it pools, because the model does not credit the statistical multiplexing
of a larger pool (measured in ``benchmarks/RESULTS.md``: ties to dedicated instances lost 3 req/s at load ×8).
Isolation is still chosen where it wins in the model, e.g. prefill/decode instances for the strictest tier.
"""

from __future__ import annotations

import numpy as np

from nitsum_opt.models.spec import CapacityTable, LengthMix, Role
from nitsum_opt.plan import Plan
from nitsum_opt.planners import MilpPlanner, Planner, StabilizerSettings, StabilizerState, stabilize
from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.controllers.planning import (
    ROLE_PREFERENCE,
    candidate_configs,
    capacity_table,
    fill_idle_gpus,
    prefer_roles,
    seats_table,
    shared_capacity_table,
    tuning_table,
)
from nitsum_opt.sim.deployment import (
    Deployment,
    InstanceSeats,
    InstanceTuning,
    SharedSeats,
    deployment_from_plan,
)
from nitsum_opt.spec import ObjectiveSettings, PlanningInput, TierDemand
from nitsum_opt.workloads.demand import length_mixes
from nitsum_opt.workloads.forecast import EwmaForecaster, LastWindowForecaster
from nitsum_opt.workloads.trace import RequestTrace

POOL_ON_TIES = 0.5 * ObjectiveSettings().gpu_cost
"""The controller's ``ε_s``: half the dedicated price per GPU, so that ties between a shared and a dedicated
instance go to the shared one."""


SHARED_TPOT_SLACK = 2.0
"""How much looser than the strictest tier's TPOT target the controller prices a tier on a shared instance:
``R^s[t,c]`` is built at ``min(TPOT_t, SHARED_TPOT_SLACK × min_u TPOT_u)``. A shared instance batches every tier,
so its steps keep the strictest TPOT (the physical price is a slack of 1); the slack credits the statistical
multiplexing of one larger pool, which the time-sharing row does not see. Measured (``benchmarks/RESULTS.md``,
"Shared instances"): a slack of 1 loses 1.3–3.7 req/s on the default scenario, no cap (``R^s = R``) loses 6–16 %
on ``qwen14b-tight`` (TPOT targets 10 / 50 / 200 ms), 2 matches the better of the two on both."""


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
        role_preference: float = ROLE_PREFERENCE,
        weighted_seats: bool = True,
        shared_gpu_cost: float | None = POOL_ON_TIES,
        fill_idle_shared: bool = False,
        shared_seats: SharedSeats = "host",
        shared_roles: tuple[Role, ...] = (Role.COLOCATED,),
        shared_table: bool = True,
        shared_tpot_slack: float = SHARED_TPOT_SLACK,
        overload_admission: float = 1.0,
    ) -> None:
        """See the module docstring; ``role_preference=1`` and ``weighted_seats=False`` give the controller as it
        was before those two rules (one seat per request, the plain capacity table). Shared instances (when the
        planner allows them): ``shared_table`` plans them with ``R^s`` built at the strictest tier's TPOT times
        ``shared_tpot_slack`` (:data:`SHARED_TPOT_SLACK`; at most the tier's own TPOT;
        :func:`~nitsum_opt.sim.controllers.planning.shared_capacity_table`; ``False``: ``R^s = R``);
        ``shared_gpu_cost`` is the objective's ``ε_s`` (default :data:`POOL_ON_TIES`; ``None``: ``ε``, ties go to
        dedicated instances); ``fill_idle_shared`` fills idle GPUs with shared instances; ``shared_seats`` sizes
        them (see :func:`~nitsum_opt.sim.deployment.deployment_from_plan`); ``shared_roles`` are the roles shared
        instances may take (``PlanningInput.shared_roles``; the ``nitsum-shared-pd`` system adds prefill and decode,
        :data:`~nitsum_opt.sim.controllers.planning.SHARED_PD_ROLES`). ``overload_admission`` scales the
        admitted rate of every tier whose forecast exceeds its planned capacity (1: admit exactly the capacity;
        measured in ``benchmarks/RESULTS.md``, "The oracle's local search, and where Nitsum loses in overload")."""
        if not 0 < overload_admission <= 1:
            raise ValueError(f"overload_admission={overload_admission} must be in (0, 1]")
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
        self.role_preference = role_preference
        self.weighted_seats = weighted_seats
        self.shared_gpu_cost = shared_gpu_cost
        self.fill_idle_shared = fill_idle_shared
        self.shared_seats: SharedSeats = shared_seats
        self.shared_roles = shared_roles
        self.shared_table = shared_table
        self.shared_tpot_slack = shared_tpot_slack
        self.overload_admission = overload_admission
        self._tuned: tuple[object, InstanceTuning, InstanceSeats | None] | None = None
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
        return prefer_roles(capacity_table(ctx, self._planned_mixes), ctx.tiers, self.role_preference)

    def _forecast(self, ctx: ControlContext, now_s: float) -> np.ndarray:
        """Per-tier demand (req/s) to plan the next epoch for."""
        forecast = self.forecaster.forecast(np.asarray(self.history))
        if self.follow_rises or len(self.history) == 1:
            forecast = np.maximum(forecast, self.history[-1] * (1.0 + self.forecaster.headroom))
        return forecast * self._burst

    def _step(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment:
        self._ttft_s = [t.ttft_slo_ms / 1000.0 for t in ctx.tiers]
        self._observe(window)
        forecast = self._forecast(ctx, now_s)
        sw = ctx.settings.switch
        capacity = self._capacity_for(ctx)
        inp = PlanningInput(
            cluster=ctx.cluster,
            tiers=ctx.tiers,
            demand=tuple(TierDemand(tier=t.name, arrival_rate_rps=float(forecast[k])) for k, t in enumerate(ctx.tiers)),
            capacity=capacity,
            shared_capacity=shared_capacity_table(
                ctx, self._planned_mixes, self.role_preference, self.shared_tpot_slack, self.shared_roles
            )
            if self.shared_table and isinstance(self.planner, MilpPlanner) and self.planner.shared
            else None,
            shared_roles=self.shared_roles,
            configs=candidate_configs(ctx),
            objective=ObjectiveSettings(
                switch_cost_s=sw.switch_s,
                plan_horizon_s=max(60.0, 2 * ctx.settings.epoch_s),
                shared_gpu_cost=self.shared_gpu_cost,
            ),
            current_plan=None if self.plan is None else self.plan.as_current(),
            model=ctx.model_spec,
        )
        candidate = self.planner.plan(inp)
        if self.fill_idle:
            candidate = fill_idle_gpus(inp, candidate, shared=self.fill_idle_shared)
        decision = stabilize(inp, candidate, now_s, self.state, self.stabilizer)
        self.state = decision.state
        self.plan = decision.plan
        self.plans_made += 1
        self.plan_time_ms += candidate.solve_time_ms
        label = f"{self.name} ({decision.plan.status.value})"
        tuning, seats = self._tuning(ctx)
        deployment = deployment_from_plan(
            decision.plan,
            tuning,
            label=label,
            seats=seats,
            tiers=ctx.tiers,
            shared_seats=self.shared_seats,
        )
        return self._overload_admission(deployment, decision.plan)

    def _overload_admission(self, deployment: Deployment, plan: Plan) -> Deployment:
        """Admit ``overload_admission`` × the planned capacity of each tier whose demand exceeds it."""
        if self.overload_admission == 1.0 or deployment.admitted_rps is None:
            return deployment
        short = {a.tier for a in plan.tiers if a.admitted_rps < 0.999 * a.demand_rps}
        admitted = {t: r * self.overload_admission if t in short else r for t, r in deployment.admitted_rps.items()}
        return deployment.model_copy(update={"admitted_rps": admitted})

    def _tuning(self, ctx: ControlContext) -> tuple[InstanceTuning, InstanceSeats | None]:
        """Per-instance tuning and seats for the planned mixes (recomputed only when those change)."""
        key = tuple(sorted((name, mix.model_dump_json()) for name, mix in self._planned_mixes.items()))
        if self._tuned is None or self._tuned[0] != key:
            seats = seats_table(ctx, self._planned_mixes) if self.weighted_seats else None
            self._tuned = (key, tuning_table(ctx, self._planned_mixes), seats)
        return self._tuned[1], self._tuned[2]
