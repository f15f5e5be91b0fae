"""KV migration: the head re-split plan, gather/scatter, and the double-buffered transfer over gloo that
lands, bit for bit, the KV each rank of the target TP degree must hold."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from nitsum_runtime.kv_migration import (
    KvLayout,
    allocate_kv_cache,
    chunk_schedule,
    gather_kv,
    kv_transfer_plan,
    migrate_kv,
    scatter_kv,
    token_slots,
)
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.ref_worker import RankWorker


def _heads_of(num_kv: int, tp: int, rank: int) -> range:
    local = max(1, num_kv // tp)
    s = rank // max(1, tp // num_kv)
    return range(s * local, (s + 1) * local)


@given(
    num_kv=st.sampled_from([1, 2, 4, 8]),
    src_tp=st.sampled_from([1, 2, 4, 8]),
    dst_tp=st.sampled_from([1, 2, 4, 8]),
    src_base=st.sampled_from([0, 8]),
    dst_base=st.sampled_from([0, 8]),
)
def test_plan_delivers_every_needed_head_exactly_once(
    num_kv: int, src_tp: int, dst_tp: int, src_base: int, dst_base: int
) -> None:
    src = list(range(src_base, src_base + src_tp))
    dst = list(range(dst_base, dst_base + dst_tp))
    plan = kv_transfer_plan(num_kv, src, dst)
    for j, d in enumerate(dst):
        got: list[int] = []
        for t in (t for t in plan if t.dst == d):
            i = src.index(t.src)
            src_heads = _heads_of(num_kv, src_tp, i)
            got += [src_heads[t.src_head + k] for k in range(t.num_heads)]
            assert t.dst_head == got[-t.num_heads] - _heads_of(num_kv, dst_tp, j).start
        assert got == list(_heads_of(num_kv, dst_tp, j))
    for t in plan:  # a head the target's own GPU holds in the source engine is copied locally
        if t.dst in src and t.src != t.dst:
            own = set(_heads_of(num_kv, src_tp, src.index(t.dst)))
            moved = _heads_of(num_kv, src_tp, src.index(t.src))[t.src_head : t.src_head + t.num_heads]
            assert not own & set(moved)


def test_plan_prefers_local_copies_and_spreads_replicas() -> None:
    plan = kv_transfer_plan(8, [0], [0, 1])  # TP1 on GPU 0 -> TP2 on GPUs 0, 1
    assert [(t.src, t.dst, t.src_head, t.num_heads) for t in plan] == [(0, 0, 0, 4), (0, 1, 4, 4)]
    plan = kv_transfer_plan(2, [0, 1, 2, 3], [0, 1, 2, 3])  # same TP4 with replicated heads: all local
    assert all(t.src == t.dst for t in plan)
    plan = kv_transfer_plan(2, [4, 5, 6, 7], [0, 1, 2, 3])  # replicas spread over both sources of a head
    assert [t.src for t in plan] == [4, 5, 6, 7]


def test_chunks_cover_layers_and_tokens_once() -> None:
    for num_layers, tokens, per, cap in [(4, 10, 8, 1000), (4, 10, 8, 100), (3, 7, 64, 200), (2, 1, 4, 1)]:
        cells = [
            (layer, tok)
            for c in chunk_schedule(num_layers, tokens, per, cap)
            for layer in range(c.layer_start, c.layer_end)
            for tok in range(c.token_start, c.token_end)
        ]
        assert sorted(cells) == list(itertools.product(range(num_layers), range(tokens)))


def test_gather_scatter_round_trip() -> None:
    lay = KvLayout(num_layers=3, num_kv_heads=4, head_dim=4, block_size=4, dtype="float32")
    src = allocate_kv_cache(lay, 1, num_blocks=5, device="cpu")
    for c in src:
        c.copy_(torch.randn(c.shape))
    slots = torch.tensor(token_slots([3, 0, 4], 10, 4))
    data = gather_kv(src, slots, head_start=1, num_heads=2)
    assert data.shape == (3, 10, 2, 8)
    dst = allocate_kv_cache(lay, 2, num_blocks=5, device="cpu")
    dslots = torch.tensor(token_slots([1, 2, 0], 10, 4))
    scatter_kv(dst, dslots, head_start=0, data=data)
    assert torch.equal(gather_kv(dst, dslots, 0, 2), data)
    assert torch.equal(dst[0].view(-1, 2, 8)[dslots], src[0].view(-1, 4, 8)[slots][:, 1:3])


LAYOUT = KvLayout(num_layers=3, num_kv_heads=4, head_dim=4, block_size=4, dtype="float32")
#: (src ranks, dst ranks, KV heads): TP up, down, sideways, to other GPUs, with and without replication.
SCENARIOS = [
    ((0,), (0, 1), 4),
    ((0, 1), (0, 1, 2, 3), 4),
    ((0, 1, 2, 3), (0,), 4),
    ((0,), (3,), 4),
    ((2, 3), (0, 1), 4),
    ((0, 1, 2, 3), (2, 3), 4),
    ((0,), (0, 1, 2, 3), 2),
    ((0, 1, 2, 3), (1,), 2),
    ((0, 1), (0, 1, 2, 3), 1),
]
#: Two requests: (tokens, source blocks, target blocks).
REQUESTS = [(11, (4, 1, 6), (0, 5, 2)), (6, (0, 3), (6, 3))]


def _full_kv(num_kv: int) -> torch.Tensor:
    """What an engine holds for the two requests: [layers, tokens, all KV heads, 2*head_dim]."""
    tokens = sum(r[0] for r in REQUESTS)
    return torch.arange(LAYOUT.num_layers * tokens * num_kv * 8, dtype=torch.float32).view(
        LAYOUT.num_layers, tokens, num_kv, 8
    )


def _migration_rank(worker: RankWorker, chunk_sizes: list[int]) -> list[bool]:
    """On a rank_cluster rank: every scenario at every chunk size; True for each check that holds."""
    rank, device = worker.rank, worker.device
    ok = []
    for chunk_bytes, (src_ranks, dst_ranks, num_kv) in itertools.product(chunk_sizes, SCENARIOS):
        lay = LAYOUT.model_copy(update={"num_kv_heads": num_kv})
        full = _full_kv(num_kv)
        src_slots = torch.tensor([s for n, b, _ in REQUESTS for s in token_slots(b, n, 4)])
        dst_slots = torch.tensor([s for n, _, b in REQUESTS for s in token_slots(b, n, 4)])
        src = dst = None
        if rank in src_ranks:
            src = allocate_kv_cache(lay, len(src_ranks), 8, device)
            heads = _heads_of(num_kv, len(src_ranks), src_ranks.index(rank))
            scatter_kv(src, src_slots, 0, full[:, :, heads.start : heads.stop])
        if rank in dst_ranks:
            dst = allocate_kv_cache(lay, len(dst_ranks), 8, device)
        plan = kv_transfer_plan(num_kv, src_ranks, dst_ranks)
        stats = migrate_kv(rank, plan, src, dst, src_slots, dst_slots, chunk_bytes=chunk_bytes)
        if dst is not None:
            heads = _heads_of(num_kv, len(dst_ranks), dst_ranks.index(rank))
            got = gather_kv(dst, dst_slots, 0, len(heads))
            ok.append(torch.equal(got, full[:, :, heads.start : heads.stop]))
            ok.append(stats.bytes_received + stats.bytes_local == full[:, :, : len(heads)].numel() * 4)
            ok.append(stats.chunks > 4 if chunk_bytes < 1000 else stats.chunks == 1)
    return ok


def test_migration_over_gloo_lands_exact_target_kv(rank_cluster: RankCluster) -> None:
    chunk_sizes = [96, 1 << 20]  # many chunks (tokens split, both buffers reused) / one chunk
    results = rank_cluster.call([0, 1, 2, 3], "call", fn=_migration_rank, kwargs={"chunk_sizes": chunk_sizes})
    checks = [c for r in results for c in r]
    assert len(checks) == 3 * len(chunk_sizes) * sum(len(d) for _, d, _ in SCENARIOS)
    assert all(checks)
