"""Static deployments of the baseline systems (placement by :func:`nitsum_opt.placement.place_instances`).

* ``vllm-static-tpN``: every GPU in colocated TP-``N`` engines serving every tier, first come first served, no
  admission control (vLLM as deployed today, with a least-loaded router in front).
* ``vllm-priority``: the same engines with vLLM's priority scheduling by tier (``--scheduling-policy priority``).
* ``distserve``: prefill and decode engines (``n_p × tp_p`` + ``n_d × tp_d``) serving every tier, FCFS.
* ``split``: one colocated cluster per tier, GPUs shared out in proportion to the tier's mean demand over its best
  per-GPU rate, FCFS inside each cluster, nothing shared between clusters.
"""

from __future__ import annotations

from collections.abc import Mapping

from nitsum_opt.models.spec import CapacityTable, Role, ServingConfig
from nitsum_opt.placement import PlacementError, place_instances
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.spec import ClusterSpec

UNTIERED = "*"
"""Placeholder tier name for engines that serve every tier."""


Tuning = Mapping[tuple[str, int, Role], tuple[int, int | None]]
"""``(tier, tp, role)`` → (SLO-safe requests, step token budget or ``None`` for the engine default)."""


def place(
    cluster: ClusterSpec, counts: Mapping[tuple[str, ServingConfig], int], tuning: Tuning
) -> tuple[DeployedInstance, ...]:
    """Engines for ``counts`` (tier ``UNTIERED`` = every tier) on aligned GPU groups, tuned by ``tuning``."""
    out = []
    for i in place_instances(cluster, {k: v for k, v in counts.items() if v > 0}):
        seqs, budget = tuning[(i.tier, i.tp, i.role)]
        out.append(
            DeployedInstance(
                tier=None if i.tier == UNTIERED else i.tier,
                tp=i.tp,
                role=i.role,
                gpu_ids=i.gpu_ids,
                slo_safe_seqs=seqs,
                max_num_batched_tokens=budget,
            )
        )
    return tuple(out)


