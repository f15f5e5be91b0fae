"""Which batch configurations the profiler measures (pure: no engine needed to build or test a grid).

Three families, each a list of configurations with a stable ``config_id``:

* **prefill**: ``n`` prompts of ``L`` tokens in one step (``n·L`` up to the engine's token budget),
  plus single long prompts cut into chunks (later chunks attend to cached context);
* **decode**: ``B`` sequences of context ``C``. For each context the grid starts the largest batch that the
  KV cache and the setup budget allow and halves it by aborting requests, so each context is prefilled
  once (the setup steps are real steps and are recorded too);
* **mixed**: while a decode batch runs, one prompt of ``P`` tokens arrives and is computed in chunks of
  ``K`` tokens next to the decodes (vLLM's chunked prefill).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    """``num_prompts`` prompts of ``prompt_tokens`` each, scheduled together in one step."""

    num_prompts: int
    prompt_tokens: int

    @property
    def config_id(self) -> str:
        """Stable id, e.g. ``prefill-n4-l512``."""
        return f"prefill-n{self.num_prompts}-l{self.prompt_tokens}"

    @property
    def total_tokens(self) -> int:
        """Prompt tokens the step computes."""
        return self.num_prompts * self.prompt_tokens


@dataclass(frozen=True, slots=True)
class ChunkedPrefillConfig:
    """One prompt of ``prompt_tokens`` computed ``chunk_tokens`` at a time, alone or next to decodes."""

    prompt_tokens: int
    chunk_tokens: int

    def chunks(self) -> list[tuple[int, int]]:
        """``(chunk, context)`` of each step, in order."""
        out, done = [], 0
        while done < self.prompt_tokens:
            chunk = min(self.chunk_tokens, self.prompt_tokens - done)
            out.append((chunk, done))
            done += chunk
        return out

    def tag(self) -> str:
        """Short id part, e.g. ``p8000-k2048``."""
        return f"p{self.prompt_tokens}-k{self.chunk_tokens}"


@dataclass(frozen=True, slots=True)
class DecodeSeries:
    """Sequences of ``context_tokens`` prompt tokens, measured at each batch size (largest first)."""

    context_tokens: int
    batch_sizes: tuple[int, ...]
    mixed_batch_sizes: tuple[int, ...]
    """Batch sizes of this series at which the mixed experiments run."""

    @property
    def setup_tokens(self) -> int:
        """Prompt tokens needed to start the largest batch."""
        return self.batch_sizes[0] * self.context_tokens

    @staticmethod
    def config_id(context_tokens: int, batch_size: int) -> str:
        """Stable id, e.g. ``decode-c1024-b256``."""
        return f"decode-c{context_tokens}-b{batch_size}"


@dataclass(frozen=True, slots=True)
class ProfileGrid:
    """Everything one engine measures, in the order it measures it."""

    prefill: tuple[PrefillConfig, ...]
    prefill_repeats: int
    chunked_prefill: tuple[ChunkedPrefillConfig, ...]
    decode: tuple[DecodeSeries, ...]
    decode_steps: int
    decode_warmup_steps: int
    mixed: tuple[ChunkedPrefillConfig, ...]
    mixed_repeats: int

    @property
    def repeat_stride(self) -> int:
        """Repeat indices one pass over the grid uses at most (prefill, mixed and decode repeats); pass ``p``
        of a multi-pass profile labels its rows ``p * repeat_stride + r``."""
        return max(self.prefill_repeats, self.mixed_repeats, self.decode_steps, 1)

    def setup_tokens(self) -> int:
        """Prompt tokens all decode setups prefill (the dominant cost of a profile)."""
        return sum(s.setup_tokens for s in self.decode)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What the engine admits; the grid never exceeds it."""

    max_model_len: int
    """Longest prompt + output, tokens."""
    max_num_batched_tokens: int
    """Token budget of one step."""
    max_num_seqs: int
    """Most sequences in one step."""
    kv_cache_tokens: int
    """KV-cache capacity, tokens."""


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


def longest_prompt(limits: EngineLimits, output_tokens: int) -> int:
    """Longest prompt that still leaves room for ``output_tokens`` generated tokens."""
    return limits.max_model_len - output_tokens


