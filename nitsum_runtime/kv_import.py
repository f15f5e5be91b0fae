"""KV import into a vLLM engine: the logic of the Nitsum KV connector, free of vLLM (tested on CPU).

:mod:`nitsum_runtime.kv_connector` is the thin vLLM 0.26 ``KVConnectorBase_V1`` shell that vLLM loads
(``kv_transfer_config={"kv_connector": "NitsumKvConnector", "kv_connector_module_path":
"nitsum_runtime.kv_connector", "kv_role": "kv_both"}``); everything it does is here:

* **How a request says it has KV waiting**: its ``SamplingParams.extra_args["kv_transfer_params"]`` holds
  ``{"nitsum_kv_import": {"key": ..., "num_tokens": n}}`` (vLLM 0.26 copies that dict to
  ``Request.kv_transfer_params``, ``v1/request.py``, which the scheduler's connector reads). ``key`` names the
  staged KV in the target's workers; ``n`` tokens (prompt then output) are staged.
* **Scheduler side** (:class:`ImportScheduler`, in the engine-core process): ``get_num_new_matched_tokens``
  reports ``min(n, num_tokens - 1) - num_computed`` tokens as external hits, loaded synchronously (vLLM
  always computes at least the last token: it is re-run and samples the next one);
  ``update_state_after_alloc`` records the request's block ids; ``build_connector_meta`` hands the step's
  imports (:class:`ImportJob`) to the workers and forgets them.
* **Worker side** (:class:`ImportWorker`, in every TP worker): the staged KV of this rank
  (:data:`STAGED`, filled by the worker extension's ``nitsum_kv_stage`` and the controller's copy) is
  written into the blocks vLLM allocated, all layers, before the forward pass of that step
  (``start_load_kv``, on the current stream, so the forward sees it). A missing or short stage reports the
  request's blocks as failed loads (vLLM then recomputes them with ``kv_load_failure_policy="recompute"``).

Staged KV is **head-major**: ``[heads_local, layers, tokens, 2 * head_dim]`` (K then V in the last axis, as in
vLLM's FlashAttention cache), so that each (source rank, target rank) head range of
:func:`~nitsum_runtime.kv_migration.kv_transfer_plan` is one contiguous copy
(:func:`nitsum_runtime.kv_copy.copy_heads`). The paged caches are vLLM 0.26's FlashAttention layout: logical
``[blocks, heads, block_size, 2*head_dim]``, NHD in memory (:mod:`nitsum_runtime.kv_migration`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nitsum_runtime.kv_arena import worker_arena
from nitsum_runtime.kv_ticket import ImportTicket, ticket_of


def matched_tokens(staged_tokens: int, request_tokens: int, num_computed_tokens: int) -> int:
    """External hits to report: staged tokens beyond those already computed, never the request's last token
    (vLLM computes at least one token per request; ``num_computed + hits <= num_tokens - 1``)."""
    return max(0, min(staged_tokens, request_tokens - 1) - num_computed_tokens)


def layer_order(names: Sequence[str]) -> list[str]:
    """Attention layer names in model order (by the integers in the name, e.g. ``model.layers.10.self_attn.attn``
    after ``...9...``)."""
    return sorted(names, key=lambda n: ([int(x) for x in re.findall(r"\d+", n)], n))


def slots_of(block_ids: Sequence[int], block_size: int, first_token: int, num_tokens: int) -> list[int]:
    """Cache slots of tokens ``first_token .. first_token + num_tokens - 1`` of a request holding ``block_ids``."""
    end = first_token + num_tokens
    if end > len(block_ids) * block_size:
        raise ValueError(f"tokens up to {end} do not fit in {len(block_ids)} blocks of {block_size}")
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(first_token, end)]


def nhd_views(caches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """vLLM's per-layer caches (logical ``[blocks, heads, block_size, 2*head_dim]``) as contiguous NHD
    ``[blocks, block_size, heads, 2*head_dim]`` views; refuses any other layout."""
    out = []
    for c in caches:
        if c.dim() != 4:
            raise ValueError(f"KV cache of shape {tuple(c.shape)}: want vLLM FlashAttention's 4-D layout")
        v = c.transpose(1, 2)
        if not v.is_contiguous():
            raise ValueError(
                f"KV cache of shape {tuple(c.shape)} and strides {c.stride()} is not NHD in memory; unset "
                "VLLM_KV_CACHE_LAYOUT and use the FlashAttention backend"
            )
        out.append(v)
    return out


def write_staged(
    nhd: Sequence[torch.Tensor], staged: torch.Tensor, slots: torch.Tensor, first_token: int, num_tokens: int
) -> int:
    """Write staged tokens ``first_token ..`` (head-major ``[heads, layers, tokens, width]``) into ``slots`` of
    every layer's NHD cache; returns the bytes written."""
    heads, layers, _, width = staged.shape
    if layers != len(nhd) or heads != nhd[0].shape[2] or width != nhd[0].shape[3]:
        raise ValueError(
            f"staged KV [heads {heads}, layers {layers}, width {width}] does not match the cache "
            f"[layers {len(nhd)}, heads {nhd[0].shape[2]}, width {nhd[0].shape[3]}]"
        )
    part = staged.narrow(2, first_token, num_tokens)
    for layer, cache in enumerate(nhd):
        flat = cache.view(cache.shape[0] * cache.shape[1], heads, width)
        flat.index_copy_(0, slots, part[:, layer].transpose(0, 1))
    return part.numel() * part.element_size()


