"""The Nitsum KV connector's logic on CPU with real tensors: tickets, matched tokens, export -> head re-split ->
stage -> scheduler bookkeeping -> write into vLLM-layout paged caches, and the connector shell's contract."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nitsum_runtime import kv_import
from nitsum_runtime.kv_arena import WORKER_ARENA, KvArena
from nitsum_runtime.kv_copy import copy_heads
from nitsum_runtime.kv_import import (
    STAGED,
    ImportScheduler,
    ImportWorker,
    gather_head_major,
    layer_order,
    matched_tokens,
    nhd_views,
    slots_of,
)
from nitsum_runtime.kv_migration import kv_transfer_plan
from nitsum_runtime.kv_mover import ArenaCache, move_staged
from nitsum_runtime.kv_ticket import CONNECTOR_CONFIG, ticket_of, ticket_params

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 3, 4, 8, 16


def vllm_caches(tp: int, num_blocks: int, fill: bool, seed: int = 0) -> list[torch.Tensor]:
    """Per-layer caches as vLLM 0.26's FlashAttention backend hands them out: logical
    ``[blocks, heads, block_size, 2*head_dim]`` views of NHD memory."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK, max(1, KV_HEADS // tp), 2 * HEAD_DIM)
    out = []
    for _ in range(LAYERS):
        t = torch.randn(shape, generator=g) if fill else torch.zeros(shape)
        out.append(t.transpose(1, 2))
    return out


def full_kv(rank_caches: list[list[torch.Tensor]], block_ids: list[int], n: int) -> torch.Tensor:
    """``[layers, tokens, all heads, width]`` of a request across the ranks of a TP group (no replication)."""
    slots = torch.tensor(slots_of(block_ids, BLOCK, 0, n))
    parts = [gather_head_major(nhd_views(c), slots) for c in rank_caches]  # [heads_r, layers, tokens, width]
    return torch.cat(parts, dim=0).permute(1, 2, 0, 3)


def test_ticket_round_trip_and_errors() -> None:
    params = ticket_params("r1@tp1#5", 37)
    assert ticket_of(params) == kv_import.ImportTicket("r1@tp1#5", 37)
    assert ticket_of(None) is None and ticket_of({"other": 1}) is None
    with pytest.raises(ValueError, match="want"):
        ticket_of({"nitsum_kv_import": {"key": "x"}})
    with pytest.raises(ValueError, match=">= 1 staged token"):
        ticket_params("k", 0)
    assert CONNECTOR_CONFIG["kv_connector_module_path"] == "nitsum_runtime.kv_connector"


@pytest.mark.parametrize(
    ("staged", "total", "computed", "want"),
    [(36, 37, 0, 36), (37, 37, 0, 36), (20, 37, 0, 20), (36, 37, 16, 20), (10, 37, 16, 0), (5, 1, 0, 0)],
)
def test_matched_tokens_never_the_last_token(staged: int, total: int, computed: int, want: int) -> None:
    assert matched_tokens(staged, total, computed) == want


def test_layer_order_is_numeric() -> None:
    names = [f"model.layers.{i}.self_attn.attn" for i in (10, 2, 0, 1)]
    assert layer_order(names) == [f"model.layers.{i}.self_attn.attn" for i in (0, 1, 2, 10)]


def test_nhd_views_refuse_other_layouts() -> None:
    with pytest.raises(ValueError, match="not NHD"):
        nhd_views([torch.zeros(4, 2, BLOCK, 16)])  # HND memory


