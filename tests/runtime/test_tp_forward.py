"""A TP-n forward of the reference Llama (vLLM-layout shards + gloo all-reduce on n processes) equals TP 1
(run on the shared 4-rank rank_cluster of conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.kv_migration import KvLayout, allocate_kv_cache
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.ref_model import BatchInput, RefModelConfig, SeqInput, TopK, TpComm, forward
from nitsum_runtime.ref_worker import RankWorker
from nitsum_runtime.sharding import TpLayout, slice_shard
from nitsum_runtime.weights import ResidentWeightStore

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


def _run(spec: ModelSpec, rank: int, tp: int, group: dist.ProcessGroup | None) -> tuple[list[TopK], list[torch.Tensor]]:
    full = ResidentWeightStore.dummy(spec, seed=11, device="cpu", dtype=torch.float32).tensors
    params = slice_shard(spec, full, tp, rank)
    caches = allocate_kv_cache(KvLayout.of(spec, BLOCK, "float32"), tp, num_blocks=6, device="cpu")
    comm = TpComm(group, tp)
    out = forward(spec, RefModelConfig(), params, caches, PREFILL, tp, rank, comm)
    out += forward(spec, RefModelConfig(), params, caches, DECODE, tp, rank, comm)
    return out, caches


def _rank_fn(worker: RankWorker, spec: ModelSpec) -> dict[int, tuple[list[TopK], list[torch.Tensor]]]:
    """On a rank_cluster rank: TP4 on all four ranks, then TP2 on {0, 1} or {2, 3}."""
    r = worker.rank
    pair = (0, 1) if r < 2 else (2, 3)
    return {4: _run(spec, r, 4, worker.groups[(0, 1, 2, 3)]), 2: _run(spec, r % 2, 2, worker.groups[pair])}


@pytest.fixture(scope="module")
def tp1(tiny_llama: ModelSpec) -> tuple[list[TopK], list[torch.Tensor]]:
    return _run(tiny_llama, 0, 1, None)


@pytest.fixture(scope="module")
def tp_results(
    rank_cluster: RankCluster, tiny_llama: ModelSpec
) -> list[dict[int, tuple[list[TopK], list[torch.Tensor]]]]:
    return rank_cluster.call([0, 1, 2, 3], "call", fn=_rank_fn, kwargs={"spec": tiny_llama})


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_forward_equals_tp1(
    tp1: tuple[list[TopK], list[torch.Tensor]],
    tp_results: list[dict[int, tuple[list[TopK], list[torch.Tensor]]]],
    tiny_llama: ModelSpec,
    tp: int,
) -> None:
    ref_rows, ref_caches = tp1
    results = [r[tp] for r in tp_results]
    assert len(ref_rows) == 7 + 1 + 2  # 7 prompt positions, 1 last position, 2 decode rows
    for rows, _ in results:
        assert rows == results[0][0]  # every rank returns the same rows
        for got, ref in zip(rows, ref_rows, strict=True):
            assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4)
            assert got.token_ids[0] == ref.token_ids[0]
    lay = TpLayout.of(tiny_llama, tp)
    for rank, (_, caches) in enumerate(results):
        heads = lay.kv_heads_of(rank % tp)
        for got, ref in zip(caches, ref_caches, strict=True):
            assert torch.allclose(got, ref[:, :, heads.start : heads.stop], atol=1e-5)
            assert got.abs().sum() > 0