def vllm_static(
    cluster: ClusterSpec, tp: int, priority: bool = False, max_num_seqs: int = 1024, budget: int | None = None
) -> Deployment:
    """All GPUs as colocated TP-``tp`` engines for every tier (FCFS, or tier priority); ``budget`` overrides the
    engines' step token budget."""
    if tp > cluster.gpus_per_node:
        raise ValueError(f"tp={tp} does not fit nodes of {cluster.gpus_per_node} GPUs")
    config = ServingConfig(tp=tp, role=Role.COLOCATED)
    count = cluster.num_nodes * (cluster.gpus_per_node // tp)
    tuning = {(UNTIERED, tp, Role.COLOCATED): (max_num_seqs, budget)}
    label = f"{count}×tp{tp}-colocated" + (" (tier priority)" if priority else "")
    return Deployment(
        instances=place(cluster, {(UNTIERED, config): count}, tuning),
        tier_priority=priority,
        label=label + ("" if budget is None else f" ({budget}-token steps)"),
    )


def distserve(
    cluster: ClusterSpec, prefill: tuple[int, int], decode: tuple[int, int], max_num_seqs: int = 1024
) -> Deployment:
    """``prefill = (tp_p, n_p)`` prefill engines and ``decode = (tp_d, n_d)`` decode engines for every tier."""
    (tp_p, n_p), (tp_d, n_d) = prefill, decode
    counts = {
        (UNTIERED, ServingConfig(tp=tp_p, role=Role.PREFILL)): n_p,
        (UNTIERED, ServingConfig(tp=tp_d, role=Role.DECODE)): n_d,
    }
    tuning = {
        (UNTIERED, tp_p, Role.PREFILL): (max_num_seqs, None),
        (UNTIERED, tp_d, Role.DECODE): (max_num_seqs, None),
    }
    return Deployment(
        instances=place(cluster, counts, tuning),
        label=f"{n_p}×tp{tp_p}-prefill + {n_d}×tp{tp_d}-decode",
    )


def distserve_candidates(
    cluster: ClusterSpec, tps: tuple[int, ...] = (1, 2, 4, 8)
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every ``((tp_p, n_p), (tp_d, n_d))`` with TP degrees from ``tps`` that uses all GPUs and packs into the
    nodes."""
    out = []
    tps = tuple(tp for tp in tps if tp <= cluster.gpus_per_node)
    g = cluster.total_gpus
    for tp_p in tps:
        for tp_d in tps:
            for n_p in range(1, g // tp_p + 1):
                rest = g - n_p * tp_p
                if rest < tp_d or rest % tp_d:
                    continue
                counts = {
                    ("p", ServingConfig(tp=tp_p, role=Role.PREFILL)): n_p,
                    ("d", ServingConfig(tp=tp_d, role=Role.DECODE)): rest // tp_d,
                }
                try:
                    place_instances(cluster, counts)
                except PlacementError:
                    continue
                out.append(((tp_p, n_p), (tp_d, rest // tp_d)))
    return out


def split_counts(
    cluster: ClusterSpec, mean_rps: Mapping[str, float], capacity: CapacityTable, tps: tuple[int, ...] = (1, 2, 4, 8)
) -> dict[tuple[str, ServingConfig], int]:
    """GPUs per tier ∝ mean demand / best colocated per-GPU rate (largest remainder, at least one GPU for a tier
    with demand), each share filled with the tier's best per-GPU colocated config that fits it."""
    tiers = [t for t, r in mean_rps.items() if r > 0] or list(mean_rps)
    configs = [ServingConfig(tp=tp, role=Role.COLOCATED) for tp in tps if tp <= cluster.gpus_per_node]

    def per_gpu(tier: str, c: ServingConfig) -> float:
        return capacity.rate_rps(tier, c) / c.gpus

    need = {t: mean_rps[t] / max(1e-9, max(per_gpu(t, c) for c in configs)) for t in tiers}
    total = sum(need.values()) or 1.0
    g = cluster.total_gpus
    raw = {t: g * need[t] / total for t in tiers}
    share = {t: max(1, int(raw[t])) for t in tiers}
    while sum(share.values()) > g:
        share[max(share, key=lambda t: share[t] - raw[t])] -= 1
    for t in sorted(tiers, key=lambda t: raw[t] - share[t], reverse=True)[: g - sum(share.values())]:
        share[t] += 1
    counts: dict[tuple[str, ServingConfig], int] = {}
    for t in tiers:
        left = share[t]
        for c in sorted(configs, key=lambda c: (-per_gpu(t, c), c.tp)):
            if c.gpus <= left:
                counts[t, c] = counts.get((t, c), 0) + left // c.gpus
                left %= c.gpus
        if left:
            one = ServingConfig(tp=1, role=Role.COLOCATED)
            counts[t, one] = counts.get((t, one), 0) + left
    return counts


def split(
    cluster: ClusterSpec,
    mean_rps: Mapping[str, float],
    capacity: CapacityTable,
    tuning: Tuning,
    tps: tuple[int, ...] = (1, 2, 4, 8),
    label: str = "split",
) -> Deployment:
    """One FCFS colocated cluster per tier (see :func:`split_counts`); falls back to TP-1 engines when the
    chosen TP sizes do not pack into the nodes."""
    counts = split_counts(cluster, mean_rps, capacity, tps)
    try:
        instances = place(cluster, counts, tuning)
    except PlacementError:
        flat: dict[tuple[str, ServingConfig], int] = {}
        for (t, c), n in counts.items():
            one = ServingConfig(tp=1, role=Role.COLOCATED)
            flat[t, one] = flat.get((t, one), 0) + n * c.gpus
        instances = place(cluster, flat, tuning)
    return Deployment(instances=instances, label=f"{label}: " + Deployment(instances=instances).describe())
