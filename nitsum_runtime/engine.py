"""The ``Engine`` protocol the pool and the transition executor drive, and the values that cross it.

Two implementations: :class:`nitsum_runtime.reference_engine.ReferenceEngine` (plain torch, CPU and GPU) and
:class:`nitsum_runtime.vllm_pool_engine.VllmEngine` (a vLLM engine in its own process). This module imports
neither torch nor vLLM. An engine is one TP group of GPUs running one model copy;
it is *asleep* (no weights, no KV: memory free for other engines), *awake* (serving) or *paused* (awake,
requests kept, no progress). A request leaves an engine as a :class:`RequestSnapshot` (tokens so far and where
its KV lives) and joins another by :meth:`Engine.import_requests`, either with its KV migrated from the source
engine or re-prefilled from its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pydantic import Field

from nitsum_opt.models.spec import Frozen


class EngineError(RuntimeError):
    """An engine operation failed; the message names the engine, the rank and the cause."""


class EngineCapacityError(EngineError):
    """The engine has no room (KV blocks or memory) for what was asked."""


class TopK(Frozen):
    """Top-k next-token log-probabilities of one row (ids sorted by decreasing log-probability)."""

    token_ids: tuple[int, ...]
    """Most likely next tokens; the first is the greedy choice."""
    logprobs: tuple[float, ...]
    """Their log-probabilities (float32 log-softmax over the whole vocabulary)."""


class EngineState(StrEnum):
    """Lifecycle of an engine."""

    ASLEEP = "asleep"
    """Weights and KV cache released."""
    AWAKE = "awake"
    """Serving: :meth:`Engine.step` makes progress."""
    PAUSED = "paused"
    """Awake but not stepping; requests and their KV are kept."""


class GenerationRequest(Frozen):
    """A request as the runtime sees it: token ids in, greedy tokens and top-k log-probabilities out."""

    request_id: str = Field(min_length=1)
    """Unique id."""
    prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    """Prompt tokens."""
    max_tokens: int = Field(ge=1)
    """Tokens to generate."""
    top_k: int = Field(default=5, ge=0)
    """Log-probabilities returned per generated token; 0: none (serving: the engine skips computing them, and
    every :class:`TokenEvent` of the request has an empty ``top``)."""
    prompt_logprobs: bool = False
    """Also return the top-k of every prompt position (teacher-forced scoring)."""


class TokenEvent(Frozen):
    """One generated token."""

    request_id: str
    """Request it belongs to."""
    index: int = Field(ge=0)
    """Position in the request's output (0 = first generated token)."""
    token_id: int = Field(ge=0)
    """The greedy token."""
    top: TopK
    """Top-k next-token log-probabilities this token was chosen from."""
    finished: bool
    """Whether this was the last token."""
    engine_id: str
    """Engine that produced it."""
    prompt_top: tuple[TopK, ...] = ()
    """With ``prompt_logprobs``: top-k after each prompt position but the last (first event only)."""


class KvDescriptor(Frozen):
    """Where a request's KV lives in its engine."""

    engine_id: str
    """Engine holding it."""
    gpu_ids: tuple[int, ...]
    """The engine's GPUs (world ranks of the node), TP rank order."""
    block_ids: tuple[int, ...]
    """Its blocks, in order."""
    num_tokens: int = Field(ge=0)
    """Tokens with KV in the cache."""
    block_size: int = Field(ge=1)
    """Tokens per block."""


class RequestSnapshot(Frozen):
    """Everything needed to continue a request on another engine."""

    request: GenerationRequest
    """The original request."""
    output_token_ids: tuple[int, ...]
    """Tokens generated so far."""
    num_computed_tokens: int = Field(ge=0)
    """Tokens (prompt then output) whose KV is cached."""
    kv: KvDescriptor | None
    """Where that KV is (None when nothing is cached)."""

    @property
    def all_token_ids(self) -> tuple[int, ...]:
        """Prompt followed by the output so far."""
        return self.request.prompt_token_ids + self.output_token_ids


class ImportResult(Frozen):
    """What :meth:`Engine.import_requests` did."""

    migrated: int = Field(ge=0)
    """Requests whose KV was migrated."""
    reprefilled: int = Field(ge=0)
    """Requests that will recompute their KV."""
    bytes_moved: int = Field(ge=0)
    """KV bytes written into this engine's caches (remote and local copies)."""
    seconds: float = Field(ge=0)
    """Wall time."""


class FillSummary(Frozen):
    """What :meth:`Engine.fill_weights` did, over all ranks."""

    bytes_copied: int = Field(ge=0)
    """Bytes copied from the resident stores, all ranks together."""
    seconds: float = Field(ge=0)
    """Wall time of the call (ranks fill in parallel)."""


@runtime_checkable
class Engine(Protocol):
    """One TP group of GPUs serving one model copy."""

    @property
    def engine_id(self) -> str:
        """Stable id, e.g. ``tp2-g0-1``."""
        ...

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        """GPUs (node-local ids), TP rank order."""
        ...

    @property
    def state(self) -> EngineState:
        """Current lifecycle state."""
        ...

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a new request (engine awake or paused)."""
        ...

    def step(self) -> list[TokenEvent]:
        """One iteration; no-op returning ``[]`` unless awake."""
        ...

    def request_ids(self) -> tuple[str, ...]:
        """Unfinished requests it holds."""
        ...

    def pause(self) -> None:
        """Stop stepping; keep requests and KV."""
        ...

    def resume(self) -> None:
        """Step again after :meth:`pause`."""
        ...

    def sleep(self) -> None:
        """Release weights and KV; the engine must hold no request."""
        ...

    def wake(self) -> None:
        """Allocate weights and KV; weights are undefined until :meth:`fill_weights`."""
        ...

    def fill_weights(self) -> FillSummary:
        """Copy each rank's shard from the resident weight store on its GPU (never from disk)."""
        ...

    def export_requests(self, request_ids: Sequence[str]) -> list[RequestSnapshot]:
        """Snapshots of held requests (the engine keeps them until :meth:`drop_requests`)."""
        ...

    def can_migrate_from(self, source: Engine) -> bool:
        """Whether KV can be pulled from ``source`` (else requests from it are re-prefilled)."""
        ...

    def import_requests(self, snapshots: Sequence[RequestSnapshot], kv_source: Engine | None) -> ImportResult:
        """Take requests over: migrate their KV from ``kv_source``, or re-prefill them when it is None.
        All or nothing: on failure no request is left half-imported."""
        ...

    def drop_requests(self, request_ids: Sequence[str]) -> None:
        """Forget requests and free their KV."""
        ...
