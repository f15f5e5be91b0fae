"""The controller's part of a KV migration between two vLLM engines: copy staged KV over CUDA IPC.

Each engine process sees only its own GPUs (``CUDA_VISIBLE_DEVICES``), so neither side can open the other's
buffers when, say, a TP4 engine on GPUs 0-3 hands requests to a TP1 engine on GPU 0. The controller (the
process holding the resident weight stores, which sees every GPU of the node) can: the source's workers
export head-major copies of each request's KV (``nitsum_kv_export``), the target's workers make the buffers
their KV connector will read (``nitsum_kv_stage``), and :func:`move_staged` resolves both sides' refs and runs
:func:`~nitsum_runtime.kv_migration.kv_transfer_plan` as contiguous device copies (peer to peer over NVLink
across GPUs; :mod:`nitsum_runtime.kv_copy`). The buffers are ranges of each worker's persistent arena
(:mod:`nitsum_runtime.kv_arena`), which this process allocated on the worker's GPU and handed over at engine
start (:data:`ARENAS`), so its copies write memory it owns; only a request too large for the free space gets
buffers of its own, exported by the worker, opened for that migration and written through bounce buffers.
Imports torch only (no vLLM).
"""

from __future__ import annotations

import functools
import time
import uuid as uuid_mod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_runtime.kv_arena import view_range
from nitsum_runtime.kv_copy import CopyStreams, copy_heads
from nitsum_runtime.kv_migration import kv_transfer_plan


class MoveStats(Frozen):
    """One migration's copies, all requests together."""

    bytes_remote: int = Field(ge=0)
    """Bytes copied between different GPUs."""
    bytes_local: int = Field(ge=0)
    """Bytes copied within one GPU."""
    link_bytes: int = Field(default=0, ge=0)
    """Bytes over the busiest GPU pair (source GPU -> target GPU, across GPUs): what point-to-point bandwidth
    bounds."""
    copy_s: float = Field(ge=0)
    """Wall time of the copies, devices synchronised (buffers opened before the clock starts)."""
    open_s: float = Field(ge=0)
    """Wall time of opening the buffers (CUDA IPC handles not opened before)."""
    arena_refs: int = Field(default=0, ge=0)
    """Buffers that were ranges of the engines' persistent arenas (the others were opened one by one)."""
    own_refs: int = Field(default=0, ge=0)
    """Buffers of their own (did not fit in an arena), opened for this migration."""

    @property
    def gb_per_s(self) -> float:
        """Bytes moved (remote + local) per second of copy."""
        return (self.bytes_remote + self.bytes_local) / self.copy_s / 1e9 if self.copy_s > 0 else 0.0

    @property
    def link_gb_per_s(self) -> float:
        """Bytes over the busiest GPU pair per second of copy (compare with point-to-point bandwidth)."""
        return self.link_bytes / self.copy_s / 1e9 if self.copy_s > 0 else 0.0


@functools.cache
def _visible_gpus() -> dict[str, int]:
    from nitsum_runtime.worker_ext import gpu_uuid

    return {gpu_uuid(i): i for i in range(torch.cuda.device_count())}


def device_of_uuid(uuid: str) -> int:
    """This process's index of the GPU with ``uuid``; the error lists the GPUs it sees."""
    seen = _visible_gpus()
    if uuid not in seen:
        raise RuntimeError(
            f"the controller does not see GPU {uuid} (it sees {sorted(seen)}); KV migration between vLLM engines "
            "needs a controller with every GPU of the node visible"
        )
    return seen[uuid]


#: Size of each of the two buffers a cross-GPU copy into a buffer this process does not own goes through on the
#: target GPU (:mod:`nitsum_runtime.kv_copy`: writing into another process's CUDA IPC buffer across GPUs runs at a
#: tenth of the NVLink bandwidth).
BOUNCE_BYTES = 64 * 2**20


def controller_sees_gpus() -> bool:
    """Whether this process can open CUDA IPC handles at all (a CUDA build with a GPU)."""
    return torch.cuda.is_available()


#: Opens one buffer: ``(ref or arena description, GPU UUID) -> tensor`` (an arena opens as flat uint8).
Opener = Callable[[dict[str, Any], str], torch.Tensor]