def gather_head_major(
    nhd: Sequence[torch.Tensor], slots: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A request's KV (``slots``) from NHD caches, head-major ``[heads, layers, tokens, width]``, into ``out``
    (e.g. a range of the worker's arena) or a new tensor."""
    heads, width = nhd[0].shape[2], nhd[0].shape[3]
    shape = (heads, len(nhd), slots.numel(), width)
    if out is None:
        out = torch.empty(shape, dtype=nhd[0].dtype, device=nhd[0].device)
    elif tuple(out.shape) != shape or out.dtype != nhd[0].dtype:
        raise ValueError(f"export buffer {tuple(out.shape)} {out.dtype} does not match the KV {shape} {nhd[0].dtype}")
    for layer, cache in enumerate(nhd):
        flat = cache.view(cache.shape[0] * cache.shape[1], heads, width)
        out[:, layer] = flat.index_select(0, slots).transpose(0, 1)
    return out


@dataclass(frozen=True)
class ImportJob:
    """One request's import in one step (scheduler -> workers, inside the connector metadata)."""

    request_id: str
    key: str
    block_ids: tuple[int, ...]
    first_token: int
    """First token to write (tokens before it were computed locally)."""
    num_tokens: int


@dataclass
class ImportScheduler:
    """Scheduler-side state of the connector (see the module docstring)."""

    block_size: int
    pending: dict[str, tuple[ImportTicket, int]] = field(default_factory=dict)
    """Requests announced by ``get_num_new_matched_tokens``: ticket and tokens computed before the hit."""
    ready: list[ImportJob] = field(default_factory=list)
    """Jobs allocated this step (``update_state_after_alloc``), handed out by :meth:`build_jobs`."""
    imported: int = 0
    """Requests whose KV was handed to the workers so far."""

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        ticket = ticket_of(getattr(request, "kv_transfer_params", None))
        if ticket is None:
            return 0, False
        hits = matched_tokens(ticket.num_tokens, int(request.num_tokens), num_computed_tokens)
        if hits:
            self.pending[request.request_id] = (ticket, num_computed_tokens)
        return hits, False

    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        entry = self.pending.pop(request.request_id, None)
        if entry is None or num_external_tokens == 0:
            return
        ticket, first = entry
        if (first + num_external_tokens + self.block_size - 1) // self.block_size > len(block_ids):
            raise RuntimeError(
                f"request {request.request_id}: {first + num_external_tokens} tokens but only {len(block_ids)} "
                f"blocks of {self.block_size} allocated"
            )
        self.ready.append(ImportJob(request.request_id, ticket.key, tuple(block_ids), first, num_external_tokens))

    def build_jobs(self) -> tuple[ImportJob, ...]:
        jobs, self.ready = tuple(self.ready), []
        self.imported += len(jobs)
        return jobs

    def request_finished(self, request_id: str) -> None:
        self.pending.pop(request_id, None)


#: Staged KV of this worker process: key -> head-major tensor on this rank's GPU (see the module docstring).
STAGED: dict[str, torch.Tensor] = {}
STAGED_LOCK = threading.Lock()


@dataclass
class ImportWorker:
    """Worker-side state of the connector: the paged caches and the loads done."""

    block_size: int
    layer_names: list[str] = field(default_factory=list)
    nhd: list[torch.Tensor] = field(default_factory=list)
    failed_blocks: set[int] = field(default_factory=set)
    loaded: list[tuple[str, int, int]] = field(default_factory=list)
    """(request id, tokens, bytes) of every load, in order."""

    def register_kv_caches(self, kv_caches: Mapping[str, Any]) -> None:
        names = [n for n, c in kv_caches.items() if isinstance(c, torch.Tensor)]
        if len(names) != len(kv_caches):
            raise ValueError("the Nitsum KV connector takes attention layers only (one cache tensor per layer)")
        self.layer_names = layer_order(names)
        self.nhd = nhd_views([kv_caches[n] for n in self.layer_names])

    def load(self, jobs: Sequence[ImportJob]) -> None:
        """Write each job's staged KV into its blocks (and drop the stage); a missing stage marks the job's
        blocks failed (:meth:`take_failed_blocks`)."""
        arena = worker_arena()
        for job in jobs:
            with STAGED_LOCK:
                staged = STAGED.pop(job.key, None)
            if staged is not None and staged.shape[2] >= job.first_token + job.num_tokens:
                slots = slots_of(job.block_ids, self.block_size, job.first_token, job.num_tokens)
                index = torch.tensor(slots, dtype=torch.long, device=staged.device)
                n = write_staged(self.nhd, staged, index, job.first_token, job.num_tokens)
                self.loaded.append((job.request_id, job.num_tokens, n))
            else:
                self.failed_blocks.update(job.block_ids)
            if arena is not None:
                # The write above is queued on this stream; the range is reused only after a later stage or
                # export call, which this stream runs after it (and the stage call synchronises before answering).
                with STAGED_LOCK:
                    arena.give_back(job.key)

    def take_failed_blocks(self) -> set[int]:
        out, self.failed_blocks = self.failed_blocks, set()
        return out
