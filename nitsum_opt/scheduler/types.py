"""Typed configuration of the multi-tier request scheduler (see :mod:`nitsum_opt.scheduler.policy`)."""

from __future__ import annotations

from enum import IntEnum
from typing import Self

from pydantic import Field, model_validator

from nitsum_opt.models.spec import Frozen, Role


class RequestClass(IntEnum):
    """Why a request is served, which decides its place in the queues (lower value = served first)."""

    FEASIBLE = 0
    """Admitted within its tier's planned rate ``y_t``: the plan sized capacity for it (SLO guaranteed)."""
    BEST_EFFORT = 1
    """Above its tier's admitted rate: served on spare SLO-safe capacity, after every feasible request."""
    BACKGROUND = 2
    """Best-effort that waited in the central queue past its TTFT target: it can no longer meet the SLO, so it is
    served last (never dropped) and does not take capacity from requests that still can."""


class SchedulerInstance(Frozen):
    """One engine as the scheduler sees it."""

    instance_id: str = Field(min_length=1)
    """Stable id (e.g. the plan's ``<tier>/<config>/<k>``)."""
    tier: str | None
    """Tier the instance is dedicated to; ``None`` = it serves every tier (untiered deployments)."""
    role: Role
    """Prefill, decode or colocated: prefill-capable instances take new requests, decode-capable ones hand-offs."""
    slo_safe_seqs: int = Field(ge=1)
    """Requests the instance can hold at once while its tier's SLO still holds (the spare-capacity bound)."""
    tier_seqs: dict[str, int] | None = None
    """Requests of each tier's length mix the instance could hold at once while *its own* tier's SLO still holds
    (e.g. ``{"chat": 130, "batch": 40}`` on a chat instance: batch requests have longer contexts). A request of
    tier ``u`` then takes ``slo_safe_seqs / tier_seqs[u]`` of the instance's ``slo_safe_seqs`` seats, so requests
    spilled in from a tier with heavier requests cannot push the host tier past its SLO (``0``: requests of
    ``u`` never go there; a tier left out takes one seat). ``None``: every request takes one seat."""

    @property
    def takes_prompts(self) -> bool:
        """Whether new requests (prompts) can be dispatched to it."""
        return self.role is not Role.DECODE

    @property
    def takes_handoffs(self) -> bool:
        """Whether a prefill instance can hand a request's KV to it."""
        return self.role is Role.DECODE


class TierPolicy(Frozen):
    """One tier's admission and priority."""

    name: str = Field(min_length=1)
    """Tier name."""
    admitted_rps: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """``y_t``: requests/s admitted as feasible (token bucket); ``None`` = admit everything (no admission control)."""
    ttft_slo_ms: float = Field(gt=0, allow_inf_nan=False)
    """TTFT target; a best-effort request waiting centrally longer than this is demoted to background."""
    tpot_slo_ms: float = Field(gt=0, allow_inf_nan=False)
    """TPOT target (with ``ttft_slo_ms`` it decides which tiers' instances are at least as strict)."""
    priority: int = Field(default=0, ge=0)
    """Rank in an engine's queue when tier priority is on (0 = first)."""


class SchedulerConfig(Frozen):
    """Everything the scheduler needs for one plan."""

    tiers: tuple[TierPolicy, ...] = Field(min_length=1)
    """Every tier (requests of an unknown tier are an error)."""
    instances: tuple[SchedulerInstance, ...]
    """Every running engine."""
    tier_priority: bool = True
    """Order an engine's waiting queue by (class, tier priority, arrival); off = (class, arrival)."""
    spill_over: bool = True
    """Let best-effort requests use spare SLO-safe capacity of other tiers' instances."""
    central_queue: bool = True
    """Hold best-effort requests that find no spare capacity in the scheduler (dispatched when capacity frees);
    off = queue them at the least-loaded instance of their tier."""
    burst_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    """Token-bucket depth in seconds of the admitted rate (at least one request)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"scheduler tiers must be unique, got {names}")
        ids = [i.instance_id for i in self.instances]
        if len(set(ids)) != len(ids):
            raise ValueError(f"instance ids must be unique, got {ids}")
        for inst in self.instances:
            if inst.tier is not None and inst.tier not in names:
                raise ValueError(f"instance {inst.instance_id!r} serves tier {inst.tier!r}, not among {names}")
            unknown = sorted(set(inst.tier_seqs or {}) - set(names))
            if unknown:
                raise ValueError(
                    f"instance {inst.instance_id!r} gives tier_seqs for unknown tiers {unknown}; tiers: {names}"
                )
            negative = sorted(k for k, v in (inst.tier_seqs or {}).items() if v < 0)
            if negative:
                raise ValueError(f"instance {inst.instance_id!r}: tier_seqs must be >= 0, got {negative} below 0")
        return self
