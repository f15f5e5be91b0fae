"""GPU ids for instance counts: aligned first-fit-decreasing, keeping running instances where they are.

A TP-``s`` instance occupies ``s`` consecutive GPUs of one node starting at a multiple of ``s`` (the groups the
runtime pre-launches engines for: TP2 on {0,1},{2,3}, …). Running instances that the new plan keeps stay on
their GPUs, so the runtime leaves them untouched; the rest are placed largest first. If kept instances fragment
a node so badly that the rest no longer fit, everything is re-placed from scratch, which always succeeds when
the counts satisfy the formulation's ``gpu_budget``/``node_packing`` rows.
"""

from __future__ import annotations

from collections.abc import Mapping

from nitsum_opt.models.spec import ServingConfig
from nitsum_opt.plan import Instance
from nitsum_opt.spec import ClusterSpec, CurrentPlan


class PlacementError(ValueError):
    """The instance counts do not fit into the cluster's nodes."""


Counts = Mapping[tuple[str, ServingConfig], int]


def place_instances(cluster: ClusterSpec, counts: Counts, current: CurrentPlan | None = None) -> tuple[Instance, ...]:
    """Instances with GPU ids for ``counts``; running instances of ``current`` keep their GPUs when possible."""
    kept = _kept_groups(cluster, counts, current)
    try:
        return _place(cluster, counts, kept)
    except PlacementError:
        if not kept:
            raise
        return _place(cluster, counts, {})


def _kept_groups(
    cluster: ClusterSpec, counts: Counts, current: CurrentPlan | None
) -> dict[tuple[str, ServingConfig], list[tuple[int, ...]]]:
    if current is None:
        return {}
    kept: dict[tuple[str, ServingConfig], list[tuple[int, ...]]] = {}
    for key, want in counts.items():
        tier, config = key
        groups = current.gpu_ids.get(f"{tier}/{config.key}", ())
        valid = [g for g in groups if _valid_group(cluster, config.gpus, g)]
        if valid:
            kept[key] = sorted(valid)[:want]
    return kept


def _valid_group(cluster: ClusterSpec, size: int, gpu_ids: tuple[int, ...]) -> bool:
    per_node = cluster.gpus_per_node
    if len(gpu_ids) != size or not gpu_ids:
        return False
    first = gpu_ids[0]
    local = first % per_node
    return (
        first >= 0
        and first + size <= cluster.total_gpus
        and local % size == 0
        and local + size <= per_node
        and tuple(range(first, first + size)) == tuple(gpu_ids)
    )


def _place(
    cluster: ClusterSpec, counts: Counts, kept: Mapping[tuple[str, ServingConfig], list[tuple[int, ...]]]
) -> tuple[Instance, ...]:
    free = [True] * cluster.total_gpus
    instances: list[Instance] = []
    for (tier, config), groups in kept.items():
        for gpu_ids in groups:
            if not all(free[g] for g in gpu_ids):
                raise PlacementError(f"running instances overlap on GPUs {gpu_ids}")
            _take(free, gpu_ids)
            instances.append(_instance(cluster, tier, config, gpu_ids))
    todo = [
        (tier, config)
        for (tier, config), count in counts.items()
        for _ in range(count - len(kept.get((tier, config), ())))
    ]
    todo.sort(key=lambda k: (-k[1].gpus, k[0], k[1].role.value))
    cursors: dict[int, int] = {}
    for tier, config in todo:
        gpu_ids = _first_fit(cluster, free, config.gpus, cursors)
        if gpu_ids is None:
            raise PlacementError(
                f"no aligned block of {config.gpus} free GPUs left for {tier}/{config.key}: the counts need more "
                f"GPUs than {cluster.num_nodes} node(s) × {cluster.gpus_per_node} provide"
            )
        _take(free, gpu_ids)
        instances.append(_instance(cluster, tier, config, gpu_ids))
    return tuple(sorted(instances, key=lambda i: i.gpu_ids[0]))


def _first_fit(cluster: ClusterSpec, free: list[bool], size: int, cursors: dict[int, int]) -> tuple[int, ...] | None:
    """First free aligned block of ``size`` GPUs. ``cursors[size]`` remembers where the last search for this size
    ended: GPUs are only ever taken, so blocks before it stay busy and are never scanned again."""
    per_node = cluster.gpus_per_node
    start = cursors.get(size, 0)
    slots_per_node = per_node // size
    total_slots = cluster.num_nodes * slots_per_node
    for slot in range(start, total_slots):
        first = (slot // slots_per_node) * per_node + (slot % slots_per_node) * size
        if all(free[g] for g in range(first, first + size)):
            cursors[size] = slot
            return tuple(range(first, first + size))
    cursors[size] = total_slots
    return None


def _take(free: list[bool], gpu_ids: tuple[int, ...]) -> None:
    for g in gpu_ids:
        free[g] = False


def _instance(cluster: ClusterSpec, tier: str, config: ServingConfig, gpu_ids: tuple[int, ...]) -> Instance:
    return Instance(
        instance_id=f"{tier}/{config.key}@gpu{gpu_ids[0]}",
        tier=tier,
        tp=config.tp,
        role=config.role,
        node=gpu_ids[0] // cluster.gpus_per_node,
        gpu_ids=gpu_ids,
    )
