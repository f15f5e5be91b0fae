"""Serve a deployment on real engines: arrivals → the multi-tier scheduler → engines, prefill → decode hand-offs.

This is the runtime's request path (DESIGN §3, "requests routed by tier scheduler"). :class:`PlanServer` runs one
:class:`~nitsum_opt.sim.deployment.Deployment` on the engines of an :class:`~nitsum_runtime.pool.EnginePool` with
the scheduler the simulator uses, unchanged: :class:`~nitsum_opt.scheduler.MultiTierScheduler`, configured by
:func:`~nitsum_opt.sim.deployment.scheduler_config` (admission by token bucket, feasible / best-effort /
background queues, SLO-safe seats, spill-over, the central queue). So a request timeline measured here and one
simulated for the same deployment and trace differ only where the simulator's engines differ from the real ones.

The loop, open-loop in wall-clock time:

* a request is submitted to the scheduler when the clock reaches its arrival; the instance it picks gets it
  (or the scheduler holds it centrally until a seat frees: :meth:`MultiTierScheduler.release`);
* engines step **concurrently**: an engine with ``begin_step`` / ``end_step`` (a vLLM engine process) is started
  and collected when its pipe answers, so a fast decode engine is never held to a slow prefill engine's pace;
  other engines (the reference engine) step in line. A command to a stepping engine waits until its step ends
  (requests arriving meanwhile join after it, as in a server's input queue);
* a request whose first token comes from a **prefill** instance is handed off: the scheduler picks the decode
  instance (:meth:`MultiTierScheduler.handoff`), the prefill engine takes no further step until the request left
  it, and it moves with its KV (:meth:`Engine.import_requests` with the prefill engine as ``kv_source``; vLLM
  engines with the Nitsum KV connector copy the KV over NVLink) or, where no KV path exists, is re-prefilled on
  the decode engine (CPU stand-ins);
* every token passes the pool's ledger (:meth:`EnginePool.record`): none lost, duplicated or out of order.

Per request it records what :mod:`nitsum_runtime.replay` records (TTFT to the end of the step that produced the
first token, TPOT over the rest, the finish; the simulator's definitions) plus the class the scheduler gave it at
arrival; requests still running ``drain_s`` after the last arrival are aborted, and held ones never dispatched
count as unfinished.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as wait_ready
from typing import Protocol

from nitsum_opt.models.spec import Role
from nitsum_opt.scheduler import MultiTierScheduler
from nitsum_opt.sim.deployment import Deployment, scheduler_config
from nitsum_opt.spec import SHARED_TIER, Tier
from nitsum_runtime.engine import Engine, EngineState, GenerationRequest, TokenEvent
from nitsum_runtime.handoff import Move, arrive, leave
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.replay import RequestTiming, validate_requests
from nitsum_runtime.serving_reconfig import Reconfigurable
from nitsum_runtime.serving_types import ServingResult, TieredRequest, check_servable


class PlanServer:
    """Serve ``deployment`` on ``pool``'s engines for ``tiers`` (module docstring). Each instance runs on the pool's
    engine for its GPUs; the pool's routing table is set to the deployment."""

    def __init__(self, pool: EnginePool, deployment: Deployment, tiers: Sequence[Tier]) -> None:
        check_servable(deployment)
        self.pool = pool
        self.deployment = deployment
        self.tiers = tuple(tiers)
        self.config = scheduler_config(self.tiers, deployment)
        self.instances = deployment.instances
        self.engines: list[Engine] = [pool.engine(i.gpu_ids) for i in self.instances]
        for inst, engine in zip(self.instances, self.engines, strict=True):
            pool.route(inst.key, engine, inst.tier or SHARED_TIER)

    def wake(self) -> None:
        """Wake every instance's engine that sleeps and fill its weights from the resident copy."""
        for engine in self.engines:
            if engine.state is EngineState.ASLEEP:
                engine.wake()
                engine.fill_weights()

    def serve(
        self,
        requests: Sequence[TieredRequest],
        *,
        vocab_size: int,
        max_model_len: int,
        drain_s: float = 60.0,
        seed: int = 0,
        top_k: int = 0,
        progress: Callable[[str], None] | None = None,
        prefix: str = "",
        control: LoopControl | None = None,
        log_steps: bool = False,
    ) -> ServingResult:
        """Serve ``requests`` (sorted by arrival; prompts are seeded random tokens made before the clock starts)
        and return every request's timing. Request ids are ``<prefix>r<index>`` (unique per pool ledger);
        ``top_k`` log-probabilities per token (0: none, as a server returns by default); ``control`` is called at
        every turn of the loop (it may change the deployment); ``log_steps``: keep every engine step's time and
        composition (:attr:`ServingResult.step_log`; vLLM engines and their CPU stand-in report them)."""
        validate_requests(requests, vocab_size, max_model_len)
        names = {t.name for t in self.tiers}
        unknown = sorted({r.tier for r in requests} - names)
        if unknown:
            raise ValueError(f"requests of tiers {unknown}; the server's tiers are {sorted(names)}")
        rng = random.Random(seed)
        made = [
            GenerationRequest(
                request_id=f"{prefix}r{i}",
                prompt_token_ids=tuple(rng.randrange(vocab_size) for _ in range(r.input_tokens)),
                max_tokens=r.output_tokens,
                top_k=top_k,
            )
            for i, r in enumerate(requests)
        ]
        return ServingRun(self, requests, made, control, log_steps).go(drain_s, progress)


