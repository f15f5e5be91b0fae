"""Why the KV connector's copies are slow: cross-GPU copies between CUDA-IPC-opened buffers, first vs repeated.

The vLLM KV-migration path (``nitsum_runtime.kv_mover.move_staged``) opens, in the controller process, buffers
that engine workers exported over CUDA IPC, then copies between GPUs. On 2 x H200 it reached only 2-10 GB/s.
This benchmark isolates the copy: a child process allocates a source buffer on GPU 0 and a target on GPU 1 for
every round (as each switch does), publishes them with ``nitsum_runtime.worker_ext.ipc_handle``, and the parent
opens them with ``open_ipc_tensor`` and times (a) opening, (b) the first copy, (c) repeated copies of the same
buffers, against (d) a copy between buffers the parent allocated itself.

    python benchmarks/gpu/ipc_copy_bench.py --out results.csv   # needs 2 GPUs, torch only (no vLLM)
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

from nitsum_runtime.worker_ext import ipc_handle, open_ipc_tensor


def _child(conn: Any, sizes_mb: list[int], rounds: int) -> None:
    for size in sizes_mb:
        for _ in range(rounds):
            n = size * 2**20 // 2
            src = torch.randn(n, device="cuda:0", dtype=torch.float32).to(torch.bfloat16)
            dst = torch.empty(n, device="cuda:1", dtype=torch.bfloat16)
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            conn.send(json.dumps({"src": ipc_handle(src), "dst": ipc_handle(dst), "mb": size}))
            conn.recv()  # the parent is done with this pair
            del src, dst
    conn.send("done")


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    t = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return time.perf_counter() - t


def _staged_copy(dst: torch.Tensor, src: torch.Tensor, bounce_src: torch.Tensor, bounce_dst: torch.Tensor) -> float:
    """IPC source -> native buffer on the source GPU -> native buffer on the target GPU -> IPC target."""
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    t = time.perf_counter()
    bounce_src.copy_(src)
    bounce_dst.copy_(bounce_src, non_blocking=True)
    dst.copy_(bounce_dst)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sizes-mb", default="17,138")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    print("p2p access 0->1:", torch.cuda.can_device_access_peer(0, 1), "1->0:", torch.cuda.can_device_access_peer(1, 0))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, sizes, args.rounds))
    proc.start()
    rows = []
    while (msg := parent.recv()) != "done":
        m = json.loads(msg)
        t0 = time.perf_counter()
        src = open_ipc_tensor(m["src"], 0)
        dst = open_ipc_tensor(m["dst"], 1)
        open_s = time.perf_counter() - t0
        first_s = _timed_copy(dst, src)
        repeat_s = statistics.median(_timed_copy(dst, src) for _ in range(5))
        same = bool(torch.equal(dst.cpu(), src.cpu()))
        nsrc = torch.empty_like(src)
        ndst = torch.empty(src.shape, dtype=src.dtype, device="cuda:1")
        _timed_copy(ndst, nsrc)
        native_s = statistics.median(_timed_copy(ndst, nsrc) for _ in range(5))
        ipc_to_native_s = statistics.median(_timed_copy(ndst, src) for _ in range(5))
        native_to_ipc_s = statistics.median(_timed_copy(dst, nsrc) for _ in range(5))
        local_ipc_s = statistics.median(_timed_copy(nsrc, src) for _ in range(5))  # IPC -> native, same GPU
        nsrc1 = torch.empty(src.shape, dtype=src.dtype, device="cuda:1")
        native_to_ipc_local_s = statistics.median(_timed_copy(dst, nsrc1) for _ in range(5))  # same GPU 1
        del nsrc1
        staged_s = statistics.median(_staged_copy(dst, src, nsrc, ndst) for _ in range(5))
        staged_ok = bool(torch.equal(dst.cpu(), src.cpu()))
        nbytes = src.numel() * src.element_size()
        row = {
            "mb": m["mb"],
            "open_ms": open_s * 1e3,
            "first_copy_ms": first_s * 1e3,
            "repeat_copy_ms": repeat_s * 1e3,
            "native_copy_ms": native_s * 1e3,
            "first_gb_per_s": nbytes / first_s / 1e9,
            "repeat_gb_per_s": nbytes / repeat_s / 1e9,
            "native_gb_per_s": nbytes / native_s / 1e9,
            "copied_exactly": same,
            "ipc_to_native_gb_per_s": nbytes / ipc_to_native_s / 1e9,
            "native_to_ipc_gb_per_s": nbytes / native_to_ipc_s / 1e9,
            "ipc_local_gb_per_s": nbytes / local_ipc_s / 1e9,
            "native_to_ipc_local_gb_per_s": nbytes / native_to_ipc_local_s / 1e9,
            "staged_3hop_gb_per_s": nbytes / staged_s / 1e9,
            "staged_copied_exactly": staged_ok,
        }
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del src, dst, nsrc, ndst
        torch.cuda.synchronize(0)
        parent.send("ok")
    proc.join()
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