class ArenaCache:
    """The engines' arenas known to this process, by arena id: the ones it owns (made by :meth:`offer` and
    handed to the workers, the normal case) and ones a worker allocated itself, opened once when first seen.
    An engine's arenas are dropped when it goes away (:meth:`forget`)."""

    def __init__(self) -> None:
        self.opened: dict[str, torch.Tensor] = {}
        self.owned: set[str] = set()

    def offer(self, devices: Sequence[int], capacity_bytes: int) -> dict[str, list[Any]]:
        """Allocate one arena of ``capacity_bytes`` on each CUDA device of ``devices`` (this process's
        numbering) and return the offer for ``nitsum_kv_arena``: GPU UUID -> ``[arena id, CUDA IPC handle]``."""
        from nitsum_runtime.worker_ext import gpu_uuid, ipc_handle

        offers: dict[str, list[Any]] = {}
        for d in devices:
            buffer = torch.empty(capacity_bytes, dtype=torch.uint8, device=torch.device("cuda", d))
            arena_id = uuid_mod.uuid4().hex
            self.opened[arena_id] = buffer
            self.owned.add(arena_id)
            offers[gpu_uuid(d)] = [arena_id, ipc_handle(buffer)]
        return offers

    def open(self, arena: dict[str, Any], uuid: str, opener: Opener) -> torch.Tensor:
        """The arena's bytes here: an owned or already opened one as is, else opened now with ``opener``."""
        got = self.opened.get(arena["id"])
        if got is not None:
            return got
        got = opener(arena, uuid)
        if got.dtype != torch.uint8 or got.dim() != 1 or got.numel() != int(arena["bytes"]):
            raise RuntimeError(
                f"arena {arena['id']} opened as {got.dtype} {tuple(got.shape)}, want {arena['bytes']} bytes (uint8)"
            )
        self.opened[arena["id"]] = got
        return got

    def forget(self, arena_ids: Sequence[str]) -> None:
        """Drop arenas whose engine went away (its process must be gone before an owned arena is freed)."""
        for a in arena_ids:
            self.opened.pop(a, None)
            self.owned.discard(a)


#: The controller's arenas (one process drives the pool).
ARENAS = ArenaCache()


@dataclass
class Resolved:
    """One side's buffers of a migration, by node GPU and key (:func:`resolve_refs`)."""

    tensors: dict[int, dict[str, torch.Tensor]]
    in_arena: int = 0
    """Buffers that are ranges of arenas."""
    own: int = 0
    """Buffers of their own (opened one by one)."""
    foreign: set[str] = field(default_factory=set)
    """Keys with a buffer this process does not own (writing into those across GPUs needs the bounce)."""


def resolve_refs(
    answers: Sequence[dict[str, Any]],
    keys: Sequence[str],
    gpus: Sequence[int],
    opener: Opener,
    arenas: ArenaCache,
) -> Resolved:
    """Each rank's buffers by node GPU and key, from the ranks' export/stage answers (``rank``, ``uuid``,
    ``arena``, ``refs``)."""
    out = Resolved(tensors={})
    for a in answers:
        tensors = {}
        for k in keys:
            ref = a["refs"][k]
            if "arena" in ref:
                if a.get("arena") is None or a["arena"]["id"] != ref["arena"]:
                    raise RuntimeError(f"rank {a['rank']}: ref of {k!r} names arena {ref['arena']} it did not describe")
                tensors[k] = view_range(arenas.open(a["arena"], a["uuid"], opener), ref)
                out.in_arena += 1
                if ref["arena"] not in arenas.owned:
                    out.foreign.add(k)
            else:
                tensors[k] = opener(ref, a["uuid"])
                out.own += 1
                out.foreign.add(k)
        out.tensors[gpus[a["rank"]]] = tensors
    return out


