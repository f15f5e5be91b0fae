"""A small request-level discrete-event simulator of ONE engine instance, timed by an iteration-time model.

It is the independent check of :mod:`.capacity`: requests arrive as a Poisson process with lengths drawn from
the tier's mix and are served step by step, each step timed by ``predict_ms`` of the model. Engine semantics
(vLLM V1 style; the capacity model assumes the same):

* every step: the running decode sequences (one token each, ``decode`` and ``colocated`` roles) first, then
prompt
  tokens up to ``max_num_batched_tokens`` in total: prompts already being prefilled first, then waiting
  prompts in
  arrival order; the last one is chunked to fill the budget;
* a request is admitted (prefill started, or, for the ``decode`` role, added to the running batch) only while
fewer
  than ``max_num_seqs`` run and its whole KV (``input + output`` tokens) fits the unreserved cache (reserved
  until
  it finishes; FCFS, so a request that does not fit blocks the ones behind it);
* a prompt's first token appears at the end of the step that computes its last chunk (TTFT); the ``decode``
role
  receives requests whose first token exists already (arrival = first token) and generates ``output − 1``
  tokens;
  TPOT = (last token − first token) / (output − 1);
* hand-off pauses (0 by default): a ``prefill`` instance pauses ``handoff_leave_ms`` after a step that completes
  prompts (they leave for a decode instance), a ``decode`` instance pauses ``handoff_arrive_ms`` before a step
  that admits requests (their KV arrived).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .features import FloatArray
from .spec import LengthMix, Role, SloTarget


class StepClock(Protocol):
    """What the simulator needs from a latency model."""

    def predict_ms(
        self,
        tp: int,
        num_prefill_seqs: int,
        prefill_tokens: int,
        prefill_attention_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float: ...

    def kv_cache_tokens(self, tp: int) -> int: ...


@dataclass(frozen=True)
class SimResult:
    """Per-request outcomes of a simulation (requests in arrival order; warm-up ones dropped)."""

    ttft_ms: FloatArray
    """Time to first token (NaN for the decode role)."""
    tpot_ms: FloatArray
    """Mean time per output token after the first (NaN for single-token outputs and the prefill role)."""
    sim_time_s: float
    """Simulated seconds until the last request finished."""
    steps: int
    """Engine steps simulated."""

    def attainment(self, slo: SloTarget, role: Role) -> float:
        """Share of requests that meet the targets the role is responsible for."""
        ttft_ok = np.isnan(self.ttft_ms) | (self.ttft_ms <= slo.ttft_slo_ms)
        tpot_ok = np.isnan(self.tpot_ms) | (self.tpot_ms <= slo.tpot_slo_ms)
        if role is Role.PREFILL:
            return float(ttft_ok.mean())
        if role is Role.DECODE:
            return float(tpot_ok.mean())
        return float((ttft_ok & tpot_ok).mean())


def sample_requests(mix: LengthMix, rate_rps: float, n: int, seed: int) -> tuple[FloatArray, np.ndarray, np.ndarray]:
    """Poisson arrival times (s) and (input, output) lengths drawn from ``mix``."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_rps, size=n))
    idx = rng.choice(len(mix.buckets), size=n, p=np.array(mix.probabilities))
    inp = np.array([b.input_tokens for b in mix.buckets])[idx]
    out = np.array([b.output_tokens for b in mix.buckets])[idx]
    return arrivals, inp, out


class _Engine:
    def __init__(self, clock: StepClock, tp: int, role: Role, budget: int, max_seqs: int, n: int) -> None:
        self.clock, self.tp, self.role = clock, tp, role
        self.budget, self.max_seqs = budget, max_seqs
        self.kv_free = clock.kv_cache_tokens(tp) if role is not Role.PREFILL else 1 << 62
        self.ttft = np.full(n, np.nan)
        self.tpot = np.full(n, np.nan)
        self.waiting: deque[int] = deque()
        self.prefilling: list[list[int]] = []  # [request, tokens done]
        self.dec_id: list[int] = []
        self.dec_gen: list[int] = []
        self.first_s: dict[int, float] = {}
        self.running = 0
        self.joined = 0  # decode role: requests admitted since the last step

    def admit(self, inp: np.ndarray, out: np.ndarray, arrivals: FloatArray) -> int:
        """Admit waiting requests FCFS while sequences and KV allow (prefill role: no limits); returns the
        requests that finish on admission (decode role, single-token outputs)."""
        finished = 0
        while self.waiting:
            r = self.waiting[0]
            if self.role is Role.DECODE and out[r] <= 1:
                self.waiting.popleft()
                finished += 1
                continue
            need = int(inp[r] + out[r])
            if self.role is not Role.PREFILL and (self.running >= self.max_seqs or need > self.kv_free):
                break
            self.waiting.popleft()
            self.kv_free -= need if self.role is not Role.PREFILL else 0
            self.running += 1
            if self.role is Role.DECODE:
                self.joined += 1
                self.first_s[r] = float(arrivals[r])
                self.dec_id.append(r)
                self.dec_gen.append(1)
            else:
                self.prefilling.append([r, 0])
        return finished


