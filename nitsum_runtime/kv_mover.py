"""The controller's part of a KV migration between two vLLM engines: copy staged KV over CUDA IPC.

Each engine process sees only its own GPUs (``CUDA_VISIBLE_DEVICES``), so neither side can open the other's
buffers when, say, a TP4 engine on GPUs 0-3 hands requests to a TP1 engine on GPU 0. The controller (the
process holding the resident weight stores, which sees every GPU of the node) can: the source's workers
export head-major copies of each request's KV (``nitsum_kv_export``), the target's workers allocate the
buffers their KV connector will read (``nitsum_kv_stage``), and :func:`move_staged` opens both sets of CUDA
IPC handles here and runs :func:`~nitsum_runtime.kv_migration.kv_transfer_plan` as contiguous device copies
(peer to peer over NVLink across GPUs). Imports torch only (no vLLM).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_runtime.kv_import import copy_heads
from nitsum_runtime.kv_migration import kv_transfer_plan


class MoveStats(Frozen):
    """One migration's copies, all requests together."""

    bytes_remote: int = Field(ge=0)
    """Bytes copied between different GPUs."""
    bytes_local: int = Field(ge=0)
    """Bytes copied within one GPU."""
    copy_s: float = Field(ge=0)
    """Wall time of the copies, devices synchronised (handles opened before the clock starts)."""
    open_s: float = Field(ge=0)
    """Wall time of opening the IPC handles."""

    @property
    def gb_per_s(self) -> float:
        """Bytes moved (remote + local) per second of copy."""
        return (self.bytes_remote + self.bytes_local) / self.copy_s / 1e9 if self.copy_s > 0 else 0.0


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


#: Size of the buffer each cross-GPU copy goes through on the target GPU (see :func:`copy_heads`: writing into
#: another process's CUDA IPC buffer across GPUs runs at a tenth of the NVLink bandwidth).
BOUNCE_BYTES = 64 * 2**20


def controller_sees_gpus() -> bool:
    """Whether this process can open CUDA IPC handles at all (a CUDA build with a GPU)."""
    return torch.cuda.is_available()


def move_staged(
    num_kv_heads: int,
    keys: Sequence[str],
    exported: Sequence[dict[str, Any]],
    staged: Sequence[dict[str, Any]],
    src_gpus: Sequence[int],
    dst_gpus: Sequence[int],
    open_tensor: Callable[[list[Any], str], torch.Tensor] | None = None,
) -> MoveStats:
    """Copy every key's KV from the source ranks' exports to the target ranks' stages.

    ``exported`` / ``staged``: the per-rank answers of ``nitsum_kv_export`` / ``nitsum_kv_stage`` (``rank``,
    ``uuid``, ``handles`` by key); ``src_gpus`` / ``dst_gpus``: the engines' node GPU ids in TP rank order
    (the plan's world ranks). ``open_tensor(handle, uuid)`` opens one buffer (default: CUDA IPC)."""
    opener = open_tensor or _open_cuda
    t0 = time.perf_counter()
    src = {src_gpus[a["rank"]]: {k: opener(a["handles"][k], a["uuid"]) for k in keys} for a in exported}
    dst = {dst_gpus[a["rank"]]: {k: opener(a["handles"][k], a["uuid"]) for k in keys} for a in staged}
    if set(src) != set(src_gpus) or set(dst) != set(dst_gpus):
        raise RuntimeError(f"answers from ranks on GPUs {sorted(src)} -> {sorted(dst)}, want {src_gpus} -> {dst_gpus}")
    open_s = time.perf_counter() - t0
    plan = kv_transfer_plan(num_kv_heads, src_gpus, dst_gpus)
    devices = {t.device for per in (*src.values(), *dst.values()) for t in per.values() if t.is_cuda}
    _sync(devices)
    t1 = time.perf_counter()
    remote = local = 0
    for k in keys:
        r, lo = copy_heads(
            plan,
            {g: b[k] for g, b in src.items()},
            {g: b[k] for g, b in dst.items()},
            bounce_bytes=BOUNCE_BYTES if devices else 0,
        )
        remote, local = remote + r, local + lo
    _sync(devices)
    copy_s = time.perf_counter() - t1
    del src, dst  # close the IPC mappings before the owners free the buffers
    return MoveStats(bytes_remote=remote, bytes_local=local, copy_s=copy_s, open_s=open_s)


def _sync(devices: set[torch.device]) -> None:
    for d in devices:
        torch.cuda.synchronize(d)


def _open_cuda(handle: list[Any], uuid: str) -> torch.Tensor:
    from nitsum_runtime.worker_ext import open_ipc_tensor

    return open_ipc_tensor(handle, device_of_uuid(uuid))
