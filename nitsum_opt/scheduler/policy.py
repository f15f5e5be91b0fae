"""The multi-tier request scheduler: admission, classes, routing, spill-over and the central queue, as pure logic.

The same object drives the simulator and the runtime: it knows requests only as integer ids and instances as
indices into :attr:`SchedulerConfig.instances`, keeps its own load count per instance (requests dispatched and
not yet released), and never looks at engine internals. Policy, per request:

1. **Admission** (per tier, token bucket at the plan's ``y_t`` with ``burst_s`` of depth): a request that finds a
   token is ``FEASIBLE``, otherwise ``BEST_EFFORT`` (``admitted_rps=None``: every request is feasible).
2. **SLO-safe capacity**: an instance has *spare* capacity for a request when its load plus the request's seats
   stays within ``slo_safe_seqs``; above it, its tier's SLO would no longer hold for what it already runs. A
   request takes one seat, or (with :attr:`~nitsum_opt.scheduler.SchedulerInstance.tier_seqs`) a share that
   reflects its tier's request sizes, so heavier requests spilled in from other tiers take more of the room.
3. **Routing**. Feasible: the least-loaded (load / capacity) prompt-taking instance of its tier with spare capacity
   (untiered instances serve every tier); when all are full (a burst) and spill-over is on, the least-loaded
   instance with spare capacity of a tier whose targets are both at least as strict (it meets the request's SLO
   too); else it waits in the central queue. Best-effort: its tier's least-loaded instance with spare capacity,
   else (spill-over) the one of any tier with the most spare capacity, else the central queue. Without a central
   queue (``central_queue=False``, plain vLLM-style routing) a request that finds no spare capacity joins the
   least-loaded instance of its tier.
4. **Central queue**: per tier three FIFOs, served in class order — feasible, best-effort, then **background**:
   a request whose wait exceeds its tier's TTFT target is demoted to background (it can no longer meet its SLO, so
   it must not take capacity from one that can; it is still served, never dropped). When an instance releases a
   request and has spare capacity it pulls, class by class, the head it may serve with the best (tier rank,
   arrival).
   **Decode-aware routing**: with the central queue, while no decode instance a request's KV may go to (its
   tier's or a shared one) has spare capacity, a shared (untiered) prefill instance is chosen only when no other
   candidate has room: the request is prefilled elsewhere (e.g. on a colocated instance) rather than handed to a
   full decode side, which least-loaded routing alone floods (prefill instances hold their requests briefly, so
   they look emptiest), but it is never held for that reason.
5. **Hand-off** (prefill → decode) and **resume** (a decoding request moved by a plan change): like routing,
   among decode (resume: decode or colocated) instances, starting from the tier of the prefill instance; they are
   never held (the KV exists already): with no spare capacity they join the least-loaded instance.
6. **Engine queue order**: :meth:`MultiTierScheduler.priority` gives the key an engine sorts its waiting
   requests by (then arrival): class first, then the tier's rank when ``tier_priority`` is on.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from nitsum_opt.models.spec import Role
from nitsum_opt.scheduler.types import RequestClass, SchedulerConfig, SchedulerInstance

_FEASIBLE = int(RequestClass.FEASIBLE)
_BEST_EFFORT = int(RequestClass.BEST_EFFORT)
_BACKGROUND = int(RequestClass.BACKGROUND)
_NONE = -1
Held = tuple[int, int, int, int]
"""A dispatch out of the central queue: ``(request, tier, instance, class)``."""


class TokenBucket:
    """Admits ``rate_rps`` requests/s on average with bursts of up to ``depth = max(1, rate_rps · burst_s)``
    requests (starts full); a rate of 0 admits nothing."""

    __slots__ = ("depth", "last_s", "level", "rate_rps")

    def __init__(self, rate_rps: float, burst_s: float, now_s: float = 0.0) -> None:
        self.rate_rps = rate_rps
        self.depth = max(1.0, rate_rps * burst_s) if rate_rps > 0 else 0.0
        self.level = self.depth
        self.last_s = now_s

    def take(self, now_s: float) -> bool:
        """Consume one token if there is one at ``now_s``."""
        if now_s > self.last_s:
            self.level = min(self.depth, self.level + (now_s - self.last_s) * self.rate_rps)
            self.last_s = now_s
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False


class MultiTierScheduler:
    """Admission, routing and central queueing for one plan (see the module docstring).

    Args:
        config: tiers, instances and switches.
        previous: the scheduler of the plan before; loads of instances that survive (same id), token-bucket
            levels and the central queues are carried over.
        now_s: time of the (re)configuration.
    """

    def __init__(self, config: SchedulerConfig, previous: MultiTierScheduler | None = None, now_s: float = 0.0):
        self.config = config
        self.tier_names = tuple(t.name for t in config.tiers)
        self._tier_index = {name: k for k, name in enumerate(self.tier_names)}
        self.instance_ids = tuple(i.instance_id for i in config.instances)
        self.capacity = [i.slo_safe_seqs for i in config.instances]
        tiers = range(len(config.tiers))
        self._cost = [self._seat_costs(i) for i in config.instances]
        self._count = [[0] * len(config.tiers) for _ in config.instances]
        self._uniform = [all(c == 1.0 for c in costs) for costs in self._cost]
        self._gated = [config.central_queue and i.tier is None and i.role is Role.PREFILL for i in config.instances]
        self._any_gated = any(self._gated)
        self.load: list[float] = [0.0] * len(config.instances)
        """Seats taken per instance (requests dispatched and not released, each weighted by its seat cost)."""
        self._rank = [t.priority if config.tier_priority else 0 for t in config.tiers]
        self._deadline_s = [t.ttft_slo_ms / 1000.0 for t in config.tiers]
        tiers = range(len(config.tiers))
        self._prompt = [self._own(k, "prompt") for k in tiers]
        self._handoff = [self._own(k, "handoff") for k in tiers]
        self._resume = [self._own(k, "resume") for k in tiers]
        self._all = {kind: self._every(kind) for kind in ("prompt", "handoff", "resume")}
        self._stricter = {kind: [self._stricter_than(k, kind) for k in tiers] for kind in ("prompt", "handoff")}
        n = len(config.instances)
        self._feasible_tiers = [
            tuple(k for k in tiers if i in self._prompt[k] or i in self._stricter["prompt"][k]) for i in range(n)
        ]
        self._effort_tiers = [self._effort_served(i) for i in range(n)]
        self._buckets = [
            None if t.admitted_rps is None else TokenBucket(t.admitted_rps, config.burst_s, now_s) for t in config.tiers
        ]
        self._central: list[tuple[deque[tuple[int, float]], ...]] = [(deque(), deque(), deque()) for _ in tiers]
        self.held = 0
        """Requests waiting in the central queue."""
        if previous is not None:
            self._carry(previous)

    # ------------------------------------------------------------------ construction helpers
    def _seat_costs(self, inst: SchedulerInstance) -> list[float]:
        """Seats a request of each tier takes on ``inst`` (see :attr:`SchedulerInstance.tier_seqs`)."""
        seats = inst.tier_seqs or {}
        out = []
        for name in self.tier_names:
            n = seats.get(name)
            out.append(1.0 if n is None else math.inf if n == 0 else inst.slo_safe_seqs / n)
        return out

    @staticmethod
    def _fits(role: Role, kind: str) -> bool:
        if kind == "prompt":
            return role is not Role.DECODE
        if kind == "handoff":
            return role is Role.DECODE
        return role is not Role.PREFILL

    def _own(self, tier: int, kind: str) -> list[int]:
        name = self.tier_names[tier]
        return [i for i, s in enumerate(self.config.instances) if s.tier in (name, None) and self._fits(s.role, kind)]

    def _every(self, kind: str) -> list[int]:
        return [i for i, s in enumerate(self.config.instances) if self._fits(s.role, kind)]

    def _stricter_than(self, tier: int, kind: str) -> list[int]:
        """Other tiers' instances whose targets are both at least as strict as ``tier``'s (spill-over only)."""
        if not self.config.spill_over:
            return []
        mine = self.config.tiers[tier]
        out = []
        for i, s in enumerate(self.config.instances):
            if s.tier is None or s.tier == mine.name or not self._fits(s.role, kind):
                continue
            theirs = self.config.tiers[self._tier_index[s.tier]]
            if theirs.ttft_slo_ms <= mine.ttft_slo_ms and theirs.tpot_slo_ms <= mine.tpot_slo_ms:
                out.append(i)
        return out

    def _effort_served(self, i: int) -> tuple[int, ...]:
        inst = self.config.instances[i]
        if inst.tier is None or self.config.spill_over:
            return tuple(range(len(self.tier_names)))
        return (self._tier_index[inst.tier],)

    def _carry(self, previous: MultiTierScheduler) -> None:
        old = dict(zip(previous.instance_ids, previous._count, strict=True))
        for i, iid in enumerate(self.instance_ids):
            counts = old.get(iid)
            if counts is None:
                continue
            for j, name in enumerate(previous.tier_names):
                k = self._tier_index.get(name)
                if k is not None and counts[j]:
                    self._count[i][k] += counts[j]
            self._reload(i)
        for k, name in enumerate(self.tier_names):
            j = previous._tier_index.get(name)
            if j is None:
                continue
            old_bucket, bucket = previous._buckets[j], self._buckets[k]
            if old_bucket is not None and bucket is not None:
                bucket.level = min(bucket.depth, old_bucket.level)
                bucket.last_s = old_bucket.last_s
            for c in range(3):
                self._central[k][c].extend(previous._central[j][c])
        self.held = sum(len(q) for queues in self._central for q in queues)

    # ------------------------------------------------------------------ lookups
    def tier_index(self, name: str) -> int:
        """Index of tier ``name``; the error lists the tiers."""
        try:
            return self._tier_index[name]
        except KeyError:
            raise KeyError(f"unknown tier {name!r}; the scheduler has tiers {list(self.tier_names)}") from None

    def priority(self, klass: int, tier: int) -> int:
        """Engine queue key of a request (smaller = earlier; ties by arrival)."""
        return klass * 1024 + self._rank[tier]

    def has_spare(self, i: int, tier: int | None = None) -> bool:
        """Whether instance ``i`` has room within its SLO-safe capacity for one more request (of ``tier``:
        its seat cost; ``None``: any request, i.e. fewer seats taken than the capacity)."""
        if tier is None:
            return self.load[i] < self.capacity[i]
        return self._room_for(i, tier)

    def _room_for(self, i: int, tier: int) -> bool:
        return self.load[i] + self._cost[i][tier] <= self.capacity[i] + 1e-9

    def _reload(self, i: int) -> None:
        self.load[i] = sum(n * c for n, c in zip(self._count[i], self._cost[i], strict=True) if n)

    def _take(self, i: int, tier: int) -> None:
        self._count[i][tier] += 1
        if self._uniform[i]:
            self.load[i] += 1.0
        else:
            self._reload(i)  # exact sums: equal loads tie exactly, whatever the order requests came in

    # ------------------------------------------------------------------ routing
    def _decode_room(self, tier: int) -> bool:
        """Whether a decode instance a request of ``tier`` may be handed to (its tier's or a shared one) has room."""
        return any(self._room_for(d, tier) for d in self._handoff[tier])

    def _least_loaded(self, candidates: list[int], spare_only: bool, tier: int) -> int:
        best, best_fill = _NONE, float("inf")
        load, cap, cost = self.load, self.capacity, self._cost
        fallback, fallback_fill = _NONE, float("inf")  # a shared prefill instance while decode has no room
        decode_room: bool | None = None  # evaluated at most once
        for i in candidates:
            li, ci = load[i], cap[i]
            if spare_only and li + cost[i][tier] > ci + 1e-9:
                continue
            fill = li / ci
            if self._gated[i]:
                decode_room = self._decode_room(tier) if decode_room is None else decode_room
                if not decode_room:
                    if fill < fallback_fill:
                        fallback, fallback_fill = i, fill
                    continue
            if fill < best_fill:
                best, best_fill = i, fill
        return fallback if best == _NONE else best

    def _pick(self, tier: int, klass: int, kind: str, request_tier: int | None = None) -> int:
        """Instance with spare capacity for a request of ``request_tier`` (default ``tier``) and ``klass``, among
        ``tier``'s instances first (``-1``: none)."""
        rt = tier if request_tier is None else request_tier
        own = (
            self._prompt[tier] if kind == "prompt" else self._handoff[tier] if kind == "handoff" else self._resume[tier]
        )
        target = self._least_loaded(own, True, rt)
        if target == _NONE and self.config.spill_over:
            if klass == _FEASIBLE and kind != "resume":
                target = self._least_loaded(self._stricter[kind][tier], True, rt)
            elif klass != _FEASIBLE:
                target = self._least_loaded(self._all[kind], True, rt)
        return target

    def submit(self, now_s: float, request: int, tier: int) -> tuple[int, int]:
        """Admit and route a new request: ``(instance index, class)``; instance ``-1`` = held centrally (it is
        dispatched later by :meth:`release` or :meth:`pump`)."""
        bucket = self._buckets[tier]
        klass = _FEASIBLE if bucket is None or bucket.take(now_s) else _BEST_EFFORT
        return self.route(now_s, request, tier, klass)

    def route(
        self, now_s: float, request: int, tier: int, klass: int, arrival_s: float | None = None
    ) -> tuple[int, int]:
        """Route a request of a known class (a new one, or one displaced by a plan change) without touching the
        token bucket: ``(instance index, class)``, ``-1`` = held centrally."""
        target = self._pick(tier, klass, "prompt")
        if target == _NONE and not self.config.central_queue:
            target = self._least_loaded(self._prompt[tier] or self._all["prompt"], False, tier)
        if target != _NONE:
            self._take(target, tier)
            return target, klass
        self._central[tier][klass].append((request, now_s if arrival_s is None else arrival_s))
        self.held += 1
        return _NONE, klass

    def handoff(self, now_s: float, tier: int, host_tier: int | None, klass: int) -> int:
        """Decode instance for a request prefilled on an instance of ``host_tier`` (``None`` = untiered): its
        index (load counted), or ``-1`` when the plan has no decode instance."""
        return self._place_kv(tier if host_tier is None else host_tier, klass, "handoff", tier)

    def resume_target(self, tier: int, klass: int) -> int:
        """Decode or colocated instance for a decoding request whose engine a plan change removed (load
        counted), or ``-1`` when no instance can decode."""
        return self._place_kv(tier, klass, "resume", tier)

    def _place_kv(self, tier: int, klass: int, kind: str, request_tier: int) -> int:
        target = self._pick(tier, klass, kind, request_tier)
        if target == _NONE:
            home = (self._handoff[tier] if kind == "handoff" else self._resume[tier]) or self._all[kind]
            target = self._least_loaded(home, False, request_tier)
        if target != _NONE:
            self._take(target, request_tier)
        return target

    def recount(self, placed: Iterable[tuple[int, int]]) -> None:
        """Set every instance's load from scratch: ``placed`` holds ``(instance, tier)`` of every request an
        engine holds now (the runtime, after a transition moved requests between engines on its own)."""
        self._count = [[0] * len(self.tier_names) for _ in self.instance_ids]
        for instance, tier in placed:
            self._count[instance][tier] += 1
        for i in range(len(self.instance_ids)):
            self._reload(i)

    # ------------------------------------------------------------------ release and the central queue
    def release(self, now_s: float, instance: int, tier: int | None = None) -> list[Held]:
        """A request of ``tier`` left ``instance`` (finished, handed off or moved): held requests it now takes
        (already counted in its load). ``tier`` may be left out only when every request takes one seat there."""
        counts = self._count[instance]
        if tier is None:
            if not self._uniform[instance]:
                raise ValueError(
                    f"instance {self.instance_ids[instance]!r} weighs requests by tier: "
                    "pass the released request's tier"
                )
            tier = next((k for k, n in enumerate(counts) if n > 0), 0)
        counts[tier] -= 1
        if self._uniform[instance]:
            self.load[instance] -= 1.0
        else:
            self._reload(instance)
        if not self.held or self.config.instances[instance].role is Role.DECODE:
            return []
        return self._fill(now_s, instance)

    def pump(self, now_s: float) -> list[Held]:
        """Dispatch held requests to every instance with spare capacity (after a plan change)."""
        out: list[Held] = []
        for i in self._all["prompt"]:
            if not self.held:
                break
            out += self._fill(now_s, i)
        return out

    def _fill(self, now_s: float, instance: int) -> list[Held]:
        out: list[Held] = []
        while self.held and self.load[instance] < self.capacity[instance]:
            picked = self._next_held(now_s, instance)
            if picked is None:
                break
            request, tier, klass = picked
            self._take(instance, tier)
            out.append((request, tier, instance, klass))
        return out

    def _next_held(self, now_s: float, instance: int) -> tuple[int, int, int] | None:
        """The held request ``instance`` serves next: feasible, then best-effort, then background; within a class
        the best (tier rank, arrival) among the tiers whose requests still fit its room."""
        for klass, tiers in ((_FEASIBLE, self._feasible_tiers[instance]), (_BEST_EFFORT, self._effort_tiers[instance])):
            best: tuple[int, float, int] | None = None
            for tier in tiers:
                queue, late = self._central[tier][klass], self._central[tier][_BACKGROUND]
                while queue and now_s - queue[0][1] > self._deadline_s[tier]:
                    late.append(queue.popleft())
                if not self._room_for(instance, tier):
                    continue
                if queue and (best is None or (self._rank[tier], queue[0][1], tier) < best):
                    best = (self._rank[tier], queue[0][1], tier)
            if best is not None:
                request, _ = self._central[best[2]][klass].popleft()
                self.held -= 1
                return request, best[2], klass
        best = None
        for tier in self._effort_tiers[instance]:
            late = self._central[tier][_BACKGROUND]
            if (
                late
                and self._room_for(instance, tier)
                and (best is None or (self._rank[tier], late[0][1], tier) < best)
            ):
                best = (self._rank[tier], late[0][1], tier)
        if best is None:
            return None
        request, _ = self._central[best[2]][_BACKGROUND].popleft()
        self.held -= 1
        return request, best[2], _BACKGROUND

    def held_requests(self) -> list[tuple[int, int]]:
        """``(request, tier)`` of every centrally held request."""
        return [(r, k) for k, queues in enumerate(self._central) for q in queues for r, _ in q]
