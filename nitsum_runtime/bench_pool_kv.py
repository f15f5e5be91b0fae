"""Benchmark (d), KV part: large KV migrations between vLLM engines against point-to-point bandwidth measured in
the same run, and the markdown lines on migration vs re-prefill.

:func:`measure_p2p` times, before the engines start, (1) NCCL ``batch_isend_irecv`` GPU 0 -> GPU 1 on two fresh
ranks (the reference the issue names; :mod:`nitsum_runtime.bench_kv`) and (2) a copy GPU 0 -> GPU 1 between two
buffers of this process (the bound of the controller's own copies). :func:`run_bulk_migrations` then runs a
few switches around the path with ``requests`` long requests (``prompt_len`` tokens) in flight, every one
migrated (the executor's ``migrate`` policy), so each switch moves about ``requests * prompt_len`` tokens of KV:
on Llama-3.1-8B (128 KiB per token) 8 x 1,000 tokens is ~1 GB. Each switch's copy is timed in the controller
(:class:`~nitsum_runtime.kv_mover.MoveStats`): ``link GB/s`` = bytes over the busiest GPU pair / copy time,
the figure point-to-point bandwidth bounds (TP1 <-> TP2 on GPUs 0-1 uses one link).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.executor import TransitionExecutor, TransitionReport
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.scenarios import run_switch_loop

#: Bytes per point-to-point measurement (the largest gives the reference figure).
P2P_SIZES = (64 << 20, 256 << 20, 1 << 30)


def nccl_p2p_rank(rank: int, world: int, device: Any, sizes: list[int], iters: int) -> list[dict[str, Any]]:
    """One rank of the NCCL measurement (:func:`nitsum_runtime.bench_kv._p2p`)."""
    from nitsum_runtime.bench_kv import _p2p

    return _p2p(rank, device, sizes, iters)


def copy_p2p(sizes: tuple[int, ...], iters: int = 5) -> list[dict[str, Any]]:
    """GPU 0 -> GPU 1 ``copy_`` between buffers of this process: best of ``iters`` after a warm-up."""
    import torch

    rows = []
    for size in sizes:
        src = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda:0")
        dst = torch.empty_like(src, device="cuda:1")
        best = float("inf")
        for i in range(iters + 1):
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(1)
            if i:
                best = min(best, time.perf_counter() - t0)
        rows.append({"bytes": size, "seconds_min": best, "gb_per_s": size / best / 1e9})
        del src, dst
    return rows


def measure_p2p(iters: int = 5) -> dict[str, Any]:
    """NCCL and in-process copy bandwidth GPU 0 -> GPU 1 (module docstring); best GB/s of each."""
    from nitsum_runtime.procs import run_ranks

    nccl = run_ranks(nccl_p2p_rank, 2, args=(list(P2P_SIZES), iters), backend="nccl", timeout_s=180)[0]
    copy = copy_p2p(P2P_SIZES, iters)
    return {
        "nccl_rows": nccl,
        "copy_rows": copy,
        "nccl_gb_per_s": max(r["gb_per_s"] for r in nccl),
        "copy_gb_per_s": max(r["gb_per_s"] for r in copy),
    }


def run_bulk_migrations(
    pool: EnginePool,
    spec: ModelSpec,
    path: tuple[tuple[int, ...], ...],
    switches: int,
    requests: int,
    prompt_len: int,
    row: Callable[[int, str, TransitionReport], dict[str, Any]],
) -> dict[str, Any]:
    """``switches`` switches around ``path`` with ``requests`` long requests in flight, all migrated; ``row``
    makes (and records) the CSV row of each switch. Returns the loop's result."""
    executor = TransitionExecutor(pool, spec, policy="migrate")
    labels = [f"tp{len(a)}->tp{len(b)}" for a, b in itertools.pairwise(path)]

    def on_switch(k: int, r: TransitionReport) -> None:
        row(k, labels[k % len(labels)], r)

    loop = run_switch_loop(
        pool,
        executor,
        spec,
        switches,
        layouts=[[g] for g in path[:-1]],
        in_flight=requests,
        prompt_len=prompt_len,
        max_tokens=16,
        steps_between=2,
        on_switch=on_switch,
    )
    return loop.model_dump()


