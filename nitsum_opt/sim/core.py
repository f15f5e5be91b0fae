"""The discrete-event simulator: arrivals → multi-tier scheduler → engines, with epochs at which a controller
may change the deployment.

Events, in time order (ties: engine steps before arrivals): a request arrives (admitted, classified and routed by
:class:`~nitsum_opt.scheduler.MultiTierScheduler`); an engine's step or fast-forward jump ends
(:mod:`nitsum_opt.sim.engine`); a KV transfer ends (P→D hand-off or migration after a plan change); a paused
engine resumes; an epoch starts and the controller may return a new deployment (:mod:`nitsum_opt.sim.transitions`).
The controller sees only requests that have arrived. Request outcomes are kept in plain lists during the run and
returned as numpy columns (:class:`~nitsum_opt.sim.results.SimResult`).

What is exact and what is approximated: step times are the iteration model's (deterministic, its mean); decode
stretches are fast-forwarded exactly for models affine in the decode context (see the engine module); KV is counted
in tokens (no block rounding); a P→D or migration transfer takes ``bytes / (bandwidth · min(tp_src, tp_dst))``
plus a fixed latency and transfers leaving one engine are serialised; a mixed step in flight on an engine that a
plan change removes is lost (its requests are moved as they were at the step's start).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from heapq import heappop, heappush

import numpy as np

from nitsum_opt.models.spec import ModelSpec
from nitsum_opt.scheduler import MultiTierScheduler
from nitsum_opt.sim.controllers.base import ControlContext, Controller
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.sim.engine import JUMP, Engine
from nitsum_opt.sim.results import Outcome, RejectReason, SimResult, StepRecord
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.sim.timing import IterationTimeModel
from nitsum_opt.sim.transitions import adds_engines, apply_deployment
from nitsum_opt.spec import ClusterSpec, Tier
from nitsum_opt.workloads.trace import RequestTrace

_STEP, _TRANSFER, _RESUME, _EPOCH, _APPLY = 0, 1, 2, 3, 4


class RequestState:
    """Per-request columns as Python lists (fast scalar access in the event loop)."""

    __slots__ = (
        "arrival",
        "base",
        "engine",
        "finish",
        "first",
        "gen",
        "held_kv",
        "host",
        "inp",
        "klass",
        "klass0",
        "migrations",
        "out",
        "outcome",
        "pre_len",
        "preemptions",
        "prio",
        "reason",
        "src",
        "tier",
    )

    def __init__(self, trace: RequestTrace) -> None:
        n = len(trace)
        nan = math.nan
        self.arrival: list[float] = trace.arrival_s.tolist()
        self.inp: list[int] = trace.input_tokens.tolist()
        self.out: list[int] = trace.output_tokens.tolist()
        self.tier: list[int] = trace.tier.tolist()
        self.klass = [-1] * n  # current class (a held request may be demoted to background)
        self.klass0 = [-1] * n  # class given at arrival
        self.prio = [0] * n
        self.first = [nan] * n
        self.finish = [nan] * n
        self.outcome = [int(Outcome.UNFINISHED)] * n
        self.reason = [int(RejectReason.NONE)] * n
        self.pre_len = list(self.inp)
        self.gen = [0] * n
        self.base = [0] * n
        self.engine = [-1] * n
        self.host = [-1] * n
        self.src = [-1] * n
        self.held_kv = [0] * n
        self.preemptions = [0] * n
        self.migrations = [0] * n


class Simulator:
    """Simulate ``trace`` on ``cluster`` under ``controller`` (one run; see the module docstring).

    Args:
        trace: the requests (tier names must match ``tiers``).
        tiers: SLO tiers, in the trace's tier order.
        model: iteration-time model (step times and KV capacity).
        model_spec: the served model (KV bytes per token, ``max_model_len``).
        cluster: the GPUs.
        controller: decides the deployment at start and at every epoch.
        settings: engine, switch-cost and run knobs.
        record_steps: keep every step/jump's (engine, GPUs, start, end) for inspection (tests, timelines).
    """

    REJECT_KV = int(RejectReason.EXCEEDS_KV_CACHE)

    def __init__(
        self,
        trace: RequestTrace,
        tiers: Sequence[Tier],
        model: IterationTimeModel,
        model_spec: ModelSpec,
        cluster: ClusterSpec,
        controller: Controller,
        settings: SimSettings | None = None,
        record_steps: bool = False,
    ) -> None:
        names = tuple(t.name for t in tiers)
        if names != trace.tier_names:
            raise ValueError(
                f"tiers {list(names)} do not match the trace's tiers {list(trace.tier_names)} (same names, same order)"
            )
        self.trace = trace
        self.tiers = tuple(tiers)
        self.model = model
        self.predict_ms = model.predict_ms
        self.model_spec = model_spec
        self.cluster = cluster
        self.controller = controller
        self.settings = settings or SimSettings()
        self.max_jump = self.settings.max_jump_steps
        self.leave_s = self.settings.switch.handoff_leave_ms * 1e-3
        self.arrive_s = self.settings.switch.handoff_arrive_ms * 1e-3
        self.kv_bytes_per_token = float(model_spec.kv_bytes_per_token)
        self.req = RequestState(trace)
        self.engines: list[Engine] = []
        self.s2e: list[int] = []  # scheduler instance index -> engine index (for the current deployment)
        self.sched: MultiTierScheduler | None = None
        self.heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self.timeline: list[tuple[float, object]] = []
        self.switch_windows: list[tuple[str, tuple[int, ...], float, float]] = []
        self.prepared: dict[int, Deployment] = {}  # epoch -> deployment being prepared ahead
        self.step_log: list[StepRecord] | None = [] if record_steps else None
        self.pending_handoffs: list[int] = []
        self.steps_simulated = 0
        self.events = 0
        self.stopped_early = False
        self.ctx = ControlContext(
            cluster=cluster, tiers=self.tiers, model_spec=model_spec, model=model, settings=self.settings
        )

    # ------------------------------------------------------------------ event plumbing
    def push_step(self, engine: Engine, t: float) -> None:
        """Schedule the end of ``engine``'s step/jump (older events of the engine become stale)."""
        self._seq += 1
        heappush(self.heap, (t, self._seq, _STEP, engine.idx, engine.version))

    def _push(self, t: float, kind: int, a: int, b: int) -> None:
        self._seq += 1
        heappush(self.heap, (t, self._seq, kind, a, b))

    def kick(self, engine: Engine, now: float) -> None:
        """New work for ``engine`` at ``now``: start it if idle (unless paused), cut its jump short if jumping."""
        if not engine.alive:
            return
        if engine.mode == 0:
            if engine.paused_until > now:
                if not engine.resume_pending:
                    engine.resume_pending = True
                    self._push(engine.paused_until, _RESUME, engine.idx, 0)
                return
            engine.start(self, now)
        elif engine.mode == JUMP:
            engine.truncate(self, now)

    def place(self, r: int, sched_idx: int, klass: int, now: float) -> None:
        """Put request ``r`` (class ``klass``) into the waiting queue of the scheduler's instance ``sched_idx``."""
        req = self.req
        engine_idx = self.s2e[sched_idx]
        engine = self.engines[engine_idx]
        req.klass[r] = klass
        prio = self.sched.priority(klass, req.tier[r])  # type: ignore[union-attr]
        req.prio[r] = prio
        req.engine[r] = engine_idx
        req.host[r] = engine.tier
        heappush(engine.waiting, (prio, r))
        self.kick(engine, now)

    def dispatch_all(self, dispatches: list[tuple[int, int, int, int]], now: float) -> None:
        """Place requests the scheduler released from its central queue."""
        for r, _, sched_idx, klass in dispatches:
            self.place(r, sched_idx, klass, now)

    # ------------------------------------------------------------------ request outcomes
    def complete(self, r: int, now: float, engine: Engine) -> None:
        """Request ``r`` produced its last token on ``engine`` at ``now``."""
        req = self.req
        req.finish[r] = now
        req.outcome[r] = int(Outcome.COMPLETED)
        req.gen[r] = req.out[r]
        self.dispatch_all(self.sched.release(now, engine.sidx, req.tier[r]), now)  # type: ignore[union-attr]

    def reject(self, r: int, now: float, engine: Engine | None, reason: int) -> None:
        """Request ``r`` cannot be served (``reason``); it ends here."""
        req = self.req
        req.outcome[r] = int(Outcome.REJECTED)
        req.reason[r] = reason
        req.finish[r] = now
        if engine is not None:
            self.dispatch_all(self.sched.release(now, engine.sidx, req.tier[r]), now)  # type: ignore[union-attr]

    def hand_off(self, r: int, now: float, engine: Engine, held_kv: int) -> None:
        """Request ``r`` finished its prefill on prefill engine ``engine``: send its KV to a decode engine."""
        sched = self.sched
        req = self.req
        self.dispatch_all(sched.release(now, engine.sidx, req.tier[r]), now)  # type: ignore[union-attr]
        req.src[r] = engine.idx
        req.held_kv[r] = held_kv
        host = engine.tier if engine.tier >= 0 else None
        target = sched.handoff(now, req.tier[r], host, req.klass[r])  # type: ignore[union-attr]
        if target < 0:
            self.pending_handoffs.append(r)
            return
        self.send_kv(r, now, engine, self.engines[self.s2e[target]], req.inp[r] + req.gen[r])

    def send_kv(self, r: int, now: float, src: Engine, dst: Engine, tokens: int) -> None:
        """Transfer ``tokens`` of request ``r``'s KV from ``src`` to ``dst`` (serialised per source engine; NVLink
        inside a node, the inter-node link across nodes)."""
        sw = self.settings.switch
        gb_s = sw.kv_migration_gb_s
        if src.gpu_ids[0] // self.cluster.gpus_per_node != dst.gpu_ids[0] // self.cluster.gpus_per_node:
            gb_s = sw.internode_gb_s
        seconds = sw.transfer_latency_ms * 1e-3 + tokens * self.kv_bytes_per_token / (gb_s * 1e9 * min(src.tp, dst.tp))
        start = max(now, src.link_free_s)
        src.link_free_s = start + seconds
        self.req.engine[r] = dst.idx
        self._push(start + seconds, _TRANSFER, dst.idx, r)

    def _transfer_done(self, engine_idx: int, r: int, now: float) -> None:
        req = self.req
        src_idx = req.src[r]
        if src_idx >= 0:
            src = self.engines[src_idx]
            req.src[r] = -1
            if src.alive:
                src.kv_used -= req.held_kv[r]
                self.kick(src, now)
        dst = self.engines[engine_idx]
        if not dst.alive:  # its target was removed by a plan change meanwhile: move on
            target = self.sched.resume_target(req.tier[r], req.klass[r])  # type: ignore[union-attr]
            if target < 0:
                self.pending_handoffs.append(r)
                return
            self.send_kv(r, now, dst, self.engines[self.s2e[target]], req.inp[r] + req.gen[r])
            return
        dst.joins.append(r)
        self.kick(dst, now)

    # ------------------------------------------------------------------ the loop
    def known_misses(self, now: float) -> int:
        """Requests already certain to miss their SLO at ``now``: rejected, past their TTFT deadline without a
        first token, first token late, or completed with a TPOT over target."""
        req = self.req
        first = np.array(req.first)
        outcome = np.array(req.outcome)
        deadline = self._deadline
        late = np.where(np.isnan(first), now > deadline, first > deadline)
        done = outcome == int(Outcome.COMPLETED)
        finish = np.array(req.finish)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = (finish - first) / self._decode_tokens
        slow = done & (self._decode_tokens > 0) & (tpot > self._tpot_slo)
        return int(np.count_nonzero(late | slow | (outcome == int(Outcome.REJECTED))))

    def run(
        self, progress: Callable[[float], None] | None = None, stop: Callable[[Simulator, float], bool] | None = None
    ) -> SimResult:
        """Simulate to the horizon (last arrival + ``drain_s``) and return every request's outcome. ``stop`` is
        asked every 2.5 % of the arrivals whether to end the run early (a search pruning a candidate that can no
        longer win); the result then has ``stopped_early`` set."""
        trace, req, settings = self.trace, self.req, self.settings
        start_s = trace.start_s
        horizon = trace.end_s + settings.drain_s
        warmup = trace.window(start_s, start_s + settings.epoch_s)
        apply_deployment(self, self.controller.start(self.ctx, warmup), start_s)
        if not self.controller.is_static:
            k = 1
            while start_s + k * settings.epoch_s < trace.end_s:
                self._push(start_s + k * settings.epoch_s, _EPOCH, k, 0)
                k += 1
        arrivals, tiers = req.arrival, req.tier
        inp, out = req.inp, req.out
        max_len = self.model_spec.max_model_len
        n = len(arrivals)
        nxt = 0
        heap = self.heap
        engines = self.engines
        report_every = max(1, n // 100)
        check_every = max(1, n // 40)
        if stop is not None:
            slo = self.tiers
            tier_arr = self.trace.tier
            self._deadline = self.trace.arrival_s + np.array([t.ttft_slo_ms / 1000.0 for t in slo])[tier_arr]
            self._tpot_slo = np.array([t.tpot_slo_ms / 1000.0 for t in slo])[tier_arr]
            self._decode_tokens = (self.trace.output_tokens - 1).astype(np.float64)
        while True:
            t_next = heap[0][0] if heap else math.inf
            if nxt < n and arrivals[nxt] < t_next:
                t = arrivals[nxt]
                if t > horizon:
                    break
                r = nxt
                nxt += 1
                if progress is not None and r % report_every == 0:
                    progress(r / n)
                if stop is not None and r % check_every == 0 and r and stop(self, t):
                    self.stopped_early = True
                    break
                if inp[r] + out[r] > max_len:
                    self.reject(r, t, None, int(RejectReason.OVER_MAX_MODEL_LEN))
                    continue
                target, klass = self.sched.submit(t, r, tiers[r])  # type: ignore[union-attr]
                req.klass[r] = req.klass0[r] = klass
                if target >= 0:
                    self.place(r, target, klass, t)
                continue
            if t_next > horizon:
                break
            t, _, kind, a, b = heappop(heap)
            self.events += 1
            if kind == _STEP:
                engine = engines[a]
                if engine.version == b and engine.alive and engine.mode != 0 and engine.step_end == t:
                    self.steps_simulated += engine.jump_k if engine.mode == JUMP else 1
                    if self.step_log is not None:
                        self.step_log.append(StepRecord(engine.key, engine.gpu_ids, engine.t0, t))
                    engine.finish_step(self, t)
            elif kind == _TRANSFER:
                self._transfer_done(a, b, t)
            elif kind == _RESUME:
                engine = engines[a]
                engine.resume_pending = False
                self.kick(engine, t)
            elif kind == _APPLY:
                apply_deployment(self, self.prepared.pop(a), t, pause=False)
            else:
                self._epoch(a, t)
        if progress is not None:
            progress(1.0)
        return SimResult.from_simulator(self, horizon)

    def _epoch(self, k: int, now: float) -> None:
        window = self.trace.window(now - self.settings.epoch_s, now)
        deployment = self.controller.on_epoch(self.ctx, now, window)
        if deployment is None:
            return
        switch = self.settings.switch
        if switch.prepare_ahead and switch.switch_s > 0 and adds_engines(self, deployment):
            self.prepared[k] = deployment  # its new engines wake while the current deployment serves
            self._push(now + switch.switch_s, _APPLY, k, 0)
        else:
            apply_deployment(self, deployment, now)
