"""What a controller hands the simulator: the instances to run and how requests are scheduled on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Self

from pydantic import Field, model_validator

from nitsum_opt.models.spec import Frozen, Role, ServingConfig
from nitsum_opt.plan import Plan
from nitsum_opt.scheduler import SchedulerConfig, SchedulerInstance, TierPolicy
from nitsum_opt.spec import Tier


class DeployedInstance(Frozen):
    """One engine of a deployment."""

    tier: str | None
    """Tier it is dedicated to; ``None`` = it serves every tier."""
    tp: int = Field(ge=1)
    """Tensor-parallel degree."""
    role: Role
    """Prefill, decode or colocated."""
    gpu_ids: tuple[int, ...] = Field(min_length=1)
    """Global GPU ids it occupies (``tp`` of them)."""
    slo_safe_seqs: int = Field(default=1024, ge=1)
    """Requests it holds at once while its tier's SLO holds (the scheduler's spare-capacity bound)."""
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    """Its step token budget (``None`` = the engine default); a smaller budget bounds the time a prefill chunk adds
    to a decode step (TPOT) at the cost of longer prefills."""
    tier_seqs: dict[str, int] | None = None
    """Requests of each tier's length mix it could hold while its own tier's SLO holds; the scheduler then counts
    a request of another tier as ``slo_safe_seqs / tier_seqs[tier]`` seats (see
    :attr:`nitsum_opt.scheduler.SchedulerInstance.tier_seqs`). ``None``: one seat per request."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(self.gpu_ids) != self.tp:
            raise ValueError(f"instance with tp={self.tp} lists {len(self.gpu_ids)} GPU ids {self.gpu_ids}")
        return self

    @property
    def key(self) -> str:
        """Identity across plans: the same GPUs, TP and role are the same engine (its tier may change)."""
        return f"g{self.gpu_ids[0]}-tp{self.tp}-{self.role.value}"


class Deployment(Frozen):
    """Instances plus the scheduling policy over them."""

    instances: tuple[DeployedInstance, ...]
    """Every engine (their GPU sets must be disjoint)."""
    admitted_rps: dict[str, float] | None = None
    """Per-tier admitted rate ``y_t`` (token bucket); ``None`` = no admission control (every request feasible)."""
    tier_priority: bool = False
    """Engines order waiting requests by tier rank (else first come, first served)."""
    spill_over: bool = False
    """Best-effort requests may use spare capacity of other tiers' instances."""
    central_queue: bool = False
    """Best-effort requests without spare capacity wait in the scheduler instead of an engine."""
    label: str = ""
    """Short description for reports (e.g. ``4×tp2-colocated``)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        seen: set[int] = set()
        for inst in self.instances:
            clash = seen.intersection(inst.gpu_ids)
            if clash:
                raise ValueError(f"GPUs {sorted(clash)} are used by two instances of deployment {self.label!r}")
            seen.update(inst.gpu_ids)
        return self

    @property
    def gpus_used(self) -> int:
        """GPUs held by instances."""
        return sum(i.tp for i in self.instances)

    def describe(self) -> str:
        """Compact text, e.g. ``interactive:2×tp2-colocated standard:1×tp4-colocated``."""
        groups: dict[tuple[str, str], int] = {}
        for inst in self.instances:
            k = (inst.tier or "*", f"tp{inst.tp}-{inst.role.value}")
            groups[k] = groups.get(k, 0) + 1
        return " ".join(f"{t}:{n}×{c}" for (t, c), n in sorted(groups.items()))


InstanceTuning = Mapping[tuple[str, int, Role], tuple[int, int | None]]
"""``(tier, tp, role)`` → (SLO-safe requests, step token budget or ``None``) of an instance of that shape."""

SharedSeats = Literal["host", "engine"]
"""How many requests a shared instance takes at once: its host tier's SLO-safe capacity (seats weighted by tier
mix), or the engine's own limit."""

ENGINE_SEATS = 1024
"""``slo_safe_seqs`` of a shared instance with ``shared_seats="engine"`` (vLLM's ``max_num_seqs`` default)."""

InstanceSeats = Mapping[tuple[str, int, Role], dict[str, int]]
"""``(tier, tp, role)`` → requests of every tier's mix such an instance holds within its own tier's SLO."""


