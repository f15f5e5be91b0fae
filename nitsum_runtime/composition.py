"""Batch composition of one engine step, computed from what the scheduler actually scheduled.

The profiler never trusts its own plan for the numbers it records: after every step it reads the scheduler's
decision (which request got how many new tokens, and how many tokens each already had in its KV cache) and
turns it into a :class:`StepComposition` here. The plan is only compared against it.

For a request ``i`` scheduled with ``n_i`` new tokens and ``c_i`` tokens already computed, and prompt length
``P_i``:

* it is a **prefill** sequence when ``c_i < P_i`` (it computes prompt tokens); then ``n_i`` is its chunk and
  ``c_i`` its context, and its causal attention covers ``n_i * c_i + n_i * (n_i + 1) / 2`` (query, key) pairs;
* it is a **decode** sequence when ``c_i >= P_i`` (it feeds back its last sampled token, ``n_i == 1``); it
  attends over ``c_i + 1`` keys: its prompt plus every token generated so far, the new one included.

This module is pure Python (no vLLM, no torch) so that CI can test it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nitsum_runtime.profile_schema import ExperimentKind


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of a step, as the scheduler decided it."""

    request_id: str
    """The engine's request id."""
    num_new_tokens: int
    """Tokens computed for this request in the step (a prompt chunk, or 1 for a decode)."""
    num_computed_tokens: int
    """Tokens already in the request's KV cache before the step."""


@dataclass(frozen=True, slots=True)
class StepComposition:
    """Aggregate composition of one step, in the units of the profile CSV (see PROFILE_SCHEMA.md)."""

    num_prefill_seqs: int
    """Sequences computing prompt tokens in this step."""
    prefill_tokens: int
    """Σ chunk_i over prefill sequences."""
    prefill_context_tokens: int
    """Σ ctx_i: prompt tokens already cached for the prefill sequences before this step."""
    prefill_attention_pairs: int
    """Σ chunk_i·ctx_i + chunk_i·(chunk_i+1)/2: causal (query, key) pairs of the prefill part."""
    num_decode_seqs: int
    """Sequences generating one token in this step."""
    decode_context_tokens: int
    """Σ keys attended by decode sequences (prompt + generated tokens, the new one included)."""

    @property
    def experiment(self) -> ExperimentKind:
        """``prefill``, ``decode`` or ``mixed``, from which kinds of sequences the step holds."""
        if self.num_prefill_seqs and self.num_decode_seqs:
            return ExperimentKind.MIXED
        if self.num_prefill_seqs:
            return ExperimentKind.PREFILL
        if self.num_decode_seqs:
            return ExperimentKind.DECODE
        raise ValueError("an empty step (no scheduled tokens) has no experiment kind")

    @property
    def total_tokens(self) -> int:
        """Tokens the model processed in the step."""
        return self.prefill_tokens + self.num_decode_seqs

    def counts(self) -> tuple[int, int, int]:
        """``(num_prefill_seqs, prefill_tokens, num_decode_seqs)``: what a plan can predict exactly."""
        return (self.num_prefill_seqs, self.prefill_tokens, self.num_decode_seqs)


def scheduled_of(output: Any) -> list[ScheduledRequest]:
    """What one vLLM ``SchedulerOutput`` scheduled (new and cached requests), read by attribute only."""
    computed = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    cached = output.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    return [
        ScheduledRequest(req_id, int(n), int(computed[req_id])) for req_id, n in output.num_scheduled_tokens.items()
    ]


def step_counts(
    scheduled: Iterable[ScheduledRequest], prompt_tokens: Mapping[str, int]
) -> tuple[int, int, int, int, int]:
    """A step in the latency model's terms (``predict_ms``'s arguments after ``tp``): a request computing more than
    one token, or any token of its prompt (``prompt_tokens``; unknown ids: 0), is prefill (a recompute after
    preemption too); one token past its prompt is a decode attending its whole context, the new token included."""
    n_pre = tokens = pairs = n_dec = ctx = 0
    for s in scheduled:
        new, done = s.num_new_tokens, s.num_computed_tokens
        if new > 1 or done < prompt_tokens.get(s.request_id, 0):
            n_pre, tokens, pairs = n_pre + 1, tokens + new, pairs + new * done + new * (new + 1) // 2
        else:
            n_dec, ctx = n_dec + 1, ctx + done + 1
    return n_pre, tokens, pairs, n_dec, ctx


def attention_pairs(chunk_tokens: int, context_tokens: int) -> int:
    """Causal (query, key) pairs of a chunk of ``chunk_tokens`` after ``context_tokens`` cached tokens."""
    if chunk_tokens < 0 or context_tokens < 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} and context_tokens={context_tokens} must be >= 0")
    return chunk_tokens * context_tokens + chunk_tokens * (chunk_tokens + 1) // 2


def compose_step(scheduled: Iterable[ScheduledRequest], prompt_tokens: Mapping[str, int]) -> StepComposition:
    """Classify each scheduled request as prefill or decode and sum the CSV columns.

    ``prompt_tokens`` maps every request id the profiler submitted to its prompt length. A request id the
    profiler does not know, a chunk that runs past the end of the prompt, or a decode of more than one token
    (speculative decoding is off) raises, naming the request: the recorded row would otherwise be wrong.
    """
    n_prefill = prefill_tokens = prefill_ctx = pairs = n_decode = decode_ctx = 0
    for req in scheduled:
        if req.request_id not in prompt_tokens:
            raise KeyError(
                f"scheduler ran request {req.request_id!r} that the profiler did not submit; "
                "profile on an engine nobody else sends requests to"
            )
        if req.num_new_tokens <= 0 or req.num_computed_tokens < 0:
            raise ValueError(
                f"request {req.request_id!r}: num_new_tokens={req.num_new_tokens} must be > 0 and "
                f"num_computed_tokens={req.num_computed_tokens} >= 0"
            )
        prompt = prompt_tokens[req.request_id]
        if req.num_computed_tokens < prompt:
            end = req.num_computed_tokens + req.num_new_tokens
            if end > prompt:
                raise ValueError(
                    f"request {req.request_id!r}: chunk of {req.num_new_tokens} tokens after "
                    f"{req.num_computed_tokens} cached runs past its {prompt}-token prompt"
                )
            n_prefill += 1
            prefill_tokens += req.num_new_tokens
            prefill_ctx += req.num_computed_tokens
            pairs += attention_pairs(req.num_new_tokens, req.num_computed_tokens)
        else:
            if req.num_new_tokens != 1:
                raise ValueError(
                    f"request {req.request_id!r}: decode step with {req.num_new_tokens} new tokens; the "
                    "profiler runs without speculative decoding, so a decode computes exactly one token"
                )
            n_decode += 1
            decode_ctx += req.num_computed_tokens + 1
    return StepComposition(
        num_prefill_seqs=n_prefill,
        prefill_tokens=prefill_tokens,
        prefill_context_tokens=prefill_ctx,
        prefill_attention_pairs=pairs,
        num_decode_seqs=n_decode,
        decode_context_tokens=decode_ctx,
    )
