"""A TP-n forward of the reference Llama (vLLM-layout shards + gloo all-reduce on n processes) equals TP 1."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from nitsum_opt.models.spec import ModelSpec

from nitsum_runtime.kv_migration import KvLayout, allocate_kv_cache
from nitsum_runtime.procs import run_ranks
from nitsum_runtime.ref_model import BatchInput, RefModelConfig, SeqInput, TopK, TpComm, forward
from nitsum_runtime.sharding import TpLayout, slice_shard
from nitsum_runtime.weights import ResidentWeightStore

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
BLOCK = 4
PREFILL = BatchInput(
    token_ids=(5, 17, 99, 3, 42, 8, 61, 7, 0, 55, 23, 11),
    positions=(0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4),
    seqs=(
        SeqInput(query_start=0, query_len=7, context_len=7, block_ids=(2, 0), logits_from=0),
        SeqInput(query_start=7, query_len=5, context_len=5, block_ids=(1, 3), logits_from=4),
    ),
)
DECODE = BatchInput(
    token_ids=(12, 70),
    positions=(7, 5),
    seqs=(
        SeqInput(query_start=0, query_len=1, context_len=8, block_ids=(2, 0), logits_from=0),
        SeqInput(query_start=1, query_len=1, context_len=6, block_ids=(1, 3), logits_from=0),
    ),
)


def _run(rank: int, tp: int, group: dist.ProcessGroup | None) -> tuple[list[TopK], list[torch.Tensor]]:
    full = ResidentWeightStore.dummy(TINY, seed=11, device="cpu", dtype=torch.float32).tensors
    params = slice_shard(TINY, full, tp, rank)
    caches = allocate_kv_cache(KvLayout.of(TINY, BLOCK, "float32"), tp, num_blocks=6, device="cpu")
    comm = TpComm(group, tp)
    out = forward(TINY, RefModelConfig(), params, caches, PREFILL, tp, rank, comm)
    out += forward(TINY, RefModelConfig(), params, caches, DECODE, tp, rank, comm)
    return out, caches


def _rank_fn(rank: int, world: int, device: torch.device) -> tuple[list[TopK], list[torch.Tensor]]:
    return _run(rank, world, dist.group.WORLD)


@pytest.fixture(scope="module")
def tp1() -> tuple[list[TopK], list[torch.Tensor]]:
    return _run(0, 1, None)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_forward_equals_tp1(tp1: tuple[list[TopK], list[torch.Tensor]], tp: int) -> None:
    ref_rows, ref_caches = tp1
    results = run_ranks(_rank_fn, tp, timeout_s=120)
    assert len(ref_rows) == 7 + 1 + 2  # 7 prompt positions, 1 last position, 2 decode rows
    for rows, _ in results:
        assert rows == results[0][0]  # every rank returns the same rows
        for got, ref in zip(rows, ref_rows, strict=True):
            assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4)
            assert got.token_ids[0] == ref.token_ids[0]
    lay = TpLayout.of(TINY, tp)
    for rank, (_, caches) in enumerate(results):
        heads = lay.kv_heads_of(rank)
        for got, ref in zip(caches, ref_caches, strict=True):
            assert torch.allclose(got, ref[:, :, heads.start : heads.stop], atol=1e-5)
            assert got.abs().sum() > 0