class LoopControl(Protocol):
    """Called by the serving loop at every turn (e.g. :class:`~nitsum_runtime.adaptive.EpochControl`, which
    re-plans at epochs); it may :meth:`ServingRun.quiesce` the loop and :meth:`ServingRun.retarget` it."""

    def tick(self, run: ServingRun, now: float) -> None:
        """One turn of the loop at ``now`` (seconds since the start of the run)."""

    def idle(self) -> bool:
        """Whether it has nothing left to do (the loop ends once requests are served and it is idle)."""


class ServingRun(Reconfigurable):
    """One :meth:`PlanServer.serve` call: the loop's state and steps."""

    def __init__(
        self,
        server: PlanServer,
        requests: Sequence[TieredRequest],
        made: list[GenerationRequest],
        control: LoopControl | None = None,
        log_steps: bool = False,
    ) -> None:
        self.requests, self.made, self.control, self.log_steps = requests, made, control, log_steps
        self.pool = server.pool
        self.tiers = server.tiers
        tindex = {t.name: k for k, t in enumerate(server.tiers)}
        self.tier_of = [tindex[r.tier] for r in requests]
        self.index_of = {g.request_id: k for k, g in enumerate(made)}
        n = len(requests)
        self.result = ServingResult(
            timings=[RequestTiming() for _ in range(n)], classes=[-1] * n, late_adds=[math.nan] * n
        )
        self.klass = [-1] * n
        self.moves: dict[int, list[Move]] = {}  # decode instance -> requests on their way to it
        self.stepping: set[int] = set()
        self.stopping = False
        self.sched = MultiTierScheduler(server.config, now_s=0.0)
        self.retarget(server)
        self.t0 = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ------------------------------------------------------------------ requests in
    def admit_until(self, now: float, nxt: int) -> int:
        """Submit every request arrived by ``now`` from index ``nxt``; returns the next index."""
        while nxt < len(self.requests) and self.requests[nxt].arrival_s <= now:
            target, klass = self.sched.submit(now, nxt, self.tier_of[nxt])
            self.result.classes[nxt] = self.klass[nxt] = klass
            if target >= 0:
                self.to_add[target].append(nxt)
            nxt += 1
        self.result.max_held = max(self.result.max_held, self.sched.held)
        return nxt

    def dispatch(self, held: list[tuple[int, int, int, int]]) -> None:
        """Requests the scheduler released from its central queue go to their instances."""
        for r, _, instance, klass in held:
            self.klass[r] = klass
            self.to_add[instance].append(r)

    def flush_adds(self, i: int) -> None:
        """Hand instance ``i`` (idle) the requests dispatched to it."""
        now = self.now()
        for r in self.to_add[i]:
            self.pool.place(self.requests[r].tier, self.made[r], self.keys[i])
            self.result.late_adds[r] = now - self.requests[r].arrival_s
        self.to_add[i].clear()

    # ------------------------------------------------------------------ tokens out
    def on_events(self, i: int, events: list[TokenEvent]) -> None:
        """Tokens of instance ``i``'s step, collected now."""
        now = self.now()
        self.result.steps[self.keys[i]] += 1
        handed: list[int] = []
        for ev in events:
            self.pool.record(ev)
            r = self.index_of[ev.request_id]
            t = self.result.timings[r]
            if ev.index == 0:
                t.first_token_at_s = now
                t.ttft_s = now - self.requests[r].arrival_s
            if ev.finished:
                t.finish_s = now
                n_out = self.requests[r].output_tokens
                if n_out >= 2:
                    t.tpot_s = (now - t.first_token_at_s) / (n_out - 1)
                self.dispatch(self.sched.release(now, i, self.tier_of[r]))
            elif ev.index == 0 and self.roles[i] is Role.PREFILL:
                handed.append(r)
        if handed:
            self.hand_off(i, handed, now)

    def hand_off(self, i: int, handed: list[int], now: float) -> None:
        """Requests ``handed`` have their first token on prefill instance ``i`` (between steps): book a decode
        instance for each and take them off ``i`` (:func:`~nitsum_runtime.handoff.leave`)."""
        by_target: dict[int, list[str]] = {}
        for r in handed:
            tier = self.tier_of[r]
            self.dispatch(self.sched.release(now, i, tier))
            target = self.sched.handoff(now, tier, self.host_tier[i], self.klass[r])
            if target < 0:
                raise RuntimeError(
                    f"no decode instance of deployment {self.server.deployment.describe()!r} takes tier "
                    f"{self.tiers[tier].name!r} hand-offs from {self.keys[i]}; give that tier a decode instance"
                )
            by_target.setdefault(target, []).append(self.made[r].request_id)
        for d, ids in by_target.items():
            t0 = time.perf_counter()
            exported = leave(self.engines[i], self.engines[d], ids)
            if exported is None:
                self.outgoing[i] += ids
            self.moves.setdefault(d, []).append(Move(ids, i, exported))
            self.result.leave_s.append(time.perf_counter() - t0)

    def run_moves(self) -> None:
        """Carry out booked hand-offs whose decode engine is not stepping (prefill engines holding requests that
        must leave never are)."""
        for d in [d for d in self.moves if d not in self.stepping]:
            t0 = time.perf_counter()
            for move in self.moves.pop(d):
                done = arrive(self.engines[move.src], self.engines[d], move)
                for rid in move.request_ids:
                    self.pool.owner[rid] = self.keys[d]
                self.result.handoffs += len(move.request_ids)
                self.result.migrated += done.migrated
                if move.exported is None:
                    self.outgoing[move.src] = [x for x in self.outgoing[move.src] if x not in move.request_ids]
                elif move.exported.source is not None:
                    self.releases[move.src].append(move.exported)
            self.result.arrive_s.append(time.perf_counter() - t0)

    # ------------------------------------------------------------------ engines
    def start_steps(self) -> None:
        """Start a step on every idle instance with work (in-line engines run theirs to the end here)."""
        for i, engine in enumerate(self.engines):
            if i in self.stepping or self.outgoing[i]:
                continue
            self.free_buffers(i)
            if self.to_add[i]:
                self.flush_adds(i)
            if not engine.request_ids():
                continue
            if getattr(engine, "begin_step", None) is None:
                t0 = time.perf_counter()
                events = engine.step()
                self.result.busy_s[self.keys[i]] += time.perf_counter() - t0
                self.on_events(i, events)
            else:
                self.begin(i)

    def begin(self, i: int) -> None:
        if self.engines[i].begin_step():  # type: ignore[attr-defined]
            self.stepping.add(i)
            self.began[i] = time.perf_counter()

    def free_buffers(self, i: int) -> None:
        """Free the KV buffers of requests that left instance ``i`` (between steps) and arrived elsewhere."""
        for exported in self.releases[i]:
            self.engines[i].release_exported(exported)  # type: ignore[attr-defined]
        self.releases[i].clear()

    def may_pipeline(self, i: int) -> bool:
        """Whether instance ``i`` may start its next step before its last step's tokens are processed: nothing
        waits to be added to it, moved into it or freed on it, and it hands nothing off (not a prefill instance)."""
        busy = self.to_add[i] or i in self.moves or self.releases[i]
        return not (self.stopping or self.roles[i] is Role.PREFILL or busy)

    def collect(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for stepping engines and take the tokens of those that finished (an engine
        with nothing else to do starts its next step first, so the tokens are processed while it runs)."""
        by_pipe = {self.engines[i].step_waitable: i for i in self.stepping}  # type: ignore[attr-defined]
        for pipe in wait_ready(list(by_pipe), timeout=max(0.0, timeout_s)):
            i = by_pipe[pipe]  # type: ignore[index]
            self.stepping.discard(i)
            events = self.engines[i].end_step()  # type: ignore[attr-defined]
            round_trip = time.perf_counter() - self.began[i]
            self.result.busy_s[self.keys[i]] += round_trip
            self.result.engine_s[self.keys[i]] += self.engines[i].last_engine_s  # type: ignore[attr-defined]
            if self.log_steps:
                rows = self.engines[i].last_step_log  # type: ignore[attr-defined]
                self.result.step_log += [(self.keys[i], round_trip / len(rows), *row) for row in rows]
            if self.may_pipeline(i):
                self.begin(i)
            self.on_events(i, events)

    def busy(self) -> bool:
        return bool(self.stepping or self.moves or any(self.to_add) or any(e.request_ids() for e in self.engines))

    # ------------------------------------------------------------------ the loop
    def go(self, drain_s: float, progress: Callable[[str], None] | None) -> ServingResult:
        n = len(self.requests)
        last = self.requests[-1].arrival_s if n else 0.0
        nxt, next_report = 0, 10.0
        self.t0 = time.perf_counter()
        while True:
            now = self.now()
            if self.control is not None:
                self.control.tick(self, now)
            nxt = self.admit_until(now, nxt)
            if now > last + drain_s:
                self.abort_rest()
                break
            self.run_moves()
            self.start_steps()
            until_next = self.requests[nxt].arrival_s - self.now() if nxt < n else 0.05
            if self.stepping:
                self.collect(min(until_next, 0.05))
            elif not self.busy():
                if nxt >= n and (self.control is None or self.control.idle()):
                    break
                time.sleep(max(0.0, min(until_next, 0.05)))
            if progress is not None and now >= next_report:
                progress(f"t={now:.0f} s: {nxt}/{n} arrived, {self.sched.held} held, {len(self.pool.owner)} in engines")
                next_report += 10.0
        self.result.never_dispatched += self.sched.held
        self.result.wall_s = self.now()
        return self.result

    def abort_rest(self) -> None:
        """At the drain limit: finish running steps, then drop every request still in an engine."""
        self.stopping = True
        while self.stepping:
            self.collect(60.0)
        for i, engine in enumerate(self.engines):
            ids = list(engine.request_ids())
            if ids:
                engine.drop_requests(ids)
                self.result.aborted += len(ids)
            self.result.never_dispatched += len(self.to_add[i])
            self.to_add[i].clear()
            self.free_buffers(i)
        for moves in self.moves.values():  # exported and not arrived: their KV buffers go too
            for move in moves:
                self.result.aborted += len(move.request_ids) if move.exported is not None else 0
                if move.exported is not None and move.exported.source is not None:
                    self.engines[move.src].release_exported(move.exported)  # type: ignore[attr-defined]
        self.moves.clear()


__all__ = ["LoopControl", "PlanServer", "ServingResult", "ServingRun", "TieredRequest", "check_servable"]