def move_staged(
    num_kv_heads: int,
    keys: Sequence[str],
    exported: Sequence[dict[str, Any]],
    staged: Sequence[dict[str, Any]],
    src_gpus: Sequence[int],
    dst_gpus: Sequence[int],
    open_tensor: Opener | None = None,
    arenas: ArenaCache | None = None,
) -> MoveStats:
    """Copy every key's KV from the source ranks' exports to the target ranks' stages.

    ``exported`` / ``staged``: the per-rank answers of ``nitsum_kv_export`` / ``nitsum_kv_stage`` (``rank``,
    ``uuid``, ``arena``, ``refs`` by key, :data:`~nitsum_runtime.kv_arena.KvRef`); ``src_gpus`` / ``dst_gpus``:
    the engines' node GPU ids in TP rank order (the plan's world ranks). ``open_tensor(ref_or_arena, uuid)``
    opens one buffer (default: CUDA IPC); ``arenas``: the arenas known here (default: this process's).
    Targets this process owns are written directly; others through the bounce buffers
    (:mod:`nitsum_runtime.kv_copy`). Each GPU pair's copies run on streams of their own, side by side."""
    opener = open_tensor or _open_cuda
    cache = ARENAS if arenas is None else arenas
    t0 = time.perf_counter()
    src = resolve_refs(exported, keys, src_gpus, opener, cache)
    dst = resolve_refs(staged, keys, dst_gpus, opener, cache)
    if set(src.tensors) != set(src_gpus) or set(dst.tensors) != set(dst_gpus):
        raise RuntimeError(
            f"answers from ranks on GPUs {sorted(src.tensors)} -> {sorted(dst.tensors)}, want {src_gpus} -> {dst_gpus}"
        )
    open_s = time.perf_counter() - t0
    plan = kv_transfer_plan(num_kv_heads, src_gpus, dst_gpus)
    devices = {t.device for per in (*src.tensors.values(), *dst.tensors.values()) for t in per.values() if t.is_cuda}
    _sync(devices)
    t1 = time.perf_counter()
    remote = local = 0
    links: dict[tuple[int, int], int] = {}
    total_bytes = sum(t.numel() * t.element_size() for per in dst.tensors.values() for t in per.values())
    streams = CopyStreams.for_plan(plan, total_bytes)
    for k in keys:
        r, lo = copy_heads(
            plan,
            {g: b[k] for g, b in src.tensors.items()},
            {g: b[k] for g, b in dst.tensors.items()},
            bounce_bytes=BOUNCE_BYTES if devices and k in dst.foreign else 0,
            links=links,
            streams=streams,
        )
        remote, local = remote + r, local + lo
    streams.join()
    _sync(devices)
    copy_s = time.perf_counter() - t1
    counts = (src.in_arena + dst.in_arena, src.own + dst.own)
    del src, dst  # close the own buffers' IPC mappings before their owners free them (arenas stay)
    return MoveStats(
        bytes_remote=remote,
        bytes_local=local,
        link_bytes=max((n for (a, b), n in links.items() if a != b), default=0),
        copy_s=copy_s,
        open_s=open_s,
        arena_refs=counts[0],
        own_refs=counts[1],
    )


_WARM_PAIRS: set[tuple[int, int]] = set()


def warm_peers(devices: Sequence[int]) -> None:
    """One small copy between every ordered pair of ``devices`` and a side stream on each (once per process), so
    that the first migration pays neither for enabling peer access nor for torch's lazy stream pool (measured
    on 2 x H200: the first migration's copies took 19 ms for 138 MB, the next ones 0.4-0.7 ms)."""
    for d in devices:
        torch.cuda.Stream(torch.device("cuda", d))  # creates the device's stream pool on first use
    for a in devices:
        for b in devices:
            if a != b and (a, b) not in _WARM_PAIRS:
                x = torch.zeros(1 << 20, dtype=torch.uint8, device=torch.device("cuda", a))
                x.to(torch.device("cuda", b))
                _WARM_PAIRS.add((a, b))
    for d in devices:
        torch.cuda.synchronize(d)


def _sync(devices: set[torch.device]) -> None:
    for d in devices:
        torch.cuda.synchronize(d)


def _open_cuda(ref: dict[str, Any], uuid: str) -> torch.Tensor:
    """Open an own buffer (``{"ipc": handle}``) or an arena description (``{"id", "bytes", "handle"}``)."""
    from nitsum_runtime.worker_ext import open_ipc_tensor

    handle = ref.get("ipc", ref.get("handle"))
    if handle is None:
        raise RuntimeError(f"buffer {ref.get('id', ref)} has no CUDA IPC handle (made on CPU?)")
    return open_ipc_tensor(handle, device_of_uuid(uuid))
