"""The persistent KV exchange arenas (:mod:`nitsum_runtime.kv_arena`) and the controller's cache of opened ones."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nitsum_runtime.kv_arena import ALIGN_BYTES, KvArena, RangeAllocator, view_range
from nitsum_runtime.kv_mover import ArenaCache, resolve_refs


def test_first_fit_reuses_freed_gaps() -> None:
    a = RangeAllocator(4096, align=512)
    assert a.alloc("x", 100) == 0  # rounded up to 512
    assert a.alloc("y", 1024) == 512
    assert a.alloc("z", 512) == 1536
    assert a.free("y") and not a.free("y")
    assert a.alloc("w", 600) == 512  # first gap that holds 1024 rounded bytes
    assert a.alloc("v", 2048) == 2048
    assert a.alloc("too-big", 1) is None  # 0..4096 is full now
    assert a.used_bytes == 4096
    assert [k for _, _, k in a.ranges()] == ["x", "w", "z", "v"]


def test_allocator_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        RangeAllocator(-1)
    a = RangeAllocator(1024)
    a.alloc("k", 8)
    with pytest.raises(KeyError, match="already holds"):
        a.alloc("k", 8)
    with pytest.raises(ValueError, match="nbytes=-3"):
        a.alloc("j", -3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.integers(0, 3000)), max_size=60))
def test_ranges_never_overlap_and_stay_in_bounds(ops: list[tuple[bool, int, int]]) -> None:
    """Any sequence of allocs and frees: live ranges are aligned, disjoint, inside the arena, and an alloc fails
    only when no gap between live ranges (or at the end) holds it."""
    a = RangeAllocator(8192, align=ALIGN_BYTES)
    for is_alloc, k, n in ops:
        key = f"k{k}"
        if is_alloc and key not in a:
            got = a.alloc(key, n)
            size = max(ALIGN_BYTES, -(-n // ALIGN_BYTES) * ALIGN_BYTES)
            if got is None:
                bounds = [0, *(s + z for s, z, _ in a.ranges())]
                ends = [s for s, _, _ in a.ranges()] + [a.capacity_bytes]
                assert all(e - b < size for b, e in zip(bounds, ends, strict=True))
        elif not is_alloc:
            a.free(key)
        live = a.ranges()
        assert all(s % ALIGN_BYTES == 0 and s + z <= a.capacity_bytes for s, z, _ in live)
        assert all(s1 + z1 <= s2 for (s1, z1, _), (s2, _, _) in itertools.pairwise(live))


def test_arena_views_share_its_buffer() -> None:
    arena = KvArena(4096, "cpu")
    t, ref = arena.take("a", (2, 3, 4), torch.bfloat16)
    t.fill_(1.5)
    assert ref == {"arena": arena.arena_id, "offset": 0, "shape": [2, 3, 4], "dtype": "bfloat16"}
    assert torch.equal(view_range(arena.buffer, ref), t)
    assert arena.take("b", (4096,), torch.float32) is None  # 16 KiB does not fit: the caller allocates its own
    u, ref_u = arena.take("c", (10,), torch.float32)
    assert ref_u["offset"] == ALIGN_BYTES and u.data_ptr() == arena.buffer.data_ptr() + ALIGN_BYTES
    assert arena.give_back("a") and not arena.give_back("a")
    assert arena.describe() == {"id": arena.arena_id, "bytes": 4096, "handle": None}  # no IPC handle on CPU


def test_view_range_refuses_refs_outside_the_arena_and_unknown_dtypes() -> None:
    buf = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside its arena"):
        view_range(buf, {"offset": 512, "shape": [200], "dtype": "float32"})
    with pytest.raises(ValueError, match="unknown dtype 'bfloat17'"):
        view_range(buf, {"offset": 0, "shape": [1], "dtype": "bfloat17"})


def test_controller_opens_each_arena_once() -> None:
    arena = KvArena(2048, "cpu")
    opened: list[str] = []

    def opener(desc: dict, _uuid: str) -> torch.Tensor:
        opened.append(desc.get("id", "own"))
        return arena.buffer if "id" in desc else desc["ipc"]

    cache = ArenaCache()
    own = torch.arange(4.0)
    for step in range(3):
        _, ref = arena.take(f"k{step}", (4,), torch.float32)
        answers = [{"rank": 0, "uuid": "g", "arena": arena.describe(), "refs": {f"k{step}": ref, "own": {"ipc": own}}}]
        got = resolve_refs(answers, [f"k{step}", "own"], [5], opener, cache)
        assert (got.in_arena, got.own) == (1, 1) and set(got.tensors) == {5}
        assert got.foreign == {f"k{step}", "own"}  # neither is this process's memory: writes need the bounce
        got.tensors[5][f"k{step}"].copy_(torch.full((4,), float(step)))
        assert torch.equal(view_range(arena.buffer, ref), torch.full((4,), float(step)))
    assert opened == [arena.arena_id, "own", "own", "own"]  # the arena once, own buffers every time
    cache.forget([arena.arena_id])
    assert not cache.opened


def test_owned_arenas_are_written_directly() -> None:
    """An arena the controller owns (offered to the worker, which borrows it) is never opened and needs no bounce;
    the borrowing worker's description carries no handle (it never re-exports another process's memory)."""
    cache = ArenaCache()
    owner = torch.zeros(1024, dtype=torch.uint8)
    cache.opened["a1"], cache.owned = owner, {"a1"}
    worker = KvArena(1024, "cpu", buffer=owner, arena_id="a1")
    assert worker.borrowed and worker.describe() == {"id": "a1", "bytes": 1024, "handle": None}
    t, ref = worker.take("k", (8,), torch.float32)
    t.fill_(2.0)

    def never(desc: dict, uuid: str) -> torch.Tensor:
        raise AssertionError(f"opened {desc} on {uuid}")

    answer = {"rank": 0, "uuid": "g", "arena": worker.describe(), "refs": {"k": ref}}
    got = resolve_refs([answer], ["k"], [0], never, cache)
    assert got.foreign == set() and torch.equal(got.tensors[0]["k"], torch.full((8,), 2.0))
    cache.forget(["a1"])
    assert cache.owned == set() and not cache.opened
    with pytest.raises(ValueError, match="want 64 uint8 bytes"):
        KvArena(64, "cpu", buffer=torch.zeros(16, dtype=torch.float32))


def test_refs_naming_an_undescribed_arena_are_refused() -> None:
    arena = KvArena(1024, "cpu")
    _, ref = arena.take("k", (4,), torch.float32)
    answers = [{"rank": 0, "uuid": "g", "arena": None, "refs": {"k": ref}}]
    with pytest.raises(RuntimeError, match="did not describe"):
        resolve_refs(answers, ["k"], [0], lambda d, u: arena.buffer, ArenaCache())


def test_cache_refuses_a_buffer_of_the_wrong_size() -> None:
    with pytest.raises(RuntimeError, match="want 64 bytes"):
        ArenaCache().open({"id": "a", "bytes": 64}, "g", lambda d, u: torch.zeros(32, dtype=torch.uint8))


def test_pair_streams_only_for_large_fan_in_or_fan_out() -> None:
    from nitsum_runtime.kv_copy import PAIR_STREAMS_MIN_BYTES, CopyStreams
    from nitsum_runtime.kv_migration import kv_transfer_plan

    big, small = PAIR_STREAMS_MIN_BYTES, PAIR_STREAMS_MIN_BYTES - 1
    assert not CopyStreams.for_plan(kv_transfer_plan(8, [0], [0, 1]), big).per_pair  # one link (and a local copy)
    assert not CopyStreams.for_plan(kv_transfer_plan(8, [0, 1], [0]), big).per_pair
    assert CopyStreams.for_plan(kv_transfer_plan(8, [0, 1, 2, 3], [0]), big).per_pair  # fan-in: 1, 2, 3 -> 0
    assert CopyStreams.for_plan(kv_transfer_plan(8, [0, 1], [0, 1, 2, 3]), big).per_pair  # fan-out from 1
    assert not CopyStreams.for_plan(kv_transfer_plan(8, [0, 1, 2, 3], [0]), small).per_pair
