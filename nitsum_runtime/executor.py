"""Carries a transition out on an :class:`~nitsum_runtime.pool.EnginePool`, times every step, and rolls back
on failure.

Every action before the commit point (pause, wake, fill weights, move requests) registers its undo; if one of
them raises, the undos run in reverse order: imported request copies are dropped from the targets, woken
engines go back to sleep, paused sources resume. Sources keep their requests until the commit, so a rollback
loses nothing and the pool serves the previous plan again. After the commit (route, sleep, resume) the target
plan is live; a failure there is reported and the remaining actions still run.

Per request, :func:`~nitsum_runtime.switch_cost.kv_switch_cost` chooses KV migration or re-prefill (``policy``
may force one); the chosen prices are in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Literal

from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec
from nitsum_runtime.engine import Engine, EngineState, RequestSnapshot
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.switch_cost import KvSwitchCost, PrefillTimeModel, RooflinePrefillModel, kv_switch_cost
from nitsum_runtime.transitions import (
    PREPARE_KINDS,
    Action,
    FillWeights,
    Layout,
    MoveRequests,
    Pause,
    Resume,
    Route,
    Sleep,
    Wake,
    diff_plans,
    instances_of,
)


class StepTiming(Frozen):
    """One executed action (or undo)."""

    kind: str
    """Action kind (``undo:<kind>`` for rollback steps)."""
    instance_id: str
    """Instance acted on."""
    seconds: float = Field(ge=0)
    """Wall time."""
    ok: bool
    """Whether it succeeded."""
    detail: str = ""
    """What it did (bytes, requests) or the error."""


class MoveDecision(Frozen):
    """Where one request went and how."""

    request_id: str
    """Request."""
    from_instance: str
    """Instance it left."""
    to_instance: str
    """Instance it joined."""
    cost: KvSwitchCost
    """Both prices; ``cost.choice`` unless the policy forced the other."""
    method: Literal["migrate", "reprefill"]
    """What was done."""


class TransitionReport(Frozen):
    """Outcome and timing of one transition."""

    ok: bool
    """True when every action succeeded."""
    rolled_back: bool
    """True when a failure before the commit point restored the previous plan."""
    error: str = ""
    """First error, if any."""
    steps: tuple[StepTiming, ...]
    """Executed actions in order, then rollback steps."""
    total_s: float = Field(ge=0)
    """Wall time of the whole transition."""
    pause_to_resume_s: float = Field(ge=0)
    """From the first pause to the end of the last resume (0 without pause): the switch time users see."""
    moves: tuple[MoveDecision, ...] = ()
    """Every moved request."""
    kv_bytes_moved: int = Field(default=0, ge=0)
    """KV bytes written into target engines."""
    weight_bytes_filled: int = Field(default=0, ge=0)
    """Weight bytes copied from resident stores."""

    @property
    def migrated(self) -> int:
        """Requests whose KV was migrated."""
        return sum(1 for m in self.moves if m.method == "migrate")

    @property
    def reprefilled(self) -> int:
        """Requests re-prefilled."""
        return sum(1 for m in self.moves if m.method == "reprefill")


class TransitionExecutor:
    """Applies plans to one node's pool."""

    def __init__(
        self,
        pool: EnginePool,
        spec: ModelSpec,
        link_gb_per_s: float = 370.0,
        prefill_model: PrefillTimeModel | None = None,
        policy: Literal["auto", "migrate", "reprefill"] = "auto",
    ) -> None:
        self.pool, self.spec, self.link_gb_per_s, self.policy = pool, spec, link_gb_per_s, policy
        self.prefill_model = prefill_model or RooflinePrefillModel(spec=spec)

    def execute(
        self, current: Layout | None, target: Layout, prepared: Collection[tuple[int, ...]] = ()
    ) -> TransitionReport:
        """Turn ``current`` (what the pool serves now, a plan or its instances; None at start) into ``target``.
        ``prepared``: GPU groups whose engines were woken and filled ahead (while the old plan served); their wake
        and fill are skipped, and a rollback puts them back to sleep."""
        actions = diff_plans(current, target)
        self._validate(actions, target)
        run = _Run(self)
        run.prepared = {tuple(g) for g in prepared}
        t0 = time.perf_counter()
        for action in actions:
            if run.error and not run.committed:
                break  # a prepare step failed: stop here and roll back
            run.do(action)
        rolled_back = False
        if run.error and not run.committed:
            run.rollback()
            rolled_back = True
        end = time.perf_counter()
        first_pause = run.first_pause if run.first_pause is not None else end
        return TransitionReport(
            ok=not run.error,
            rolled_back=rolled_back,
            error=run.error,
            steps=tuple(run.steps),
            total_s=end - t0,
            pause_to_resume_s=(end - first_pause) if run.first_pause is not None else 0.0,
            moves=tuple(run.moves),
            kv_bytes_moved=run.kv_bytes,
            weight_bytes_filled=run.weight_bytes,
        )

    def _validate(self, actions: list[Action], target: Layout) -> None:
        """Refuse, before touching anything, a transition the pool cannot carry out."""
        for inst in instances_of(target):
            self.pool.engine(inst.gpu_ids, inst.node)
        for a in actions:
            engine = self.pool.engine(a.gpu_ids, a.node)
            if isinstance(a, MoveRequests) and not a.to_instances and self.pool.requests_of(a.instance_id):
                raise ValueError(
                    f"instance {a.instance_id!r} holds requests and the target plan has no "
                    "instance to take them; keep at least one instance"
                )
            if isinstance(a, Wake) and engine.state is not EngineState.ASLEEP and engine.request_ids():
                raise ValueError(f"engine {engine.engine_id} for added instance {a.instance_id!r} is busy")


