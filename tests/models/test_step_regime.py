"""Engine-step regimes: vLLM's CUDA-graph capture sizes and padding, the custom all-reduce limit, and the
features and model terms that use them (known answers on hand-made rows)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nitsum_opt.models.features import COMPOSITION_COLUMNS, ArchitectureConstants, attention_pairs, iteration_features
from nitsum_opt.models.heldout import evaluate_heldout
from nitsum_opt.models.latency import Basis, IterationTimeModel, design_matrix
from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_opt.models.step_regime import (
    StepRegimeLimits,
    cuda_graph_capture_sizes,
    padded_token_count,
    padded_tokens,
)

LLAMA = MODEL_PRESETS["llama-3.1-8b"]
QWEN = MODEL_PRESETS["qwen2.5-14b"]
C = ArchitectureConstants.from_spec(LLAMA)
MIB = 1024 * 1024


def test_capture_sizes_follow_vllm_defaults() -> None:
    sizes = cuda_graph_capture_sizes(512)
    # the 51 sizes the H200 engines logged: 1, 2, 4, 8..248 step 8, 256..512 step 16
    assert len(sizes) == 51 and sizes[:5] == (1, 2, 4, 8, 16) and sizes[-3:] == (480, 496, 512)
    assert 248 in sizes and 252 not in sizes and 264 not in sizes and 272 in sizes
    assert cuda_graph_capture_sizes(8) == (1, 2, 4, 8)
    assert cuda_graph_capture_sizes(0) == ()


def test_padding_rounds_up_to_the_next_capture_size_and_leaves_eager_steps() -> None:
    sizes = cuda_graph_capture_sizes(512)
    tokens = [1, 3, 17, 256, 257, 500, 512, 513, 4096]
    assert padded_tokens(tokens, sizes).tolist() == [1, 4, 24, 256, 272, 512, 512, 513, 4096]
    assert [padded_token_count(t, sizes) for t in tokens] == [1, 4, 24, 256, 272, 512, 512, 513, 4096]
    assert padded_tokens([5], ()).tolist() == [5]


@pytest.mark.parametrize(
    ("engine_args", "graph_max", "ar_max"),
    [
        ({}, 512, 8 * MIB),
        ({"max_num_seqs": 512, "max_num_batched_tokens": 16384}, 512, 8 * MIB),  # the H200 profiles
        ({"max_num_seqs": 64}, 128, 8 * MIB),  # min(2 * max_num_seqs, 512)
        ({"max_num_seqs": 512, "max_num_batched_tokens": 256}, 256, 8 * MIB),
        ({"compilation_config": {"max_cudagraph_capture_size": 1024}}, 1024, 8 * MIB),
        ({"enforce_eager": True, "disable_custom_all_reduce": True}, 0, 0),
    ],
)
def test_limits_from_engine_args(engine_args: dict, graph_max: int, ar_max: int) -> None:
    limits = StepRegimeLimits.from_engine_args(engine_args)
    assert (limits.cuda_graph_max_tokens, limits.custom_allreduce_max_bytes) == (graph_max, ar_max)


def test_regime_features_by_hand() -> None:
    rows = [
        [2, 0, 0, 0, 3, 300],  # decode batch 3: a graph of 4 tokens
        [2, 1, 512, attention_pairs(512), 0, 0],  # the largest graph
        [2, 1, 513, attention_pairs(513), 0, 0],  # one token more: eager
        [2, 1, 1023, attention_pairs(1023), 0, 0],  # 1023 · 8 KiB < 8 MiB: custom all-reduce
        [2, 1, 1024, attention_pairs(1024), 0, 0],  # exactly 8 MiB: NCCL
        [1, 1, 1024, attention_pairs(1024), 0, 0],  # no all-reduce at TP 1
    ]
    f = iteration_features(C, rows)
    assert f["graph_tokens"].tolist() == [4, 512, 513, 1023, 1024, 1024]
    assert f["eager_step"].tolist() == [0, 0, 1, 1, 1, 1]
    assert f["allreduce_nccl_bytes"].tolist() == [0, 0, 0, 0, 2 * 32 * 1024 * 4096 * 2, 0]
    # Qwen2.5-14B (hidden 5120) crosses 8 MiB at 820 tokens; a larger custom buffer moves the switch.
    qwen = ArchitectureConstants.from_spec(QWEN)
    assert iteration_features(qwen, [[4, 1, 819, 0, 0, 0], [4, 1, 820, 0, 0, 0]])["allreduce_nccl_bytes"][0] == 0
    assert iteration_features(qwen, [[4, 1, 820, 0, 0, 0]])["allreduce_nccl_bytes"][0] == 2 * 48 * 820 * 5120 * 2
    big = StepRegimeLimits(custom_allreduce_max_bytes=32 * MIB)
    assert iteration_features(qwen, [[4, 1, 820, 0, 0, 0]], big)["allreduce_nccl_bytes"][0] == 0


def test_eager_underlap_columns_by_hand() -> None:
    basis = Basis()
    names = basis.names()
    comp = np.array([[4, 1, 768, 0, 0, 0], [4, 1, 5000, 0, 0, 0], [4, 0, 0, 0, 300, 300]], dtype=float)
    a = design_matrix(C, comp, basis)
    col = {n: a[:, names.index(n)].tolist() for n in names}
    assert col["eager_step"] == [1, 1, 0]
    assert col["eager_underlap_1024"] == [256, 0, 0]
    assert col["eager_underlap_2048"] == [1280, 0, 0]
    assert col["eager_underlap_4096"] == [3328, 0, 0]
    scale = 2 * C.layer_linear_params / 4
    assert col["gemm_roofline_0"][2] == pytest.approx(scale * 304)  # 300 decodes run as a 304-token graph


def _hand_model(**terms: float) -> IterationTimeModel:
    """A fitted TP-2 model whose only non-zero coefficients are ``terms`` (per design-matrix column)."""
    basis = Basis()
    names = basis.names()
    coef = [terms.get(n, 0.0) for n in names]
    params = {
        "roofline_knots_tokens": list(basis.roofline_knots_tokens),
        "eager_knots_tokens": list(basis.eager_knots_tokens),
        "cuda_graph_max_tokens": basis.cuda_graph_max_tokens,
        "custom_allreduce_max_bytes": basis.custom_allreduce_max_bytes,
        "feature_names": names,
        "coef": {"2": coef},
        "ranges": {"2": [[0, 1e9]] * 5},
    }
    return IterationTimeModel.from_params(LLAMA, params)


def test_predict_ms_known_answers() -> None:
    per_token_ms = 0.01
    model = _hand_model(
        const=1.0,
        eager_step=10.0,
        eager_underlap_1024=0.02,
        gemm_roofline_0=per_token_ms / (2 * C.layer_linear_params / 2),
        allreduce_nccl_bytes=1e-9,
    )
    nccl_ms_per_token = 1e-9 * 2 * 32 * 4096 * 2
    cases = {
        (0, 0, 0, 3, 30): 1.0 + 4 * per_token_ms,  # graph: padded to 4 tokens
        (1, 512, 1, 0, 0): 1.0 + 512 * per_token_ms,
        (1, 768, 1, 0, 0): 1.0 + 10.0 + 0.02 * 256 + 768 * per_token_ms,  # eager, 256 tokens below the knot
        (1, 1024, 1, 0, 0): 1.0 + 10.0 + 1024 * per_token_ms + 1024 * nccl_ms_per_token,  # eager + NCCL
        (1, 4000, 1, 0, 0): 1.0 + 10.0 + 4000 * per_token_ms + 4000 * nccl_ms_per_token,
    }
    for (n_pre, tok, pairs, n_dec, ctx), expected in cases.items():
        assert model.predict_ms(2, n_pre, tok, pairs, n_dec, ctx) == pytest.approx(expected), (tok, n_dec)
        assert model.predict([[2, n_pre, tok, pairs, n_dec, ctx]])[0] == pytest.approx(expected)


def test_eager_terms_recover_a_cpu_floor(h) -> None:
    """Ground truth with the H200 shape: steps beyond 512 tokens cost max(22 ms, GPU time). The eager terms
    fit it to about 1 % on held-out configurations; without them (no step counted as eager) the same
    data is fitted far worse."""
    base = h.synthetic_profile(seed=1, noise=0.02)
    rows = [(tp, tokens) for tp in (1, 2, 4) for tokens in (600, 768, 900, 1024, 1280, 1536, 2048, 3072)]
    extra = pd.DataFrame(
        [
            {
                **base.iloc[0].to_dict(),
                "tp": tp,
                "experiment": "prefill",
                "config_id": f"tp{tp}-mid-{tokens}",
                "repeat": 0,
                "num_prefill_seqs": 1,
                "prefill_tokens": tokens,
                "prefill_attention_pairs": int(attention_pairs(tokens)),
                "num_decode_seqs": 0,
                "decode_context_tokens": 0,
            }
            for tp, tokens in rows
        ]
    )
    df = pd.concat([base, extra], ignore_index=True)
    tokens = (df["prefill_tokens"] + df["num_decode_seqs"]).to_numpy(float)
    gpu = h.true_step_ms(
        df["tp"].to_numpy(float),
        tokens,
        df["prefill_attention_pairs"].to_numpy(float),
        df["num_decode_seqs"].to_numpy(float),
        df["decode_context_tokens"].to_numpy(float),
    )
    rng = np.random.default_rng(3)
    df["step_time_ms"] = np.where(tokens > 512, np.maximum(22.0, gpu), gpu) * np.exp(rng.normal(0, 0.02, len(df)))
    with_eager = evaluate_heldout(df, LLAMA).by_tp()
    without = evaluate_heldout(df, LLAMA, limits=StepRegimeLimits(cuda_graph_max_tokens=100_000)).by_tp()
    for tp in (1, 2, 4):
        assert with_eager[tp].mean_mape_pct < 2.5, with_eager[tp]  # ~1 % (2 % noise, averaged over repeats)
        assert without[tp].mean_mape_pct > 3 * with_eager[tp].mean_mape_pct, (without[tp], with_eager[tp])


def test_bad_basis_parameters_are_named(synthetic: pd.DataFrame) -> None:
    x = synthetic[list(COMPOSITION_COLUMNS)].to_numpy(float)
    y = synthetic["step_time_ms"].to_numpy(float)
    with pytest.raises(ValueError, match=r"eager_knots_tokens=\(1024, 1024\) must be distinct"):
        IterationTimeModel(spec=LLAMA, eager_knots_tokens=(1024, 1024)).fit(x, y)
    with pytest.raises(ValueError, match=r"cuda_graph_max_tokens=-1 must be in \[0, 1048576\]"):
        IterationTimeModel(spec=LLAMA, cuda_graph_max_tokens=-1).fit(x, y)
