"""Replay a request trace open-loop against one engine and time every request: what the simulator predicts,
measured.

Each request is added when the clock reaches its arrival time (never earlier; while a step runs, arrivals wait for
it, as they wait in a real server's input queue), the engine is stepped while anything is queued or running, and
per request the replay records

* **TTFT**: end of the step in which the request's prompt was computed in full (that step samples its first
  token) minus its arrival;
* **TPOT**: (end of the step that produced its last token − end of the step that produced its first) ÷
  (output tokens − 1), NaN for one-token outputs — the simulator's definition
  (:class:`~nitsum_opt.sim.results.SimResult`);
* when it finished; requests still running ``drain_s`` after the last arrival are aborted and reported
  unfinished.

The engine is anything with :class:`~nitsum_runtime.profiler.EngineLike`'s ``add_request`` / ``step`` /
``abort`` (``InProcessVllmEngine`` on a GPU; CPU tests use an engine that schedules like vLLM's, on a virtual
clock). Prompts are random token ids from a seeded generator, all made before the clock starts; outputs run to
exactly their trace length (``ignore_eos``).

``python -m nitsum_runtime.replay --slices FILE --out DIR`` runs every slice of a slice file
(:mod:`nitsum_opt.sim.fidelity`) through one vLLM engine and writes ``measured.csv`` and ``meta.json``
(``benchmarks/gpu/run_fidelity_h200.sh``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nitsum_runtime.composition import ScheduledRequest, step_counts
from nitsum_runtime.profiler import EngineLike


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """One request to replay."""

    arrival_s: float
    """Seconds after the replay starts."""
    input_tokens: int
    """Prompt length."""
    output_tokens: int
    """Tokens to generate."""


@dataclass(slots=True)
class RequestTiming:
    """What the replay measured for one request (NaN where it did not happen)."""

    ttft_s: float = math.nan
    tpot_s: float = math.nan
    finish_s: float = math.nan
    first_token_at_s: float = math.nan


@dataclass
class ReplayResult:
    """Per-request timings (indexed like the requests) and how the replay went."""

    timings: list[RequestTiming]
    steps: int = 0
    """Engine steps run."""
    busy_s: float = 0.0
    """Seconds spent inside ``step()``."""
    wall_s: float = 0.0
    """Seconds from the start to the last step."""
    late_adds: list[float] = field(default_factory=list)
    """How late each request was added after its arrival (a step was running)."""
    aborted: int = 0
    """Requests aborted at the drain limit."""
    step_log: list[StepRecord] = field(default_factory=list)
    """Every step's time and composition (only with ``log_steps=True``)."""


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step: its wall time and batch composition in the latency model's terms
    (:meth:`~nitsum_opt.sim.timing.IterationTimeModel.predict_ms`). A request computing more than one token,
    or any token of its prompt, counts as prefill (a recompute after preemption too); one token past its prompt
    is a decode attending its whole context, the new token included."""

    step_time_s: float
    num_prefill_seqs: int
    prefill_tokens: int
    prefill_attention_pairs: int
    num_decode_seqs: int
    decode_context_tokens: int


def validate_requests(requests: Sequence[ReplayRequest], vocab_size: int, max_model_len: int) -> None:
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} must be at least 2")
    previous = 0.0
    for i, r in enumerate(requests):
        if not (math.isfinite(r.arrival_s) and r.arrival_s >= previous):
            raise ValueError(f"request {i}: arrival {r.arrival_s} s must be finite, ≥ 0 and not before request {i - 1}")
        if r.input_tokens < 1 or r.output_tokens < 1:
            raise ValueError(f"request {i}: input {r.input_tokens} and output {r.output_tokens} tokens must be ≥ 1")
        if r.input_tokens + r.output_tokens > max_model_len:
            raise ValueError(
                f"request {i}: {r.input_tokens} + {r.output_tokens} tokens exceed max_model_len={max_model_len}; "
                "clip the trace's lengths first"
            )
        previous = r.arrival_s


@dataclass
class _Tracker:
    """Maps engine ids to requests and turns step reports into timings."""

    requests: Sequence[ReplayRequest]
    timings: list[RequestTiming]
    index_of: dict[str, int] = field(default_factory=dict)

    def composition(self, step_time_s: float, scheduled: Sequence[ScheduledRequest]) -> StepRecord:
        prompts = {
            s.request_id: self.requests[i].input_tokens
            for s in scheduled
            if (i := self.index_of.get(s.request_id)) is not None
        }
        return StepRecord(step_time_s, *step_counts(scheduled, prompts))

    def on_step(self, scheduled: Sequence[ScheduledRequest], finished: frozenset[str], now_s: float) -> None:
        for s in scheduled:
            i = self.index_of.get(s.request_id)
            if i is None:
                continue
            t = self.timings[i]
            done = s.num_computed_tokens + s.num_new_tokens
            if math.isnan(t.first_token_at_s) and done >= self.requests[i].input_tokens:
                t.first_token_at_s = now_s
                t.ttft_s = now_s - self.requests[i].arrival_s
        for rid in finished:
            i = self.index_of.pop(rid, None)
            if i is None:
                continue
            t = self.timings[i]
            t.finish_s = now_s
            n_out = self.requests[i].output_tokens
            if n_out >= 2 and not math.isnan(t.first_token_at_s):
                t.tpot_s = (now_s - t.first_token_at_s) / (n_out - 1)


def replay(
    engine: EngineLike,
    requests: Sequence[ReplayRequest],
    *,
    vocab_size: int,
    max_model_len: int,
    drain_s: float = 120.0,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] | None = None,
    log_steps: bool = False,
) -> ReplayResult:
    """Replay ``requests`` (sorted by arrival) open-loop on ``engine``; see the module docstring. ``log_steps``
    keeps every step's time and composition (:class:`StepRecord`) in :attr:`ReplayResult.step_log`."""
    validate_requests(requests, vocab_size, max_model_len)
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(r.input_tokens)] for r in requests]  # made before the clock
    timings = [RequestTiming() for _ in requests]
    tracker = _Tracker(requests, timings)
    result = ReplayResult(timings)
    last_arrival = requests[-1].arrival_s if requests else 0.0
    next_i = 0
    t0 = clock()
    next_report = 10.0
    while True:
        now = clock() - t0
        while next_i < len(requests) and requests[next_i].arrival_s <= now:
            r = requests[next_i]
            tracker.index_of[engine.add_request(prompts[next_i], r.output_tokens)] = next_i
            result.late_adds.append(now - r.arrival_s)
            next_i += 1
        if now > last_arrival + drain_s and tracker.index_of:
            result.aborted = len(tracker.index_of)
            engine.abort(list(tracker.index_of))
            tracker.index_of.clear()
        if tracker.index_of:
            step = engine.step()
            result.steps += 1
            result.busy_s += step.step_time_s
            if log_steps:
                result.step_log.append(tracker.composition(step.step_time_s, step.scheduled))
            tracker.on_step(step.scheduled, step.finished, clock() - t0)
        elif next_i < len(requests):
            sleep(max(0.0, requests[next_i].arrival_s - now))
        else:
            break
        if progress is not None and now >= next_report:
            progress(f"t={now:.0f} s: {next_i}/{len(requests)} arrived, {len(tracker.index_of)} in the engine")
            next_report += 10.0
    result.wall_s = clock() - t0
    return result


__all__ = ["ReplayRequest", "ReplayResult", "RequestTiming", "StepRecord", "replay", "validate_requests"]
