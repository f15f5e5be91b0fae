"""Shard slicing in vLLM's layouts: every shard reassembles into the full weight, padding and replication
follow vLLM 0.26's rules, and the in-place refill equals the sliced shard."""

from __future__ import annotations

import pytest
import torch

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.sharding import (
    TpLayout,
    full_weight_shapes,
    pad_vocab,
    plan_mismatches,
    shard_plan,
    slice_shard,
)
from nitsum_runtime.weights import ResidentWeightStore, fill_shard

TINY = ModelSpec(
    name="tiny",
    num_layers=2,
    hidden_size=32,
    num_attention_heads=8,
    num_kv_heads=2,
    intermediate_size=48,
    vocab_size=100,
    max_model_len=256,
)


@pytest.fixture(scope="module")
def full() -> dict[str, torch.Tensor]:
    return ResidentWeightStore.dummy(TINY, seed=3, device="cpu", dtype=torch.float32).tensors


def test_vocab_padding_follows_vllm() -> None:
    assert pad_vocab(100) == 128
    assert pad_vocab(128256) == 128256  # Llama 3: already a multiple of 64
    assert pad_vocab(32001) == 32064
    lay = TpLayout.of(TINY, 4)
    assert (lay.vocab_padded, lay.vocab_local) == (128, 32)
    assert [lay.vocab_rows(r, 100) for r in range(4)] == [(0, 32), (32, 64), (64, 96), (96, 100)]


def test_kv_replication_when_tp_exceeds_kv_heads() -> None:
    lay = TpLayout.of(TINY, 8)
    assert (lay.kv_heads_local, lay.kv_replicas) == (1, 4)
    assert [lay.kv_shard(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shards_reassemble_into_full_weights(full: dict[str, torch.Tensor], tp: int) -> None:
    shards = [slice_shard(TINY, full, tp, r) for r in range(tp)]
    d, h = TINY.head_dim, TINY.hidden_size
    ql = TINY.num_attention_heads // tp * d
    kl = max(1, TINY.num_kv_heads // tp) * d
    rep = max(1, tp // TINY.num_kv_heads)
    il = TINY.intermediate_size // tp
    for i in range(TINY.num_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        qkv = [s[f"{a}.qkv_proj.weight"] for s in shards]
        assert all(t.shape == (ql + 2 * kl, h) for t in qkv)
        assert torch.equal(torch.cat([t[:ql] for t in qkv]), full[f"{a}.q_proj.weight"])
        # one copy per KV shard; replicas hold identical rows
        assert torch.equal(torch.cat([t[ql : ql + kl] for t in qkv[::rep]]), full[f"{a}.k_proj.weight"])
        assert torch.equal(torch.cat([t[ql + kl :] for t in qkv[::rep]]), full[f"{a}.v_proj.weight"])
        for r in range(tp):
            assert torch.equal(qkv[r][ql:], qkv[r - r % rep][ql:])
        assert torch.equal(torch.cat([s[f"{a}.o_proj.weight"] for s in shards], 1), full[f"{a}.o_proj.weight"])
        gu = [s[f"{m}.gate_up_proj.weight"] for s in shards]
        assert torch.equal(torch.cat([t[:il] for t in gu]), full[f"{m}.gate_proj.weight"])
        assert torch.equal(torch.cat([t[il:] for t in gu]), full[f"{m}.up_proj.weight"])
        assert torch.equal(torch.cat([s[f"{m}.down_proj.weight"] for s in shards], 1), full[f"{m}.down_proj.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{i}.{norm}.weight"
            assert all(torch.equal(s[name], full[name]) for s in shards)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        cat = torch.cat([s[name] for s in shards])
        assert cat.shape == (pad_vocab(TINY.vocab_size), h)
        assert torch.equal(cat[: TINY.vocab_size], full[name])
        assert not cat[TINY.vocab_size :].any()  # padding rows are zero


def test_fill_shard_in_place_equals_slice(full: dict[str, torch.Tensor]) -> None:
    store = ResidentWeightStore(TINY, full)
    plan = shard_plan(TINY, 4, 3)
    params = {n: torch.full(s, float("nan")) for n, s in plan.shapes.items()}
    report = fill_shard(store, params, tp=4, rank=3)
    expected = slice_shard(TINY, full, 4, 3)
    assert all(torch.equal(params[n], expected[n]) for n in expected)
    assert report.params == len(expected)
    assert report.bytes_copied == sum(t.numel() * 4 for n, t in expected.items()) - 2 * (128 - 100) * 32 * 4


def test_fill_shard_names_the_bad_parameter(full: dict[str, torch.Tensor]) -> None:
    store = ResidentWeightStore(TINY, full)
    params = {n: torch.empty(s) for n, s in shard_plan(TINY, 2, 0).shapes.items()}
    params["model.layers.1.mlp.down_proj.weight"] = torch.empty(32, 48)
    with pytest.raises(ValueError, match=r"down_proj.*shape \(32, 48\).*\(32, 24\)"):
        fill_shard(store, params, tp=2, rank=0)
    params["model.layers.1.mlp.down_proj.weight"] = torch.empty(32, 24)
    del params["model.norm.weight"]
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):
        fill_shard(store, params, tp=2, rank=0)


def test_bad_tp_is_rejected_with_the_dimension() -> None:
    with pytest.raises(ValueError, match="num_attention_heads=8"):
        TpLayout.of(TINY, 3)
    with pytest.raises(ValueError, match="rank=2 is outside"):
        shard_plan(TINY, 2, 2)


def test_tied_embeddings_have_no_lm_head() -> None:
    tied = TINY.model_copy(update={"tie_word_embeddings": True})
    assert "lm_head.weight" not in full_weight_shapes(tied)
    assert "lm_head.weight" not in shard_plan(tied, 2, 1).shapes


def test_plan_mismatches_names_every_parameter_that_differs(full: dict[str, torch.Tensor]) -> None:
    plan = shard_plan(TINY, 4, 3)  # the last rank holds vocabulary padding rows
    shard = slice_shard(TINY, full, 4, 3)
    assert plan_mismatches(plan, full, shard) == []
    shard["model.layers.1.mlp.down_proj.weight"][0, 5] += 2**-20  # one element, one ulp-sized change
    shard["lm_head.weight"][-1, 0] = 1.0  # a padding row that must stay zero
    assert plan_mismatches(plan, full, shard) == ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"]
