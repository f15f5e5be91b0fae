"""Drive an engine step by step through a :class:`~nitsum_runtime.profile_grid.ProfileGrid` and record rows.

Every step's row is built from what the scheduler *ran* (:func:`~nitsum_runtime.composition.compose_step`),
never from the plan; the plan's counts (prefill sequences, prefill tokens, decode sequences) are compared
with it and every disagreement is kept in :attr:`Profiler.mismatches`. Warm-up steps (the first steps after
the engine starts and after each change of the decode batch) are run but not recorded. Prompts are random
token ids from a seeded generator, so a run is reproducible step for step.

The engine is anything with the small interface of :class:`EngineLike` (``InProcessVllmEngine`` in practice).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from nitsum_runtime.composition import ScheduledRequest, StepComposition, compose_step
from nitsum_runtime.profile_grid import ChunkedPrefillConfig, DecodeSeries, ProfileGrid
from nitsum_runtime.profile_schema import ProfileRow

#: Prefill configurations of at most this many tokens get one unrecorded repeat before the recorded ones.
WARMUP_REPEAT_MAX_TOKENS = 4096


class StepLike(Protocol):
    """What one engine step reports (see ``InProcessVllmEngine.step``)."""

    @property
    def step_time_s(self) -> float: ...
    @property
    def scheduled(self) -> tuple[ScheduledRequest, ...]: ...
    @property
    def finished(self) -> frozenset[str]: ...


class EngineLike(Protocol):
    """The engine operations the profiler uses."""

    def add_request(self, prompt_token_ids: list[int], max_tokens: int) -> str: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def set_prefill_chunk_limit(self, tokens: int | None) -> None: ...
    def step(self) -> StepLike: ...


@dataclass(frozen=True, slots=True)
class RowContext:
    """Labels of the rows a step produces and the counts the plan expects (``None``: no expectation)."""

    config_id: str
    repeat: int
    expected: tuple[int, int, int] | None
    record: bool = True


@dataclass
class Profiler:
    """Runs one engine through a grid; rows go to ``sink`` as they are measured."""

    engine: EngineLike
    grid: ProfileGrid
    sink: Callable[[ProfileRow], None]
    model: str
    gpu: str
    tp: int
    vocab_size: int
    max_model_len: int
    deadline: float = float("inf")
    """``time.monotonic()`` after which no new configuration starts (the ones started finish)."""
    seed: int = 0
    passes: int = 1
    """Times the whole grid is measured, one pass after the other on the same engine. Later passes spread a
    configuration's repeats over the run, so slow drifts (whole blocks of steps shifting together) average out
    of its mean; pass ``p`` labels repeat ``r`` as ``p * grid.repeat_stride + r``."""
    progress: Callable[[str], None] = lambda _msg: None
    mismatches: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: int = 0
    prefill_tokens_per_s: float = 0.0
    """Prompt throughput of the warm-up's longest prefill; sizes what still fits before the deadline."""
    _prompts: dict[str, int] = field(default_factory=dict)
    _computed: dict[str, int] = field(default_factory=dict)
    _rng: random.Random = field(init=False)
    _repeat_offset: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.passes < 1:
            raise ValueError(f"passes={self.passes} must be at least 1")
        self._rng = random.Random(self.seed)

    # --- primitives -------------------------------------------------------------------------------
    def _add(self, prompt_tokens: int, max_tokens: int) -> str:
        ids = [self._rng.randrange(self.vocab_size) for _ in range(prompt_tokens)]
        rid = self.engine.add_request(ids, max_tokens)
        self._prompts[rid] = prompt_tokens
        self._computed[rid] = 0
        return rid

    def _forget(self, rids: list[str] | frozenset[str]) -> None:
        for rid in rids:
            self._prompts.pop(rid, None)
            self._computed.pop(rid, None)

    def _abort(self, rids: list[str]) -> None:
        live = [r for r in rids if r in self._prompts]
        self.engine.abort(live)
        self._forget(live)

    def _step(self, ctx: RowContext) -> tuple[StepComposition | None, frozenset[str]]:
        result = self.engine.step()
        if not result.scheduled:
            return None, result.finished
        comp = compose_step(result.scheduled, self._prompts)
        for req in result.scheduled:
            self._computed[req.request_id] = req.num_computed_tokens + req.num_new_tokens
        if ctx.expected is not None and comp.counts() != ctx.expected:
            self.mismatches.append(
                f"{ctx.config_id} repeat {ctx.repeat + self._repeat_offset}: planned (prefill seqs, prefill "
                f"tokens, decode seqs)={ctx.expected}, scheduled {comp.counts()}"
            )
        if ctx.record:
            self.sink(
                ProfileRow(
                    model=self.model,
                    gpu=self.gpu,
                    tp=self.tp,
                    experiment=comp.experiment,
                    config_id=ctx.config_id,
                    repeat=ctx.repeat + self._repeat_offset,
                    num_prefill_seqs=comp.num_prefill_seqs,
                    prefill_tokens=comp.prefill_tokens,
                    prefill_context_tokens=comp.prefill_context_tokens,
                    prefill_attention_pairs=comp.prefill_attention_pairs,
                    num_decode_seqs=comp.num_decode_seqs,
                    decode_context_tokens=comp.decode_context_tokens,
                    step_time_ms=result.step_time_s * 1e3,
                )
            )
            self.rows += 1
        self._forget(result.finished)
        return comp, result.finished

    def _run_until_finished(self, rids: set[str], ctx_of_step: Callable[[int], RowContext]) -> None:
        """Step until every request in ``rids`` finished; step ``k`` is labelled ``ctx_of_step(k)``."""
        k = 0
        while rids:
            _comp, finished = self._step(ctx_of_step(k))
            rids -= finished
            k += 1
            if k > 10_000:
                raise RuntimeError(f"requests {sorted(rids)[:3]} did not finish after 10000 steps")

    def _time_left(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return True
        self.skipped.append(what)
        return False

    # --- experiments ------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Unrecorded steps of every kind, so first-use costs stay out of the profile."""
        off = RowContext("warmup", 0, None, record=False)
        longest = self.max_model_len - 1
        for n, length in ((1, longest), (64, 16), (4, 2048), (1, longest)):
            rids = {self._add(length, 1) for _ in range(n)}
            t0 = time.perf_counter()
            self._run_until_finished(rids, lambda _k: off)
            if n == 1:
                self.prefill_tokens_per_s = length / (time.perf_counter() - t0)
        decodes = [self._add(256, 64) for _ in range(32)]
        for _ in range(6):
            self._step(off)
        self.engine.set_prefill_chunk_limit(512)
        self._run_until_finished({self._add(1024, 1)}, lambda _k: off)
        self.engine.set_prefill_chunk_limit(None)
        self._abort(decodes)

    def prefill(self) -> None:
        """``n`` prompts of ``L`` tokens in one step, each configuration ``prefill_repeats`` times."""
        for cfg in self.grid.prefill:
            if not self._time_left(cfg.config_id):
                continue
            self.progress(cfg.config_id)
            # Small steps feel first-use costs most (seen on H200: +0.3..1 ms): one unrecorded repeat first.
            first = -1 if cfg.total_tokens <= WARMUP_REPEAT_MAX_TOKENS else 0
            for r in range(first, self.grid.prefill_repeats):
                rids = {self._add(cfg.prompt_tokens, 1) for _ in range(cfg.num_prompts)}
                expected = (cfg.num_prompts, cfg.total_tokens, 0)

                def label(k: int, r: int = r, e: tuple[int, int, int] = expected, c: str = cfg.config_id) -> RowContext:
                    if k > 0:
                        return RowContext(f"{c}-extra{k}", r, None, record=r >= 0)
                    return RowContext(c, r, e, record=r >= 0)

                self._run_until_finished(rids, label)

    def chunked_prefill(self) -> None:
        """One long prompt alone, in chunks: later chunks attend to the cached earlier ones."""
        for cfg in self.grid.chunked_prefill:
            base = f"chunked-{cfg.tag()}"
            if not self._time_left(base):
                continue
            self.progress(base)
            self._chunked(cfg, base, decode_seqs=0, repeats=self.grid.prefill_repeats)

    def _chunked(self, cfg: ChunkedPrefillConfig, base: str, decode_seqs: int, repeats: int) -> None:
        chunks = cfg.chunks()
        self.engine.set_prefill_chunk_limit(cfg.chunk_tokens)
        try:
            # Repeat -1 is unrecorded: the first prompt after a change of batch ran up to 4x slower on H200.
            for r in range(-1, repeats):
                rid = self._add(cfg.prompt_tokens, 1)

                def label(k: int, r: int = r) -> RowContext:
                    if k >= len(chunks):
                        return RowContext(f"{base}-extra{k}", r, None, record=r >= 0)
                    return RowContext(f"{base}-i{k}", r, (1, chunks[k][0], decode_seqs), record=r >= 0)

                self._run_until_finished({rid}, label)
        finally:
            self.engine.set_prefill_chunk_limit(None)

    def decode(self) -> None:
        """Every decode series of the grid (with its mixed experiments)."""
        for series in self.grid.decode:
            name = f"decode-c{series.context_tokens}"
            setup_s = series.setup_tokens / self.prefill_tokens_per_s if self.prefill_tokens_per_s else 0.0
            if time.monotonic() + 1.5 * setup_s > self.deadline:
                self.skipped.append(f"{name} (setup of ~{setup_s:.0f} s does not fit before the deadline)")
                continue
            if self._time_left(name):
                self._decode_series(series)

    def _decode_series(self, series: DecodeSeries) -> None:
        ctx, b_max = series.context_tokens, series.batch_sizes[0]
        self.progress(f"decode c={ctx}: setup of {b_max} sequences")
        active = [self._add(ctx, self.max_model_len - ctx) for _ in range(b_max)]
        setup = f"setup-c{ctx}-b{b_max}"
        k = 0
        while any(self._computed.get(r, 0) < ctx for r in active):
            self._step(RowContext(f"{setup}-s{k}", 0, None))
            k += 1
        try:
            for b in series.batch_sizes:
                if not self._time_left(DecodeSeries.config_id(ctx, b)):
                    break
                self._abort(active[b:])
                active = active[:b]
                for _ in range(self.grid.decode_warmup_steps):
                    self._step(RowContext("warmup", 0, (0, 0, b), record=False))
                cid = DecodeSeries.config_id(ctx, b)
                for r in range(self.grid.decode_steps):
                    self._step(RowContext(cid, r, (0, 0, b)))
                if b in series.mixed_batch_sizes:
                    for cfg in self.grid.mixed:
                        self._chunked(cfg, f"mixed-c{ctx}-b{b}-{cfg.tag()}", b, self.grid.mixed_repeats)
        finally:
            self._abort(active)

    def run(self) -> None:
        """Warm up, then ``passes`` times: prefill, decode (with mixed), chunked prefill; no configuration
        starts after the deadline."""
        self.progress("warm-up")
        self.warm_up()
        for p in range(self.passes):
            self._repeat_offset = p * self.grid.repeat_stride
            if self.passes > 1:
                self.progress(f"pass {p + 1} of {self.passes}")
            self.prefill()
            self.decode()
            self.chunked_prefill()
