"""vLLM worker extension: refill an engine's TP shard from the resident weight copy on the same GPU, and
read/write KV blocks, inside every vLLM worker (``collective_rpc``).

Load it with ``LLM(..., worker_extension_cls="nitsum_runtime.worker_ext.NitsumWorkerExtension")`` and call
``llm.collective_rpc("nitsum_fill_weights")``. vLLM 0.26 (``v1/worker/worker_base.py``) appends this class to
the worker's bases, refusing names the worker already has: every method here starts with ``nitsum_``. The
methods use ``self.model_runner.get_model()`` (unwrapped from CUDA graphs), ``self.model_runner.kv_caches``
(one tensor per layer) and ``self.device``, which both of vLLM 0.26's model runners provide.

Where the resident copy lives — a *store process* per node, not the engines: one process holds one full copy
on every GPU and publishes CUDA IPC handles (:func:`publish_store`), keyed by GPU UUID because each engine's
workers number their GPUs from 0 (``CUDA_VISIBLE_DEVICES``); a worker opens the handles of its own GPU once
(:meth:`NitsumWorkerExtension.nitsum_attach_store`) and every refill is then a device-to-device ``copy_`` of
narrowed views into its own parameters. Keeping the copy inside one engine's workers instead would duplicate
it for every engine on the GPU (TP1, TP2 and TP4 engines share GPU 0) and lose it when that engine sleeps at
level 2 or restarts; the IPC mapping costs no memory and survives the engines' sleep/wake cycles, because vLLM
only releases memory it allocated itself.

This module never imports vLLM at module level (it is imported in the controller too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.kv_migration import gather_kv, scatter_kv, token_slots
from nitsum_runtime.sharding import plan_mismatches, shard_plan
from nitsum_runtime.weights import ResidentWeightStore, fill_shard


def gpu_uuid(device_index: int) -> str:
    """Physical identity of a visible GPU (stable across ``CUDA_VISIBLE_DEVICES`` numberings)."""
    return str(torch.cuda.get_device_properties(device_index).uuid)


_CLASSES = {
    f"{c.__module__}.{c.__qualname__}": c
    for c in (torch.Tensor, torch.nn.Parameter, torch.TypedStorage, torch.UntypedStorage)
}


def _encode(args: tuple[Any, ...]) -> list[Any]:
    """torch's CUDA IPC rebuild arguments as JSON values (classes and dtypes by name, bytes as hex)."""
    out: list[Any] = []
    for a in args:
        if isinstance(a, type):
            out.append({"class": f"{a.__module__}.{a.__qualname__}"})
        elif isinstance(a, torch.dtype):
            out.append({"dtype": str(a).removeprefix("torch.")})
        elif isinstance(a, bytes):
            out.append({"bytes": a.hex()})
        elif isinstance(a, tuple | torch.Size):
            out.append(list(a))
        else:
            out.append(a)
    return out


