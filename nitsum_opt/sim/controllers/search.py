"""Hindsight searches with the simulator: the best static deployment of a family, judged on the whole trace.

:class:`StaticEvaluator` simulates a static deployment over the trace and remembers its goodput, so the searches of
one load level (``vllm-priority``'s TP, ``distserve``'s placement, ``oracle-static``'s configuration) share runs.
Every search maximises goodput (requests/s that meet both SLO targets of their tier).

``vllm-priority`` searches every TP degree with tier priority, with vLLM's default step token budget and with the
SLO-aware budget of the strictest tier (an operator tuning ``max_num_batched_tokens`` for the tightest TPOT).
``oracle-static`` searches the union of every static family: all vLLM TP degrees with FCFS and with tier priority,
each with both budgets, every DistServe placement, the per-tier split (both budgets), and tier-aware plans — the
MILP's plan for hindsight statistics of the demand (mean and the 50/75/90/100th percentile of the per-epoch rates of
each tier), with idle GPUs filled, run with the multi-tier scheduler (admission at the plan's capacity, and without
admission control), planned dedicated-only and, as the ``nitsum`` controller plans, with shared instances (colocated
instances serving every tier; ties between a shared and a dedicated instance go to the shared one). The tier-aware
plans come in two families: the plain capacity table with one scheduler seat per request, and Nitsum's own planning
inputs and scheduler (the role preference of :func:`~nitsum_opt.sim.controllers.planning.prefer_roles` and seats
weighted by each tier's request mix, :func:`~nitsum_opt.sim.controllers.planning.seats_table`), so the static plans
get every planning rule the adaptive controller has. Its goodput is therefore at least that of every other static
system.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from nitsum_opt.evaluate import Counts
from nitsum_opt.models.spec import LengthMix, ModelSpec
from nitsum_opt.plan import Plan
from nitsum_opt.planners import MilpPlanner
from nitsum_opt.sim.capacity import slo_token_budget
from nitsum_opt.sim.controllers.base import ControlContext, StaticController
from nitsum_opt.sim.controllers.nitsum import POOL_ON_TIES, SHARED_TPOT_SLACK
from nitsum_opt.sim.controllers.planning import (
    FALLBACK_MIX,
    ROLE_PREFERENCE,
    candidate_configs,
    capacity_table,
    fill_idle_gpus,
    prefer_roles,
    seats_table,
    shared_capacity_table,
    tuning_table,
)
from nitsum_opt.sim.controllers.static import distserve, distserve_candidates, split, vllm_static
from nitsum_opt.sim.deployment import Deployment, InstanceSeats, InstanceTuning, deployment_from_plan
from nitsum_opt.sim.results import SimResult
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.sim.timing import IterationTimeModel
from nitsum_opt.spec import ClusterSpec, ObjectiveSettings, PlanningInput, Tier, TierDemand
from nitsum_opt.workloads.demand import epoch_demand, length_mixes
from nitsum_opt.workloads.trace import RequestTrace

HINDSIGHT_QUANTILES: tuple[float | str, ...] = ("mean", 50.0, 75.0, 90.0, 100.0)
"""Demand statistics the oracle's tier-aware candidates are planned for."""