def _p50(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def bulk_lines(s: dict[str, Any]) -> tuple[list[str], bool]:
    """Markdown on the large migrations vs point-to-point, and whether the target (>= 0.70 x NCCL p2p, median
    of the single-link switches) holds."""
    p2p, bulk = s.get("p2p"), s.get("bulk")
    rows = [r for r in s.get("switch_rows", []) if r["phase"] == "bulk" and r["kv_copy_ms"] > 0]
    if not p2p or not rows:
        return [], False
    nccl, copy = p2p["nccl_gb_per_s"], p2p["copy_gb_per_s"]
    out = [
        "",
        f"Large migrations ({s.get('bulk_requests')} requests x {s.get('bulk_prompt_len')} prompt tokens in "
        f"flight, every switch migrates all): point-to-point GPU 0 -> GPU 1 in this run: NCCL **{nccl:.1f} GB/s**, "
        f"copy between this process's buffers {copy:.1f} GB/s.",
        "",
        "| switch | MB moved | copy ms | total GB/s | busiest link GB/s | link / NCCL p2p | arena refs | own refs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['switch']} | {r['kv_bytes'] / 1e6:.0f} | {r['kv_copy_ms']:.2f} | {r['kv_copy_gb_per_s']:.1f} | "
            f"{r['kv_link_gb_per_s']:.1f} | {r['kv_link_gb_per_s'] / nccl:.2f} | {r['kv_arena_refs']} | "
            f"{r['kv_own_refs']} |"
        )
    single = [r["kv_link_gb_per_s"] for r in rows if r["switch"] in ("tp1->tp2", "tp2->tp1")]
    ratio = _p50(single) / nccl if nccl > 0 else 0.0
    lost = bulk["lost"] if bulk else "?"
    out += [
        "",
        f"- single-link switches (TP1 <-> TP2): busiest link p50 **{_p50(single):.1f} GB/s = {ratio:.2f} x NCCL p2p** "
        f"(target >= 0.70); requests lost in this phase: {lost}",
    ]
    return out, ratio >= 0.70 and bulk is not None and bulk["lost"] == 0


def migrating(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Switches with requests in flight run under the migrate policy (round trip, even loop switches)."""
    return [r for r in rows if r["in_flight"] and r["switch"] != "start" and r.get("policy") in ("", "migrate")]


def kv_lines(s: dict[str, Any]) -> list[str]:
    """Markdown lines on KV migration into vLLM engines (``kv="migrate"``) vs re-prefill."""
    rows = s.get("switch_rows", [])
    mig = [r for r in migrating(rows) if r["kv_copy_ms"] > 0]
    rep = [r for r in rows if r["phase"] == "loop" and r.get("policy") == "reprefill" and r["in_flight"]]
    out = [
        f"- KV migrated into vLLM engines through the Nitsum KV connector: {sum(r['migrated'] for r in rows)} "
        f"requests, {sum(r['kv_bytes'] for r in rows) / 1e6:.1f} MB; fell back: {s.get('kv_errors') or 'never'}"
    ]
    if mig:
        ms, gbs = [r["kv_copy_ms"] for r in mig], [r["kv_copy_gb_per_s"] for r in mig]
        out.append(
            f"- KV copy (CUDA IPC, heads re-split): p50 {_p50(ms):.2f} ms, max {max(ms):.2f} ms; "
            f"p50 {_p50(gbs):.1f} GB/s (min {min(gbs):.1f})"
        )
    for name, sel in (("migrate", [r for r in mig if r["phase"] == "loop"]), ("re-prefill", rep)):
        if sel:
            mv, pr = [r["move_requests_ms"] for r in sel], [r["pause_to_resume_ms"] for r in sel]
            out.append(
                f"- loop switches by {name} ({len(sel)}): move_requests p50 {_p50(mv):.1f} ms, pause->resume "
                f"p50 {_p50(pr):.1f} ms (a re-prefill's compute lands in the target's first step)"
            )
    return out
