"""The multi-tier request scheduler: admission, classes, routing and spill-over, as pure logic.

The same object drives the simulator and the runtime: it knows requests only as integer ids and instances as
indices into :attr:`SchedulerConfig.instances`, keeps its own load count per instance (requests dispatched and
not yet released), and never looks at engine internals. Policy, per request:

1. **Admission** (per tier, token bucket at the plan's ``y_t`` with ``burst_s`` of depth): a request that finds a
   token is ``FEASIBLE``, otherwise ``BEST_EFFORT`` (``admitted_rps=None``: every request is feasible).
2. **Routing**: a feasible request goes to the *least-loaded* prompt-taking instance of its tier (load / SLO-safe
   capacity; untiered instances serve every tier), whatever its load — the plan sized the tier for it.
   A best-effort request goes to the least-loaded instance of its tier that has *spare SLO-safe capacity*
   (load < ``slo_safe_seqs``), else (**spill-over**) to the instance of any tier with the most spare capacity,
   else it waits in the scheduler's **central queue** (or, without one, joins its tier's least-loaded instance).
3. **Central queue**: per tier a best-effort FIFO and a **background** FIFO; a best-effort request whose wait
   exceeds its tier's TTFT target is demoted to background (it can no longer meet its SLO, so it must not take
   capacity from one that can). When an instance releases a request and has spare capacity, it pulls the
   best-effort head of the tiers it may serve (tier priority, then arrival), then the background head.
4. **Hand-off** (prefill → decode): the least-loaded decode instance of the tier of the prefill instance that
   served the request; a best-effort request prefers one with spare capacity (spill-over to other tiers' decode
   instances), else the least-loaded one.
5. **Engine queue order**: :meth:`MultiTierScheduler.priority` gives the key an engine sorts its waiting
   requests by (then arrival): class first, then the tier's rank when ``tier_priority`` is on.
"""

from __future__ import annotations

from collections import deque

from nitsum_opt.models.spec import Role
from nitsum_opt.scheduler.types import RequestClass, SchedulerConfig

_FEASIBLE = int(RequestClass.FEASIBLE)
_BEST_EFFORT = int(RequestClass.BEST_EFFORT)
_BACKGROUND = int(RequestClass.BACKGROUND)
_NO_INSTANCE = -1


