"""Typed inputs of the planner: cluster, tiers, demand, objective settings and the planning input.

Every type is a frozen pydantic model with ``extra="forbid"``; numeric names carry units. Validators only
check and normalise values (no I/O, no side effects); their errors name the field and the fix.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Self

from pydantic import Field, field_validator, model_validator

from nitsum_opt.models.spec import (
    CapacityTable,
    Frozen,
    LengthMix,
    ModelSpec,
    Role,
    ServingConfig,
    SloTarget,
    all_configs,
)

_TIER_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"

SHARED_TIER = "*"
"""Tier name of *shared* instances: instances that serve every tier with tier priority (never a valid
tier name, so it cannot clash with one). In counts, plans and running plans they appear as tier ``"*"``."""


class ClusterSpec(Frozen):
    """A pool of identical nodes; TP groups never span nodes (NVLink domain = one node)."""

    num_nodes: int = Field(ge=1)
    """Nodes in the pool."""
    gpus_per_node: int = Field(ge=1, le=64)
    """GPUs in one node (the NVLink domain a TP group must fit in)."""
    gpu_type: str = "H200"
    """GPU model, e.g. ``H200``; the capacity table must have been built for it."""
    gpu_memory_gib: float = Field(default=141.0, gt=0, allow_inf_nan=False)
    """Memory of one GPU in GiB."""

    @property
    def total_gpus(self) -> int:
        """``G``: GPUs in the pool."""
        return self.num_nodes * self.gpus_per_node

    @classmethod
    def with_gpus(cls, total_gpus: int, gpus_per_node: int = 8, **kwargs: object) -> ClusterSpec:
        """A cluster of ``total_gpus`` GPUs in full nodes of ``gpus_per_node`` (a smaller pool is one node)."""
        if total_gpus < 1:
            raise ValueError(f"total_gpus={total_gpus}: a cluster needs at least one GPU")
        if total_gpus < gpus_per_node:
            return cls(num_nodes=1, gpus_per_node=total_gpus, **kwargs)  # type: ignore[arg-type]
        if total_gpus % gpus_per_node:
            raise ValueError(
                f"total_gpus={total_gpus} is not a multiple of gpus_per_node={gpus_per_node}; use whole nodes"
            )
        return cls(num_nodes=total_gpus // gpus_per_node, gpus_per_node=gpus_per_node, **kwargs)  # type: ignore[arg-type]


class Tier(Frozen):
    """An SLO class of traffic (e.g. interactive chat, agents, background jobs)."""

    name: str = Field(pattern=_TIER_NAME)
    """Identifier used in capacity tables, plans and solver names."""
    ttft_slo_ms: float = Field(gt=0, allow_inf_nan=False)
    """Time-to-first-token target in ms (queueing included)."""
    tpot_slo_ms: float = Field(gt=0, allow_inf_nan=False)
    """Time-per-output-token target in ms (mean over a request's output after the first token)."""
    slo_percentile: float = Field(default=90.0, gt=0, lt=100)
    """Share of requests, in percent, that must meet both targets."""
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """``w_t``: value of one admitted request/s of this tier in the objective."""
    min_admission: float = Field(default=0.0, ge=0, le=1)
    """Smallest admitted fraction of the tier's demand a plan must guarantee (0 = none)."""

    @property
    def slo(self) -> SloTarget:
        """The latency targets alone, as the capacity builder takes them."""
        return SloTarget(ttft_slo_ms=self.ttft_slo_ms, tpot_slo_ms=self.tpot_slo_ms, slo_percentile=self.slo_percentile)


class TierDemand(Frozen):
    """Forecast demand of one tier for the coming epoch."""

    tier: str
    """Name of the tier."""
    arrival_rate_rps: float = Field(ge=0, allow_inf_nan=False)
    """``λ_t``: forecast arrival rate in requests/s."""
    length_mix: LengthMix | None = None
    """Prompt/output length distribution (used to build capacity tables; the MILP needs only ``λ_t``)."""

    @field_validator("arrival_rate_rps", mode="before")
    @classmethod
    def _finite_rate(cls, value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"arrival_rate_rps={value} must be a finite rate >= 0 in requests/s")
        return value


class ObjectiveSettings(Frozen):
    """Prices in the objective ``Σ w_t y_t − ε Σ g_c n[t,c] − ε_s Σ g_c s[c] − Σ β (d_up + d_down)``."""

    gpu_cost: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    """``ε``: weighted req/s given up per GPU in use; a tie-breaker that leaves idle GPUs off."""
    shared_gpu_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """``ε_s``: the same price per GPU of a *shared* instance (``None`` = ``gpu_cost``). A shared colocated
    instance can do everything a dedicated one can, so at equal prices the two tie wherever sharing gains nothing;
    the MILP planner then keeps the tiers isolated (:func:`nitsum_opt.admission.prefer_dedicated`). Below
    ``gpu_cost`` every colocated instance tends to be shared; above it, sharing must serve more to be chosen.
    (A premium in the objective instead of the tie-break after the solve doubled the solver's tree on the hard
    tail of ``nitsum bench solve``.)"""
    switch_cost_s: float = Field(default=0.26, ge=0, allow_inf_nan=False)
    """Seconds an instance is out of service when it is started, stopped or re-shaped (TP switch).
    Default: the mean pause→resume of the vLLM TP switches measured on 4 × H200 (wake of a standby engine from
    sleep level 2, weight refill from the resident copy, KV wake: 226 / 282 / 280 ms; benchmarks/RESULTS.md,
    "Runtime on H200"); the simulator's ``SwitchCosts.standby_wake_s`` uses the same figure."""
    plan_horizon_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds a new plan is expected to stay in place; a change's cost is amortised over it:
    ``β[t,c] = w_t · g_c · ρ_t · switch_cost_s / plan_horizon_s`` per instance added or removed
    (``ρ_t``: the tier's best per-GPU rate)."""


class PlanningInput(Frozen):
    """Everything one planning epoch needs."""

    cluster: ClusterSpec
    """GPUs available."""
    tiers: tuple[Tier, ...] = Field(min_length=1)
    """SLO tiers, in priority-independent stable order."""
    demand: tuple[TierDemand, ...]
    """Forecast arrival rate of every tier (one entry per tier)."""
    capacity: CapacityTable
    """``R[t,c]`` for every tier and every candidate config."""
    shared_capacity: CapacityTable | None = None
    """``R^s[t,c]``: rate of tier ``t`` one *shared* instance of config ``c`` serves while it runs the other
    tiers' requests in the same batches (e.g. the tier's mix at the strictest tier's TPOT target); cells for every
    tier and every candidate config of a role in ``shared_roles``. ``None``: ``R[t,c]``, i.e. pure time-sharing."""
    shared_roles: tuple[Role, ...] = (Role.COLOCATED,)
    """Roles a shared instance may take. Colocated (the default): a shared instance serves whole requests of every
    tier. With prefill and decode as well, shared prefill instances take every tier's prompts and hand their KV to
    decode instances (shared, or dedicated to the request's tier), and shared decode instances take every tier's
    hand-offs: the disaggregated layout without a pair per tier."""
    configs: tuple[ServingConfig, ...] = ()
    """Candidate instance shapes; empty = every supported TP up to ``gpus_per_node`` × every role."""
    objective: ObjectiveSettings = ObjectiveSettings()
    """Prices of GPUs and of changes."""
    current_plan: CurrentPlan | None = None
    """Instances running now (churn is priced against them); ``None`` at the first epoch."""
    model: ModelSpec | None = None
    """The served model (informational; the capacity table already encodes its speed)."""

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        tier_names = [t.name for t in self.tiers]
        if len(set(tier_names)) != len(tier_names):
            raise ValueError(f"tier names must be unique, got {tier_names}")
        demand_names = [d.tier for d in self.demand]
        if sorted(demand_names) != sorted(tier_names):
            raise ValueError(f"demand must list every tier exactly once: tiers {tier_names}, demand {demand_names}")
        gpn = self.cluster.gpus_per_node
        for c in self.configs:
            if c.tp > gpn:
                raise ValueError(
                    f"config {c.key} needs {c.tp} GPUs in one node but cluster.gpus_per_node={gpn}; "
                    f"drop it or use nodes with at least {c.tp} GPUs"
                )
        if len(set(self.configs)) != len(self.configs):
            raise ValueError(f"configs contain duplicates: {[c.key for c in self.configs]}")
        missing = self.capacity.missing_cells(tier_names, self.candidate_configs)
        if missing:
            raise ValueError(
                f"capacity table is missing cells {missing[:6]}{' …' if len(missing) > 6 else ''}; "
                "add them (0 where the config cannot meet the tier's SLO) or restrict `configs`"
            )
        if len(set(self.shared_roles)) != len(self.shared_roles):
            raise ValueError(f"shared_roles contain duplicates: {[r.value for r in self.shared_roles]}")
        if self.shared_capacity is not None:
            missing = self.shared_capacity.missing_cells(tier_names, self.shared_configs)
            if missing:
                raise ValueError(
                    f"shared_capacity table is missing cells {missing[:6]}{' …' if len(missing) > 6 else ''}; "
                    "give every tier a rate for every candidate config of the shared roles "
                    f"{[r.value for r in self.shared_roles]} (0 where it cannot share), or narrow shared_roles"
                )
        for tier in self.tiers:
            self._check_servable(tier)
        if self.current_plan is not None:
            self.current_plan.check_against(self)
        return self

    def _check_servable(self, tier: Tier) -> None:
        rates = {c: self.capacity.rate_rps(tier.name, c) for c in self.candidate_configs}
        colocated = any(r > 0 for c, r in rates.items() if c.role.value == "colocated")
        prefill = any(r > 0 for c, r in rates.items() if c.role.value == "prefill")
        decode = any(r > 0 for c, r in rates.items() if c.role.value == "decode")
        if not (colocated or (prefill and decode)):
            raise ValueError(
                f"no candidate config can meet tier {tier.name!r}'s SLO (ttft_slo_ms={tier.ttft_slo_ms}, "
                f"tpot_slo_ms={tier.tpot_slo_ms}): every capacity cell that could serve it is 0; relax the "
                "SLO, allow larger TP, or drop the tier"
            )

    @cached_property
    def candidate_configs(self) -> tuple[ServingConfig, ...]:
        """The configs the planner may use (explicit list, or every supported one that fits a node)."""
        return self.configs or all_configs(max_tp=self.cluster.gpus_per_node)

    def demand_rps(self, tier: str) -> float:
        """``λ_t``."""
        for d in self.demand:
            if d.tier == tier:
                return d.arrival_rate_rps
        raise KeyError(f"no demand for tier {tier!r}")

    @property
    def shared_configs(self) -> tuple[ServingConfig, ...]:
        """The candidate configs a shared instance may take (those of a role in ``shared_roles``)."""
        return tuple(c for c in self.candidate_configs if c.role in self.shared_roles)

    def shared_rate_rps(self, tier: str, config: ServingConfig) -> float:
        """``R^s[t,c]``: ``shared_capacity``'s cell, or ``R[t,c]`` without that table."""
        table = self.capacity if self.shared_capacity is None else self.shared_capacity
        return table.rate_rps(tier, config)

    def churn_price(self, tier: str, config: ServingConfig) -> float:
        """``β[t,c] = w_t · g_c · ρ_t · switch_cost_s / plan_horizon_s``: objective lost per instance added or
        removed. Each of its ``g_c`` GPUs is out of service for ``switch_cost_s``, losing the tier's best per-GPU
        rate ``ρ_t = max_c R[t,c]/g_c``; the loss is amortised over the plan's expected lifetime. Pricing per GPU
        (not per instance capacity) keeps the price of a change independent of how the GPUs are grouped.
        For a shared instance (``tier = "*"``) a GPU could be serving any tier, so its price is the largest:
        ``β[*,c] = g_c · max_t w_t ρ_t · switch_cost_s / plan_horizon_s``."""
        obj = self.objective
        if self.current_plan is None or obj.switch_cost_s == 0:
            return 0.0
        per_gpu = self._churn_price_per_gpu[tier]
        return config.gpus * per_gpu

    @cached_property
    def _best_rates_per_gpu(self) -> dict[str, float]:
        """``ρ_t = max_c R[t,c] / g_c``."""
        return {
            t.name: max(self.capacity.rate_rps(t.name, c) / c.gpus for c in self.candidate_configs) for t in self.tiers
        }

    @property
    def shared_gpu_cost(self) -> float:
        """``ε_s``: the price per GPU of a shared instance."""
        obj = self.objective
        return obj.gpu_cost if obj.shared_gpu_cost is None else obj.shared_gpu_cost

    def gpu_price(self, tier: str) -> float:
        """Price per GPU of an instance of ``tier``: ``ε``, or ``ε_s`` for a shared one (``tier = "*"``)."""
        return self.shared_gpu_cost if tier == SHARED_TIER else self.objective.gpu_cost

    @cached_property
    def _churn_price_per_gpu(self) -> dict[str, float]:
        amortise = self.objective.switch_cost_s / self.objective.plan_horizon_s
        out = {t.name: t.weight * self._best_rates_per_gpu[t.name] * amortise for t in self.tiers}
        out[SHARED_TIER] = max(out.values())
        return out

    def tier(self, name: str) -> Tier:
        """The tier called ``name``."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"unknown tier {name!r}; tiers are {[t.name for t in self.tiers]}")


class InstanceCount(Frozen):
    """A number of identical instances serving one tier, or every tier (shared)."""

    tier: str
    """Tier the instances serve; ``"*"`` for shared instances that serve every tier with tier priority (colocated,
    or prefill / decode with ``PlanningInput.shared_roles``)."""
    config: ServingConfig
    """Their shape."""
    count: int = Field(ge=0)
    """How many."""


class CurrentPlan(Frozen):
    """What runs now: instance counts per (tier, config) and, optionally, their GPU ids for stable placement."""

    counts: tuple[InstanceCount, ...] = ()
    """``n⁰[t,c]``, and ``s⁰[c]`` as tier ``"*"``."""
    gpu_ids: dict[str, tuple[tuple[int, ...], ...]] = Field(default_factory=dict)
    """``'<tier>/<config key>'`` (``'*/<config key>'`` for shared instances) → GPU ids of each running instance
    (optional; keeps instances in place)."""

    def count(self, tier: str, config: ServingConfig) -> int:
        """``n⁰[t,c]`` (``s⁰[c]`` for ``tier = "*"``)."""
        return sum(ic.count for ic in self.counts if ic.tier == tier and ic.config == config)

    def check_against(self, inp: PlanningInput) -> None:
        """Raise when the current plan names unknown tiers or configs, or holds more GPUs than exist."""
        tiers = {t.name for t in inp.tiers}
        used = 0
        for ic in self.counts:
            if ic.tier == SHARED_TIER and ic.config.role not in inp.shared_roles:
                raise ValueError(
                    f"current_plan has shared ('*') instances of {ic.config.key}, but shared_roles is "
                    f"{[r.value for r in inp.shared_roles]}; add {ic.config.role.value!r} to shared_roles"
                )
            if ic.tier not in tiers and ic.tier != SHARED_TIER:
                raise ValueError(
                    f"current_plan names tier {ic.tier!r}, which is not among {sorted(tiers)} (or '*' for shared)"
                )
            if ic.config.tp > inp.cluster.gpus_per_node:
                raise ValueError(f"current_plan uses {ic.config.key}, larger than a node")
            used += ic.count * ic.config.gpus
        if used > inp.cluster.total_gpus:
            raise ValueError(
                f"current_plan uses {used} GPUs but the cluster has {inp.cluster.total_gpus}; "
                "pass the plan that actually runs on this cluster"
            )


PlanningInput.model_rebuild()
