"""The controller's end of one engine process: start it, send commands with deadlines, wait for answers, kill it.

The process runs ``target(conn, gpu_ids, model_dir, llm_kwargs, env)``: :func:`~nitsum_runtime.vllm_process.
engine_process` (vLLM) or :func:`~nitsum_runtime.toy_engine.toy_engine_process` (its CPU stand-in); both serve
the commands of :mod:`nitsum_runtime.vllm_protocol` under a watchdog. Failures come back typed:
:class:`EngineCommandFailed` (the command raised; the process lives on), :class:`EngineProcessLost` (the process
died, or its watchdog reported a stuck command and is exiting) and :class:`EngineNoAnswer` (not even the
watchdog answered in time). Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from nitsum_runtime.watchdog import process_tree


class EngineCommandFailed(RuntimeError):
    """A command raised in the engine process (the message carries its traceback); the process is alive."""


class EngineProcessLost(RuntimeError):
    """The engine process died, or its watchdog reported a stuck command and is ending the process."""


class EngineNoAnswer(TimeoutError):
    """No answer within the deadline plus grace, not even from the engine's watchdog."""


def _default_target() -> Callable[..., None]:
    from nitsum_runtime.vllm_process import engine_process

    return engine_process


class EngineHandle:
    """One engine process driven over a pipe.

    Every command carries a deadline that the engine's watchdog enforces (an overdue command, or one engine
    step, is answered with the engine's state and where it blocks); this side waits ``grace_s`` longer and
    then reports the process tree. :meth:`send` / :meth:`wait` let a command run while another engine works
    (an old engine's sleep during the new one's first step). :meth:`close` kills the process group."""

    def __init__(
        self,
        name: str,
        gpu_ids: tuple[int, ...],
        model_dir: str,
        llm_kwargs: dict[str, Any],
        grace_s: float = 20.0,
        target: Callable[..., None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.gpu_ids, self.model_dir, self.llm_kwargs = name, gpu_ids, model_dir, llm_kwargs
        self.grace_s = grace_s
        self.target = target
        self.env = dict(env or {})
        self.proc: Any = None
        self.conn: Any = None
        self._pending: tuple[str, float] | None = None

    @property
    def pending(self) -> str | None:
        """Command started by :meth:`send` and not collected yet."""
        return self._pending[0] if self._pending else None

    def alive(self) -> bool:
        """Whether the engine process runs."""
        return self.proc is not None and self.proc.is_alive()

    def launch(self) -> None:
        """Start the process (its engine builds in the background; :meth:`wait_started` collects it)."""
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        target = self.target or _default_target()
        proc = ctx.Process(
            target=target,
            args=(child, list(self.gpu_ids), self.model_dir, self.llm_kwargs, self.env),
            name=f"nitsum-engine-{self.name}",
        )
        proc.start()
        self.proc = proc
        child.close()  # this side keeps only its end: the child's death then reads as end of file

    def wait_started(self, timeout_s: float) -> Any:
        """The start answer (:class:`~nitsum_runtime.vllm_protocol.EngineStarted`)."""
        return self._answer(timeout_s, "start")

    def start(self, timeout_s: float) -> Any:
        """:meth:`launch` and :meth:`wait_started`."""
        self.launch()
        return self.wait_started(timeout_s)

    def send(self, name: str, timeout_s: float = 120.0, **kwargs: Any) -> None:
        """Start command ``name`` (its watchdog deadline: ``timeout_s``); collect the answer with :meth:`wait`."""
        if self._pending is not None:
            raise RuntimeError(f"engine {self.name}: {self._pending[0]!r} is still running; wait() for it first")
        if self.proc is None:
            raise EngineProcessLost(f"engine {self.name} has no process (never started, or closed)")
        try:
            self.conn.send((name, kwargs, timeout_s))
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise EngineProcessLost(f"engine {self.name} died before {name!r} ({exc})") from None
        self._pending = (name, timeout_s)

    def wait(self) -> Any:
        """Answer of the command started by :meth:`send`."""
        if self._pending is None:
            raise RuntimeError(f"engine {self.name}: no command is running")
        name, timeout_s = self._pending
        self._pending = None
        return self._answer(timeout_s + self.grace_s, name)

    def call(self, name: str, timeout_s: float = 120.0, **kwargs: Any) -> Any:
        """Run command ``name`` and return its answer."""
        self.send(name, timeout_s, **kwargs)
        return self.wait()

    def _answer(self, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                raise EngineProcessLost(f"engine {self.name} died during {what!r} (exit {self.proc.exitcode})")
            if time.monotonic() > deadline:
                tree = process_tree(self.proc.pid)
                raise EngineNoAnswer(
                    f"engine {self.name}: {what!r} got no answer within {timeout_s:.0f} s, not even from its "
                    f"watchdog (process {self.proc.pid} alive; children: {tree})"
                )
        try:
            ok, value = self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            self.proc.join(timeout=5)
            raise EngineProcessLost(f"engine {self.name} died during {what!r} (exit {self.proc.exitcode})") from None
        if not ok:
            if isinstance(value, str) and value.startswith("watchdog:"):
                raise EngineProcessLost(f"engine {self.name}: {what!r} failed:\n{value}")
            raise EngineCommandFailed(f"engine {self.name}: {what!r} failed:\n{value}")
        return value

    def close(self) -> None:
        """Kill the engine's process group (engine, engine core, workers). No orderly shutdown: it can take
        minutes, and vLLM 0.26 unmaps the memory of an engine asleep at level 2 a second time when it frees
        it (``CuMemAllocator._python_free_callback`` skips that only on ROCm), printing "CUDA Error: invalid
        argument at cumem_allocator.cpp" per allocation; the driver frees everything when the processes end."""
        self._pending = None
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process leads its own session (os.setsid)
        self.proc.kill()  # in case it died, or was killed, before it called setsid
        self.proc.join(timeout=30)
        with contextlib.suppress(OSError):
            self.conn.close()
        self.proc = None
