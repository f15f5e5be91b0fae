"""Persistent KV exchange buffers: one arena per vLLM worker, exported over CUDA IPC once.

A KV migration between two vLLM engines goes through buffers in the engines' workers: the source's workers
export each request's KV head-major, the target's workers stage buffers their KV connector reads
(:mod:`nitsum_runtime.kv_mover`). Allocating those buffers per migration means a fresh CUDA IPC export per
request, which the controller must open (measured on H200: first open 241-288 ms, first copy 4-5x slower than
later ones). Instead every worker keeps one :class:`KvArena`: a byte buffer allocated once, whose IPC handle the
controller opens once (at pool start, :meth:`~nitsum_runtime.vllm_pool_kv.KvPort.warm_kv_path`); exports and
stages are then byte ranges of it, described by a :data:`KvRef` (arena id, offset, shape, dtype). A request
that does not fit in the free space falls back to its own buffer (a ``{"ipc": handle}`` ref), so an arena
bounds memory, never correctness.

Who owns the bytes matters (H200, ``benchmarks/gpu/ipc_copy_bench.py``): the controller's copy *into* a buffer
another process exported runs at a tenth of NVLink bandwidth when it crosses GPUs, while reading one, and any
copy within one GPU, is full speed. So the controller allocates each worker's arena on the worker's GPU and
hands it over (``nitsum_kv_arena`` with an offer): the worker allocates ranges and writes exports into it
within its GPU, the controller's cross-GPU copies write into its own memory, and the connector reads stages
within the GPU. A worker offered nothing allocates its own arena (the controller then opens it over IPC).

The arena is allocated by torch's caching allocator, outside vLLM's sleep-mode memory pool, so it survives the
engine's sleep at level 2 (as the resident weight store's mappings do). :class:`RangeAllocator` is plain Python
(tested with hypothesis); :class:`KvArena` is torch only and runs on CPU too.
"""

from __future__ import annotations

import bisect
import uuid
from typing import Any

import torch

#: Offsets are multiples of this (any dtype view of a range is aligned; 512 B suits DMA).
ALIGN_BYTES = 512

#: A description of one exported or staged tensor that crosses the RPC layer (plain JSON values): either
#: ``{"ipc": handle}`` (its own CUDA IPC buffer) or ``{"arena": id, "offset": bytes, "shape": [...],
#: "dtype": "bfloat16"}`` (a range of a worker's arena).
KvRef = dict[str, Any]


class RangeAllocator:
    """First-fit allocation of byte ranges, by key, in ``[0, capacity_bytes)``; offsets aligned to ``align``."""

    def __init__(self, capacity_bytes: int, align: int = ALIGN_BYTES) -> None:
        if capacity_bytes < 0 or align < 1:
            raise ValueError(f"capacity_bytes={capacity_bytes} must be >= 0 and align={align} >= 1")
        self.capacity_bytes, self.align = capacity_bytes, align
        self._starts: list[int] = []  # sorted offsets of live ranges
        self._ranges: dict[int, tuple[str, int]] = {}  # offset -> (key, size)
        self._by_key: dict[str, int] = {}  # key -> offset

    def alloc(self, key: str, nbytes: int) -> int | None:
        """Offset of a new range of ``nbytes`` for ``key``, or None when no gap is large enough."""
        if key in self._by_key:
            raise KeyError(f"key {key!r} already holds a range at offset {self._by_key[key]}")
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} must be >= 0")
        size = max(self.align, -(-nbytes // self.align) * self.align)
        cursor = 0
        for start in self._starts:
            if start - cursor >= size:
                break
            cursor = start + self._ranges[start][1]
        if cursor + size > self.capacity_bytes:
            return None
        bisect.insort(self._starts, cursor)
        self._ranges[cursor] = (key, size)
        self._by_key[key] = cursor
        return cursor

    def free(self, key: str) -> bool:
        """Give ``key``'s range back; False when it holds none."""
        offset = self._by_key.pop(key, None)
        if offset is None:
            return False
        del self._ranges[offset]
        self._starts.remove(offset)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    @property
    def used_bytes(self) -> int:
        """Bytes held by live ranges (alignment included)."""
        return sum(size for _, size in self._ranges.values())

    def ranges(self) -> list[tuple[int, int, str]]:
        """Live ranges as (offset, size, key), by offset."""
        return [(s, self._ranges[s][1], self._ranges[s][0]) for s in self._starts]


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (``"bfloat16"`` or ``"torch.bfloat16"``); a clear error otherwise."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a KV ref")
    return dtype


def view_range(buffer: torch.Tensor, ref: KvRef) -> torch.Tensor:
    """The tensor ``ref`` describes, as a view of the arena ``buffer`` (flat uint8)."""
    dtype = dtype_of(ref["dtype"])
    shape = [int(x) for x in ref["shape"]]
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    offset = int(ref["offset"])
    if offset < 0 or offset + nbytes > buffer.numel():
        raise ValueError(f"KV ref {ref} lies outside its arena of {buffer.numel()} bytes")
    return buffer.narrow(0, offset, nbytes).view(dtype).view(shape)


class KvArena:
    """A worker's exchange buffer (module docstring): ``capacity_bytes`` on ``device``, ranges by key."""

    def __init__(
        self,
        capacity_bytes: int,
        device: torch.device | str,
        buffer: torch.Tensor | None = None,
        arena_id: str | None = None,
    ) -> None:
        self.arena_id = arena_id or uuid.uuid4().hex
        """Name of this buffer for the controller's cache of opened arenas."""
        if buffer is not None and (
            buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != capacity_bytes
        ):
            raise ValueError(f"arena buffer {buffer.dtype} {tuple(buffer.shape)}: want {capacity_bytes} uint8 bytes")
        self.borrowed = buffer is not None
        """The bytes belong to another process (the controller's offer); this process never re-exports them."""
        self.buffer = buffer if buffer is not None else torch.empty(capacity_bytes, dtype=torch.uint8, device=device)
        """The bytes: allocated here, or another process's buffer opened here (module docstring)."""
        self.ranges = RangeAllocator(capacity_bytes)
        self._handle: list[Any] | None = None

    @property
    def capacity_bytes(self) -> int:
        return self.ranges.capacity_bytes

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, KvRef] | None:
        """A tensor of ``shape`` and ``dtype`` in the arena for ``key`` and its ref; None when it does not fit."""
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        offset = self.ranges.alloc(key, nbytes)
        if offset is None:
            return None
        ref: KvRef = {
            "arena": self.arena_id,
            "offset": offset,
            "shape": list(shape),
            "dtype": str(dtype).removeprefix("torch."),
        }
        return view_range(self.buffer, ref), ref

    def give_back(self, key: str) -> bool:
        """Free ``key``'s range (the caller guarantees no pending use of it); False when it has none."""
        return self.ranges.free(key)

    def describe(self) -> dict[str, Any]:
        """``{"id", "bytes", "handle"}``: what the controller needs to open the arena (handle made once; None
        for a borrowed buffer, which its owner has, and on CPU, where only this process can use the buffer)."""
        if self._handle is None and self.buffer.is_cuda and not self.borrowed:
            from nitsum_runtime.worker_ext import ipc_handle

            self._handle = ipc_handle(self.buffer)
        return {"id": self.arena_id, "bytes": self.capacity_bytes, "handle": self._handle}


#: This worker process's arena (set by the worker extension; read by the KV connector to free staged ranges).
WORKER_ARENA: list[KvArena] = []


def worker_arena() -> KvArena | None:
    """The arena of this worker process, if one was made."""
    return WORKER_ARENA[0] if WORKER_ARENA else None
