"""Serve requests while a controller re-plans every epoch: the runtime's control loop (DESIGN §3).

The deciding is the simulator's: any :class:`~nitsum_opt.sim.controllers.base.Controller` (``nitsum``: the MILP
and its stabilizer; ``nitsum-greedy``; the static baselines), which sees only requests that have arrived. This
module carries its decisions out on an :class:`~nitsum_runtime.pool.EnginePool` while
:class:`~nitsum_runtime.serving.PlanServer`'s loop serves (:class:`AdaptiveServer`):

* **start**: the controller's first deployment (planned from the first epoch's requests, the operator's prior, as
  the simulator does) is brought up by the :class:`~nitsum_runtime.executor.TransitionExecutor` (engines woken,
  weights filled from the resident copy);
* **every ``epoch_s``** of the trace clock, the requests that arrived in the last epoch go to
  ``controller.on_epoch`` in a worker thread, so serving goes on while it plans; epochs are planned in order, so
  the controller sees the same windows as in the simulator and decides the same deployments;
* **its answer** is carried out at once:

  - ``None`` or the running deployment: nothing (``keep``);
  - the same engines with the same roles and tiers, other admission or seats: only the scheduler is replaced
    (loads, token buckets and held requests carried over; no engine touched: ``reschedule``);
  - anything else: a **transition**. First, in the planning thread and while the old deployment still serves,
    the engines it adds are woken and their weights filled from the resident copy (``prepare_ahead``; engines in
    their own processes). Then the loop is quiesced (steps in flight collected, hand-offs arrived, dispatched
    requests added) for the cut-over only: the executor carries out the diff of the two layouts — removed
    instances' engines paused, removed instances' requests moved (KV migrated or re-prefilled, priced per
    request), routes switched, removed engines asleep — and the loop serves the new deployment, whose scheduler
    counts every request where the pool's ledger now has it. A failed preparation, or a transition the executor
    rolls back, leaves the previous deployment serving (``rolled_back``).

Two differences from the simulator (:mod:`nitsum_opt.sim.transitions`), both recorded per epoch: here the
whole loop stops for the cut-over (``stall_s``; the simulator pauses only the new engines, for
``SwitchCosts.switch_s``, which covers the wake done ahead here), and an instance that only changes role keeps its
engine (a re-route; the simulator restarts it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.workloads.trace import RequestTrace
from nitsum_runtime.engine import Engine, EngineState
from nitsum_runtime.executor import TransitionExecutor, TransitionReport
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.serving import PlanServer, ServingRun
from nitsum_runtime.serving_types import ServingResult, TieredRequest, check_servable
from nitsum_runtime.transitions import Wake, diff_plans, layout_of

EpochAction = Literal["start", "keep", "reschedule", "transition", "rolled_back"]


class EpochRecord(Frozen):
    """What one epoch's decision did."""

    at_s: float = Field(ge=0)
    """Epoch time on the trace clock (the decision covers arrivals up to it)."""
    ready_s: float
    """Run clock when the decision was carried out (``at_s`` plus the planning and waiting time)."""
    plan_ms: float = Field(ge=0)
    """Wall time of the controller's call."""
    action: EpochAction
    """What was done (module docstring)."""
    deployment: str
    """The deployment serving afterwards (:meth:`Deployment.describe`)."""
    admitted_rps: dict[str, float] | None = None
    """Its admitted rate per tier."""
    stall_s: float = Field(default=0.0, ge=0)
    """Seconds the serving loop stopped for it (quiesce + transition)."""
    pause_to_resume_s: float = Field(default=0.0, ge=0)
    """The executor's pause → resume time."""
    moved: int = Field(default=0, ge=0)
    """Requests moved between engines."""
    migrated: int = Field(default=0, ge=0)
    """Of those, with their KV."""
    kv_bytes: int = Field(default=0, ge=0)
    """KV bytes migrated."""
    prepare_s: float = Field(default=0.0, ge=0)
    """Seconds spent waking and filling the new engines ahead, while the old deployment served (not a stall)."""
    actions: tuple[tuple[str, str, float], ...] = ()
    """The executor's actions: ``(kind, instance, seconds)``."""
    error: str = ""
    """The executor's error, if any."""