def shared_host_tier(plan: Plan, tiers: Sequence[Tier], config: ServingConfig, planned_only: bool = False) -> str:
    """The tier whose SLO a shared instance of ``config`` is tuned for: the strictest (TPOT, then TTFT target) of
    all tiers, since the scheduler routes every tier's requests to a shared instance and they run in the same
    batches, so the strictest tier's TPOT bounds them all; ``planned_only``: of the tiers the plan puts on shared
    instances of ``config`` (``x[t,c] > 0``), else of all tiers."""
    rates = plan.shared_rates()
    planned = [t for t in tiers if rates.get(t.name, {}).get(config, 0.0) > 0] if planned_only else []
    return min(planned or tiers, key=lambda t: (t.tpot_slo_ms, t.ttft_slo_ms)).name


def deployment_from_plan(
    plan: Plan,
    tuning: InstanceTuning,
    label: str = "",
    admit: bool = True,
    seats: InstanceSeats | None = None,
    tiers: Sequence[Tier] = (),
    shared_seats: SharedSeats = "host",
) -> Deployment:
    """A tier-aware deployment running ``plan``: its instances (tuned per tier by ``tuning``; with ``seats``, a
    request takes the seats of its tier's mix), admission at the plan's ``y_t`` (``admit``), tier priority,
    spill-over and the central queue. A shared instance (tier ``"*"``) serves every tier, tuned for its host tier
    (:func:`shared_host_tier`, which needs ``tiers``): its SLO-aware step budget and, with ``shared_seats="host"``,
    the host's SLO-safe capacity and seats per tier mix; with ``shared_seats="engine"`` it takes requests up to the
    engine's own limit (like the pooled engines of ``vllm-priority``) and leaves the rest to tier priority."""
    instances = []
    for i in plan.instances:
        host = i.tier
        if i.shared:
            if not tiers:
                raise ValueError("deployment_from_plan: the plan has shared instances; pass the tiers")
            host = shared_host_tier(plan, tiers, i.config)
        seqs, budget = tuning[(host, i.tp, i.role)]
        tier_seqs = None if seats is None else dict(seats[(host, i.tp, i.role)])
        if i.shared and shared_seats == "engine":
            seqs, tier_seqs = ENGINE_SEATS, None
        instances.append(
            DeployedInstance(
                tier=None if i.shared else i.tier,
                tp=i.tp,
                role=i.role,
                gpu_ids=i.gpu_ids,
                slo_safe_seqs=seqs,
                max_num_batched_tokens=budget,
                tier_seqs=tier_seqs,
            )
        )
    return Deployment(
        instances=tuple(instances),
        admitted_rps={a.tier: a.admitted_rps for a in plan.tiers} if admit else None,
        tier_priority=True,
        spill_over=True,
        central_queue=True,
        label=label,
    )


def tier_ranks(tiers: Sequence[Tier]) -> list[int]:
    """Rank of each tier in tier-priority mode: higher weight first, then tighter TTFT, then tier order."""
    order = sorted(range(len(tiers)), key=lambda k: (-tiers[k].weight, tiers[k].ttft_slo_ms, k))
    ranks = [0] * len(order)
    for rank, k in enumerate(order):
        ranks[k] = rank
    return ranks


def scheduler_config(tiers: Sequence[Tier], dep: Deployment) -> SchedulerConfig:
    """The multi-tier scheduler's configuration for ``dep`` serving ``tiers``: what the simulator and the runtime
    (:mod:`nitsum_runtime.serving`) both hand :class:`~nitsum_opt.scheduler.MultiTierScheduler`; instance ids are
    the instances' :attr:`DeployedInstance.key`."""
    ranks = tier_ranks(tiers)
    names = [t.name for t in tiers]
    if dep.admitted_rps is not None:
        missing = [n for n in names if n not in dep.admitted_rps]
        if missing:
            raise ValueError(f"deployment {dep.label!r} admits no rate for tiers {missing}; give every tier one")
    return SchedulerConfig(
        tiers=tuple(
            TierPolicy(
                name=t.name,
                admitted_rps=None if dep.admitted_rps is None else dep.admitted_rps[t.name],
                ttft_slo_ms=t.ttft_slo_ms,
                tpot_slo_ms=t.tpot_slo_ms,
                priority=ranks[k],
            )
            for k, t in enumerate(tiers)
        ),
        instances=tuple(
            SchedulerInstance(
                instance_id=i.key, tier=i.tier, role=i.role, slo_safe_seqs=i.slo_safe_seqs, tier_seqs=i.tier_seqs
            )
            for i in dep.instances
        ),
        tier_priority=dep.tier_priority,
        spill_over=dep.spill_over,
        central_queue=dep.central_queue,
    )
