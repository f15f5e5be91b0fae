"""The engine command loop's watchdog and the step loop that stops when nothing is unfinished.

The blocking "engine" here is a consumer of a real ``queue.Queue`` fed by a producer thread that, like vLLM
0.26's engine core, produces one output per step while requests are unfinished and nothing afterwards: a
client that keeps calling ``get()`` then waits forever (what hung benchmark (c) on H200)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from typing import Any

from nitsum_runtime.vllm_process import run_steps
from nitsum_runtime.watchdog import Progress, process_tree, serve_commands


class QueueEngine:
    """Outputs come from a producer thread, one per step, only while tokens remain to be generated."""

    def __init__(self, tokens: int) -> None:
        self.left = tokens
        self.outputs: queue.Queue[int] = queue.Queue()
        self._steps: queue.Queue[None] = queue.Queue()
        threading.Thread(target=self._core, args=(tokens,), daemon=True).start()

    def _core(self, tokens: int) -> None:
        for made in range(1, tokens + 1):
            self._steps.get()
            self.outputs.put(made)
        # idle from now on: like an engine core without requests, it sends nothing more

    def step(self) -> list[int]:
        self._steps.put(None)
        out = self.outputs.get()  # blocks forever once the core has nothing to do
        self.left -= 1
        return [out]

    def has_unfinished(self) -> bool:
        return self.left > 0


def test_run_steps_stops_when_every_request_finished() -> None:
    eng = QueueEngine(5)
    progress = Progress()
    ran, outs = run_steps(eng.step, eng.has_unfinished, 64, progress, step_timeout_s=5)
    assert ran == 5 and outs == [1, 2, 3, 4, 5]
    assert progress.snapshot()[0] == "step 5 of 64"
    assert run_steps(eng.step, eng.has_unfinished, 3, progress, 5) == (0, [])


def _serve(conn: Any, tokens: int) -> None:
    eng = QueueEngine(tokens)
    progress = Progress()

    def blind_steps(n: int) -> int:  # the loop that hung: n steps whatever the engine holds
        for k in range(n):
            progress.begin(f"step {k + 1} of {n}", 0.5)
            eng.step()
        return n

    commands = {
        "echo": lambda **kw: kw,
        "steps": lambda n: run_steps(eng.step, eng.has_unfinished, n, progress, 0.5)[0],
        "blind_steps": blind_steps,
        "fail": lambda: 1 / 0,
    }
    serve_commands(conn, commands, lambda: {"tokens_left": eng.left}, progress, poll_s=0.05)
    conn.send((True, "stopped"))


def _ask(conn: Any, name: str, deadline_s: float = 5.0, **kwargs: Any) -> tuple[bool, Any]:
    conn.send((name, kwargs, deadline_s))
    assert conn.poll(20), f"no answer to {name!r}"
    return conn.recv()


def test_watchdog_answers_a_stuck_step_with_the_engine_state_and_where_it_blocks() -> None:
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(there, 3))
    proc.start()
    try:
        assert _ask(here, "echo", a=1) == (True, {"a": 1})
        ok, err = _ask(here, "fail")
        assert not ok and "ZeroDivisionError" in err
        ok, err = _ask(here, "nope")
        assert not ok and "unknown command 'nope'" in err
        assert _ask(here, "steps", n=64) == (True, 3)  # stops after the 3 tokens, does not block
        t0 = time.monotonic()
        ok, report = _ask(here, "blind_steps", 30.0, n=2)  # the engine is idle now: step 1 blocks forever
        assert not ok and time.monotonic() - t0 < 10
        assert "watchdog: 'step 1 of 2' still running" in report
        assert "engine state: {'tokens_left': 0}" in report
        assert "outputs.get()" in report  # the stack shows where it blocks
        proc.join(10)
        assert proc.exitcode == 3  # the stuck process ends itself; its controller sees why
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_stop_returns_to_the_caller() -> None:
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(there, 1))
    proc.start()
    here.send(("stop", {}, 0))
    assert here.poll(20) and here.recv() == (True, "stopped")
    proc.join(10)
    assert proc.exitcode == 0


def test_process_tree_lists_children_with_their_state() -> None:
    ctx = mp.get_context("fork")
    child = ctx.Process(target=time.sleep, args=(5,))
    child.start()
    try:
        tree = process_tree()
        assert any(p["pid"] == child.pid and p["state"] in "RSD" for p in tree)
    finally:
        child.kill()
        child.join()
