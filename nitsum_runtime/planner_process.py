"""A controller in its own process: planning never holds the serving loop's interpreter lock.

Re-planning costs CPU: a new capacity table when the tiers' length mix moves (about 0.3 s per table on one core),
and the MILP (up to its time limit, 1 s by default). :class:`~nitsum_runtime.adaptive.AdaptiveServer` plans in a
worker thread so that serving goes on, but a Python thread still shares the interpreter lock with the serving loop,
whose own work per engine step is about a millisecond. :class:`PlannerProcess` moves the controller into a child
process (spawned, so it inherits no engine pipes): the parent thread only sends each epoch's window and waits on a
pipe, which releases the lock.

The controller and its :class:`~nitsum_opt.sim.controllers.base.ControlContext` are pickled into the child once; the
child's copy of the context is the one the controller sees (the ``ctx`` argument of :meth:`start` and
:meth:`on_epoch` is ignored), and the controller's state (forecasts, the stabilizer's plan) lives there.
"""

from __future__ import annotations

import multiprocessing
import pickle
import traceback
from typing import Any

from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.workloads.trace import RequestTrace


class PlannerError(RuntimeError):
    """The planner process failed, or did not answer in time."""


def _serve(conn: Any, payload: bytes) -> None:
    """Child process: unpickle the controller, then answer ``(kind, args)`` until ``stop`` or the pipe closes."""
    try:
        controller, ctx = pickle.loads(payload)
    except BaseException:
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, "ready"))
    while True:
        try:
            kind, args = conn.recv()
        except EOFError:  # the parent is gone
            return
        if kind == "stop":
            conn.send((True, None))
            return
        try:
            value = controller.start(ctx, *args) if kind == "start" else controller.on_epoch(ctx, *args)
            conn.send((True, value))
        except BaseException:
            conn.send((False, traceback.format_exc()))


class PlannerProcess(Controller):
    """``controller`` deciding in a child process (module docstring); close it with :meth:`close` (or ``with``).

    Args:
        controller: the controller to run (picklable: every controller of :mod:`nitsum_opt.sim.controllers` is).
        ctx: what it knows; its copy in the child is what it sees.
        call_timeout_s: longest a decision may take before :class:`PlannerError`.
        start_timeout_s: longest the child may take to start (imports included).
    """

    def __init__(
        self,
        controller: Controller,
        ctx: ControlContext,
        call_timeout_s: float = 120.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.name, self.is_static = controller.name, controller.is_static
        self.call_timeout_s = call_timeout_s
        try:
            payload = pickle.dumps((controller, ctx))
        except Exception as exc:
            raise PlannerError(f"controller {controller.name!r} cannot move to a planner process: {exc}") from exc
        mp = multiprocessing.get_context("spawn")
        self._conn, child = mp.Pipe()
        self._proc = mp.Process(target=_serve, args=(child, payload), daemon=True, name=f"nitsum-plan-{self.name}")
        self._proc.start()
        child.close()
        self._receive("start", start_timeout_s)

    def _receive(self, what: str, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            self.close()
            raise PlannerError(f"planner process of {self.name!r} gave no answer to {what} within {timeout_s:g} s")
        try:
            ok, value = self._conn.recv()
        except EOFError:
            raise PlannerError(
                f"planner process of {self.name!r} exited during {what} (exit code {self._proc.exitcode})"
            ) from None
        if not ok:
            raise PlannerError(f"planner process of {self.name!r} failed in {what}:\n{value}")
        return value

    def _call(self, kind: str, *args: Any) -> Deployment | None:
        if not self._proc.is_alive():
            raise PlannerError(f"planner process of {self.name!r} is not running (exit code {self._proc.exitcode})")
        self._conn.send((kind, args))
        return self._receive(kind, self.call_timeout_s)  # type: ignore[no-any-return]

    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        """The first deployment, decided in the child."""
        dep = self._call("start", warmup)
        assert dep is not None
        return dep

    def on_epoch(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment | None:
        """The epoch's decision, made in the child."""
        return self._call("on_epoch", now_s, window)

    def close(self) -> None:
        """Stop the child (idempotent)."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", ()))
                self._conn.poll(5.0)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(5.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()

    def __enter__(self) -> PlannerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PlannerError", "PlannerProcess"]
