"""The planner's output: instances with their GPUs, admission per tier, and how the plan was found."""

from __future__ import annotations

from collections import Counter
from enum import StrEnum

from pydantic import Field

from nitsum_opt.models.spec import Frozen, Role, ServingConfig
from nitsum_opt.spec import SHARED_TIER, CurrentPlan, InstanceCount


class PlanStatus(StrEnum):
    """How trustworthy the plan is, for the caller to act on (never a print)."""

    OPTIMAL = "optimal"
    """The MILP was solved to optimality (within the configured gap)."""
    FEASIBLE = "feasible"
    """The MILP stopped at its time limit with a feasible incumbent; ``gap`` says how far from optimal."""
    FALLBACK = "fallback"
    """The MILP failed (timeout without incumbent, infeasible, solver error); this is the greedy plan.
    ``message`` says why."""
    HEURISTIC = "heuristic"
    """Produced by the greedy allocator on purpose."""
    PINNED = "pinned"
    """The user's fixed plan, with admission computed for the current demand."""
    KEPT = "kept"
    """The stabilizer kept the running plan (the candidate was not worth a switch); ``message`` says why."""


class Instance(Frozen):
    """One serving engine: a TP group of GPUs inside one node, dedicated to one tier and role, or shared."""

    instance_id: str
    """Stable id, ``<tier>/<config>@gpu<first GPU id>`` (``*/<config>@gpu<id>`` for a shared instance)."""
    tier: str
    """Tier it serves; ``"*"``: a shared colocated instance that serves every tier with tier priority (each tier's
    share of it is in :attr:`TierAllocation.shared_rates_rps`)."""
    tp: int = Field(ge=1)
    """Tensor-parallel degree (= number of GPUs)."""
    role: Role
    """Prefill, decode or colocated."""
    node: int = Field(ge=0)
    """Node index."""
    gpu_ids: tuple[int, ...]
    """Global GPU ids (``node * gpus_per_node + local``), ``tp`` consecutive aligned ids."""

    @property
    def config(self) -> ServingConfig:
        """``(tp, role)``."""
        return ServingConfig(tp=self.tp, role=self.role)

    @property
    def shared(self) -> bool:
        """Whether it serves every tier (tier ``"*"``)."""
        return self.tier == SHARED_TIER


class TierAllocation(Frozen):
    """What the plan gives one tier."""

    tier: str
    """Tier name."""
    demand_rps: float = Field(ge=0)
    """``λ_t`` the plan was made for."""
    admitted_rps: float = Field(ge=0)
    """``y_t``: rate admitted with an SLO guarantee."""
    best_effort_rps: float = Field(ge=0)
    """``λ_t − y_t``: served best-effort (never silently dropped)."""
    admission_fraction: float = Field(ge=0, le=1)
    """``a_t = y_t / λ_t`` (1 when ``λ_t = 0``)."""
    prefill_capacity_rps: float = Field(ge=0)
    """Σ R·n over the tier's prefill and colocated instances, plus its rate on shared instances."""
    decode_capacity_rps: float = Field(ge=0)
    """Σ R·n over the tier's decode and colocated instances, plus its rate on shared instances."""
    gpus: int = Field(ge=0)
    """GPUs dedicated to the tier (shared instances not counted)."""
    shared_rates_rps: dict[str, float] = Field(default_factory=dict)
    """``x[t,c]``: rate of the tier served on shared instances, by config key (e.g. ``{"tp1-colocated": 3.2}``);
    per config, ``Σ_t x[t,c] / R^s[t,c]`` is at most the number of shared instances (empty: none used)."""

    @property
    def shared_rps(self) -> float:
        """The tier's rate planned on shared instances: ``Σ_c x[t,c]`` over shared colocated instances plus the larger
        of its shared prefill and shared decode rates (a request prefilled and decoded on shared instances counts
        once)."""
        sides = {"colocated": 0.0, "prefill": 0.0, "decode": 0.0}
        for key, rate in self.shared_rates_rps.items():
            sides[key.rsplit("-", 1)[1]] += rate
        return sides["colocated"] + max(sides["prefill"], sides["decode"])


class Provenance(Frozen):
    """Enough to reproduce the plan: what went in and which planner ran."""

    input_hash: str
    """sha256 (first 16 hex) of the canonical JSON of the planning input."""
    planner: str
    """Planner name and its settings, e.g. ``milp(ortools/scip, gap=1e-06)``."""
    nitsum_version: str
    """Library version that made the plan."""


class Plan(Frozen):
    """A complete plan for one epoch; ``evaluate_plan`` re-checks it independently of the planner."""

    instances: tuple[Instance, ...]
    """Every instance with its GPUs, sorted by GPU id."""
    tiers: tuple[TierAllocation, ...]
    """Per-tier admission and capacity, in the input's tier order."""
    objective: float
    """``Σ w_t y_t − ε Σ g n − ε_s Σ g s − Σ β (d_up + d_down)`` of this plan."""
    objective_bound: float | None = None
    """Best bound the solver proved (MILP only)."""
    gap: float | None = None
    """Relative gap between objective and bound (MILP only)."""
    status: PlanStatus
    """How the plan was found; callers must handle FEASIBLE and FALLBACK."""
    solver: str | None = None
    """Solver backend and engine, e.g. ``ortools/scip`` (MILP only)."""
    solve_time_ms: float = Field(ge=0)
    """Wall time of the planner call, model build included."""
    message: str = ""
    """Why a fallback happened, or why the stabilizer kept the old plan."""
    provenance: Provenance
    """Hash of the input and the planner that ran."""

    def counts(self) -> dict[tuple[str, ServingConfig], int]:
        """``n[t,c]`` of the plan, and ``s[c]`` under tier ``"*"``."""
        return dict(Counter((i.tier, i.config) for i in self.instances))

    def shared_rates(self) -> dict[str, dict[ServingConfig, float]]:
        """``x[t,c]``: tier → config → rate on shared instances (tiers without shared rate left out)."""
        return {
            a.tier: {ServingConfig.parse(k): v for k, v in a.shared_rates_rps.items()}
            for a in self.tiers
            if a.shared_rates_rps
        }

    def tier_allocation(self, tier: str) -> TierAllocation:
        """Allocation of ``tier``."""
        for alloc in self.tiers:
            if alloc.tier == tier:
                return alloc
        raise KeyError(f"plan has no tier {tier!r}")

    @property
    def gpus_used(self) -> int:
        """GPUs held by instances."""
        return sum(i.tp for i in self.instances)

    def as_current(self) -> CurrentPlan:
        """This plan as the ``current_plan`` of the next epoch's input."""
        groups: dict[tuple[str, ServingConfig], list[tuple[int, ...]]] = {}
        for inst in self.instances:
            groups.setdefault((inst.tier, inst.config), []).append(inst.gpu_ids)
        return CurrentPlan(
            counts=tuple(
                InstanceCount(tier=t, config=c, count=len(ids)) for (t, c), ids in sorted(groups.items(), key=_k)
            ),
            gpu_ids={f"{t}/{c.key}": tuple(ids) for (t, c), ids in sorted(groups.items(), key=_k)},
        )


def _k(item: tuple[tuple[str, ServingConfig], object]) -> tuple[str, int, str]:
    (tier, config), _ = item
    return (tier, config.tp, config.role.value)