@dataclass(frozen=True)
class Preparation:
    """What :meth:`AdaptiveServer.prepare` did ahead of a transition."""

    groups: tuple[tuple[int, ...], ...] = ()
    """GPU groups of the engines woken and filled (empty: nothing prepared)."""
    seconds: float = 0.0
    """Wall time it took (off the serving loop)."""
    error: str = ""
    """Why it failed (the engines it woke are asleep again)."""


@dataclass(frozen=True)
class AdaptiveResult:
    """An adaptive run: every request's outcome and every epoch's decision."""

    serving: ServingResult
    """Per-request timings and the loop's counters."""
    epochs: tuple[EpochRecord, ...]
    """The start and every epoch, in order."""


def requests_trace(requests: Sequence[TieredRequest], tier_names: Sequence[str], end_s: float) -> RequestTrace:
    """``requests`` as a trace over ``[0, end_s]`` (tier indices in ``tier_names`` order), for the controller."""
    index = {name: k for k, name in enumerate(tier_names)}
    unknown = sorted({r.tier for r in requests} - set(index))
    if unknown:
        raise ValueError(f"requests of tiers {unknown}; the controller's tiers are {list(tier_names)}")
    return RequestTrace.from_arrays(
        np.array([r.arrival_s for r in requests], dtype=float),
        np.array([r.input_tokens for r in requests], dtype=np.int64),
        np.array([r.output_tokens for r in requests], dtype=np.int64),
        tier=np.array([index[r.tier] for r in requests], dtype=np.int64),
        tier_names=tuple(tier_names),
        start_s=0.0,
        end_s=end_s,
    )


