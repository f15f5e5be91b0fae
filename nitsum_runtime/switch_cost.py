"""What moving an in-flight request to an engine of another TP costs: migrate its KV, or re-prefill it.

Migration time is priced from the bytes the head re-split plan (:func:`~nitsum_runtime.kv_migration.
kv_transfer_plan`) moves: the busiest GPU link (egress of a source GPU or ingress of a target GPU) at the
measured point-to-point bandwidth, plus the copies that stay on one GPU at HBM copy speed, plus a fixed
per-migration overhead. Re-prefill time comes from a prefill time model of the target TP. The cheaper wins;
the planner and the simulator use :func:`kv_switch_cost` as the switch cost of a request.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec
from nitsum_runtime.kv_migration import kv_transfer_plan


class PrefillTimeModel(Protocol):
    """Anything that predicts the time to prefill ``tokens`` tokens of one request at TP ``tp``."""

    def prefill_s(self, tokens: int, tp: int) -> float:
        """Seconds."""
        ...


class RooflinePrefillModel(Frozen):
    """Prefill time from FLOPs: ``fixed_s + flops(tokens) / (tp * gpu_flops * mfu)``.

    A default until fitted latency models (``nitsum_opt.models``) are plugged in; ``flops`` counts the matrix
    products (``2 * params * tokens``) and causal attention (``2 * layers * hidden * tokens^2``)."""

    spec: ModelSpec
    """Model shape."""
    gpu_tflops: float = Field(default=989.0, gt=0)
    """Dense bf16 peak of one GPU in TFLOP/s (H200 SXM: 989)."""
    mfu: float = Field(default=0.5, gt=0, le=1)
    """Achieved fraction of the peak during prefill."""
    fixed_s: float = Field(default=0.005, ge=0)
    """Per-prefill overhead (scheduling, launch, sampling)."""

    def prefill_s(self, tokens: int, tp: int) -> float:
        """Seconds to prefill ``tokens`` tokens at ``tp``."""
        flops = 2 * self.spec.param_count * tokens + 2 * self.spec.num_layers * self.spec.hidden_size * tokens**2
        return self.fixed_s + flops / (tp * self.gpu_tflops * 1e12 * self.mfu)


class KvSwitchCost(Frozen):
    """Migrate or re-prefill one request whose instance changes TP, with both prices."""

    tokens: int = Field(ge=0)
    """Tokens whose KV is cached."""
    src_tp: int = Field(ge=1)
    """TP of the engine it leaves."""
    dst_tp: int = Field(ge=1)
    """TP of the engine it joins."""
    kv_bytes: int = Field(ge=0)
    """KV bytes of the request (all heads, all layers, no replication)."""
    link_bytes: int = Field(ge=0)
    """Bytes through the busiest GPU link (egress or ingress)."""
    local_bytes: int = Field(ge=0)
    """Bytes copied inside the busiest GPU (source and target on the same GPU)."""
    migrate_s: float = Field(ge=0)
    """Predicted migration time."""
    reprefill_s: float = Field(ge=0)
    """Predicted re-prefill time at the target TP (prompt and tokens generated so far)."""
    choice: Literal["migrate", "reprefill"]
    """The cheaper option (migration on a tie)."""

    @property
    def cost_s(self) -> float:
        """Time of the chosen option."""
        return self.migrate_s if self.choice == "migrate" else self.reprefill_s


def migration_cost(
    spec: ModelSpec,
    tokens: int,
    src_tp: int,
    dst_tp: int,
    link_gb_per_s: float,
    local_gb_per_s: float = 1500.0,
    overhead_s: float = 0.002,
    src_gpus: tuple[int, ...] | None = None,
    dst_gpus: tuple[int, ...] | None = None,
) -> tuple[float, int, int]:
    """``(seconds, link_bytes, local_bytes)`` to migrate ``tokens`` tokens of KV from TP ``src_tp`` to
    ``dst_tp``; bandwidths in GB/s (1e9 bytes). By default both engines start at GPU 0 (an in-place TP change:
    TP1 on {0} -> TP2 on {0, 1})."""
    if link_gb_per_s <= 0 or local_gb_per_s <= 0:
        raise ValueError(f"bandwidths must be > 0 GB/s, got link={link_gb_per_s}, local={local_gb_per_s}")
    src = src_gpus or tuple(range(src_tp))
    dst = dst_gpus or tuple(range(dst_tp))
    per_head = tokens * spec.num_layers * 2 * spec.head_dim * spec.dtype_bytes
    egress: dict[int, int] = {}
    ingress: dict[int, int] = {}
    local: dict[int, int] = {}
    for t in kv_transfer_plan(spec.num_kv_heads, src, dst):
        nbytes = t.num_heads * per_head
        if t.src == t.dst:
            local[t.src] = local.get(t.src, 0) + nbytes
        else:
            egress[t.src] = egress.get(t.src, 0) + nbytes
            ingress[t.dst] = ingress.get(t.dst, 0) + nbytes
    link = max([*egress.values(), *ingress.values(), 0])
    local_max = max([*local.values(), 0])
    # A local copy reads and writes HBM; both overlap the link traffic in the pipelined transfer.
    seconds = overhead_s + max(link / (link_gb_per_s * 1e9), 2 * local_max / (local_gb_per_s * 1e9))
    return (seconds if tokens else 0.0), link, local_max


def reprefill_cost(tokens: int, dst_tp: int, prefill_model: PrefillTimeModel) -> float:
    """Seconds to recompute ``tokens`` tokens of KV at ``dst_tp``."""
    return prefill_model.prefill_s(tokens, dst_tp) if tokens else 0.0


def kv_switch_cost(
    spec: ModelSpec,
    tokens: int,
    src_tp: int,
    dst_tp: int,
    link_gb_per_s: float,
    prefill_model: PrefillTimeModel,
    can_migrate: bool = True,
) -> KvSwitchCost:
    """Price both options for one request and pick the cheaper (``can_migrate=False``: no KV path between
    the engines, e.g. across nodes, so re-prefill)."""
    migrate_s, link, local = migration_cost(spec, tokens, src_tp, dst_tp, link_gb_per_s)
    reprefill_s = reprefill_cost(tokens, dst_tp, prefill_model)
    choice: Literal["migrate", "reprefill"] = "migrate" if can_migrate and migrate_s <= reprefill_s else "reprefill"
    return KvSwitchCost(
        tokens=tokens,
        src_tp=src_tp,
        dst_tp=dst_tp,
        kv_bytes=tokens * spec.kv_bytes_per_token,
        link_bytes=link,
        local_bytes=local,
        migrate_s=migrate_s,
        reprefill_s=reprefill_s,
        choice=choice,
    )


class InstanceSwitchCost(Frozen):
    """Predicted cost of changing one instance's TP with requests in flight (what the planner prices)."""

    pause_s: float = Field(ge=0)
    """Pause -> resume: fixed overhead + weight refill + KV migrations (re-prefills run after resume)."""
    fill_s: float = Field(ge=0)
    """Weight refill from the resident copies (ranks in parallel)."""
    migrate_s: float = Field(ge=0)
    """KV migration of the requests that migrate, batched in one transfer."""
    reprefill_s: float = Field(ge=0)
    """Prefill time added after resume for the requests that re-prefill."""
    requests: tuple[KvSwitchCost, ...]
    """Per-request prices and choices."""


