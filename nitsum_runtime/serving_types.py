"""What the serving loop (:mod:`nitsum_runtime.serving`) takes and returns: tiered requests, per-request results."""

from __future__ import annotations

from dataclasses import dataclass, field

from nitsum_opt.models.spec import Role
from nitsum_opt.sim.deployment import Deployment
from nitsum_runtime.replay import ReplayRequest, RequestTiming


@dataclass(frozen=True, slots=True)
class TieredRequest(ReplayRequest):
    """A request to serve: arrival, lengths and its tier."""

    tier: str
    """Tier name (one of the server's tiers)."""


@dataclass
class ServingResult:
    """Per-request timings (indexed like the requests) and how the run went; ``timings`` / ``late_adds`` /
    ``aborted`` mean what they mean in :class:`~nitsum_runtime.replay.ReplayResult`."""

    timings: list[RequestTiming]
    classes: list[int]
    """Class the scheduler gave each request at arrival (:class:`~nitsum_opt.scheduler.RequestClass`)."""
    late_adds: list[float] = field(default_factory=list)
    """Per request: seconds from arrival until an engine got it (central queue + a step in progress); NaN if
    never dispatched."""
    steps: dict[str, int] = field(default_factory=dict)
    """Engine steps per instance (its :attr:`DeployedInstance.key`)."""
    handoffs: int = 0
    """Requests handed from a prefill to a decode instance."""
    migrated: int = 0
    """Of those, moved with their KV (the rest re-prefilled on the decode engine)."""
    leave_s: list[float] = field(default_factory=list)
    """Wall seconds of each batch of hand-offs leaving a prefill engine (vLLM: KV gathered into its buffers,
    requests dropped; the prefill engine waits for this)."""
    arrive_s: list[float] = field(default_factory=list)
    """Wall seconds of each batch of hand-offs arriving at a decode engine (vLLM: buffers staged, KV copied,
    requests added; the decode engine waits for this)."""
    busy_s: dict[str, float] = field(default_factory=dict)
    """Per instance: seconds its engine was stepping (from the step command to its answer)."""
    engine_s: dict[str, float] = field(default_factory=dict)
    """Per instance: of ``busy_s``, seconds inside the engine's own step (vLLM engines report it; the rest is
    output processing, the pipe and the controller)."""
    step_log: list[tuple[str, float, float, int, int, int, int, int]] = field(default_factory=list)
    """With ``log_steps``, one row per engine step: instance, round trip (the step command's wall time over its
    steps), seconds inside vLLM's step, then the step's composition in the latency model's terms
    (``num_prefill_seqs, prefill_tokens, prefill_attention_pairs, num_decode_seqs, decode_context_tokens``)."""
    step_budgets: dict[str, int | None] = field(default_factory=dict)
    """Per instance: the step token budget its engine was last given (``None``: the engine cannot change it)."""
    aborted: int = 0
    """Requests aborted at the drain limit (in an engine)."""
    never_dispatched: int = 0
    """Requests still held by the scheduler at the drain limit."""
    max_held: int = 0
    """Most requests held centrally at once."""
    wall_s: float = 0.0
    """Seconds from the start to the end of the run."""


def check_servable(deployment: Deployment) -> None:
    """Raise ``ValueError`` when ``deployment`` has prefill instances but nothing that can take their hand-offs."""
    roles = {i.role for i in deployment.instances}
    if Role.PREFILL in roles and Role.DECODE not in roles:
        raise ValueError(
            f"deployment {deployment.label or deployment.describe()!r} has prefill instances but no decode "
            "instance to hand requests to; add a decode instance or make the prefill instances colocated"
        )


__all__ = ["ServingResult", "TieredRequest", "check_servable"]