class AdaptiveServer:
    """Serve on ``pool`` what ``controller`` decides, re-planning every ``ctx.settings.epoch_s`` (module docstring).

    Args:
        pool: the node's engines (asleep except what :meth:`start` brings up).
        controller: decides the deployments (it must not be used elsewhere meanwhile: it keeps state).
        ctx: what the controller knows (cluster = the pool's GPUs, tiers, model, its iteration model, settings).
        executor: carries transitions out on ``pool``.
        prepare_ahead: wake and fill a transition's new engines in the planning thread while the old deployment
            serves, so that the loop stops only for the cut-over (engines in their own processes only).
    """

    def __init__(
        self,
        pool: EnginePool,
        controller: Controller,
        ctx: ControlContext,
        executor: TransitionExecutor,
        prepare_ahead: bool = True,
    ) -> None:
        if executor.pool is not pool:
            raise ValueError("the executor must act on the server's pool")
        self.pool, self.controller, self.ctx, self.executor = pool, controller, ctx, executor
        self.prepare_ahead = prepare_ahead
        self.server: PlanServer | None = None
        self.epochs: list[EpochRecord] = []

    @property
    def deployment(self) -> Deployment:
        """The deployment serving now."""
        if self.server is None:
            raise RuntimeError("no deployment yet: call start() first")
        return self.server.deployment

    def start(self, warmup: RequestTrace) -> EpochRecord:
        """Plan the first deployment from ``warmup`` (the first epoch's requests) and bring it up."""
        t0 = time.perf_counter()
        dep = self.controller.start(self.ctx, warmup)
        plan_ms = 1000 * (time.perf_counter() - t0)
        check_servable(dep)
        report = self.executor.execute(None, layout_of(dep, self.ctx.cluster.gpus_per_node))
        if not report.ok:
            raise RuntimeError(f"bringing up {dep.describe()!r} failed: {report.error}")
        self.server = PlanServer(self.pool, dep, self.ctx.tiers)
        return self._record(0.0, 0.0, plan_ms, "start", report=report)

    def serve(
        self,
        requests: Sequence[TieredRequest],
        *,
        vocab_size: int,
        max_model_len: int,
        duration_s: float | None = None,
        drain_s: float = 60.0,
        seed: int = 0,
        top_k: int = 0,
        progress: Callable[[str], None] | None = None,
        prefix: str = "",
        log_steps: bool = False,
    ) -> AdaptiveResult:
        """Serve ``requests`` (sorted by arrival) from the deployment :meth:`start` brought up, re-planning at every
        epoch before ``duration_s`` (default: the last arrival), as the simulator does; ``log_steps`` as in
        :meth:`PlanServer.serve`."""
        if self.server is None:
            raise RuntimeError("call start() before serve()")
        end_s = duration_s if duration_s is not None else (requests[-1].arrival_s if requests else 0.0)
        trace = requests_trace(requests, [t.name for t in self.ctx.tiers], end_s)
        control = EpochControl(self, trace)
        first = len(self.epochs)
        try:
            serving = self.server.serve(
                requests,
                vocab_size=vocab_size,
                max_model_len=max_model_len,
                drain_s=drain_s,
                seed=seed,
                top_k=top_k,
                progress=progress,
                prefix=prefix,
                control=control,
                log_steps=log_steps,
            )
        finally:
            control.close()
        return AdaptiveResult(serving=serving, epochs=tuple(self.epochs[first:]))

    # ------------------------------------------------------------------ carrying a decision out
    def prepare(self, dep: Deployment | None) -> Preparation:
        """Wake and fill the engines a transition to ``dep`` adds, while the current deployment serves (called from
        the planning thread; only engines in their own processes, which a concurrent wake cannot disturb). Nothing
        to prepare for a keep, a reschedule or engines without ``prepares_concurrently``; on a failure the engines
        woken here go back to sleep and the error is returned."""
        current = self.deployment
        if not self.prepare_ahead or dep is None or dep == current:
            return Preparation()
        gpn = self.ctx.cluster.gpus_per_node
        wakes = [a for a in diff_plans(layout_of(current, gpn), layout_of(dep, gpn)) if isinstance(a, Wake)]
        engines = [self.pool.engine(a.gpu_ids, a.node) for a in wakes]
        if not engines or not all(getattr(e, "prepares_concurrently", False) for e in engines):
            return Preparation()
        t0 = time.perf_counter()
        woken: list[Engine] = []
        try:
            for engine in engines:
                if engine.state is EngineState.ASLEEP:
                    engine.wake()
                    woken.append(engine)
                engine.fill_weights()
        except Exception as exc:  # reported with the epoch; the old deployment keeps serving
            error = f"{type(exc).__name__}: {exc}"
            for engine in woken:
                try:
                    engine.sleep()
                except Exception as undo:  # keep going: the others must sleep too
                    error += f"; putting {engine.engine_id} back to sleep failed: {type(undo).__name__}: {undo}"
            return Preparation(seconds=time.perf_counter() - t0, error=error)
        return Preparation(tuple(a.gpu_ids for a in wakes), time.perf_counter() - t0)

    def apply(
        self,
        run: ServingRun,
        at_s: float,
        now: float,
        dep: Deployment | None,
        plan_ms: float,
        prepared: Preparation | None = None,
    ) -> None:
        """Carry out the decision of the epoch at ``at_s`` on the running loop (module docstring), with the new
        engines already woken and filled when ``prepared`` says so."""
        prepared = prepared or Preparation()
        current = self.deployment
        if dep is None or dep == current:
            self._record(at_s, now, plan_ms, "keep")
            return
        check_servable(dep)
        gpn = self.ctx.cluster.gpus_per_node
        old, new = layout_of(current, gpn), layout_of(dep, gpn)
        if _same_engines(old, new):
            order = {key: k for k, key in enumerate(i.key for i in current.instances)}
            dep = dep.model_copy(update={"instances": tuple(sorted(dep.instances, key=lambda i: order[i.key]))})
            self.server = PlanServer(self.pool, dep, self.ctx.tiers)
            run.reschedule(self.server, now)
            self._record(at_s, now, plan_ms, "reschedule")
            return
        if prepared.error:
            self._record(at_s, now, plan_ms, "rolled_back", prepare_s=prepared.seconds, error=prepared.error)
            return
        t0 = time.perf_counter()
        run.quiesce()
        report = self.executor.execute(old, new, prepared=prepared.groups)
        stall = time.perf_counter() - t0
        if report.rolled_back:
            self._record(at_s, now, plan_ms, "rolled_back", report, stall, prepared.seconds)
            return
        self.server = PlanServer(self.pool, dep, self.ctx.tiers)
        run.adopt(self.server, run.now())
        self._record(at_s, now, plan_ms, "transition", report, time.perf_counter() - t0, prepared.seconds)

    def _record(
        self,
        at_s: float,
        now: float,
        plan_ms: float,
        action: EpochAction,
        report: TransitionReport | None = None,
        stall_s: float = 0.0,
        prepare_s: float = 0.0,
        error: str = "",
    ) -> EpochRecord:
        dep = self.deployment
        rec = EpochRecord(
            at_s=at_s,
            ready_s=now,
            plan_ms=plan_ms,
            action=action,
            deployment=dep.describe(),
            admitted_rps=dep.admitted_rps,
            stall_s=stall_s,
            prepare_s=prepare_s,
            error=error,
        )
        if report is not None:
            rec = rec.model_copy(
                update={
                    "pause_to_resume_s": report.pause_to_resume_s,
                    "moved": len(report.moves),
                    "migrated": report.migrated,
                    "kv_bytes": report.kv_bytes_moved,
                    "actions": tuple((t.kind, t.instance_id, t.seconds) for t in report.steps),
                    "error": report.error,
                }
            )
        self.epochs.append(rec)
        return rec


