"""The copies of a KV migration between head-major buffers, as the controller runs them on GPUs.

:func:`copy_heads` carries out a :func:`~nitsum_runtime.kv_migration.kv_transfer_plan`: each (source rank,
target rank) head range is one contiguous copy, peer to peer over NVLink across GPUs. Two measured facts
(H200, ``benchmarks/gpu/ipc_copy_bench.py``) shape it:

* a copy *into* a buffer another process exported over CUDA IPC runs at 38 GB/s when it crosses GPUs,
  against 381 GB/s into a buffer this process owns; reading an IPC buffer across GPUs is full speed, and so is
  any copy within one GPU. The engines' exchange arenas are therefore owned by the controller
  (:mod:`nitsum_runtime.kv_arena`), and a transfer into a buffer the controller does not own goes through
  :func:`_copy_through_bounce` (buffers of this process on the target GPU, double-buffered);
* torch runs a cross-GPU copy on the source GPU's current stream behind a two-way barrier with the target
  GPU's current stream, so copies issued on the current streams run one after another: same-GPU copies wait
  for NVLink copies, and copies from several GPUs into one (TP4 -> TP1) or from one GPU to several
  (TP2 -> TP4) do not overlap (measured on 4 x H200: 79-90 GB/s per link). :class:`CopyStreams` gives every
  (source GPU, target GPU) pair its own streams; :meth:`CopyStreams.join` makes the current streams wait.

On CPU the same copies run in order (what the tests check).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch

from nitsum_runtime.kv_migration import HeadTransfer

#: Below this many bytes a migration with several cross-GPU pairs keeps its NVLink copies on the current streams
#: (measured on 4 x H200, 140 MB: per-pair streams took 1.64 / 1.73 ms for TP2->TP4 / TP4->TP1 against 0.97 /
#: 1.18 ms; 950 MB: 1.94 / 2.27 ms against 2.65 / 3.0 ms).
PAIR_STREAMS_MIN_BYTES = 256 * 2**20


class CopyStreams:
    """Streams for a migration's copies (module docstring), made on first use after the devices' current
    streams; :meth:`join` makes the current streams wait for all of them. Same-GPU copies always get a stream of
    their own; cross-GPU copies get one pair of streams per (source GPU, target GPU) when ``per_pair``, else
    run on the current streams (one link, or too few bytes for the streams to pay off)."""

    def __init__(self, per_pair: bool = True) -> None:
        self.per_pair = per_pair
        self.pairs: dict[tuple[torch.device, torch.device], tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}

    @staticmethod
    def for_plan(plan: Sequence[HeadTransfer], total_bytes: int) -> CopyStreams:
        """Per-pair streams only for fan-in / fan-out plans of at least :data:`PAIR_STREAMS_MIN_BYTES`."""
        remote_pairs = {(t.src, t.dst) for t in plan if t.src != t.dst}
        return CopyStreams(per_pair=len(remote_pairs) > 1 and total_bytes >= PAIR_STREAMS_MIN_BYTES)

    def pair(self, src: torch.device, dst: torch.device) -> AbstractContextManager[object]:
        """Context in which a copy ``src -> dst`` runs on the pair's streams: torch then orders it against
        them only (its cross-GPU barrier uses both devices' current streams), not against other pairs."""
        if src.type != "cuda" or dst.type != "cuda" or (src != dst and not self.per_pair):
            return nullcontext()
        if (src, dst) not in self.pairs:
            s_src = torch.cuda.Stream(src)
            s_src.wait_stream(torch.cuda.current_stream(src))
            s_dst = s_src if src == dst else torch.cuda.Stream(dst)
            if s_dst is not s_src:
                s_dst.wait_stream(torch.cuda.current_stream(dst))
            self.pairs[(src, dst)] = (s_src, s_dst)
        s_src, s_dst = self.pairs[(src, dst)]
        stack = ExitStack()
        stack.enter_context(torch.cuda.stream(s_src))
        if s_dst is not s_src:
            stack.enter_context(torch.cuda.stream(s_dst))
        return stack

    def join(self) -> None:
        """The current streams wait for every copy issued on the pairs' streams so far."""
        for (src, dst), (s_src, s_dst) in self.pairs.items():
            torch.cuda.current_stream(src).wait_stream(s_src)
            torch.cuda.current_stream(dst).wait_stream(s_dst)


def copy_heads(
    plan: Sequence[HeadTransfer],
    sources: Mapping[int, torch.Tensor],
    targets: Mapping[int, torch.Tensor],
    bounce_bytes: int = 0,
    links: dict[tuple[int, int], int] | None = None,
    streams: CopyStreams | None = None,
) -> tuple[int, int]:
    """Carry out ``plan`` between head-major buffers keyed by GPU (world rank). Returns (bytes copied across
    GPUs, bytes copied on one GPU) and adds each transfer's bytes to ``links[(src, dst)]`` when given; the
    copies are asynchronous on GPUs (synchronise to time them). ``bounce_bytes > 0``: cross-GPU transfers go
    through buffers of that size owned here on the target GPU (for targets this process does not own);
    ``streams``: every copy on its (source, target) pair's streams (the caller joins them; module docstring)."""
    if bounce_bytes < 0:
        raise ValueError(f"bounce_bytes={bounce_bytes} must be >= 0")
    remote = local = 0
    bounce: dict[torch.device, list[torch.Tensor]] = {}
    for t in plan:
        src = sources[t.src].narrow(0, t.src_head, t.num_heads)
        dst = targets[t.dst].narrow(0, t.dst_head, t.num_heads)
        if src.shape[1:] != dst.shape[1:]:
            raise ValueError(f"transfer {t}: source heads {tuple(src.shape)} vs target heads {tuple(dst.shape)}")
        with streams.pair(src.device, dst.device) if streams is not None else nullcontext():
            if bounce_bytes and t.src != t.dst:
                _copy_through_bounce(dst, src, bounce, bounce_bytes)
            else:
                dst.copy_(src, non_blocking=True)
        n = dst.numel() * dst.element_size()
        remote, local = (remote, local + n) if t.src == t.dst else (remote + n, local)
        if links is not None:
            links[(t.src, t.dst)] = links.get((t.src, t.dst), 0) + n
    return remote, local


def _copy_through_bounce(
    dst: torch.Tensor, src: torch.Tensor, bounce: dict[torch.device, list[torch.Tensor]], bounce_bytes: int
) -> None:
    """``dst.copy_(src)`` in chunks through two buffers of ``bounce_bytes`` each, owned here on ``dst``'s device.

    Each chunk takes two hops: across GPUs into a bounce buffer (torch runs it on the source GPU's stream,
    ordered after the target's current stream), then on the target GPU into ``dst`` on a side stream, so the
    second hop of chunk ``i`` overlaps the first hop of chunk ``i + 1``. Events keep a buffer from being
    refilled before its second hop read it; the current stream waits for the side stream at the end (and the
    caching allocator orders the buffers' reuse on it). On CPU the same chunks are copied in order."""
    flat_src, flat_dst = src.reshape(-1), dst.view(-1)
    total = flat_dst.numel()
    chunk = max(1, min(bounce_bytes // dst.element_size(), total))
    bufs = bounce.get(dst.device)
    if bufs is None or bufs[0].dtype != dst.dtype or bufs[0].numel() < chunk:
        bufs = [torch.empty(chunk, dtype=dst.dtype, device=dst.device) for _ in range(2)]
        bounce[dst.device] = bufs
    chunk = bufs[0].numel()
    if not dst.is_cuda:
        for start in range(0, total, chunk):
            m = min(chunk, total - start)
            bufs[0][:m].copy_(flat_src[start : start + m])
            flat_dst[start : start + m].copy_(bufs[0][:m])
        return
    main = torch.cuda.current_stream(dst.device)
    side = _bounce_stream(dst.device)
    read: list[torch.cuda.Event | None] = [None, None]
    for i, start in enumerate(range(0, total, chunk)):
        m, buf = min(chunk, total - start), bufs[i % 2]
        if read[i % 2] is not None:
            main.wait_event(read[i % 2])
        buf[:m].copy_(flat_src[start : start + m], non_blocking=True)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            flat_dst[start : start + m].copy_(buf[:m], non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        read[i % 2] = event
    main.wait_stream(side)


_BOUNCE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _bounce_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _BOUNCE_STREAMS:
        _BOUNCE_STREAMS[device] = torch.cuda.Stream(device)
    return _BOUNCE_STREAMS[device]