def simulate_instance(
    clock: StepClock,
    tp: int,
    role: Role,
    mix: LengthMix,
    rate_rps: float,
    n_requests: int = 4000,
    seed: int = 0,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    warmup_fraction: float = 0.15,
    handoff_leave_ms: float = 0.0,
    handoff_arrive_ms: float = 0.0,
) -> SimResult:
    """Simulate one instance of ``(tp, role)`` fed ``n_requests`` Poisson arrivals at ``rate_rps`` until all
    finish (hand-off pauses: module docstring)."""
    if rate_rps <= 0 or n_requests < 1:
        raise ValueError(f"rate_rps={rate_rps} must be > 0 and n_requests={n_requests} >= 1")
    arrivals, inp, out = sample_requests(mix, rate_rps, n_requests, seed)
    eng = _Engine(clock, tp, role, max_num_batched_tokens, max_num_seqs, n_requests)
    predict = clock.predict_ms
    now, nxt, steps, done = 0.0, 0, 0, 0
    while done < n_requests:
        while nxt < n_requests and arrivals[nxt] <= now:
            eng.waiting.append(nxt)
            nxt += 1
        done += eng.admit(inp, out, arrivals)
        n_dec = len(eng.dec_id)
        if n_dec == 0 and not eng.prefilling:
            if nxt < n_requests:
                now = max(now, float(arrivals[nxt]))  # idle until the next arrival
            continue
        dec_ctx = sum(int(inp[r]) for r in eng.dec_id) + sum(eng.dec_gen) if n_dec else 0
        left = eng.budget - n_dec
        chunks: list[tuple[list[int], int]] = []
        pre_tok = pairs = 0
        for entry in eng.prefilling:
            if left <= 0:
                break
            r, done_tok = entry
            chunk = min(int(inp[r]) - done_tok, left)
            chunks.append((entry, chunk))
            pre_tok += chunk
            pairs += chunk * done_tok + chunk * (chunk + 1) // 2
            left -= chunk
        if eng.joined:  # decode role: the arrived KV is taken in before the step
            now += handoff_arrive_ms / 1000.0
            eng.joined = 0
        now += predict(tp, len(chunks), pre_tok, pairs, n_dec, dec_ctx) / 1000.0
        steps += 1
        done += _finish_decodes(eng, inp, out, now)
        handed = _finish_chunks(eng, chunks, inp, out, arrivals, now)
        done += handed
        if handed and role is Role.PREFILL:  # the prefilled requests leave before the next step
            now += handoff_leave_ms / 1000.0
    keep = slice(int(warmup_fraction * n_requests), n_requests)
    return SimResult(ttft_ms=eng.ttft[keep], tpot_ms=eng.tpot[keep], sim_time_s=now, steps=steps)


def _finish_decodes(eng: _Engine, inp: np.ndarray, out: np.ndarray, now: float) -> int:
    finished = 0
    keep_id, keep_gen = [], []
    for r, g in zip(eng.dec_id, eng.dec_gen, strict=True):
        g += 1
        if g >= out[r]:
            eng.tpot[r] = (now - eng.first_s.pop(r)) * 1000.0 / (out[r] - 1)
            eng.kv_free += int(inp[r] + out[r])
            eng.running -= 1
            finished += 1
        else:
            keep_id.append(r)
            keep_gen.append(g)
    eng.dec_id, eng.dec_gen = keep_id, keep_gen
    return finished


def _finish_chunks(
    eng: _Engine,
    chunks: list[tuple[list[int], int]],
    inp: np.ndarray,
    out: np.ndarray,
    arrivals: FloatArray,
    now: float,
) -> int:
    finished = 0
    for entry, chunk in chunks:
        entry[1] += chunk
        r = entry[0]
        if entry[1] < inp[r]:
            continue
        eng.ttft[r] = (now - arrivals[r]) * 1000.0
        if eng.role is Role.PREFILL or out[r] <= 1:
            eng.kv_free += int(inp[r] + out[r]) if eng.role is not Role.PREFILL else 0
            eng.running -= 1
            finished += 1
        else:
            eng.first_s[r] = now
            eng.dec_id.append(r)
            eng.dec_gen.append(1)
    eng.prefilling = [e for e in eng.prefilling if e[1] < inp[e[0]]]
    return finished
