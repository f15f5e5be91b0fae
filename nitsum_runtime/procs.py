"""Rank processes: one per GPU (or per CPU rank), each in its own session, with torch.distributed set up.

Every process calls ``os.setsid()`` first, so it leads its own process group: a hang or a crash is ended by
killing that group (``os.killpg``), never by name. ``torch.distributed`` is initialised through a file store
in a private temporary folder (no TCP port to collide on): gloo on CPU, NCCL on GPU (rank ``r`` on
``cuda:r``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nitsum_runtime.watchdog import watch_parent as watch_parent  # re-export (it needs no torch)


class RankFailure(RuntimeError):
    """A rank process raised, died or timed out; the message carries the rank's traceback."""


def init_rank(rank: int, world_size: int, init_file: str, backend: str, timeout_s: float) -> torch.device:
    """Join the process group as ``rank``; returns the device this rank computes on."""
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device,
        )
    else:
        device = torch.device("cpu")
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    dist.barrier()
    return device


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    backend: str,
    timeout_s: float,
    args: tuple[Any, ...],
    out: Any,
) -> None:
    os.setsid()
    watch_parent()
    torch.set_num_threads(1)
    try:
        device = init_rank(rank, world_size, init_file, backend, timeout_s)
        out.put((rank, True, fn(rank, world_size, device, *args)))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def kill_group(proc: mp.Process) -> None:
    """Kill ``proc``'s process group (it leads one) and reap it."""
    if proc.pid is not None and proc.is_alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.join(timeout=5)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, device, *args)`` on ``world_size`` fresh processes; return results by rank.

    ``fn`` must be importable (a module-level function). Raises :class:`RankFailure` with the first failing
    rank's traceback when a rank raises, dies or exceeds ``timeout_s``; every process group is killed then."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="nitsum-ranks-") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, init_file, backend, timeout_s, args, out), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(results) < world_size:
                try:
                    rank, ok, value = out.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()]
                    if dead:
                        raise RankFailure(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                    if time.monotonic() > deadline:
                        raise RankFailure(
                            f"ranks {sorted(set(range(world_size)) - set(results))} "
                            f"did not finish within {timeout_s:.0f} s"
                        ) from None
                    continue
                if not ok:
                    raise RankFailure(f"rank {rank} failed:\n{value}")
                results[rank] = value
            for p in procs:
                p.join(timeout=10)
        finally:
            for p in procs:
                kill_group(p)
    return [results[r] for r in range(world_size)]