class Ranks:
    """The answers of one TP group's workers to ``nitsum_kv_export`` / ``nitsum_kv_stage``, as the worker
    extension builds them: a range of each worker's :class:`KvArena` when ``arena_bytes`` holds it, else an own
    buffer (``{"ipc": ...}``; on CPU the test's opener hands back the tensor itself, standing in for CUDA IPC)."""

    def __init__(self, gpus: list[int], arena_bytes: int) -> None:
        self.gpus = gpus
        self.arenas = [KvArena(arena_bytes, "cpu") if arena_bytes else None for _ in gpus]

    def answer(self, key: str, buffers: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
        """Place each rank's ``buffers[r]`` (copy into the arena when it fits); returns the tensors the worker
        now holds and its answers."""
        held, answers = [], []
        for r, (buf, arena) in enumerate(zip(buffers, self.arenas, strict=True)):
            got = arena.take(key, tuple(buf.shape), buf.dtype) if arena is not None else None
            if got is None:
                tensor, ref = buf, {"ipc": buf}
            else:
                tensor, ref = got
                tensor.copy_(buf)
            held.append(tensor)
            described = arena.describe() if arena is not None else None
            answers.append({"rank": r, "uuid": f"u{id(self)}-{r}", "arena": described, "refs": {key: ref}})
        return held, answers

    def opener(self, ref: dict, _uuid: str) -> torch.Tensor:
        if "ipc" in ref:
            return ref["ipc"]
        (arena,) = [a for a in self.arenas if a is not None and a.arena_id == ref["id"]]
        return arena.buffer


def _migrate(src_tp: int, dst_tp: int, computed_on_target: int, seed: int, arena_bytes: int = 0) -> None:
    """Source TP group -> export -> plan copies -> target stages -> scheduler -> worker load, then check."""
    STAGED.clear()
    rng = random.Random(seed)
    src_gpus, dst_gpus = list(range(src_tp)), list(range(dst_tp))
    src = [vllm_caches(src_tp, 12, fill=True, seed=seed * 10 + r) for r in range(src_tp)]
    dst = [vllm_caches(dst_tp, 12, fill=False) for _ in range(dst_tp)]
    prompt_and_output = 37  # tokens of the request on the target; the source computed all but the last
    n = prompt_and_output - 1
    src_blocks = rng.sample(range(12), 3)
    key = "req-7@src#1"
    # source workers: head-major exports (nitsum_kv_export)
    slots = torch.tensor(slots_of(src_blocks, BLOCK, 0, n))
    src_ranks, dst_ranks = Ranks(src_gpus, arena_bytes), Ranks(dst_gpus, arena_bytes)
    _, exports = src_ranks.answer(key, [gather_head_major(nhd_views(src[r]), slots) for r in src_gpus])
    # target workers: stages (nitsum_kv_stage), registered where their connector reads them
    heads = max(1, KV_HEADS // dst_tp)
    stages, answers = dst_ranks.answer(
        key, [torch.full((heads, LAYERS, n, 2 * HEAD_DIM), float("nan")) for _ in dst_gpus]
    )

    def opener(ref: dict, uuid: str) -> torch.Tensor:
        return (src_ranks if uuid.startswith(f"u{id(src_ranks)}-") else dst_ranks).opener(ref, uuid)

    cache = ArenaCache()
    stats = move_staged(KV_HEADS, [key], exports, answers, src_gpus, dst_gpus, open_tensor=opener, arenas=cache)
    per_rank = n * LAYERS * 2 * HEAD_DIM * 4
    assert stats.bytes_remote + stats.bytes_local == per_rank * heads * dst_tp
    fits = arena_bytes >= per_rank * KV_HEADS
    assert (stats.arena_refs, stats.own_refs) == ((src_tp + dst_tp, 0) if fits else (0, src_tp + dst_tp))
    assert len(cache.opened) == (src_tp + dst_tp if fits else 0)
    if src_tp == 1 and dst_tp > 1:  # every target rank's heads come from GPU 0: the busiest remote pair is one
        assert stats.link_bytes == per_rank * heads
    # scheduler side (engine core): the request arrives with its ticket
    sched = ImportScheduler(BLOCK)
    request = SimpleNamespace(
        request_id="req-7-int", num_tokens=prompt_and_output, kv_transfer_params=ticket_params(key, n)
    )
    hits, is_async = sched.get_num_new_matched_tokens(request, computed_on_target)
    assert (hits, is_async) == (n - computed_on_target, False)
    dst_blocks = rng.sample(range(12), 3)  # vLLM allocates blocks for all 37 tokens
    sched.update_state_after_alloc(request, dst_blocks, hits)
    (job,) = sched.build_jobs()
    assert sched.build_jobs() == () and job.first_token == computed_on_target
    # worker side, every target rank: stage by key, caches by layer name (dict order scrambled)
    for r in dst_gpus:
        STAGED[key] = stages[r]
        WORKER_ARENA[:] = [dst_ranks.arenas[r]] if dst_ranks.arenas[r] is not None else []
        worker = ImportWorker(BLOCK)
        names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        worker.register_kv_caches({nm: dst[r][int(nm.split(".")[2])] for nm in reversed(names)})
        worker.load([job])
        assert worker.take_failed_blocks() == set() and key not in STAGED
        assert key not in (dst_ranks.arenas[r].ranges if dst_ranks.arenas[r] else ())  # the range is free again
    WORKER_ARENA.clear()
    got = full_kv(dst, dst_blocks, n) if dst_tp <= KV_HEADS else None
    want = full_kv(src, src_blocks, n) if src_tp <= KV_HEADS else None
    if got is not None and want is not None:
        assert torch.equal(got[:, computed_on_target:], want[:, computed_on_target:])
        assert not got[:, :computed_on_target].any()  # tokens computed locally are not written
    # nothing outside the request's slots was touched
    used = set(slots_of(dst_blocks, BLOCK, computed_on_target, n - computed_on_target))
    for r in dst_gpus:
        for cache in nhd_views(dst[r]):
            flat = cache.reshape(-1, cache.shape[2], cache.shape[3])
            others = [s for s in range(flat.shape[0]) if s not in used]
            assert not flat[others].any()


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 2), (2, 4), (4, 1), (2, 2), (1, 8), (8, 2)])
@pytest.mark.parametrize("arena_bytes", [0, 1024, 2**20], ids=["own-buffers", "arena-too-small", "arena"])
def test_migrated_kv_lands_in_the_target_blocks(src_tp: int, dst_tp: int, arena_bytes: int) -> None:
    _migrate(src_tp, dst_tp, 0, seed=src_tp * 10 + dst_tp, arena_bytes=arena_bytes)