def instance_switch_cost(
    spec: ModelSpec,
    src_tp: int,
    dst_tp: int,
    inflight_tokens: tuple[int, ...] | list[int],
    link_gb_per_s: float,
    prefill_model: PrefillTimeModel,
    fill_gb_per_s: float = 1500.0,
    fixed_s: float = 0.02,
) -> InstanceSwitchCost:
    """Price a TP change of one instance holding requests with ``inflight_tokens`` cached tokens each.

    ``fill_gb_per_s``: device-to-device copy speed of the refill (each GPU copies its shard, ``weight_bytes /
    dst_tp``); ``fixed_s``: pause/wake/route bookkeeping. Measured values replace both defaults
    (``benchmarks/gpu/run_runtime_h200.sh``)."""
    per_request = tuple(kv_switch_cost(spec, t, src_tp, dst_tp, link_gb_per_s, prefill_model) for t in inflight_tokens)
    migrating = sum(c.tokens for c in per_request if c.choice == "migrate")
    migrate_s = migration_cost(spec, migrating, src_tp, dst_tp, link_gb_per_s)[0]
    reprefill_s = sum(c.reprefill_s for c in per_request if c.choice == "reprefill")
    fill_s = spec.weight_bytes / dst_tp / (fill_gb_per_s * 1e9)
    return InstanceSwitchCost(
        pause_s=fixed_s + fill_s + migrate_s,
        fill_s=fill_s,
        migrate_s=migrate_s,
        reprefill_s=reprefill_s,
        requests=per_request,
    )
