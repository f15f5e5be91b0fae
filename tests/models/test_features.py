"""Physical features: units and TP scaling that can be checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from nitsum_opt.models.features import ArchitectureConstants, attention_pairs, iteration_features
from nitsum_opt.models.memory import estimate_kv_cache_tokens
from nitsum_opt.models.spec import MODEL_PRESETS

SPEC = MODEL_PRESETS["llama-3.1-8b"]
C = ArchitectureConstants.from_spec(SPEC)


def _row(tp: int, n_pre: int = 0, tok: int = 0, n_dec: int = 0, ctx: int = 0) -> list[float]:
    return [tp, n_pre, tok, float(attention_pairs(tok)) if n_pre else 0.0, n_dec, ctx]


def test_tp_halves_per_gpu_gemm_flops_weights_and_kv() -> None:
    f = iteration_features(C, [_row(1, 1, 512, 32, 32 * 1024), _row(2, 1, 512, 32, 32 * 1024)])
    for name in ("gemm_flops", "weight_bytes", "attn_prefill_flops", "attn_decode_flops", "kv_read_bytes"):
        assert f[name][1] == pytest.approx(f[name][0] / 2), name


def test_gemm_flops_by_hand() -> None:
    # Llama-3.1-8B: 6.98e9 projection weights + 0.525e9 LM head; 2 FLOP per weight per row.
    f = iteration_features(C, [_row(1, n_dec=1, ctx=1)])
    assert C.layer_linear_params == 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)
    assert f["gemm_flops"][0] == pytest.approx(2 * (C.layer_linear_params + 128256 * 4096))
    assert f["weight_bytes"][0] == pytest.approx(2 * (C.layer_linear_params + 128256 * 4096))


def test_allreduce_is_zero_at_tp1_and_two_per_layer_otherwise() -> None:
    f = iteration_features(C, [_row(1, n_dec=8, ctx=8), _row(4, n_dec=8, ctx=8)])
    assert f["allreduce_bytes"][0] == 0 and f["allreduce_count"][0] == 0
    assert f["allreduce_count"][1] == 2 * 32
    assert f["allreduce_bytes"][1] == 2 * 32 * 8 * 4096 * 2


def test_kv_heads_replicate_beyond_their_number() -> None:
    # 8 KV heads: TP 8 holds one per GPU, TP 16 would still hold one (replicated), never a fraction.
    assert C.kv_bytes_per_token_per_gpu(8) == 2 * 32 * 1 * 128 * 2
    assert C.kv_bytes_per_token_per_gpu(16) == C.kv_bytes_per_token_per_gpu(8)
    assert C.kv_bytes_per_token_per_gpu(1) * 1 == SPEC.kv_bytes_per_token


def test_attention_pairs_formula() -> None:
    assert attention_pairs(4) == 10  # 1 + 2 + 3 + 4
    assert attention_pairs(2, 3) == 2 * 3 + 3  # second chunk of a chunked prefill


def test_features_are_vectorised_and_reject_bad_rows() -> None:
    rows = np.array([_row(tp, 1, 256, 4, 4096) for tp in (1, 2, 4, 8)])
    f = iteration_features(C, rows)
    assert all(v.shape == (4,) for v in f.values())
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        iteration_features(C, rows[:, :5])
    with pytest.raises(ValueError, match="negative"):
        iteration_features(C, [[1, 0, 0, 0, -1, 0]])


def test_kv_capacity_estimate_is_plausible() -> None:
    tokens = estimate_kv_cache_tokens(SPEC, 1, 140.4)  # H200: ~(126 - 16 - 3) GiB / 128 KiB per token
    assert 800_000 < tokens < 900_000
    assert estimate_kv_cache_tokens(SPEC, 2, 140.4) > 2 * tokens  # weights shrink per GPU, too
