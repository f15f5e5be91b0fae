"""One simulated vLLM-style engine: continuous batching, chunked prefill, KV cache, preemption, fast-forward.

**Step semantics** (vLLM V1 with chunked prefill). At the start of every step the engine

1. admits *joins* — requests whose KV cache arrives from elsewhere (P→D hand-off, migration after a plan change)
   — first come first served, while the KV cache (minus the watermark) and ``max_num_seqs`` allow;
2. makes room for decode growth: every running request writes one token of KV per step; while they would not fit,
   the running request with the worst scheduler priority that joined last is **preempted** (recompute: its KV is
   freed and it re-enters the waiting queue with prompt = original prompt + the tokens generated so far);
3. fills the token budget: one token per running request, then chunks of prompts already being prefilled, then new
   prompts from the waiting queue in priority order (``(class, tier rank, arrival)``, see the scheduler), each
   admitted only while its whole prompt fits the free KV cache and ``max_num_seqs`` allows; the last chunk is cut
   to the budget;
4. takes ``predict_ms(tp, prefill seqs, prefill tokens, causal attention pairs, decode seqs, decode context)``.

At the end of the step every running request has one more token; a prompt whose last chunk ran emits its first
token (TTFT) and joins the running batch (colocated, decode) or is handed to a decode engine (prefill role).

**Fast-forward** (the speed trick). When a step would be decode-only — no prompt being prefilled and none that
can be admitted — nothing changes inside the engine until (a) the first running request finishes, (b) the KV
cache fills, or (c) something arrives from outside (a routed request, a hand-off, a plan change). The engine
commits to a *jump* of ``k`` steps, (a) and (b) computed exactly from the step counter; step ``i`` of the jump has
batch ``B`` and decode context ``C + i·B``, so its time is ``τ(C + i·B)``. The jump's total time is
``k·α + β·k(k−1)/2`` with ``α = τ(C)`` and ``β`` the secant slope ``(τ(C + (k−1)B) − α)/(k−1)``: **exact when the
iteration model is affine in the decode context for a fixed batch** (true for the fitted models of
``nitsum_opt.models`` and for the roofline fallback), otherwise a secant approximation of a convex sum. An event
of kind (c) at time ``t`` truncates the jump at the first step boundary at or after ``t`` (the in-flight step
finishes; the newcomer joins the next one), so truncation is exact too. Jumps touch no per-request state: each
running request stores the step counter when it joined and finishes at a precomputed step (a heap).
"""

from __future__ import annotations

import math
from collections import deque
from heapq import heappop, heappush
from typing import TYPE_CHECKING

from nitsum_opt.models.spec import Role
from nitsum_opt.sim.deployment import DeployedInstance

if TYPE_CHECKING:
    from nitsum_opt.sim.core import Simulator

IDLE, STEP, JUMP = 0, 1, 2
"""Engine modes: nothing running, one (mixed) step in flight, a decode-only jump in flight."""


def steps_reached(alpha: float, beta: float, elapsed: float) -> int:
    """Smallest ``j ≥ 1`` with ``j·α + β·j(j−1)/2 ≥ elapsed``: the step of a jump in flight at ``elapsed``."""
    if elapsed <= 0:
        return 1
    if beta <= 1e-15:
        j = math.ceil(elapsed / alpha)
    else:
        b = alpha - beta / 2
        j = math.ceil((-b + math.sqrt(b * b + 2 * beta * elapsed)) / beta)
    j = max(1, j)
    while j > 1 and (j - 1) * alpha + beta * (j - 1) * (j - 2) / 2 >= elapsed:
        j -= 1
    while j * alpha + beta * j * (j - 1) / 2 < elapsed:
        j += 1
    return j


