"""A small engine that schedules like vLLM's v1 scheduler, for CPU tests of the loops that drive engines.

``ToyEngine`` is not a mock of vLLM: it implements the scheduling policy those loops rely on (running requests
first, one token per decode; then waiting requests first-come-first-served; a token budget per step; a cap on
running sequences; an optional per-request prompt chunk cap; a request finishes after ``max_tokens`` sampled
tokens) and reports what it scheduled the way ``InProcessVllmEngine.step`` does. With a :class:`VirtualClock`
each step advances the clock by its step time (``1 ms + 0.1 µs`` per token), so timings are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.composition import ScheduledRequest
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.toy_vllm import toy_engine_process, write_toy_store
from nitsum_runtime.vllm_engine import StepResult
from nitsum_runtime.vllm_pool import VllmPoolSettings, build_vllm_pool


@dataclass
class VirtualClock:
    """Seconds that pass only when an engine step runs or the caller sleeps."""

    now_s: float = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += max(0.0, seconds)


@dataclass
class _Req:
    rid: str
    prompt: int
    max_tokens: int
    computed: int = 0
    generated: int = 0


@dataclass
class ToyEngine:
    budget: int = 16384
    max_seqs: int = 512
    chunk_cap: int = 0
    waiting: list[_Req] = field(default_factory=list)
    running: list[_Req] = field(default_factory=list)
    n: int = 0
    clock: VirtualClock | None = None

    def add_request(self, prompt_token_ids: list[int], max_tokens: int) -> str:
        self.n += 1
        self.waiting.append(_Req(f"q{self.n}", len(prompt_token_ids), max_tokens))
        return f"q{self.n}"

    def abort(self, request_ids: list[str]) -> None:
        gone = set(request_ids)
        self.running = [r for r in self.running if r.rid not in gone]
        self.waiting = [r for r in self.waiting if r.rid not in gone]

    def set_prefill_chunk_limit(self, tokens: int | None) -> None:
        self.chunk_cap = tokens or 0

    def _want(self, r: _Req, budget: int) -> int:
        new = r.prompt + r.generated - r.computed
        if 0 < self.chunk_cap < new:
            new = self.chunk_cap
        return min(new, budget)

    def step(self) -> StepResult:
        budget, plan = self.budget, []
        for r in self.running:
            if budget <= 0:
                break
            k = self._want(r, budget)
            plan.append((r, k))
            budget -= k
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            r = self.waiting.pop(0)
            self.running.append(r)
            k = self._want(r, budget)
            plan.append((r, k))
            budget -= k
        scheduled = tuple(ScheduledRequest(r.rid, k, r.computed) for r, k in plan)
        finished = set()
        for r, k in plan:
            r.computed += k
            if r.computed >= r.prompt + r.generated:
                r.generated += 1
                if r.generated >= r.max_tokens:
                    finished.add(r.rid)
        self.running = [r for r in self.running if r.rid not in finished]
        tokens = sum(k for _, k in plan)
        step_s = 1e-3 + tokens * 1e-7
        if self.clock is not None:
            self.clock.now_s += step_s
        return StepResult(step_s, scheduled, frozenset(finished))


def start_toy_vllm_pool(spec: ModelSpec, work: Path, seed: int, **settings: Any) -> EnginePool:
    """Toy vLLM engine processes (``nitsum_runtime.toy_vllm``: the real engine-process code on a CPU model) on
    ``settings``' groups of a 2-GPU node, started at once and asleep; close with ``close_pool``."""
    store = write_toy_store(work / "store.json", seed)
    config = VllmPoolSettings(**{"concurrent_starts": True, "max_model_len": spec.max_model_len, **settings})
    pool, _ = build_vllm_pool(spec, 2, store, work, config, target=toy_engine_process, log=lambda _: None)
    return pool