def test_locally_computed_prefix_is_not_overwritten() -> None:
    _migrate(2, 1, 16, seed=3)


def test_replicated_heads_copy_the_right_shard() -> None:
    """TP8 over 4 KV heads: each target rank holds one head, replicated; every rank's stage equals it."""
    src = [vllm_caches(1, 4, fill=True, seed=9)]
    slots = torch.tensor(slots_of([2, 0], BLOCK, 0, 20))
    export = gather_head_major(nhd_views(src[0]), slots)
    plan = kv_transfer_plan(KV_HEADS, [0], list(range(8)))
    stages = {g: torch.zeros(1, LAYERS, 20, 2 * HEAD_DIM) for g in range(8)}
    remote, local = copy_heads(plan, {0: export}, stages)
    for g in range(8):
        assert torch.equal(stages[g][0], export[g // 2])
    assert local == stages[0].numel() * 4 and remote == 7 * local


def test_missing_stage_reports_failed_blocks() -> None:
    STAGED.clear()
    worker = ImportWorker(BLOCK)
    worker.register_kv_caches({"model.layers.0.self_attn.attn": vllm_caches(1, 4, fill=False)[0]})
    worker.load([kv_import.ImportJob("r", "absent", (3, 1), 0, 20)])
    assert worker.take_failed_blocks() == {1, 3} and worker.take_failed_blocks() == set()


def test_scheduler_ignores_requests_without_ticket_and_forgets_finished() -> None:
    sched = ImportScheduler(BLOCK)
    plain = SimpleNamespace(request_id="a", num_tokens=10, kv_transfer_params=None)
    assert sched.get_num_new_matched_tokens(plain, 0) == (0, False)
    sched.update_state_after_alloc(plain, [1], 0)
    announced = SimpleNamespace(request_id="b", num_tokens=10, kv_transfer_params=ticket_params("k", 9))
    assert sched.get_num_new_matched_tokens(announced, 0) == (9, False)
    sched.request_finished("b")  # aborted before allocation
    sched.update_state_after_alloc(announced, [1], 9)
    assert sched.build_jobs() == ()
    big = SimpleNamespace(request_id="c", num_tokens=41, kv_transfer_params=ticket_params("k", 40))
    assert sched.get_num_new_matched_tokens(big, 0) == (40, False)
    with pytest.raises(RuntimeError, match="only 2 blocks"):
        sched.update_state_after_alloc(big, [1, 2], 40)  # 40 tokens need 3 blocks of 16


# vLLM 0.26 KVConnectorBase_V1 methods the connector overrides, with their parameters (v1/base.py).
CONTRACT = {
    "__init__": ["self", "vllm_config", "role", "kv_cache_config"],
    "register_kv_caches": ["self", "kv_caches"],
    "start_load_kv": ["self", "forward_context", "kwargs"],
    "wait_for_layer_load": ["self", "layer_name"],
    "save_kv_layer": ["self", "layer_name", "kv_layer", "attn_metadata", "kwargs"],
    "wait_for_save": ["self"],
    "get_block_ids_with_load_errors": ["self"],
    "get_num_new_matched_tokens": ["self", "request", "num_computed_tokens"],
    "update_state_after_alloc": ["self", "request", "blocks", "num_external_tokens"],
    "build_connector_meta": ["self", "scheduler_output"],
    "request_finished": ["self", "request", "block_ids"],
    "request_finished_all_groups": ["self", "request", "block_ids"],
}


def test_connector_shell_matches_the_vllm_contract() -> None:
    """Without vLLM: the class's methods (parsed, not imported) have vLLM 0.26's names and parameters."""
    path = Path(kv_import.__file__).with_name("kv_connector.py")
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NitsumKvConnector"]
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    for name, params in CONTRACT.items():
        a = methods[name].args
        got = [x.arg for x in a.args] + ([a.kwarg.arg] if a.kwarg else [])
        assert got == params, name
    assert {b.id for b in cls.bases if isinstance(b, ast.Name)} == {"KVConnectorBase_V1", "SupportsHMA"}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (GPU machines only)")
def test_connector_against_vllm_base_class() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from nitsum_runtime.kv_connector import NitsumKvConnector

    abstract = KVConnectorBase_V1.__abstractmethods__
    assert not (abstract - set(vars(NitsumKvConnector)))
    for name in abstract:
        base = list(inspect.signature(getattr(KVConnectorBase_V1, name)).parameters)
        assert list(inspect.signature(getattr(NitsumKvConnector, name)).parameters) == base, name


@pytest.mark.parametrize("bounce_bytes", [1, 4 * 2 * HEAD_DIM * 4, 7 * 4 + 4, 2**20])
def test_bounced_copies_equal_direct_copies(bounce_bytes: int) -> None:
    """Cross-GPU transfers through a bounce buffer (chunked, buffer reused) copy exactly what direct copies do;
    same-GPU transfers never bounce."""
    src = [vllm_caches(1, 4, fill=True, seed=11)]
    slots = torch.tensor(slots_of([3, 1, 0], BLOCK, 0, 37))
    export = gather_head_major(nhd_views(src[0]), slots)
    plan = kv_transfer_plan(KV_HEADS, [0], [0, 1, 2, 3])
    direct = {g: torch.zeros(KV_HEADS // 4, LAYERS, 37, 2 * HEAD_DIM) for g in range(4)}
    bounced = {g: torch.zeros_like(direct[g]) for g in range(4)}
    assert copy_heads(plan, {0: export}, direct) == copy_heads(plan, {0: export}, bounced, bounce_bytes)
    for g in range(4):
        heads = KV_HEADS // 4
        assert torch.equal(bounced[g], direct[g]) and torch.equal(bounced[g], export[g * heads : (g + 1) * heads])


def test_negative_bounce_is_refused() -> None:
    with pytest.raises(ValueError, match="bounce_bytes=-1"):
        copy_heads([], {}, {}, bounce_bytes=-1)
