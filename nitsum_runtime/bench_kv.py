"""Benchmark (a): NCCL point-to-point bandwidth and KV-migration bandwidth, measured in the same run.

On every rank of one process group (NCCL on GPUs, gloo on CPU for the CI smoke run): first GPU 0 -> GPU 1
``batch_isend_irecv`` of large buffers, then :func:`~nitsum_runtime.kv_migration.migrate_kv` of a request's
paged KV (shuffled blocks) for several TP changes and context lengths. Every migration is checked bit for bit
against the KV the target ranks must hold. The migration bandwidth counts the bytes through the busiest link
(``link_bytes / time``), the quantity point-to-point bandwidth bounds; ``ratio`` = migration / p2p.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.kv_migration import (
    KvLayout,
    allocate_kv_cache,
    gather_kv,
    kv_transfer_plan,
    migrate_kv,
    scatter_kv,
    token_slots,
)
from nitsum_runtime.procs import run_ranks
from nitsum_runtime.switch_cost import migration_cost

#: (label, source GPUs, target GPUs); cases needing more GPUs than available are skipped.
CASES: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (
    ("tp1->tp1 gpu0->gpu1", (0,), (1,)),
    ("tp1->tp2", (0,), (0, 1)),
    ("tp2->tp1", (0, 1), (0,)),
    ("tp2->tp4", (0, 1), (0, 1, 2, 3)),
    ("tp4->tp1", (0, 1, 2, 3), (0,)),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _p2p(rank: int, device: torch.device, sizes_bytes: Sequence[int], iters: int) -> list[dict[str, Any]]:
    rows = []
    for size in sizes_bytes:
        buf = torch.ones(size // 2, dtype=torch.bfloat16, device=device)
        times = []
        for i in range(iters + 1):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            if rank in (0, 1):
                op = dist.isend if rank == 0 else dist.irecv
                for w in dist.batch_isend_irecv([dist.P2POp(op, buf, 1 - rank)]):
                    w.wait()
                _sync(device)
            elapsed = _max_over_ranks(time.perf_counter() - t0 if rank in (0, 1) else 0.0, device)
            if i:  # the first iteration warms up
                times.append(elapsed)
        best = min(times)
        rows.append(
            {
                "bytes": size,
                "seconds_min": best,
                "seconds_mean": sum(times) / len(times),
                "gb_per_s": size / best / 1e9,
            }
        )
    return rows


def _kv_case(
    rank: int,
    device: torch.device,
    lay: KvLayout,
    src: tuple[int, ...],
    dst: tuple[int, ...],
    tokens: int,
    chunk_bytes: int,
    iters: int,
) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    num_blocks = -(-tokens // lay.block_size) + 8
    src_blocks = torch.randperm(num_blocks, generator=gen)[: -(-tokens // lay.block_size)].tolist()
    dst_blocks = torch.randperm(num_blocks, generator=gen)[: -(-tokens // lay.block_size)].tolist()
    src_slots = torch.tensor(token_slots(src_blocks, tokens, lay.block_size), device=device)
    dst_slots = torch.tensor(token_slots(dst_blocks, tokens, lay.block_size), device=device)
    plan = kv_transfer_plan(lay.num_kv_heads, src, dst)

    def heads(ranks: tuple[int, ...]) -> range:
        local = lay.heads_local(len(ranks))
        s = ranks.index(rank) // max(1, len(ranks) // lay.num_kv_heads)
        return range(s * local, (s + 1) * local)

    src_c = dst_c = None
    dtype = getattr(torch, lay.dtype)
    if rank in src:
        src_c = allocate_kv_cache(lay, len(src), num_blocks, device)
        h = heads(src)
        for layer, cache in enumerate(src_c):  # value = f(layer, token, global head, channel), exact in bf16
            vals = torch.arange(tokens * lay.num_kv_heads * 2 * lay.head_dim, device=device) % 251 + layer
            full = vals.view(tokens, lay.num_kv_heads, 2 * lay.head_dim).to(dtype)
            scatter_kv([cache], src_slots, 0, full[None, :, h.start : h.stop])
    if rank in dst:
        dst_c = allocate_kv_cache(lay, len(dst), num_blocks, device)
    times, ok = [], True
    for i in range(iters + 1):
        dist.barrier()
        stats = migrate_kv(rank, plan, src_c, dst_c, src_slots, dst_slots, chunk_bytes)
        elapsed = _max_over_ranks(stats.seconds, device)
        if i == 0 and dst_c is not None:
            h = heads(dst)
            got = gather_kv(dst_c, dst_slots, 0, len(h))
            for layer in range(lay.num_layers):
                vals = torch.arange(tokens * lay.num_kv_heads * 2 * lay.head_dim, device=device) % 251 + layer
                want = vals.view(tokens, lay.num_kv_heads, 2 * lay.head_dim).to(dtype)[:, h.start : h.stop]
                ok = ok and torch.equal(got[layer], want)
        elif i:
            times.append(elapsed)
    ok_all = _max_over_ranks(0.0 if ok else 1.0, device) == 0.0
    spec_like = ModelSpec(
        name="kv",
        num_layers=lay.num_layers,
        hidden_size=lay.num_kv_heads * lay.head_dim,
        num_attention_heads=lay.num_kv_heads,
        num_kv_heads=lay.num_kv_heads,
        intermediate_size=1,
        vocab_size=1,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
    )
    _, link, local = migration_cost(spec_like, tokens, len(src), len(dst), 1.0, src_gpus=src, dst_gpus=dst)
    best = min(times)
    return {
        "tokens": tokens,
        "chunk_bytes": chunk_bytes,
        "kv_bytes": tokens * lay.num_layers * lay.num_kv_heads * 2 * lay.head_dim * spec_like.dtype_bytes,
        "link_bytes": link,
        "local_bytes": local,
        "seconds_min": best,
        "seconds_mean": sum(times) / len(times),
        "link_gb_per_s": link / best / 1e9 if link else 0.0,
        "exact": ok_all,
    }


def bandwidth_rank(
    rank: int,
    world: int,
    device: torch.device,
    layout_json: str,
    tokens_list: list[int],
    p2p_sizes: list[int],
    chunk_sweep: list[int],
    chunk_bytes: int,
    iters: int,
) -> dict[str, Any]:
    """One rank's part of benchmark (a); rank 0's return value holds the rows."""
    lay = KvLayout.model_validate_json(layout_json)
    p2p = _p2p(rank, device, p2p_sizes, iters)
    kv = []
    for label, src, dst in CASES:
        if max(src + dst) >= world:
            continue
        for tokens in tokens_list:
            chunks = chunk_sweep if (tokens == max(tokens_list) and label.startswith("tp1->tp1")) else [chunk_bytes]
            for c in chunks:
                kv.append({"case": label, **_kv_case(rank, device, lay, src, dst, tokens, c, iters)})
    return {"p2p": p2p, "kv": kv}


def run_kv_bandwidth(
    out_dir: Path,
    spec: ModelSpec,
    world: int,
    backend: str,
    tokens_list: Sequence[int],
    p2p_sizes: Sequence[int],
    chunk_sweep: Sequence[int] = (16 << 20, 64 << 20, 256 << 20),
    chunk_bytes: int = 64 << 20,
    iters: int = 5,
    dtype: str = "bfloat16",
    timeout_s: float = 400.0,
) -> dict[str, Any]:
    """Run benchmark (a) on ``world`` ranks; writes ``p2p.csv``, ``kv_migration.csv``, returns a summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lay = KvLayout.of(spec, block_size=16, dtype=dtype)
    res = run_ranks(
        bandwidth_rank,
        world,
        backend=backend,
        timeout_s=timeout_s,
        args=(
            lay.model_dump_json(),
            list(tokens_list),
            list(p2p_sizes),
            list(chunk_sweep),
            chunk_bytes,
            iters,
        ),
    )[0]
    _write_csv(out_dir / "p2p.csv", res["p2p"])
    _write_csv(out_dir / "kv_migration.csv", res["kv"])
    p2p_best = max(r["gb_per_s"] for r in res["p2p"])
    remote = [r for r in res["kv"] if r["case"].startswith("tp1->tp1")]
    most = max((r["tokens"] for r in remote), default=0)
    best = max((r for r in remote if r["tokens"] == most), key=lambda r: r["link_gb_per_s"], default=None)
    return {
        "p2p_gb_per_s": p2p_best,
        "kv_rows": res["kv"],
        "p2p_rows": res["p2p"],
        "largest_remote_ratio": best["link_gb_per_s"] / p2p_best if best else 0.0,
        "largest_remote_best_chunk_bytes": best["chunk_bytes"] if best else 0,
        "all_exact": all(r["exact"] for r in res["kv"]),
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
