"""The profiling grid stays inside the engine's limits and never needs preemption."""

from __future__ import annotations

import pytest

from nitsum_runtime.profile_grid import ChunkedPrefillConfig, EngineLimits, build_grid, series_steps

H200_LLAMA = EngineLimits(max_model_len=8192, max_num_batched_tokens=16384, max_num_seqs=512, kv_cache_tokens=800_000)


@pytest.mark.parametrize("kv", [800_000, 300_000, 60_000])
@pytest.mark.parametrize("smoke", [False, True])
def test_grid_respects_limits(kv: int, smoke: bool) -> None:
    limits = EngineLimits(max_model_len=8192, max_num_batched_tokens=16384, max_num_seqs=512, kv_cache_tokens=kv)
    grid = build_grid(limits, smoke=smoke)
    for cfg in grid.prefill:
        assert cfg.total_tokens <= limits.max_num_batched_tokens
        assert cfg.prompt_tokens < limits.max_model_len
    ids = [c.config_id for c in grid.prefill]
    assert len(ids) == len(set(ids))
    for series in grid.decode:
        sizes = series.batch_sizes
        assert list(sizes) == sorted(sizes, reverse=True) and sizes[-1] == 1
        assert sizes[0] <= limits.max_num_seqs
        steps = series_steps(series, grid.decode_steps + grid.decode_warmup_steps, grid.mixed, grid.mixed_repeats)
        # every sequence's prompt + generated tokens fit the model length and the whole batch fits the cache
        assert series.context_tokens + steps < limits.max_model_len
        assert sizes[0] * (series.context_tokens + steps) <= 0.85 * kv
        assert set(series.mixed_batch_sizes) <= set(sizes)


def test_full_grid_covers_the_wanted_ranges() -> None:
    grid = build_grid(H200_LLAMA)
    contexts = [s.context_tokens for s in grid.decode]
    assert contexts[:3] == [128, 1024, 4096]
    assert max(contexts) == 8192 - 256
    assert grid.decode[0].batch_sizes[0] == 512
    assert min(c.total_tokens for c in grid.prefill) == 16
    assert max(c.total_tokens for c in grid.prefill) >= 8192
    assert grid.decode_steps == 10


def test_small_kv_cache_shrinks_the_largest_batch() -> None:
    big = build_grid(H200_LLAMA)
    small = build_grid(
        EngineLimits(max_model_len=8192, max_num_batched_tokens=16384, max_num_seqs=512, kv_cache_tokens=100_000)
    )
    b_big = {s.context_tokens: s.batch_sizes[0] for s in big.decode}
    b_small = {s.context_tokens: s.batch_sizes[0] for s in small.decode}
    assert b_small[1024] < b_big[1024]


def test_chunks_cover_the_prompt_with_growing_context() -> None:
    assert ChunkedPrefillConfig(5000, 2048).chunks() == [(2048, 0), (2048, 2048), (904, 4096)]
    assert ChunkedPrefillConfig(512, 512).chunks() == [(512, 0)]


def test_bad_kv_fill_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_fill"):
        build_grid(H200_LLAMA, kv_fill=0)