def _same_engines(old: Sequence, new: Sequence) -> bool:
    """Whether two layouts run the same instances (engine, role and tier), in any order."""
    return sorted((i.instance_id, i.tier) for i in old) == sorted((i.instance_id, i.tier) for i in new)


class EpochControl:
    """The serving loop's hook (:class:`~nitsum_runtime.serving.LoopControl`): plans each epoch in a worker thread
    when the run clock reaches it, and has the server carry the decision out when it comes."""

    def __init__(self, server: AdaptiveServer, trace: RequestTrace) -> None:
        self.server, self.trace = server, trace
        self.epoch_s = server.ctx.settings.epoch_s
        self.k = 1  # the next epoch is at k · epoch_s (as the simulator computes it)
        self.pending: tuple[float, Future[tuple[Deployment | None, float, Preparation]]] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nitsum-plan")

    def _plan(self, at_s: float) -> tuple[Deployment | None, float, Preparation]:
        window = self.trace.window(at_s - self.epoch_s, at_s)
        t0 = time.perf_counter()
        dep = self.server.controller.on_epoch(self.server.ctx, at_s, window)
        plan_ms = 1000 * (time.perf_counter() - t0)
        return dep, plan_ms, self.server.prepare(dep)

    def tick(self, run: ServingRun, now: float) -> None:
        """Carry out a finished decision, or start planning the next epoch once the clock reached it."""
        if self.pending is not None:
            at_s, future = self.pending
            if not future.done():
                return
            self.pending = None
            dep, plan_ms, prepared = future.result()  # a controller error ends the run: a bug, not bad luck
            self.server.apply(run, at_s, now, dep, plan_ms, prepared)
            return
        at_s = self.trace.start_s + self.k * self.epoch_s
        if self.server.controller.is_static or at_s >= self.trace.end_s or now < at_s:
            return
        self.k += 1
        self.pending = (at_s, self.pool.submit(self._plan, at_s))

    def idle(self) -> bool:
        """No decision pending and no epoch left before the trace's end (the simulator plans every one)."""
        at_s = self.trace.start_s + self.k * self.epoch_s
        return self.pending is None and (self.server.controller.is_static or at_s >= self.trace.end_s)

    def close(self) -> None:
        """Stop the worker thread (a decision still being planned is dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["AdaptiveResult", "AdaptiveServer", "EpochControl", "EpochRecord", "Preparation", "requests_trace"]