class _Run:
    """State of one execution: timings, undo stack, moves."""

    def __init__(self, ex: TransitionExecutor) -> None:
        self.ex, self.pool = ex, ex.pool
        self.steps: list[StepTiming] = []
        self.undo: list[tuple[str, str, Callable[[], None]]] = []
        self.moves: list[MoveDecision] = []
        self.moved_from: dict[str, list[str]] = {}
        self.error = ""
        self.committed = False
        self.first_pause: float | None = None
        self.kv_bytes = 0
        self.weight_bytes = 0
        self.targets: dict[str, Engine] = {}
        self.prepared: set[tuple[int, ...]] = set()

    def do(self, a: Action) -> None:
        t0 = time.perf_counter()
        if isinstance(a, Pause) and self.first_pause is None:
            self.first_pause = t0
        if a.kind not in PREPARE_KINDS:
            self.committed = True
        try:
            detail = self._apply(a)
            self.steps.append(
                StepTiming(
                    kind=a.kind,
                    instance_id=a.instance_id,
                    seconds=time.perf_counter() - t0,
                    ok=True,
                    detail=detail,
                )
            )
        except Exception as exc:  # the transition reports it; rollback decides what to undo
            msg = f"{a.kind} {a.instance_id}: {type(exc).__name__}: {exc}"
            self.error = self.error or msg
            self.steps.append(
                StepTiming(
                    kind=a.kind,
                    instance_id=a.instance_id,
                    seconds=time.perf_counter() - t0,
                    ok=False,
                    detail=msg[:2000],
                )
            )

    def _apply(self, a: Action) -> str:
        engine = self.pool.engine(a.gpu_ids, a.node)
        if isinstance(a, Pause):
            engine.pause()
            self.undo.append(("pause", a.instance_id, engine.resume))
            return ""
        if isinstance(a, Wake):
            was = EngineState.ASLEEP if a.gpu_ids in self.prepared else engine.state
            self.targets[a.instance_id] = engine
            self.undo.append(("wake", a.instance_id, lambda: self._unwake(engine, was)))
            engine.wake()
            engine.pause()
            return f"{engine.engine_id} was {was.value}"
        if isinstance(a, FillWeights):
            if a.gpu_ids in self.prepared:
                return "filled ahead"
            fill = engine.fill_weights()
            self.weight_bytes += fill.bytes_copied
            return f"{fill.bytes_copied} bytes in {fill.seconds:.4f} s"
        if isinstance(a, MoveRequests):
            return self._move(a, engine)
        if isinstance(a, Route):
            for old in a.replaces:  # same engine, new id / tier / role; the old id may now name another engine
                if self.pool.routes.get(old) is engine:
                    for rid in self.pool.requests_of(old):
                        self.pool.owner[rid] = a.instance_id
                    self.pool.unroute(old)
            self.pool.route(a.instance_id, engine, a.tier)
            for rid in self.moved_to.get(a.instance_id, []):
                self.pool.owner[rid] = a.instance_id
            return ""
        if isinstance(a, Sleep):
            engine.drop_requests(self.moved_from.get(a.instance_id, []))
            if self.pool.routes.get(a.instance_id) is engine:  # the id may already name a target instance
                self.pool.unroute(a.instance_id)
            engine.sleep()
            return ""
        if isinstance(a, Resume):
            engine.resume()
            return ""
        raise TypeError(f"unknown action {a!r}")

    @property
    def moved_to(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for m in self.moves:
            out.setdefault(m.to_instance, []).append(m.request_id)
        return out

    def _unwake(self, engine: Engine, was: EngineState) -> None:
        engine.drop_requests(engine.request_ids())
        if was is EngineState.ASLEEP:
            engine.sleep()

    def _target(self, instance_id: str) -> Engine:
        engine = self.targets.get(instance_id) or self.pool.routes.get(instance_id)
        if engine is None:
            raise KeyError(f"target instance {instance_id!r} has no engine")
        return engine

    def _move(self, a: MoveRequests, src: Engine) -> str:
        ids = [r for r in src.request_ids() if r in self.pool.requests]
        snaps = src.export_requests(ids)
        plan: dict[str, list[tuple[RequestSnapshot, KvSwitchCost, Literal["migrate", "reprefill"]]]] = {}
        for n, snap in enumerate(snaps):
            to = a.to_instances[n % max(1, a.spread)]
            dst = self._target(to)
            cost = kv_switch_cost(
                self.ex.spec,
                snap.num_computed_tokens,
                len(src.gpu_ids),
                len(dst.gpu_ids),
                self.ex.link_gb_per_s,
                self.ex.prefill_model,
                can_migrate=dst.can_migrate_from(src),
            )
            method = cost.choice if self.ex.policy == "auto" else self.ex.policy
            if method == "migrate" and (snap.kv is None or not dst.can_migrate_from(src)):
                method = "reprefill"  # nothing cached yet, or no KV path between the engines
            plan.setdefault(to, []).append((snap, cost, method))
        moved = 0
        for to, items in plan.items():
            dst = self._target(to)
            for method in ("migrate", "reprefill"):
                batch = [s for s, _, m in items if m == method]
                if not batch:
                    continue
                result = dst.import_requests(batch, src if method == "migrate" else None)
                batch_ids = [s.request.request_id for s in batch]
                self.undo.append(("move_requests", a.instance_id, lambda d=dst, b=batch_ids: d.drop_requests(b)))
                moved += result.bytes_moved
            for snap, cost, method in items:
                self.moves.append(
                    MoveDecision(
                        request_id=snap.request.request_id,
                        from_instance=a.instance_id,
                        to_instance=to,
                        cost=cost,
                        method=method,
                    )
                )
        self.kv_bytes += moved
        self.moved_from[a.instance_id] = ids
        return f"{len(ids)} requests, {moved} KV bytes"

    def rollback(self) -> None:
        for kind, instance_id, undo in reversed(self.undo):
            t0 = time.perf_counter()
            try:
                undo()
                ok, detail = True, ""
            except Exception as exc:  # keep undoing the rest; report what failed
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            self.steps.append(
                StepTiming(
                    kind=f"undo:{kind}",
                    instance_id=instance_id,
                    seconds=time.perf_counter() - t0,
                    ok=ok,
                    detail=detail,
                )
            )
        self.moves.clear()
        self.kv_bytes = 0