class StaticEvaluator:
    """Goodput of static deployments over one trace (memoised by deployment)."""

    def __init__(
        self,
        trace: RequestTrace,
        tiers: tuple[Tier, ...],
        model: IterationTimeModel,
        model_spec: ModelSpec,
        cluster: ClusterSpec,
        settings: SimSettings,
        on_run: Callable[[str], None] | None = None,
    ) -> None:
        self.trace = trace
        self.tiers = tiers
        self.model = model
        self.model_spec = model_spec
        self.cluster = cluster
        self.settings = settings
        self.on_run = on_run
        self.memo: dict[str, float] = {}
        self.results: dict[str, SimResult] = {}
        self.pruned: dict[str, int] = {}
        """Deployments whose run was cut short, with the bar (requests meeting SLO) they could not beat."""
        self.runs = 0

    @property
    def ctx(self) -> ControlContext:
        """The control context of this evaluation."""
        return ControlContext(self.cluster, self.tiers, self.model_spec, self.model, self.settings)

    @staticmethod
    def key(dep: Deployment) -> str:
        """Identity of a deployment (its label left out)."""
        return dep.model_dump_json(exclude={"label"})

    def simulate(self, dep: Deployment, beat_met: int | None = None) -> SimResult:
        """Simulate ``dep`` (static) over the trace. With ``beat_met``, the run stops as soon as it can no longer
        meet more than ``beat_met`` requests' SLOs (the result is then incomplete and not memoised as a result)."""
        from nitsum_opt.sim.core import Simulator

        key = self.key(dep)
        if key in self.results:
            return self.results[key]
        sim = Simulator(
            self.trace,
            self.tiers,
            self.model,
            self.model_spec,
            self.cluster,
            StaticController("static", dep),
            self.settings,
        )
        n = len(self.trace)
        stop = None if beat_met is None else (lambda s, now: n - s.known_misses(now) <= beat_met)
        result = sim.run(stop=stop)
        self.runs += 1
        if result.stopped_early:
            self.pruned[key] = beat_met if beat_met is not None else 0
        else:
            self.results[key] = result
            self.memo[key] = float(result.slo_met(self.tiers).sum()) / max(self.trace.duration_s, 1e-9)
        if self.on_run is not None:
            self.on_run(dep.label)
        return result

    def goodput(self, dep: Deployment) -> float:
        """Requests/s meeting their tier's SLO over the trace (always a complete run)."""
        key = self.key(dep)
        if key not in self.memo:
            self.pruned.pop(key, None)
            self.simulate(dep)
        return self.memo[key]

    def best(self, candidates: Iterable[Deployment]) -> tuple[Deployment, list[tuple[str, float | None]]]:
        """The candidate with the highest goodput (first one on ties) and every candidate's score (``None`` for a
        candidate pruned because it could no longer win). Candidates already simulated set the bar first; every
        other run stops as soon as it cannot beat the best so far (branch and bound on requests meeting SLO), so
        the winner is exact and each losing run is cut short. A candidate pruned by an earlier search is skipped
        only when the bar it lost to is not above this search's best so far (else it runs again)."""
        items = list(candidates)
        if not items:
            raise ValueError("no candidate deployment fits the cluster")
        span = max(self.trace.duration_s, 1e-9)
        known = [d for d in items if self.key(d) in self.memo]
        best: Deployment | None = max(known, key=lambda d: self.memo[self.key(d)]) if known else None
        for dep in items:
            key = self.key(dep)
            bar = None if best is None else round(self.memo[self.key(best)] * span)
            if key in self.memo or (key in self.pruned and bar is not None and self.pruned[key] <= bar):
                continue
            self.simulate(dep, beat_met=bar)
            if key in self.memo and (best is None or self.memo[key] > self.memo[self.key(best)]):
                best = dep
        assert best is not None
        return best, [(d.label, self.memo.get(self.key(d))) for d in items]


def strictest_budget(ev: StaticEvaluator, tp: int) -> int:
    """SLO-aware step token budget of an untiered TP-``tp`` engine: the one the strictest TPOT tier needs."""
    mixes = hindsight_mixes(ev.trace)
    tier = min(ev.tiers, key=lambda t: t.tpot_slo_ms)
    mix = mixes.get(tier.name, FALLBACK_MIX)
    budget = slo_token_budget(ev.model, tp, tier.tpot_slo_ms, mix, ev.settings.seat_safety)
    return min(ev.settings.engine.max_num_batched_tokens, budget)


def vllm_candidates(ev: StaticEvaluator, priority: bool, tuned: bool) -> list[Deployment]:
    """Colocated vLLM deployments at every TP that fits a node, with the engine's default step budget and (when
    ``tuned``) also with the SLO-aware budget of the strictest tier."""
    seqs = ev.settings.engine.max_num_seqs
    out = []
    for tp in ev.ctx.tps:
        out.append(vllm_static(ev.cluster, tp, priority, seqs))
        if tuned:
            out.append(vllm_static(ev.cluster, tp, priority, seqs, strictest_budget(ev, tp)))
    return out


def distserve_deployments(ev: StaticEvaluator) -> list[Deployment]:
    """Every DistServe placement that uses all GPUs (TP degrees the iteration model covers)."""
    seqs = ev.settings.engine.max_num_seqs
    return [distserve(ev.cluster, p, d, seqs) for p, d in distserve_candidates(ev.cluster, ev.ctx.tps)]


def hindsight_mixes(trace: RequestTrace) -> dict[str, LengthMix]:
    """Each tier's length mix over the whole trace."""
    return length_mixes(trace)


def split_deployment(ev: StaticEvaluator, tuned: bool = False) -> Deployment:
    """The per-tier split sized to each tier's mean demand over the trace; engine defaults, or (``tuned``) each
    tier's SLO-aware step budget."""
    mixes = hindsight_mixes(ev.trace)
    counts = np.bincount(ev.trace.tier, minlength=len(ev.tiers))
    mean = {t.name: float(counts[k]) / max(ev.trace.duration_s, 1e-9) for k, t in enumerate(ev.tiers)}
    table = tuning_table(ev.ctx, mixes)
    seqs = ev.settings.engine.max_num_seqs
    tuning = {k: (seqs, v[1] if tuned else None) for k, v in table.items()}
    label = "split (SLO-aware steps)" if tuned else "split"
    return split(ev.cluster, mean, capacity_table(ev.ctx, mixes), tuning, ev.ctx.tps, label=label)


