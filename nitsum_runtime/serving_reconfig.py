"""Changing what a running serving loop (:class:`~nitsum_runtime.serving.ServingRun`) serves: quiesce it, give it
another deployment's instances or scheduler, set the engines' step budgets, recount seats from the pool's ledger.

Used at the start of every run and by controls that change the deployment mid-run
(:class:`~nitsum_runtime.adaptive.EpochControl`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nitsum_opt.scheduler import MultiTierScheduler

if TYPE_CHECKING:
    from nitsum_runtime.serving import PlanServer
    from nitsum_runtime.vllm_pool_kv import ExportedKv


class Reconfigurable:
    """The reconfiguration half of :class:`~nitsum_runtime.serving.ServingRun` (its loop state is set there)."""

    server: PlanServer
    sched: MultiTierScheduler
    engines: list[Any]
    keys: list[str]
    stepping: set[int]
    moves: dict[int, Any]
    to_add: list[list[int]]
    stopping: bool
    result: Any
    pool: Any
    index_of: dict[str, int]
    tier_of: list[int]
    # and the loop's collect, run_moves, free_buffers, flush_adds and dispatch (ServingRun's)

    def retarget(self, server: PlanServer) -> None:
        """Serve ``server``'s deployment from now on (at the start, or :meth:`quiesce`-d: nothing stepping, moving or
        waiting to be added); the caller sets :attr:`sched` for it."""
        if self.stepping or self.moves or any(getattr(self, "to_add", ())):
            raise RuntimeError("retarget needs a quiesced loop: steps, hand-offs or adds are in flight")
        self.server, self.engines = server, server.engines
        self.keys = [i.key for i in server.instances]
        self.roles = [i.role for i in server.instances]
        tindex = {t.name: k for k, t in enumerate(server.tiers)}
        self.host_tier = [None if i.tier is None else tindex[i.tier] for i in server.instances]
        m = len(self.engines)
        self.to_add: list[list[int]] = [[] for _ in range(m)]
        self.outgoing: list[list[str]] = [[] for _ in range(m)]  # requests that must leave a prefill engine first
        self.releases: list[list[ExportedKv]] = [[] for _ in range(m)]  # KV buffers to free on an engine
        self.began = [0.0] * m
        self.set_budgets()
        for key in self.keys:
            self.result.steps.setdefault(key, 0)
            self.result.busy_s.setdefault(key, 0.0)
            self.result.engine_s.setdefault(key, 0.0)

    def set_budgets(self) -> None:
        """Give every engine its instance's step token budget (engines between steps; ``None``: the engine's own;
        engines without a settable budget keep theirs and record ``None``)."""
        for inst, engine in zip(self.server.instances, self.engines, strict=True):
            setter = getattr(engine, "set_step_budget", None)
            self.result.step_budgets[inst.key] = None if setter is None else setter(inst.max_num_batched_tokens)

    def quiesce(self) -> None:
        """Bring every engine between steps with nothing in flight: running steps collected (none pipelined),
        hand-offs arrived, exported buffers freed, dispatched requests added to their engines."""
        self.stopping = True
        while self.stepping:
            self.collect(60.0)
        while self.moves:
            self.run_moves()
        for i in range(len(self.engines)):
            self.free_buffers(i)
            if self.to_add[i]:
                self.flush_adds(i)
        self.stopping = False

    def reschedule(self, server: PlanServer, now: float) -> None:
        """Schedule with ``server``'s deployment from ``now``: the same instances in the same order (other admission,
        seats or switches); loads, token buckets and held requests carry over, held ones dispatch where room is."""
        if [i.key for i in server.instances] != self.keys:
            raise ValueError(f"reschedule needs the same instances in order: {self.keys}, got {server.instances}")
        retuned = [
            a.max_num_batched_tokens != b.max_num_batched_tokens
            for a, b in zip(self.server.instances, server.instances, strict=True)
        ]
        self.server = server
        if any(retuned):
            self.quiesce()
            self.set_budgets()
        self.sched = MultiTierScheduler(server.config, previous=self.sched, now_s=now)
        self.dispatch(self.sched.pump(now))

    def adopt(self, server: PlanServer, now: float) -> None:
        """Serve ``server``'s deployment after a transition moved requests between engines (the loop quiesced): a
        new scheduler (token buckets and held requests carried over) counts every request where the pool's ledger
        has it now, and held requests dispatch where room is."""
        self.retarget(server)
        sched = MultiTierScheduler(server.config, previous=self.sched, now_s=now)
        sched.recount(self.placed())
        self.sched = sched
        self.dispatch(sched.pump(now))

    def placed(self) -> list[tuple[int, int]]:
        """``(instance, tier)`` of every request of this run that an engine of the deployment holds (the pool's
        ledger), for :meth:`MultiTierScheduler.recount`."""
        index = {key: i for i, key in enumerate(self.keys)}
        out = []
        for rid, owner in self.pool.owner.items():
            r = self.index_of.get(rid)
            if r is not None and owner in index:
                out.append((index[owner], self.tier_of[r]))
        return out
