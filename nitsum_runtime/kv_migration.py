"""KV-cache migration between engines of different TP: gather, re-split heads, double-buffered send, scatter.

Cache layout (vLLM 0.26 FlashAttention backend, ``v1/attention/backends/flash_attn.py``): one tensor per
layer whose *logical* shape is ``[num_blocks, num_kv_heads_local, block_size, 2 * head_dim]`` (K in the first
``head_dim`` of the last axis, V in the second) and whose *memory* layout is NHD, i.e. a contiguous
``[num_blocks, block_size, num_kv_heads_local, 2 * head_dim]`` tensor (``get_kv_cache_stride_order`` =
``(0, 2, 1, 3)``). This module works on the NHD tensor; ``cache.transpose(1, 2)`` is vLLM's logical view.

A request's KV lives in token slots ``slot = block_id * block_size + offset``. Migrating it to an engine of
another TP degree moves, for each target rank, exactly the KV heads that rank holds (:func:`kv_transfer_plan`:
a contiguous head range per (source rank, target rank) pair, KV-head replication when TP > KV heads included).
:func:`migrate_kv` runs one rank's part: transfers are cut into chunks of layers (and tokens) and pipelined
with two buffers per transfer, so that gathering chunk ``k+1`` overlaps the send of chunk ``k`` and the
scatter of chunk ``k-1`` overlaps the receive of chunk ``k`` (``batch_isend_irecv``: NCCL on GPU, gloo on
CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``'bfloat16'`` -> ``torch.bfloat16``; the error lists the supported names."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}") from None


class KvLayout(Frozen):
    """Shape of one engine's paged KV cache, before the TP split of the heads."""

    num_layers: int = Field(ge=1)
    """Attention layers (one cache tensor each)."""
    num_kv_heads: int = Field(ge=1)
    """KV heads of the model (all ranks together, without replication)."""
    head_dim: int = Field(ge=1)
    """Width of one head."""
    block_size: int = Field(ge=1)
    """Tokens per block."""
    dtype: str = "bfloat16"
    """Element type name (``bfloat16``, ``float16``, ``float32``)."""

    @classmethod
    def of(cls, spec: ModelSpec, block_size: int = 16, dtype: str = "bfloat16") -> KvLayout:
        """Layout for ``spec``."""
        return cls(
            num_layers=spec.num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            block_size=block_size,
            dtype=dtype,
        )

    def heads_local(self, tp: int) -> int:
        """KV heads per rank at ``tp`` (1 when heads are replicated)."""
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ValueError(f"tp={tp} and num_kv_heads={self.num_kv_heads}: neither divides the other")
        return max(1, self.num_kv_heads // tp)

    @property
    def element_bytes(self) -> int:
        """Bytes per element."""
        return torch.empty((), dtype=torch_dtype(self.dtype)).element_size()

    def bytes_per_token_head(self) -> int:
        """Bytes of one token's K and V for one head, over all layers."""
        return self.num_layers * 2 * self.head_dim * self.element_bytes


def allocate_kv_cache(layout: KvLayout, tp: int, num_blocks: int, device: torch.device | str) -> list[torch.Tensor]:
    """Per-layer NHD cache tensors ``[num_blocks, block_size, heads_local, 2*head_dim]`` (zeroed)."""
    shape = (num_blocks, layout.block_size, layout.heads_local(tp), 2 * layout.head_dim)
    return [torch.zeros(shape, dtype=torch_dtype(layout.dtype), device=device) for _ in range(layout.num_layers)]


def token_slots(block_ids: Sequence[int], num_tokens: int, block_size: int) -> list[int]:
    """Cache slots of the first ``num_tokens`` tokens of a request holding ``block_ids``."""
    if num_tokens > len(block_ids) * block_size:
        raise ValueError(f"{num_tokens} tokens do not fit in {len(block_ids)} blocks of {block_size}")
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(num_tokens)]


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(cache.shape[0] * cache.shape[1], cache.shape[2], cache.shape[3])


def gather_kv(caches: Sequence[torch.Tensor], slots: torch.Tensor, head_start: int, num_heads: int) -> torch.Tensor:
    """Contiguous ``[layers, tokens, num_heads, 2*head_dim]`` copy of ``slots`` for local heads
    ``[head_start, head_start + num_heads)``."""
    out = torch.empty(
        (len(caches), slots.numel(), num_heads, caches[0].shape[3]),
        dtype=caches[0].dtype,
        device=caches[0].device,
    )
    for layer, cache in enumerate(caches):
        torch.index_select(_flat(cache).narrow(1, head_start, num_heads), 0, slots, out=out[layer])
    return out