@dataclass(frozen=True)
class TieredOrigin:
    """How a tier-aware candidate was built, so that a neighbouring plan can be built the same way."""

    inp: PlanningInput
    """The planning input (hindsight demand, capacity tables)."""
    counts: Counts
    """``n[t,c]`` and shared ``s[c]`` of its plan."""
    admit: bool
    """Admission control at the plan's capacity."""
    tuning: InstanceTuning
    """Per-instance SLO-safe capacity and step budget."""
    seats: InstanceSeats | None
    """Seats per tier mix (Nitsum's family) or one seat per request."""
    label: str
    """What it was planned for, e.g. ``for 90.0 demand (admission) [Nitsum planning inputs]``."""


def tiered_deployment(ev: StaticEvaluator, plan: Plan, origin: TieredOrigin) -> Deployment:
    """The deployment of a tier-aware plan: multi-tier scheduler, admission (when ``origin.admit``) at each tier's
    planned capacity ``min(prefill, decode)``."""
    dep = deployment_from_plan(plan, origin.tuning, admit=origin.admit, seats=origin.seats, tiers=ev.tiers)
    caps = {a.tier: min(a.prefill_capacity_rps, a.decode_capacity_rps) for a in plan.tiers}
    label = f"tiered plan {origin.label}: {dep.describe()}"
    return dep.model_copy(update={"label": label, "admitted_rps": caps if origin.admit else None})


def tiered_candidates(ev: StaticEvaluator, origins: dict[str, TieredOrigin] | None = None) -> list[Deployment]:
    """Tier-aware static plans for hindsight demand statistics, in both families (see the module docstring),
    deduplicated; ``origins`` (when given) receives how each was built, by deployment key."""
    ctx = ev.ctx
    mixes = hindsight_mixes(ev.trace)
    plain = capacity_table(ctx, mixes)
    tuning = tuning_table(ctx, mixes)
    families = (  # (label, R, seats, role preference)
        ("", plain, None, 1.0),
        (
            " [Nitsum planning inputs]",
            prefer_roles(plain, ev.tiers, ROLE_PREFERENCE),
            seats_table(ctx, mixes),
            ROLE_PREFERENCE,
        ),
    )
    rates = epoch_demand(ev.trace, ev.settings.epoch_s).rates_rps
    sharing_modes = (  # (label, MILP with shared instances, ε_s): the old plans, and the nitsum controller's
        (" [dedicated only]", False, None),
        (" [shared, ties pooled]", True, POOL_ON_TIES),
    )
    out: dict[str, Deployment] = {}
    for (family, capacity, seats, preference), (sharing, shared, shared_cost) in itertools.product(
        families, sharing_modes
    ):
        family = family + sharing
        planner = MilpPlanner(shared=shared)
        # shared instances priced as the nitsum controller prices them (R^s at the slackened strictest TPOT)
        shared_capacity = shared_capacity_table(ctx, mixes, preference, SHARED_TPOT_SLACK) if shared else None
        for q in HINDSIGHT_QUANTILES:
            level = rates.mean(axis=0) if q == "mean" else np.percentile(rates, q, axis=0)
            inp = PlanningInput(
                cluster=ev.cluster,
                tiers=ev.tiers,
                demand=tuple(TierDemand(tier=t.name, arrival_rate_rps=float(level[k])) for k, t in enumerate(ev.tiers)),
                capacity=capacity,
                configs=candidate_configs(ctx),
                objective=ObjectiveSettings(shared_gpu_cost=shared_cost),
                model=ev.model_spec,
                shared_capacity=shared_capacity,
            )
            plan = fill_idle_gpus(inp, planner.plan(inp))
            for admit in (True, False):
                how = "admission" if admit else "no admission"
                origin = TieredOrigin(inp, plan.counts(), admit, tuning, seats, f"for {q} demand ({how}){family}")
                dep = tiered_deployment(ev, plan, origin)
                key = StaticEvaluator.key(dep)
                out.setdefault(key, dep)
                if origins is not None:
                    origins.setdefault(key, origin)
    return list(out.values())


def oracle_candidates(ev: StaticEvaluator, origins: dict[str, TieredOrigin] | None = None) -> list[Deployment]:
    """Every static deployment the oracle considers first (``origins``: see :func:`tiered_candidates`)."""
    return [
        *vllm_candidates(ev, priority=False, tuned=True),
        *vllm_candidates(ev, priority=True, tuned=True),
        *distserve_deployments(ev),
        split_deployment(ev),
        split_deployment(ev, tuned=True),
        *tiered_candidates(ev, origins),
    ]
