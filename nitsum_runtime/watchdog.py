"""A command loop with a watchdog, for engine processes driven over a pipe.

The controller sends ``(name, kwargs, deadline_s)``; :func:`serve_commands` runs the command on the main
thread (as an engine expects) and answers ``(True, result)`` or ``(False, traceback)``. A watchdog thread
watches the command's :class:`Progress`: a command (or one unit of it, e.g. one engine step, which the command
marks with :meth:`Progress.begin`) that outlives its deadline gets a ``(False, report)`` answer instead of
silence: which unit is stuck and for how long, the engine's own description of its state, the main thread's
stack (where it blocks) and the process tree under this process (which child died or sleeps). Then the
process exits (status 3): a thread blocked in a C call or a queue cannot be stopped otherwise.

Nothing here imports vLLM; the engine side supplies the commands and the state description.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class Progress:
    """The unit of work a command is in, and until when it may take."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.unit = ""
        self.started = time.monotonic()
        self.deadline = float("inf")

    def begin(self, unit: str, deadline_s: float) -> None:
        """Start ``unit``; it is overdue ``deadline_s`` seconds from now."""
        with self._lock:
            self.unit, self.started, self.deadline = unit, time.monotonic(), time.monotonic() + deadline_s

    def overdue(self) -> bool:
        """Whether the current unit has passed its deadline."""
        with self._lock:
            return time.monotonic() > self.deadline

    def snapshot(self) -> tuple[str, float]:
        """Current unit and seconds spent in it."""
        with self._lock:
            return self.unit, time.monotonic() - self.started


def watch_parent(interval_s: float = 1.0) -> None:
    """Exit this process as soon as its parent dies (a daemon thread polls the parent pid): rank and engine
    processes lead their own sessions, so nothing else would end a rank stuck in a collective after the controller is
    killed."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="nitsum-parent-watch", daemon=True).start()


def process_tree(pid: int | None = None) -> list[dict[str, Any]]:
    """Descendants of ``pid`` (default: this process) from ``/proc``: pid, parent, name and state
    (``R`` running, ``S`` sleeping, ``D`` in the kernel, ``Z`` dead but not reaped); empty off Linux."""
    root = os.getpid() if pid is None else pid
    procs: dict[int, tuple[int, str, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        procs[int(stat.parent.name)] = (int(ppid), name, state)
    out: list[dict[str, Any]] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, name, state) in sorted(procs.items()):
            if ppid == parent:
                out.append({"pid": child, "ppid": ppid, "name": name, "state": state})
                frontier.append(child)
    return out


def stuck_report(progress: Progress, thread: threading.Thread, describe: Callable[[], Any]) -> str:
    """Text explaining a unit of work that is past its deadline (``thread`` runs it)."""
    unit, spent = progress.snapshot()
    try:
        state = describe()
    except Exception as exc:  # the description must not hide the report
        state = f"(state unavailable: {type(exc).__name__}: {exc})"
    frame = sys._current_frames().get(thread.ident or -1)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(thread gone)\n"
    tree = "\n".join(f"  pid {p['pid']} ({p['name']}) state {p['state']}" for p in process_tree()) or "  (none)"
    return (
        f"watchdog: {unit!r} still running after {spent:.1f} s (deadline passed)\n"
        f"engine state: {state}\nwhere it blocks:\n{stack}child processes:\n{tree}\n"
    )


def _exit_stuck() -> None:
    os._exit(3)  # the stuck command cannot be interrupted; the controller kills this process group


def serve_commands(
    conn: Any,
    commands: Mapping[str, Callable[..., Any]],
    describe: Callable[[], Any],
    progress: Progress,
    poll_s: float = 0.2,
    on_stuck: Callable[[], None] = _exit_stuck,
) -> None:
    """Serve ``(name, kwargs, deadline_s)`` messages from ``conn`` on this (the main) thread until ``stop``,
    which returns unanswered (the caller answers after its cleanup). A watchdog thread sends the report of
    a command past its deadline, then calls ``on_stuck`` (default: exit the process with status 3)."""
    lock = threading.Lock()
    state = {"busy": False, "stuck": False}
    me = threading.current_thread()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            with lock:
                if state["busy"] and progress.overdue():
                    conn.send((False, stuck_report(progress, me, describe)))
                    state["busy"], state["stuck"] = False, True
                    break
        on_stuck()

    threading.Thread(target=watch, name="nitsum-watchdog", daemon=True).start()
    while True:
        name, kwargs, deadline_s = conn.recv()
        if name == "stop":
            return
        with lock:
            progress.begin(name, deadline_s)
            state["busy"] = True
        try:
            if name not in commands:
                raise KeyError(f"unknown command {name!r}; known: {sorted(commands)}")
            answer = (True, commands[name](**kwargs))
        except BaseException:
            answer = (False, traceback.format_exc())
        with lock:
            if state["stuck"]:  # the report went out instead; on_stuck is ending the process
                return
            state["busy"] = False
            conn.send(answer)
