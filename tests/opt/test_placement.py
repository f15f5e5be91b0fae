"""Aligned placement, stability of running instances, and the packing guarantee."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitsum_opt import ClusterSpec, CurrentPlan, InstanceCount, ServingConfig
from nitsum_opt.placement import PlacementError, place_instances

TP = {s: ServingConfig.parse(f"tp{s}-colocated") for s in (1, 2, 4, 8)}


def test_groups_are_aligned_and_disjoint() -> None:
    cluster = ClusterSpec(num_nodes=2, gpus_per_node=8)
    counts = {("a", TP[4]): 2, ("a", TP[2]): 3, ("b", TP[1]): 2}
    insts = place_instances(cluster, counts)
    used = [g for i in insts for g in i.gpu_ids]
    assert len(used) == len(set(used)) == 16
    for inst in insts:
        assert inst.gpu_ids[0] % inst.tp == 0
        assert {g // 8 for g in inst.gpu_ids} == {inst.node}


def test_running_instances_stay_on_their_gpus() -> None:
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)
    current = CurrentPlan(
        counts=(InstanceCount(tier="a", config=TP[2], count=1),),
        gpu_ids={"a/tp2-colocated": ((6, 7),)},
    )
    insts = place_instances(cluster, {("a", TP[2]): 1, ("a", TP[4]): 1}, current)
    by_tp = {i.tp: i.gpu_ids for i in insts}
    assert by_tp[2] == (6, 7) and by_tp[4] == (0, 1, 2, 3)


def test_fragmenting_kept_instances_are_repacked() -> None:
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)
    current = CurrentPlan(
        counts=(InstanceCount(tier="a", config=TP[1], count=2),),
        gpu_ids={"a/tp1-colocated": ((1,), (5,))},
    )
    insts = place_instances(cluster, {("a", TP[1]): 2, ("a", TP[2]): 1, ("b", TP[4]): 1}, current)
    assert sum(i.tp for i in insts) == 8  # needs a re-pack: kept GPUs 1 and 5 would block the TP4 group


def test_too_many_instances_is_a_clear_error() -> None:
    with pytest.raises(PlacementError, match="no aligned block of 8 free GPUs"):
        place_instances(ClusterSpec(num_nodes=1, gpus_per_node=8), {("a", TP[8]): 2})


@settings(max_examples=100, deadline=None)
@given(
    nodes=st.integers(1, 4),
    per_node=st.sampled_from([4, 6, 8]),
    counts=st.lists(st.integers(0, 6), min_size=4, max_size=4),
)
def test_packing_rows_guarantee_a_placement(nodes: int, per_node: int, counts: list[int]) -> None:
    """Whenever the formulation's gpu_budget/node_packing rows hold, placement succeeds (and vice versa)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= per_node]
    want = {("t", TP[s]): k for s, k in zip(sizes, counts, strict=False)}
    rows_hold = all(
        sum(s * k for (_, c), k in want.items() for s in [c.gpus] if s >= lo) <= nodes * lo * (per_node // lo)
        for lo in sizes
    )
    cluster = ClusterSpec(num_nodes=nodes, gpus_per_node=per_node)
    if rows_hold:
        assert sum(i.tp for i in place_instances(cluster, want)) == sum(s.gpus * k for (_, s), k in want.items())
    else:
        with pytest.raises(PlacementError):
            place_instances(cluster, want)