class Engine:
    """State of one engine (see the module docstring). All per-request data lives in the simulator's
    :class:`~nitsum_opt.sim.core.RequestState`; the engine keeps indices."""

    __slots__ = (
        "alive",
        "alpha",
        "arrive_paid",
        "beta",
        "budget",
        "chunks",
        "ctx_sum",
        "fin",
        "gpu_ids",
        "handed",
        "idx",
        "joins",
        "jump_k",
        "key",
        "kv_cap",
        "kv_limit",
        "kv_used",
        "link_free_s",
        "max_seqs",
        "mode",
        "nb",
        "paused_until",
        "prefill_only",
        "prefilling",
        "resume_pending",
        "role",
        "running",
        "sidx",
        "spec",
        "step_end",
        "steps",
        "t0",
        "tier",
        "tp",
        "version",
        "waiting",
    )

    def __init__(self, idx: int, spec: DeployedInstance, tier: int, kv_cap: int, sim: Simulator) -> None:
        engine = sim.settings.engine
        self.idx = idx
        self.spec = spec
        self.key = spec.key
        self.tier = tier
        self.tp = spec.tp
        self.role = spec.role
        self.gpu_ids = spec.gpu_ids
        self.prefill_only = spec.role is Role.PREFILL
        default = engine.prefill_max_num_batched_tokens if self.prefill_only else engine.max_num_batched_tokens
        self.budget = spec.max_num_batched_tokens or default
        self.max_seqs = engine.max_num_seqs
        self.kv_cap = kv_cap
        self.kv_limit = int(kv_cap * (1.0 - engine.kv_watermark))
        self.kv_used = 0
        self.waiting: list[tuple[int, int]] = []  # heap of (priority, request): prompts to prefill
        self.joins: deque[int] = deque()  # requests whose KV arrived
        self.prefilling: list[list[int]] = []  # [request, tokens done, tokens total]
        self.running: dict[int, int] = {}  # request -> step counter when it joined (insertion = join order)
        self.fin: list[tuple[int, int, int]] = []  # heap of (finish step, request, join step)
        self.steps = 0
        self.ctx_sum = 0
        self.mode = IDLE
        self.version = 0
        self.t0 = self.alpha = self.beta = self.step_end = 0.0
        self.jump_k = self.nb = 0
        self.chunks: list[tuple[list[int], int]] = []
        self.paused_until = 0.0
        self.resume_pending = False
        self.handed = False  # the step in progress hands requests off (a prefill engine)
        self.arrive_paid = False  # the pause for admitting arrived KV was taken
        self.alive = True
        self.link_free_s = 0.0
        self.sidx = -1  # index in the current scheduler's instance list

    def retune(self, spec: DeployedInstance, sim: Simulator) -> None:
        """Take the new deployment's view of this engine (tier, token budget); nothing in flight changes."""
        engine = sim.settings.engine
        default = engine.prefill_max_num_batched_tokens if self.prefill_only else engine.max_num_batched_tokens
        self.spec = spec
        self.budget = spec.max_num_batched_tokens or default

    @property
    def outstanding(self) -> int:
        """Requests on the engine: waiting, arriving, being prefilled or decoding."""
        return len(self.waiting) + len(self.joins) + len(self.prefilling) + len(self.running)

    # ------------------------------------------------------------------ per-request moves
    def join(self, sim: Simulator, r: int, ctx: int) -> None:
        """Request ``r`` starts decoding here with ``ctx`` tokens of KV (counted into ``kv_used``)."""
        req = sim.req
        steps = self.steps
        self.running[r] = steps
        req.base[r] = ctx
        self.kv_used += ctx
        self.ctx_sum += ctx
        heappush(self.fin, (steps + req.out[r] - req.gen[r], r, steps))

    def leave(self, sim: Simulator, r: int) -> int:
        """Request ``r`` stops decoding here; its tokens are booked; returns the KV tokens freed."""
        req = sim.req
        done = self.steps - self.running.pop(r)
        ctx = req.base[r] + done
        self.kv_used -= ctx
        self.ctx_sum -= ctx
        req.gen[r] += done
        return ctx

    def preempt(self, sim: Simulator) -> None:
        """Recompute-preempt the worst-priority, last-joined running request."""
        req = sim.req
        prio = req.prio
        victim = max(self.running, key=lambda r: (prio[r], self.running[r]))
        self.leave(sim, victim)
        req.pre_len[victim] = req.inp[victim] + req.gen[victim]
        req.preemptions[victim] += 1
        heappush(self.waiting, (prio[victim], victim))

    # ------------------------------------------------------------------ steps
    def start(self, sim: Simulator, now: float) -> None:
        """Compose and launch the next step (or jump) at ``now``; go idle when there is no work."""
        req = sim.req
        running = self.running
        prefilling = self.prefilling
        joins = self.joins
        if joins and sim.arrive_s > 0 and not self.arrive_paid:  # arrived KV is taken in between steps
            self.arrive_paid = True
            self.paused_until = now + sim.arrive_s
            self.mode = IDLE
            sim.kick(self, now)
            return
        self.arrive_paid = False
        while joins and len(running) + len(prefilling) < self.max_seqs:
            r = joins[0]
            ctx = req.inp[r] + req.gen[r]
            if self.kv_used + ctx > self.kv_limit and (running or prefilling):
                break
            joins.popleft()
            self.join(sim, r, ctx)
        while running and self.kv_used + len(running) > self.kv_cap:
            self.preempt(sim)
        nb = len(running)
        budget = self.budget - nb
        chunks = []
        tokens = pairs = 0
        for entry in prefilling:
            if budget <= 0:
                break
            done = entry[1]
            c = entry[2] - done
            if c > budget:
                c = budget
            chunks.append((entry, c))
            budget -= c
            tokens += c
            pairs += c * done + c * (c + 1) // 2
        waiting = self.waiting
        while waiting and budget > 0 and len(running) + len(prefilling) < self.max_seqs:
            r = waiting[0][1]
            need = req.pre_len[r] + 1
            if self.kv_used + need > self.kv_limit:
                if need > self.kv_limit:
                    heappop(waiting)
                    sim.reject(r, now, self, sim.REJECT_KV)
                    continue
                break
            heappop(waiting)
            self.kv_used += need
            entry = [r, 0, need - 1]
            prefilling.append(entry)
            c = min(budget, need - 1)
            chunks.append((entry, c))
            budget -= c
            tokens += c
            pairs += c * (c + 1) // 2
        if chunks:
            self.mode = STEP
            self.t0 = now
            self.chunks = chunks
            self.nb = nb
            dt = sim.predict_ms(self.tp, len(chunks), tokens, pairs, nb, self.ctx_sum) * 1e-3
            self.step_end = now + dt
            sim.push_step(self, self.step_end)
        elif nb:
            self._jump(sim, now, nb)
        else:
            self.mode = IDLE

    def _jump(self, sim: Simulator, now: float, nb: int) -> None:
        fin = self.fin
        running = self.running
        while running.get(fin[0][1], -1) != fin[0][2]:
            heappop(fin)  # stale: the request left (preempted, migrated) since
        k = fin[0][0] - self.steps
        room = (self.kv_cap - self.kv_used) // nb
        if room < k:
            k = room
        if k > sim.max_jump:
            k = sim.max_jump
        alpha = sim.predict_ms(self.tp, 0, 0, 0, nb, self.ctx_sum) * 1e-3
        beta = 0.0
        if k > 1:
            last = sim.predict_ms(self.tp, 0, 0, 0, nb, self.ctx_sum + (k - 1) * nb) * 1e-3
            beta = (last - alpha) / (k - 1)
        self.mode = JUMP
        self.t0, self.alpha, self.beta, self.jump_k, self.nb = now, alpha, beta, k, nb
        self.step_end = now + k * alpha + beta * k * (k - 1) / 2
        sim.push_step(self, self.step_end)

    def truncate(self, sim: Simulator, now: float) -> None:
        """Something arrived at ``now`` during a jump: end the jump at the first step boundary ≥ ``now``."""
        if now >= self.step_end:
            return
        j = steps_reached(self.alpha, self.beta, now - self.t0)
        if j < self.jump_k:
            self.jump_k = j
            self.step_end = self.t0 + j * self.alpha + self.beta * j * (j - 1) / 2
            self.version += 1
            sim.push_step(self, self.step_end)

    def finish_step(self, sim: Simulator, now: float) -> None:
        """Apply the step (or jump) that ends at ``now`` and start the next one."""
        k = self.jump_k if self.mode == JUMP else 1
        nb = self.nb
        self.steps += k
        if nb:
            self.ctx_sum += nb * k
            self.kv_used += nb * k
            fin = self.fin
            running = self.running
            while fin and fin[0][0] <= self.steps:
                _, r, joined = heappop(fin)
                if running.get(r, -1) == joined:
                    self.leave(sim, r)
                    sim.complete(r, now, self)
        if self.mode == STEP:
            for entry, c in self.chunks:
                entry[1] += c
                if entry[1] >= entry[2]:
                    self.prefilling.remove(entry)
                    self._prefilled(sim, entry[0], now)
            self.chunks = []
        self.mode = IDLE
        self.jump_k = 0
        if self.handed:  # the hand-offs leave this engine before its next step
            self.handed = False
            self.paused_until = max(self.paused_until, now + sim.leave_s)
        if self.alive:
            sim.kick(self, now)

    def _prefilled(self, sim: Simulator, r: int, now: float) -> None:
        req = sim.req
        if req.first[r] != req.first[r]:  # NaN: this is the request's first token
            req.first[r] = now
        req.gen[r] += 1
        held = req.pre_len[r] + 1
        if req.gen[r] >= req.out[r]:
            self.kv_used -= held
            sim.complete(r, now, self)
        elif self.prefill_only:
            self.handed = True
            sim.hand_off(r, now, self, held)
        else:
            self.kv_used -= held
            self.join(sim, r, held)

    # ------------------------------------------------------------------ plan changes
    def stop(self, sim: Simulator, now: float) -> tuple[list[int], list[int]]:
        """Stop at ``now`` for a plan change: book the steps of a jump completed by then (a mixed step in flight
        is lost), free everything and return ``(decoding requests, requests that need a prefill)``."""
        if self.mode == JUMP:
            j = steps_reached(self.alpha, self.beta, now - self.t0)
            done = j if self.t0 + j * self.alpha + self.beta * j * (j - 1) / 2 <= now else j - 1
            self.steps += done
            self.ctx_sum += self.nb * done
            self.kv_used += self.nb * done
        decoding = list(self.running)
        for r in decoding:
            self.leave(sim, r)
        decoding += list(self.joins)
        prompts = [entry[0] for entry in self.prefilling] + [r for _, r in sorted(self.waiting)]
        self.running.clear()
        self.joins.clear()
        self.prefilling.clear()
        self.waiting.clear()
        self.fin.clear()
        self.alive = False
        self.mode = IDLE
        self.version += 1
        self.kv_used = 0
        return decoding, prompts
