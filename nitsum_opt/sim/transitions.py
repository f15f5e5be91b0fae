"""Carrying out a new deployment inside the simulator: keep, pause, migrate, re-route.

An engine is identified by its GPUs, TP and role (:attr:`DeployedInstance.key`):

* an engine the new deployment keeps (same key) runs on undisturbed; if its tier changed only the routing changes
  (requests already on it finish there);
* every other old engine stops at the change (:meth:`Engine.stop`); every new engine starts **paused** for the
  switch cost (``SwitchCosts.switch_s``: a standby wake, or a restart) and serves nothing before it ends. With
  ``SwitchCosts.prepare_ahead`` the new engines are prepared while the old deployment serves: the simulator applies
  the change ``switch_s`` after the decision, without the pause;
* requests that were decoding on a stopped engine **migrate**: their KV (prompt + generated tokens) is sent to a
  decode-capable engine of their tier chosen by the scheduler, at the KV-migration bandwidth, and they continue
  there once the transfer is done and the engine is up; with no such engine they are re-prefilled;
* requests waiting or being prefilled on a stopped engine are re-routed by the new scheduler (a partial prefill is
  lost) and keep their class (feasible stays feasible).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nitsum_opt.scheduler import MultiTierScheduler
from nitsum_opt.sim.deployment import Deployment, scheduler_config
from nitsum_opt.sim.engine import Engine

if TYPE_CHECKING:
    from nitsum_opt.sim.core import Simulator


def _check_fits(sim: Simulator, dep: Deployment) -> None:
    cluster = sim.cluster
    for inst in dep.instances:
        ids = inst.gpu_ids
        if max(ids) >= cluster.total_gpus or min(ids) < 0:
            raise ValueError(f"deployment {dep.label!r}: GPUs {ids} outside the cluster's 0..{cluster.total_gpus - 1}")
        if len({g // cluster.gpus_per_node for g in ids}) != 1:
            raise ValueError(f"deployment {dep.label!r}: instance on GPUs {ids} spans nodes")


def adds_engines(sim: Simulator, dep: Deployment) -> bool:
    """Whether ``dep`` runs an engine the simulator does not run now."""
    alive = {e.key for e in sim.engines if e.alive}
    return any(i.key not in alive for i in dep.instances)


def apply_deployment(sim: Simulator, dep: Deployment, now: float, pause: bool = True) -> None:
    """Switch the simulator to ``dep`` at ``now`` (see the module docstring); ``pause=False``: its new engines were
    prepared ahead and serve at once."""
    _check_fits(sim, dep)
    config = scheduler_config(sim.tiers, dep)
    tier_index = {t.name: k for k, t in enumerate(sim.tiers)}
    old = {e.key: e for e in sim.engines if e.alive}
    kept: list[Engine] = []
    s2e: list[int] = []
    pause_s = sim.settings.switch.switch_s if pause else 0.0
    first = not sim.engines
    for sidx, spec in enumerate(dep.instances):
        engine = old.pop(spec.key, None)
        if engine is None:
            kv = sim.model.kv_cache_tokens(spec.tp)
            engine = Engine(len(sim.engines), spec, -1, kv, sim)
            sim.engines.append(engine)
            if not first and pause_s > 0:
                engine.paused_until = now + pause_s
                sim.switch_windows.append((engine.key, engine.gpu_ids, now, now + pause_s))
        else:
            kept.append(engine)
        engine.retune(spec, sim)
        engine.tier = -1 if spec.tier is None else tier_index[spec.tier]
        engine.sidx = sidx
        s2e.append(engine.idx)
    displaced: list[tuple[Engine, list[int], list[int]]] = [(e, *e.stop(sim, now)) for e in old.values()]
    sim.sched = MultiTierScheduler(config, previous=sim.sched, now_s=now)
    sim.s2e = s2e
    sim.timeline.append((now, dep))
    _move_requests(sim, displaced, now)
    sim.dispatch_all(sim.sched.pump(now), now)
    for engine_idx in s2e:
        engine = sim.engines[engine_idx]
        if engine.outstanding:
            sim.kick(engine, now)


def _move_requests(sim: Simulator, displaced: list[tuple[Engine, list[int], list[int]]], now: float) -> None:
    sched = sim.sched
    assert sched is not None
    req = sim.req
    retry, sim.pending_handoffs = sim.pending_handoffs, []
    for engine, decoding, prompts in displaced:
        for r in decoding:
            _resume(sim, r, engine, now)
        for r in prompts:
            _reroute(sim, r, now)
    for r in retry:
        src = sim.engines[req.src[r]] if req.src[r] >= 0 else None
        _resume(sim, r, src, now)


def _resume(sim: Simulator, r: int, src: Engine | None, now: float) -> None:
    """Move decoding request ``r`` (KV on ``src``) to an engine that can decode it, or re-prefill it."""
    req = sim.req
    target = sim.sched.resume_target(req.tier[r], req.klass[r])  # type: ignore[union-attr]
    if target < 0 or src is None:
        if target >= 0:
            sim.sched.release(now, target, req.tier[r])  # type: ignore[union-attr]
        req.pre_len[r] = req.inp[r] + req.gen[r]
        _reroute(sim, r, now)
        return
    if req.src[r] != src.idx:
        req.src[r] = -1  # a migration: the old engine's KV is gone with it
    req.migrations[r] += 1
    sim.send_kv(r, now, src, sim.engines[sim.s2e[target]], req.inp[r] + req.gen[r])


def _reroute(sim: Simulator, r: int, now: float) -> None:
    req = sim.req
    klass = max(0, req.klass[r])
    target, klass = sim.sched.route(now, r, req.tier[r], klass, req.arrival[r])  # type: ignore[union-attr]
    req.klass[r] = klass
    if target >= 0:
        sim.place(r, target, klass, now)