def _decode(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, dict) and "class" in v:
            if v["class"] not in _CLASSES:
                raise ValueError(f"IPC handle names class {v['class']!r}; expected one of {sorted(_CLASSES)}")
            out.append(_CLASSES[v["class"]])
        elif isinstance(v, dict) and "dtype" in v:
            dtype = getattr(torch, v["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"IPC handle names dtype {v['dtype']!r}, which torch does not have")
            out.append(dtype)
        elif isinstance(v, dict) and "bytes" in v:
            out.append(bytes.fromhex(v["bytes"]))
        else:
            out.append(v)
    out[1], out[2] = torch.Size(out[1]), tuple(out[2])  # tensor size and stride
    return out


def publish_store(stores: list[ResidentWeightStore], path: str | Path) -> dict[str, int]:
    """Write the CUDA IPC handles of every store (one per GPU) to ``path`` as JSON; the stores must stay
    alive as long as engines use them. Returns ``{gpu uuid: bytes}``."""
    from torch.multiprocessing.reductions import reduce_tensor

    handles: dict[str, dict[str, list[Any]]] = {}
    sizes: dict[str, int] = {}
    for store in stores:
        uuid = gpu_uuid(store.device.index)
        handles[uuid] = {name: _encode(reduce_tensor(t)[1]) for name, t in store.tensors.items()}
        sizes[uuid] = store.nbytes
    torch.cuda.synchronize()
    Path(path).write_text(json.dumps(handles))
    return sizes


def open_store(spec: ModelSpec, path: str | Path, device_index: int) -> ResidentWeightStore:
    """Open, in this process, the resident copy published for GPU ``device_index`` (found by its UUID)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    handles = json.loads(Path(path).read_text())
    uuid = gpu_uuid(device_index)
    if uuid not in handles:
        raise KeyError(
            f"no resident weights published for GPU {uuid} (cuda:{device_index}); published: "
            f"{sorted(handles)}; start the store process on every GPU of the engine"
        )
    tensors = {}
    for name, encoded in handles[uuid].items():
        args = _decode(encoded)
        args[6] = device_index  # index 6 of torch's rebuild args is the device, renumbered in this process
        tensors[name] = rebuild_cuda_tensor(*args)
    return ResidentWeightStore(spec, tensors)


class NitsumWorkerExtension:
    """Methods added to every vLLM worker (``self`` is the worker)."""

    def nitsum_attach_store(self, spec_json: str, handles_path: str) -> dict[str, Any]:
        """Open the resident copy of this worker's GPU (once); returns its GPU UUID and size."""
        spec = ModelSpec.model_validate_json(spec_json)
        device_index = self.device.index  # type: ignore[attr-defined]
        self._nitsum_store = open_store(spec, handles_path, device_index)
        return {"uuid": gpu_uuid(device_index), "store_bytes": self._nitsum_store.nbytes}

    def _nitsum_rank(self) -> tuple[int, int]:
        from nitsum_runtime.vllm_engine import tensor_parallel_rank_and_size

        return tensor_parallel_rank_and_size()

    def _nitsum_params(self) -> dict[str, torch.Tensor]:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return dict(model.named_parameters())

    def nitsum_fill_weights(self) -> dict[str, Any]:
        """Copy this rank's shard from the resident copy into the engine's parameters (device to device)."""
        store = getattr(self, "_nitsum_store", None)
        if store is None:
            raise RuntimeError("nitsum_attach_store must run before nitsum_fill_weights")
        tp, rank = self._nitsum_rank()
        return fill_shard(store, self._nitsum_params(), tp, rank).model_dump()

    def nitsum_check_fill(self) -> dict[str, Any]:
        """Cross-check the refill against vLLM's own weight loaders: for every parameter, load its source
        weights with ``model.load_weights`` and compare bit for bit with what :meth:`nitsum_fill_weights`
        wrote (the parameter is restored afterwards)."""
        store = self._nitsum_store
        tp, rank = self._nitsum_rank()
        plan = shard_plan(store.spec, tp, rank)
        sources: dict[str, list[str]] = {}
        for c in plan.copies:
            sources.setdefault(c.dst, []).append(c.src)
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        params = dict(model.named_parameters())
        mismatched = []
        with torch.no_grad():
            for name, srcs in sources.items():
                snapshot = params[name].detach().clone()
                params[name].data.fill_(float("nan"))
                model.load_weights([(s, store.tensors[s]) for s in srcs])
                if not torch.equal(params[name], snapshot):
                    mismatched.append(name)
                params[name].data.copy_(snapshot)
        torch.cuda.synchronize()
        return {"rank": rank, "tp": tp, "checked": len(sources), "mismatched": mismatched}

    def nitsum_fill_mismatches(self) -> dict[str, Any]:
        """Parameters that differ now, bit for bit, from this rank's shard of the resident copy (cheap: one
        device-side comparison per parameter; run before probes to rule out weights as a cause)."""
        store = self._nitsum_store
        tp, rank = self._nitsum_rank()
        bad = plan_mismatches(shard_plan(store.spec, tp, rank), store.tensors, self._nitsum_params())
        return {"rank": rank, "tp": tp, "mismatched": bad}

    def nitsum_mem_info(self) -> dict[str, Any]:
        """This rank's GPU: free and total bytes, device-wide (every process's allocations count)."""
        free, total = torch.cuda.mem_get_info()
        return {"rank": self._nitsum_rank()[1], "free_bytes": int(free), "total_bytes": int(total)}

    def nitsum_kv_info(self) -> dict[str, Any]:
        """Shape, strides and dtype of the per-layer KV caches (to confirm the NHD layout assumption)."""
        caches = self.model_runner.kv_caches  # type: ignore[attr-defined]
        first = caches[0]
        nhd = first.transpose(1, 2)
        return {
            "layers": len(caches),
            "logical_shape": list(first.shape),
            "stride": list(first.stride()),
            "dtype": str(first.dtype),
            "nhd_contiguous": nhd.is_contiguous(),
        }

    def _nitsum_nhd(self) -> list[torch.Tensor]:
        caches = [c.transpose(1, 2) for c in self.model_runner.kv_caches]  # type: ignore[attr-defined]
        if not all(c.is_contiguous() for c in caches):
            raise RuntimeError(
                "vLLM KV cache is not in the NHD layout this code expects "
                "(unset VLLM_KV_CACHE_LAYOUT or use a FlashAttention backend)"
            )
        return caches

    def nitsum_read_kv(self, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        """This rank's KV of a request's blocks, ``[layers, tokens, heads_local, 2*head_dim]``, as
        :func:`kv_to_wire` (``collective_rpc`` results must be plain values unless vLLM runs with insecure
        serialization)."""
        caches = self._nitsum_nhd()
        slots = torch.tensor(token_slots(block_ids, num_tokens, caches[0].shape[1]), device=caches[0].device)
        return kv_to_wire(gather_kv(caches, slots, 0, caches[0].shape[2]))

    def nitsum_write_kv(self, block_ids: list[int], num_tokens: int, wire: dict[str, Any]) -> float:
        """Write KV (as returned by :meth:`nitsum_read_kv`) into a request's blocks; returns seconds."""
        t0 = time.perf_counter()
        caches = self._nitsum_nhd()
        slots = torch.tensor(token_slots(block_ids, num_tokens, caches[0].shape[1]), device=caches[0].device)
        scatter_kv(caches, slots, 0, kv_from_wire(wire).to(caches[0].device))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    # KV migration through the Nitsum KV connector (kv_import.py): export on the source, stage on the target,
    # the controller copies between the two over CUDA IPC (it sees every GPU of the node). Buffers are ranges of
    # this worker's persistent arena (kv_arena.py) when they fit, else buffers of their own.
    def nitsum_kv_arena(self, capacity_bytes: int, offers: dict[str, list[Any]] | None = None) -> dict[str, Any]:
        """Make this worker's KV exchange arena (:mod:`nitsum_runtime.kv_arena`): the buffer the controller
        offers for this rank's GPU (``offers``: GPU UUID -> ``[arena id, CUDA IPC handle]``), else one of its
        own. A later call replaces it when no range is in use. Returns this rank's GPU UUID and the arena's
        description."""
        from nitsum_runtime.kv_arena import WORKER_ARENA, KvArena
        from nitsum_runtime.kv_import import STAGED_LOCK

        uuid = gpu_uuid(self.device.index)  # type: ignore[attr-defined]
        if offers is not None and uuid not in offers:
            raise KeyError(
                f"no KV arena offered for GPU {uuid}; offered for {sorted(offers)}: the controller must number "
                "the node's GPUs as the plan does (node GPU id = its CUDA device index)"
            )
        with STAGED_LOCK:
            if WORKER_ARENA and WORKER_ARENA[0].ranges.ranges():
                raise RuntimeError("the KV arena still holds staged or exported KV; release it first")
            WORKER_ARENA.clear()
            if offers is not None:
                arena_id, handle = offers[uuid]
                buffer = open_ipc_tensor(handle, self.device.index)  # type: ignore[attr-defined]
                WORKER_ARENA.append(KvArena(capacity_bytes, buffer.device, buffer=buffer, arena_id=arena_id))
            elif capacity_bytes > 0:
                WORKER_ARENA.append(KvArena(capacity_bytes, self.device))  # type: ignore[attr-defined]
            described = WORKER_ARENA[0].describe() if WORKER_ARENA else None
        return {"rank": self._nitsum_rank()[1], "uuid": uuid, "arena": described}

    def _nitsum_kv_buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """A buffer for ``key``: an arena range if it fits, else its own allocation (kept until released)."""
        from nitsum_runtime.kv_arena import worker_arena
        from nitsum_runtime.kv_import import STAGED_LOCK

        arena = worker_arena()
        with STAGED_LOCK:
            got = arena.take(key, shape, dtype) if arena is not None else None
        if got is not None:
            return got
        buf = torch.empty(shape, dtype=dtype, device=self.device)  # type: ignore[attr-defined]
        return buf, {"ipc": ipc_handle(buf)}

    def _nitsum_kv_answer(self, refs: dict[str, Any]) -> dict[str, Any]:
        from nitsum_runtime.kv_arena import worker_arena

        torch.cuda.synchronize()
        arena = worker_arena()
        return {
            "rank": self._nitsum_rank()[1],
            "uuid": gpu_uuid(self.device.index),  # type: ignore[attr-defined]
            "arena": arena.describe() if arena is not None else None,
            "refs": refs,
        }

    def nitsum_kv_export(self, items: list[list[Any]]) -> dict[str, Any]:
        """Gather each ``[key, block_ids, num_tokens]`` request's KV of this rank into a head-major buffer
        (``[heads_local, layers, tokens, 2*head_dim]``) kept until :meth:`nitsum_kv_release`; returns this
        rank's GPU UUID, its arena and a ref per key (:data:`~nitsum_runtime.kv_arena.KvRef`)."""
        from nitsum_runtime.kv_import import gather_head_major

        nhd = self._nitsum_nhd()
        kept = self.__dict__.setdefault("_nitsum_kv_out", {})
        refs = {}
        for key, block_ids, num_tokens in items:
            slots = token_slots(block_ids, num_tokens, nhd[0].shape[1])
            shape = (nhd[0].shape[2], len(nhd), len(slots), nhd[0].shape[3])
            buf, refs[key] = self._nitsum_kv_buffer(key, shape, nhd[0].dtype)
            gather_head_major(nhd, torch.tensor(slots, dtype=torch.long, device=nhd[0].device), out=buf)
            kept[key] = buf
        return self._nitsum_kv_answer(refs)

    def nitsum_kv_stage(self, items: list[list[Any]]) -> dict[str, Any]:
        """Make, for each ``[key, num_tokens]``, the head-major buffer the connector reads this rank's KV from
        (:data:`~nitsum_runtime.kv_import.STAGED`); returns this rank's GPU UUID, its arena and the refs."""
        from nitsum_runtime.kv_import import STAGED, STAGED_LOCK

        nhd = self._nitsum_nhd()
        heads, width = nhd[0].shape[2], nhd[0].shape[3]
        refs = {}
        for key, num_tokens in items:
            buf, refs[key] = self._nitsum_kv_buffer(key, (heads, len(nhd), num_tokens, width), nhd[0].dtype)
            with STAGED_LOCK:
                STAGED[key] = buf
        return self._nitsum_kv_answer(refs)

    def nitsum_kv_release(self, keys: list[str]) -> int:
        """Drop exported and staged buffers (staged ones the connector has not consumed); returns how many."""
        from nitsum_runtime.kv_arena import worker_arena
        from nitsum_runtime.kv_import import STAGED, STAGED_LOCK

        kept = self.__dict__.setdefault("_nitsum_kv_out", {})
        arena = worker_arena()
        n = 0
        torch.cuda.synchronize()  # no pending copy reads a range given back below
        for key in keys:
            n += kept.pop(key, None) is not None
            with STAGED_LOCK:
                n += STAGED.pop(key, None) is not None
                if arena is not None:
                    arena.give_back(key)
        torch.cuda.ipc_collect()
        return n


def ipc_handle(t: torch.Tensor) -> list[Any]:
    """CUDA IPC handle of a tensor as JSON values (:func:`open_ipc_tensor` opens it in another process)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return _encode(reduce_tensor(t)[1])


def open_ipc_tensor(encoded: list[Any], device_index: int) -> torch.Tensor:
    """Open in this process a tensor published by :func:`ipc_handle` (``device_index``: the GPU as this process
    numbers it)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = _decode(encoded)
    args[6] = device_index
    return rebuild_cuda_tensor(*args)


def kv_to_wire(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as plain values (shape, dtype name, raw bytes) that any RPC layer carries."""
    cpu = t.detach().contiguous().cpu()
    return {
        "shape": list(cpu.shape),
        "dtype": str(cpu.dtype).removeprefix("torch."),
        "data": cpu.view(torch.uint8).numpy().tobytes(),
    }


def kv_from_wire(wire: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`kv_to_wire` (CPU tensor)."""
    dtype = getattr(torch, wire["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {wire['dtype']!r} in KV wire data")
    return torch.frombuffer(bytearray(wire["data"]), dtype=dtype).view(wire["shape"])