def _series(
    ctx: int, b_max: int, mixed_batches: tuple[int, ...], mixed: list[ChunkedPrefillConfig], repeats: int
) -> DecodeSeries:
    sizes = tuple(sorted(_powers_of_two(1, b_max), reverse=True))
    if sizes[0] != b_max:
        sizes = (b_max, *sizes)
    at_mixed = tuple(b for b in mixed_batches if b in sizes) if mixed and repeats else ()
    return DecodeSeries(ctx, sizes, at_mixed)


def series_steps(
    series: DecodeSeries,
    steps_per_size: int,
    mixed: list[ChunkedPrefillConfig] | tuple[ChunkedPrefillConfig, ...],
    mixed_repeats: int,
) -> int:
    """Decode steps every sequence of a series goes through after its setup (its output length)."""
    mixed_steps = sum(len(c.chunks()) for c in mixed) * mixed_repeats
    return len(series.batch_sizes) * steps_per_size + len(series.mixed_batch_sizes) * mixed_steps


def build_grid(limits: EngineLimits, smoke: bool = False, kv_fill: float = 0.85) -> ProfileGrid:
    """The profiling grid for an engine with these limits.

    ``smoke`` gives a tiny grid (seconds) that exercises every code path. ``kv_fill`` is the share of the KV
    cache a decode batch may use, so that no request is ever preempted (preemption would change the batch).
    """
    if not 0 < kv_fill <= 1:
        raise ValueError(f"kv_fill={kv_fill} must be in (0, 1]")
    decode_steps, warmup = (4, 1) if smoke else (10, 2)
    # Decode contexts and the largest batch wanted at each (the batch is halved down to 1).
    long_ctx = longest_prompt(limits, 256)
    if smoke:
        wanted = [(128, 8), (1024, 4)]
        prefill_lengths, prefill_counts = [16, 512, 2048], [1, 4]
        chunked = [ChunkedPrefillConfig(2048, 512)]
        mixed = [ChunkedPrefillConfig(1024, 512)]
        mixed_batches: tuple[int, ...] = (4,)
        prefill_repeats, mixed_repeats = 2, 1
    else:
        # In priority order: the profiler skips the tail when its time runs out.
        wanted = [(128, 512), (1024, 256), (4096, 64), (long_ctx, 32), (2048, 128), (512, 256)]
        prefill_lengths = [16, 128, 512, 2048, longest_prompt(limits, 1)]
        prefill_counts = [1, 4, 16, 64]
        chunked = [ChunkedPrefillConfig(long_ctx, 1024), ChunkedPrefillConfig(long_ctx, 4096)]
        mixed = [
            ChunkedPrefillConfig(512, 512),
            ChunkedPrefillConfig(2048, 2048),
            ChunkedPrefillConfig(long_ctx, 2048),
        ]
        mixed_batches = (4, 32, 256)
        prefill_repeats, mixed_repeats = 3, 2
    prefill = tuple(
        PrefillConfig(n, length)
        for length in prefill_lengths
        for n in prefill_counts
        if n * length <= limits.max_num_batched_tokens and n <= limits.max_num_seqs
    )
    mixed_contexts = {1024, 4096} if not smoke else {128}
    series = []
    for ctx, b_wanted in wanted:
        b = min(b_wanted, limits.max_num_seqs)
        while b >= 1:
            candidate = _series(ctx, b, mixed_batches if ctx in mixed_contexts else (), mixed, mixed_repeats)
            steps = series_steps(candidate, decode_steps + warmup, mixed, mixed_repeats)
            # Setup adds up to one step per token budget; every sequence grows by one token per step.
            steps += -(-b * ctx // limits.max_num_batched_tokens) + 1
            kv_needed = b * (ctx + steps) + max((c.prompt_tokens for c in mixed), default=0)
            if ctx + steps < limits.max_model_len and kv_needed <= limits.kv_cache_tokens * kv_fill:
                series.append(candidate)
                break
            b //= 2
    for cfg in (*chunked, *mixed):
        if cfg.prompt_tokens + 1 > limits.max_model_len:
            raise ValueError(f"prompt of {cfg.prompt_tokens} tokens does not fit max_model_len")
    return ProfileGrid(
        prefill=prefill,
        prefill_repeats=prefill_repeats,
        chunked_prefill=tuple(chunked),
        decode=tuple(series),
        decode_steps=decode_steps,
        decode_warmup_steps=warmup,
        mixed=tuple(mixed),
        mixed_repeats=mixed_repeats,
    )