def scatter_kv(caches: Sequence[torch.Tensor], slots: torch.Tensor, head_start: int, data: torch.Tensor) -> None:
    """Write ``data`` (``[layers, tokens, heads, 2*head_dim]``) into ``slots`` of local heads from
    ``head_start`` on."""
    for layer, cache in enumerate(caches):
        _flat(cache).narrow(1, head_start, data.shape[2]).index_copy_(0, slots, data[layer])


class HeadTransfer(Frozen):
    """KV heads one source rank sends to one target rank (ranks are world ranks = GPU ids of the node)."""

    src: int = Field(ge=0)
    """World rank holding the heads in the source engine."""
    dst: int = Field(ge=0)
    """World rank needing them in the target engine."""
    src_head: int = Field(ge=0)
    """First head, local index in the source rank's cache."""
    dst_head: int = Field(ge=0)
    """First head, local index in the target rank's cache."""
    num_heads: int = Field(ge=1)
    """Contiguous heads moved."""


def kv_transfer_plan(num_kv_heads: int, src_ranks: Sequence[int], dst_ranks: Sequence[int]) -> tuple[HeadTransfer, ...]:
    """Which heads go from which source rank to which target rank.

    ``src_ranks[i]`` is the world rank of TP rank ``i`` of the source engine (likewise ``dst_ranks``). Every
    target rank gets each head it holds exactly once; a head replicated on several source ranks is taken from
    the replica on the target's own rank when there is one (a local copy), else from replica
    ``target_index % replicas`` to spread the load."""
    src_tp, dst_tp = len(src_ranks), len(dst_ranks)
    src_local = max(1, num_kv_heads // src_tp)
    dst_local = max(1, num_kv_heads // dst_tp)
    for tp in (src_tp, dst_tp):
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"tp={tp} and num_kv_heads={num_kv_heads}: neither divides the other")
    src_rep = max(1, src_tp // num_kv_heads)
    dst_rep = max(1, dst_tp // num_kv_heads)
    transfers: list[HeadTransfer] = []
    for j, dst in enumerate(dst_ranks):
        first = (j // dst_rep) * dst_local
        head = first
        while head < first + dst_local:
            shard = head // src_local  # source KV shard holding `head`
            replicas = [shard * src_rep + k for k in range(src_rep)]
            local = [i for i in replicas if src_ranks[i] == dst]
            i = local[0] if local else replicas[j % src_rep]
            end = min(first + dst_local, (shard + 1) * src_local)
            transfers.append(
                HeadTransfer(
                    src=src_ranks[i],
                    dst=dst,
                    src_head=head - shard * src_local,
                    dst_head=head - first,
                    num_heads=end - head,
                )
            )
            head = end
    return tuple(transfers)


@dataclass(frozen=True)
class _Chunk:
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int


def chunk_schedule(num_layers: int, num_tokens: int, bytes_per_layer_token: int, chunk_bytes: int) -> list[_Chunk]:
    """Chunks of whole layers of at most ``chunk_bytes`` (tokens split when one layer is larger)."""
    per_layer = max(1, num_tokens * bytes_per_layer_token)
    if per_layer <= chunk_bytes:
        step = max(1, chunk_bytes // per_layer)
        return [_Chunk(lo, min(lo + step, num_layers), 0, num_tokens) for lo in range(0, num_layers, step)]
    tok_step = max(1, chunk_bytes // bytes_per_layer_token)
    return [
        _Chunk(layer, layer + 1, lo, min(lo + tok_step, num_tokens))
        for layer in range(num_layers)
        for lo in range(0, num_tokens, tok_step)
    ]


class MigrationStats(Frozen):
    """One rank's part of a migration."""

    rank: int = Field(ge=0)
    """World rank."""
    bytes_sent: int = Field(ge=0)
    """Bytes sent to other ranks."""
    bytes_received: int = Field(ge=0)
    """Bytes received from other ranks."""
    bytes_local: int = Field(ge=0)
    """Bytes copied on this rank (source and target on the same GPU)."""
    chunks: int = Field(ge=0)
    """Pipeline chunks."""
    seconds: float = Field(ge=0)
    """Wall time of this rank's part, device synchronised."""


def migrate_kv(
    rank: int,
    plan: Sequence[HeadTransfer],
    src_caches: Sequence[torch.Tensor] | None,
    dst_caches: Sequence[torch.Tensor] | None,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    chunk_bytes: int = 64 << 20,
    group: dist.ProcessGroup | None = None,
) -> MigrationStats:
    """Run world rank ``rank``'s part of ``plan``: every rank of the source and target engines calls it with
    the same plan, slots and chunk size (``src_caches`` on source ranks, ``dst_caches`` on target ranks).

    ``src_slots[t]`` and ``dst_slots[t]`` are the slots of token ``t`` in the source and target caches (the
    tokens of several requests may be concatenated)."""
    t0 = time.perf_counter()
    sends = [t for t in plan if t.src == rank and t.dst != rank]
    recvs = [t for t in plan if t.dst == rank and t.src != rank]
    locals_ = [t for t in plan if t.src == rank and t.dst == rank]
    if (sends or locals_) and src_caches is None:
        raise ValueError(f"rank {rank} sends KV but has no source cache")
    if (recvs or locals_) and dst_caches is None:
        raise ValueError(f"rank {rank} receives KV but has no target cache")
    caches = src_caches if src_caches is not None else dst_caches
    if caches is None:
        return MigrationStats(rank=rank, bytes_sent=0, bytes_received=0, bytes_local=0, chunks=0, seconds=0.0)
    ref, num_layers, num_tokens = caches[0], len(caches), src_slots.numel()
    width = ref.shape[3]
    if dst_slots.numel() != num_tokens:
        raise ValueError(f"source has {num_tokens} token slots, target {dst_slots.numel()}")
    max_heads = max((t.num_heads for t in plan), default=1)
    chunks = chunk_schedule(num_layers, num_tokens, max_heads * width * ref.element_size(), chunk_bytes)
    src_slots, dst_slots = src_slots.to(ref.device), dst_slots.to(ref.device)
    stats = {"sent": 0, "recv": 0, "local": 0}
    max_elems = max(((c.layer_end - c.layer_start) * (c.token_end - c.token_start) for c in chunks), default=0)

    def buffers(ts: list[HeadTransfer]) -> dict[HeadTransfer, list[torch.Tensor]]:
        """Two flat buffers per transfer, each big enough for the largest chunk."""
        return {
            t: [torch.empty(max_elems * t.num_heads * width, dtype=ref.dtype, device=ref.device) for _ in range(2)]
            for t in ts
        }

    send_bufs, recv_bufs = buffers(sends), buffers(recvs)
    pending: list[tuple[_Chunk, int, list[dist.Work]]] = []

    def view(buf: torch.Tensor, chunk: _Chunk, t: HeadTransfer) -> torch.Tensor:
        """Contiguous ``[layers, tokens, heads, width]`` front of a flat buffer."""
        shape = (chunk.layer_end - chunk.layer_start, chunk.token_end - chunk.token_start, t.num_heads, width)
        return buf[: shape[0] * shape[1] * shape[2] * shape[3]].view(shape)

    def finish(chunk: _Chunk, k: int, works: list[dist.Work]) -> None:
        for w in works:
            w.wait()
        slots = dst_slots[chunk.token_start : chunk.token_end]
        for t in recvs:
            buf = view(recv_bufs[t][k % 2], chunk, t)
            scatter_kv(dst_caches[chunk.layer_start : chunk.layer_end], slots, t.dst_head, buf)  # type: ignore[index]
            stats["recv"] += buf.numel() * buf.element_size()

    for k, chunk in enumerate(chunks):
        layers = slice(chunk.layer_start, chunk.layer_end)
        s_slots = src_slots[chunk.token_start : chunk.token_end]
        ops: list[dist.P2POp] = []
        for t in sends:
            buf = view(send_bufs[t][k % 2], chunk, t)
            for i, cache in enumerate(src_caches[layers]):  # type: ignore[index]
                torch.index_select(_flat(cache).narrow(1, t.src_head, t.num_heads), 0, s_slots, out=buf[i])
            ops.append(dist.P2POp(dist.isend, buf, t.dst, group))
            stats["sent"] += buf.numel() * buf.element_size()
        for t in recvs:
            ops.append(dist.P2POp(dist.irecv, view(recv_bufs[t][k % 2], chunk, t), t.src, group))
        works = dist.batch_isend_irecv(ops) if ops else []
        for t in locals_:
            data = gather_kv(src_caches[layers], s_slots, t.src_head, t.num_heads)  # type: ignore[index]
            scatter_kv(dst_caches[layers], dst_slots[chunk.token_start : chunk.token_end], t.dst_head, data)  # type: ignore[index]
            stats["local"] += data.numel() * data.element_size()
        pending.append((chunk, k, works))
        if len(pending) == 2:
            finish(*pending.pop(0))
    for item in pending:
        finish(*item)
    if ref.device.type == "cuda":
        torch.cuda.synchronize(ref.device)
    return MigrationStats(
        rank=rank,
        bytes_sent=stats["sent"],
        bytes_received=stats["recv"],
        bytes_local=stats["local"],
        chunks=len(chunks),
        seconds=time.perf_counter() - t0,
    )
