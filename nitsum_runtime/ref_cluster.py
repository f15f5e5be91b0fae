"""Controller side of the rank processes: start them, send commands, collect results, tear them down.

Each call goes to a chosen set of ranks and waits for all of them (with a timeout). A rank that raises answers
with its traceback and the call raises :class:`~nitsum_runtime.engine.EngineError`; a rank that dies or does
not answer in time makes the cluster *broken* (a collective may be stuck): further calls are refused and
:meth:`RankCluster.close` kills every process group.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch.multiprocessing as mp

from nitsum_runtime.engine import EngineCapacityError, EngineError
from nitsum_runtime.procs import kill_group
from nitsum_runtime.ref_worker import ClusterConfig, worker_main


class RankCluster:
    """One process per rank of a node; use as a context manager or call :meth:`start` / :meth:`close`."""

    def __init__(self, cfg: ClusterConfig, call_timeout_s: float = 300.0, start_timeout_s: float = 600.0) -> None:
        self.cfg = cfg
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self.start_info: list[dict[str, Any]] = []
        self.broken = ""
        self._procs: list[mp.Process] = []
        self._inboxes: list[Any] = []
        self._outbox: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._seq = 0

    def __enter__(self) -> RankCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Spawn the rank processes and wait until each has built its resident weight store."""
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="nitsum-cluster-")
        init_file = os.path.join(self._tmp.name, "store")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.cfg.world_size)]
        self._procs = [
            ctx.Process(target=worker_main, args=(r, self.cfg, init_file, self._inboxes[r], self._outbox), daemon=True)
            for r in range(self.cfg.world_size)
        ]
        for p in self._procs:
            p.start()
        try:
            self.start_info = self._collect(list(range(self.cfg.world_size)), -1, self.start_timeout_s, "start")
        except BaseException:
            self.close()
            raise

    def call(self, ranks: Sequence[int], name: str, /, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``cmd_<name>(**kwargs)`` on ``ranks``; results in the order of ``ranks``."""
        if self.broken:
            raise EngineError(f"rank cluster is broken ({self.broken}); close it and start a new one")
        if not self._procs:
            raise EngineError("rank cluster is not started; call start() first")
        self._seq += 1
        for r in ranks:
            self._inboxes[r].put((self._seq, name, kwargs))
        return self._collect(list(ranks), self._seq, timeout_s or self.call_timeout_s, name)

    def _collect(self, ranks: list[int], seq: int, timeout_s: float, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) + len(errors) < len(ranks):
            try:
                rank, got_seq, ok, value = self._outbox.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r in ranks if r not in results and r not in errors and not self._procs[r].is_alive()]
                late = time.monotonic() > deadline
                if dead or late:
                    self.broken = (
                        f"rank {dead[0]} died during {what!r}"
                        if dead
                        else f"{what!r} got no answer within {timeout_s:.0f} s"
                    )
                    raise EngineError(self.broken) from None
                continue
            if got_seq != seq:
                continue  # a late answer to an earlier, failed call
            if ok:
                results[rank] = value
            else:
                errors[rank] = value
        if errors:
            rank = min(errors)
            cls = EngineCapacityError if errors[rank].startswith("MemoryError") else EngineError
            raise cls(f"{what!r} failed on rank {rank}: {errors[rank]}")
        return [results[r] for r in ranks]

    def close(self) -> None:
        """Stop every rank (politely, then by killing its process group)."""
        for r, p in enumerate(self._procs):
            if p.is_alive() and not self.broken:
                self._inboxes[r].put((0, "stop", {}))
        for p in self._procs:
            p.join(timeout=10)
            kill_group(p)
        self._procs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