class TokenBucket:
    """Admits ``rate_rps`` requests/s on average with bursts of up to ``depth`` requests (starts full)."""

    __slots__ = ("depth", "last_s", "level", "rate_rps")

    def __init__(self, rate_rps: float, burst_s: float, now_s: float = 0.0, level: float | None = None) -> None:
        self.rate_rps = rate_rps
        self.depth = max(1.0, rate_rps * burst_s)
        self.level = self.depth if level is None else min(level, self.depth)
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
        self.load = [0] * len(config.instances)
        self._tier_rank = [t.priority if config.tier_priority else 0 for t in config.tiers]
        self._deadline_s = [t.ttft_slo_ms / 1000.0 for t in config.tiers]
        self._serves = [self._served_tiers(i) for i in range(len(config.instances))]
        self._prompt = [self._candidates(k, handoff=False) for k in range(len(self.tier_names))]
        self._handoff = [self._candidates(k, handoff=True) for k in range(len(self.tier_names))]
        self._resume = [self._candidates(k, handoff=None) for k in range(len(self.tier_names))]
        self._all_prompt = [i for i, s in enumerate(config.instances) if s.takes_prompts]
        self._all_resume = [i for i, s in enumerate(config.instances) if s.role is not Role.PREFILL]
        self._all_handoff = [i for i, s in enumerate(config.instances) if s.takes_handoffs]
        self._buckets: list[TokenBucket | None] = [
            None if t.admitted_rps is None else TokenBucket(t.admitted_rps, config.burst_s, now_s) for t in config.tiers
        ]
        self._central: list[tuple[deque[tuple[int, float]], deque[tuple[int, float]]]] = [
            (deque(), deque()) for _ in config.tiers
        ]
        self.held = 0
        """Requests waiting in the central queue."""
        if previous is not None:
            self._carry(previous)

    # ------------------------------------------------------------------ construction helpers
    def _served_tiers(self, i: int) -> tuple[int, ...]:
        inst = self.config.instances[i]
        if inst.tier is None or self.config.spill_over:
            own = () if inst.tier is None else (self._tier_index[inst.tier],)
            return own + tuple(k for k in range(len(self.tier_names)) if k not in own)
        return (self._tier_index[inst.tier],)

    def _candidates(self, tier: int, handoff: bool | None) -> list[int]:
        """Instances of ``tier`` (or untiered) that take prompts (``False``), hand-offs (``True``) or resumed
        decoding requests (``None``: decode or colocated)."""
        name = self.tier_names[tier]
        out = []
        for i, s in enumerate(self.config.instances):
            if s.tier not in (name, None):
                continue
            if (handoff is None and s.role is not Role.PREFILL) or (
                handoff is not None and (s.takes_handoffs if handoff else s.takes_prompts)
            ):
                out.append(i)
        return out

    def _carry(self, previous: MultiTierScheduler) -> None:
        old = dict(zip(previous.instance_ids, previous.load, strict=True))
        self.load = [old.get(iid, 0) for iid in self.instance_ids]
        for k, name in enumerate(self.tier_names):
            j = previous._tier_index.get(name)
            if j is None:
                continue
            old_bucket, bucket = previous._buckets[j], self._buckets[k]
            if old_bucket is not None and bucket is not None:
                bucket.level = min(bucket.depth, old_bucket.level)
                bucket.last_s = old_bucket.last_s
            self._central[k][0].extend(previous._central[j][0])
            self._central[k][1].extend(previous._central[j][1])
        self.held = sum(len(a) + len(b) for a, b in self._central)

    # ------------------------------------------------------------------ lookups
    def tier_index(self, name: str) -> int:
        """Index of tier ``name``; the error lists the tiers."""
        try:
            return self._tier_index[name]
        except KeyError:
            raise KeyError(f"unknown tier {name!r}; the scheduler has tiers {list(self.tier_names)}") from None

    def priority(self, klass: int, tier: int) -> int:
        """Engine queue key of a request (smaller = earlier; ties by arrival)."""
        return klass * 1024 + self._tier_rank[tier]

    def has_spare(self, i: int) -> bool:
        """Whether instance ``i`` holds fewer requests than its SLO-safe capacity."""
        return self.load[i] < self.capacity[i]

    # ------------------------------------------------------------------ routing
    def _least_loaded(self, candidates: list[int], spare_only: bool) -> int:
        best, best_fill = _NO_INSTANCE, float("inf")
        load, cap = self.load, self.capacity
        for i in candidates:
            li, ci = load[i], cap[i]
            if spare_only and li >= ci:
                continue
            fill = li / ci
            if fill < best_fill:
                best, best_fill = i, fill
        return best

    def _place_best_effort(self, tier: int, candidates: list[int], everyone: list[int]) -> int:
        target = self._least_loaded(candidates, spare_only=True)
        if target == _NO_INSTANCE and self.config.spill_over:
            target = self._least_loaded(everyone, spare_only=True)
        return target

    def submit(self, now_s: float, request: int, tier: int) -> tuple[int, int]:
        """Admit and route a new request: ``(instance index, class)``; instance ``-1`` = held centrally (it is
        dispatched later by :meth:`release` or :meth:`pump`)."""
        bucket = self._buckets[tier]
        if bucket is None or bucket.take(now_s):
            target = self._least_loaded(self._prompt[tier], spare_only=False)
            if target != _NO_INSTANCE:
                self.load[target] += 1
                return target, _FEASIBLE
        return self.route(now_s, request, tier, _BEST_EFFORT)

    def route(
        self, now_s: float, request: int, tier: int, klass: int, arrival_s: float | None = None
    ) -> tuple[int, int]:
        """Route a request of a known class (a new best-effort one, or one displaced by a plan change) without
        touching the token bucket: ``(instance index, class)``, ``-1`` = held centrally."""
        candidates = self._prompt[tier]
        if klass == _FEASIBLE:
            target = self._least_loaded(candidates, spare_only=False)
        else:
            target = self._place_best_effort(tier, candidates, self._all_prompt)
            if target == _NO_INSTANCE and not self.config.central_queue:
                target = self._least_loaded(candidates or self._all_prompt, spare_only=False)
        if target != _NO_INSTANCE:
            self.load[target] += 1
            return target, klass
        return self._hold(request, tier, now_s if arrival_s is None else arrival_s, klass)

    def _hold(self, request: int, tier: int, arrival_s: float, klass: int) -> tuple[int, int]:
        queue = self._central[tier][1 if klass == _BACKGROUND else 0]
        queue.append((request, arrival_s))
        self.held += 1
        return _NO_INSTANCE, _BACKGROUND if klass == _BACKGROUND else _BEST_EFFORT

    def handoff(self, now_s: float, tier: int, host_tier: int | None, klass: int) -> int:
        """Decode instance for a request prefilled on an instance of ``host_tier`` (``None`` = untiered): its
        index, or ``-1`` when the plan has no decode instance at all."""
        home = self._handoff[tier if host_tier is None else host_tier] or self._all_handoff
        if klass == _FEASIBLE:
            target = self._least_loaded(home, spare_only=False)
        else:
            target = self._place_best_effort(tier, home, self._all_handoff)
            if target == _NO_INSTANCE:
                target = self._least_loaded(home, spare_only=False)
        if target != _NO_INSTANCE:
            self.load[target] += 1
        return target

    def resume_target(self, tier: int, klass: int) -> int:
        """Instance (decode or colocated) to move a decoding request of ``tier`` to after a plan change removed
        its engine: least-loaded of the tier (best-effort: with spare capacity first, spill-over allowed), or
        ``-1`` when no instance can decode. The load is counted."""
        home = self._resume[tier] or self._all_resume
        target = _NO_INSTANCE
        if klass != _FEASIBLE:
            target = self._place_best_effort(tier, home, self._all_resume)
        if target == _NO_INSTANCE:
            target = self._least_loaded(home, spare_only=False)
        if target != _NO_INSTANCE:
            self.load[target] += 1
        return target

    def assign(self, instance: int) -> None:
        """Count a request placed on ``instance`` by the caller (e.g. a migrated request)."""
        self.load[instance] += 1

    # ------------------------------------------------------------------ release and the central queue
    def release(self, now_s: float, instance: int) -> list[tuple[int, int, int, int]]:
        """A request left ``instance`` (finished, handed off or moved): held requests it can now take, as
        ``(request, tier, instance, class)`` (already counted in its load)."""
        self.load[instance] -= 1
        if not self.held or not self.config.instances[instance].takes_prompts:
            return []
        return self._fill(now_s, instance)

    def pump(self, now_s: float) -> list[tuple[int, int, int, int]]:
        """Dispatch held requests to every instance with spare capacity (after a plan change)."""
        out: list[tuple[int, int, int, int]] = []
        for i in self._all_prompt:
            if not self.held:
                break
            out += self._fill(now_s, i)
        return out

    def _fill(self, now_s: float, instance: int) -> list[tuple[int, int, int, int]]:
        out: list[tuple[int, int, int, int]] = []
        while self.held and self.load[instance] < self.capacity[instance]:
            picked = self._next_held(now_s, instance)
            if picked is None:
                break
            request, tier, klass = picked
            self.load[instance] += 1
            out.append((request, tier, instance, klass))
        return out

    def _next_held(self, now_s: float, instance: int) -> tuple[int, int, int] | None:
        best: tuple[int, float, int] | None = None
        for tier in self._serves[instance]:
            queue, background = self._central[tier]
            while queue and now_s - queue[0][1] > self._deadline_s[tier]:
                background.append(queue.popleft())
            if queue:
                key = (self._tier_rank[tier], queue[0][1], tier)
                if best is None or key < best:
                    best = key
        if best is not None:
            tier = best[2]
            request, _ = self._central[tier][0].popleft()
            self.held -= 1
            return request, tier, _BEST_EFFORT
        for tier in self._serves[instance]:
            background = self._central[tier][1]
            if background and (best is None or (self._tier_rank[tier], background[0][1], tier) < best):
                best = (self._tier_rank[tier], background[0][1], tier)
        if best is None:
            return None
        tier = best[2]
        request, _ = self._central[tier][1].popleft()
        self.held -= 1
        return request, tier, _BACKGROUND

    def held_requests(self) -> list[tuple[int, int]]:
        """``(request, tier)`` of every centrally held request (e.g. to report them unfinished at the horizon)."""
        return [(r, k) for k, (a, b) in enumerate(self._central) for r, _ in (*a, *b)]
