"""Rank side of the reference engines: one process per GPU holding that GPU's resident weight store and the
shards of every engine that covers the GPU.

The process runs a command loop (``cmd_<name>`` methods). Engines are TP groups of ranks; the process groups
of every candidate TP group are created at start, in the same order on every rank, as torch.distributed
requires. Memory accounting: with ``memory_budget_bytes`` set, waking an engine whose shard and KV cache would
push the rank's engine memory over the budget raises, exactly as a CUDA out-of-memory would, before anything
is allocated.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec
from nitsum_runtime.kv_migration import (
    KvLayout,
    MigrationStats,
    allocate_kv_cache,
    gather_kv,
    kv_transfer_plan,
    migrate_kv,
    torch_dtype,
)
from nitsum_runtime.procs import init_rank, watch_parent
from nitsum_runtime.ref_model import BatchInput, RefModelConfig, TopK, TpComm, forward
from nitsum_runtime.sharding import plan_mismatches, shard_plan
from nitsum_runtime.weights import FillReport, ResidentWeightStore, fill_shard


class ClusterConfig(Frozen):
    """How to start the rank processes of one node."""

    spec: ModelSpec
    """Model shape."""
    world_size: int = Field(ge=1)
    """Rank processes (GPUs of the node)."""
    backend: str = Field(default="gloo", pattern="^(gloo|nccl)$")
    """``gloo`` (CPU) or ``nccl`` (GPU ``r`` for rank ``r``)."""
    dtype: str = "float32"
    """Weights and KV element type."""
    seed: int = 0
    """Seed of the dummy weights (when ``weights_path`` is empty)."""
    weights_path: str = ""
    """Folder of safetensors files to load the resident copies from, instead of dummy weights."""
    groups: tuple[tuple[int, ...], ...] = ()
    """Every TP group (2 ranks or more) an engine may use; process groups are created for them at start."""
    block_size: int = Field(default=16, ge=1)
    """Tokens per KV block."""
    memory_budget_bytes: int | None = Field(default=None, ge=0)
    """Engine memory (shards + KV) each rank may hold; None: unlimited."""
    model: RefModelConfig = RefModelConfig()
    """Numerics not carried by the spec."""
    timeout_s: float = Field(default=300.0, gt=0)
    """torch.distributed timeout (a collective waiting longer fails)."""


@dataclass
class EngineShard:
    """One engine's state on one rank."""

    engine_id: str
    ranks: tuple[int, ...]
    num_blocks: int
    local_rank: int
    comm: TpComm
    params: dict[str, torch.Tensor] | None = None
    caches: list[torch.Tensor] | None = None
    nbytes: int = 0

    @property
    def tp(self) -> int:
        return len(self.ranks)


@dataclass
class RankWorker:
    """The command handler of one rank process."""

    rank: int
    cfg: ClusterConfig
    device: torch.device
    store: ResidentWeightStore
    groups: dict[tuple[int, ...], dist.ProcessGroup]
    engines: dict[str, EngineShard] = field(default_factory=dict)
    memory_budget_bytes: int | None = None

    @property
    def layout(self) -> KvLayout:
        return KvLayout.of(self.cfg.spec, self.cfg.block_size, self.cfg.dtype)

    def engine_bytes(self) -> int:
        """Memory held by awake engines on this rank."""
        return sum(e.nbytes for e in self.engines.values())

    def cmd_wake(self, engine_id: str, ranks: tuple[int, ...], num_blocks: int) -> int:
        shard = self.engines.get(engine_id)
        if shard is None:
            group = self.groups.get(tuple(ranks)) if len(ranks) > 1 else None
            if len(ranks) > 1 and group is None:
                raise ValueError(f"ranks {ranks} are not a TP group declared at start ({list(self.groups)})")
            shard = EngineShard(engine_id, tuple(ranks), num_blocks, ranks.index(self.rank), TpComm(group, len(ranks)))
            self.engines[engine_id] = shard
        if shard.params is not None:
            return shard.nbytes
        dtype = torch_dtype(self.cfg.dtype)
        shapes = shard_plan(self.cfg.spec, shard.tp, shard.local_rank).shapes
        elem = torch.empty((), dtype=dtype).element_size()
        need = sum(torch.Size(s).numel() for s in shapes.values()) * elem
        lay = self.layout
        need += lay.num_layers * num_blocks * lay.block_size * lay.heads_local(shard.tp) * 2 * lay.head_dim * elem
        budget = self.memory_budget_bytes
        if budget is not None and self.engine_bytes() + need > budget:
            raise MemoryError(
                f"rank {self.rank}: waking engine {engine_id!r} needs {need} bytes, engines already hold "
                f"{self.engine_bytes()}, budget {budget}; put another engine on this GPU to sleep first"
            )
        shard.params = {n: torch.empty(s, dtype=dtype, device=self.device) for n, s in shapes.items()}
        shard.caches = allocate_kv_cache(lay, shard.tp, num_blocks, self.device)
        shard.nbytes = need
        return need

    def cmd_sleep(self, engine_id: str) -> int:
        shard = self.engines.get(engine_id)
        freed = 0
        if shard is not None:
            freed, shard.params, shard.caches, shard.nbytes = shard.nbytes, None, None, 0
        return freed

    def _awake(self, engine_id: str) -> EngineShard:
        shard = self.engines.get(engine_id)
        if shard is None or shard.params is None or shard.caches is None:
            raise RuntimeError(f"rank {self.rank}: engine {engine_id!r} is not awake")
        return shard

    def cmd_fill(self, engine_id: str) -> FillReport:
        shard = self._awake(engine_id)
        return fill_shard(self.store, shard.params or {}, shard.tp, shard.local_rank)

    def cmd_check_fill(self, engine_id: str) -> list[str]:
        """Parameters of ``engine_id`` on this rank that differ from the resident store's shard (bit for bit)."""
        shard = self._awake(engine_id)
        plan = shard_plan(self.cfg.spec, shard.tp, shard.local_rank)
        return plan_mismatches(plan, self.store.tensors, shard.params or {})

    def cmd_forward(self, engine_id: str, batch: BatchInput) -> list[TopK] | None:
        shard = self._awake(engine_id)
        with torch.inference_mode(), deterministic_algorithms(self.cfg.model.deterministic):
            rows = forward(
                self.cfg.spec,
                self.cfg.model,
                shard.params or {},
                shard.caches or [],
                batch,
                shard.tp,
                shard.local_rank,
                shard.comm,
            )
        return rows if shard.local_rank == 0 else None

    def cmd_migrate(
        self,
        src_engine: str,
        src_ranks: tuple[int, ...],
        dst_engine: str,
        dst_ranks: tuple[int, ...],
        src_slots: list[int],
        dst_slots: list[int],
        chunk_bytes: int,
    ) -> MigrationStats:
        """This rank's part of moving KV from ``src_engine`` (on ``src_ranks``) to ``dst_engine``."""
        plan = kv_transfer_plan(self.cfg.spec.num_kv_heads, src_ranks, dst_ranks)
        src_caches = self._awake(src_engine).caches if self.rank in src_ranks else None
        dst_caches = self._awake(dst_engine).caches if self.rank in dst_ranks else None
        with torch.inference_mode():
            return migrate_kv(
                self.rank,
                plan,
                src_caches,
                dst_caches,
                torch.tensor(src_slots),
                torch.tensor(dst_slots),
                chunk_bytes,
            )

    def cmd_read_kv(self, engine_id: str, slots: list[int]) -> torch.Tensor:
        """This rank's KV of ``slots`` (``[layers, tokens, heads_local, 2*head_dim]``, on CPU)."""
        caches = self._awake(engine_id).caches or []
        return gather_kv(caches, torch.tensor(slots, device=self.device), 0, caches[0].shape[2]).cpu()

    def cmd_fingerprint(self) -> torch.Tensor:
        return self.store.fingerprint().cpu()

    def cmd_warmup(self) -> float:
        """Create every communicator now (one all-reduce per TP group, one exchange per pair of ranks, in the
        same order on every rank) so that no switch pays for lazy NCCL initialisation; returns seconds."""
        t0 = time.perf_counter()
        x = torch.ones(16, device=self.device)
        for ranks, group in self.groups.items():
            if self.rank in ranks:
                dist.all_reduce(x, group=group)
        for a in range(self.cfg.world_size):
            for b in range(a + 1, self.cfg.world_size):
                if self.rank in (a, b):
                    peer = b if self.rank == a else a
                    y = torch.empty_like(x)
                    ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]
                    for w in dist.batch_isend_irecv(ops):
                        w.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def cmd_set_memory_budget(self, budget_bytes: int | None) -> None:
        """Change the engine memory budget of this rank (None: unlimited)."""
        self.memory_budget_bytes = budget_bytes

    def cmd_memory(self) -> dict[str, int]:
        return {e.engine_id: e.nbytes for e in self.engines.values() if e.nbytes}

    def cmd_call(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """Run an importable ``fn(worker, **kwargs)`` on this rank (how benchmarks add rank-side code)."""
        return fn(self, **kwargs)


def _build_store(cfg: ClusterConfig, device: torch.device) -> ResidentWeightStore:
    if cfg.weights_path:
        return ResidentWeightStore.from_safetensors(cfg.spec, cfg.weights_path, device, torch_dtype(cfg.dtype))
    return ResidentWeightStore.dummy(cfg.spec, cfg.seed, device, torch_dtype(cfg.dtype))


def configure_determinism(device: torch.device) -> None:
    """Process-wide settings for bit-reproducible forward passes (:attr:`RefModelConfig.deterministic`):
    cuDNN deterministic, the default cuBLAS backend (reproducible with the fixed ``CUBLAS_WORKSPACE_CONFIG``
    that :func:`worker_main` sets), and no filling of uninitialised memory by deterministic mode (every buffer
    the engine reads is written first; filling would add to the measured wake time)."""
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.preferred_blas_library("cublas")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the duration of a forward pass (warning, not failing, on an op
    without a deterministic implementation); KV migration and refills keep torch's default kernels."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def worker_main(rank: int, cfg: ClusterConfig, init_file: str, inbox: Any, outbox: Any) -> None:
    """Entry of a rank process: own session, join the process group, build the store, serve commands."""
    os.setsid()
    watch_parent()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS handle exists
    if cfg.backend == "gloo":
        torch.set_num_threads(1)
    try:
        device = init_rank(rank, cfg.world_size, init_file, cfg.backend, cfg.timeout_s)
        if cfg.model.deterministic:
            configure_determinism(device)
        groups = {tuple(g): dist.new_group(list(g)) for g in cfg.groups if len(g) > 1}
        t0 = time.perf_counter()
        store = _build_store(cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        worker = RankWorker(rank, cfg, device, store, groups, memory_budget_bytes=cfg.memory_budget_bytes)
        outbox.put((rank, -1, True, {"store_bytes": store.nbytes, "store_build_s": time.perf_counter() - t0}))
    except BaseException:
        outbox.put((rank, -1, False, traceback.format_exc()))
        return
    while True:
        seq, name, kwargs = inbox.get()
        if name == "stop":
            outbox.put((rank, seq, True, None))
            break
        try:
            outbox.put((rank, seq, True, getattr(worker, f"cmd_{name}")(**kwargs)))
        except BaseException as exc:
            outbox.put((rank, seq, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    if dist.is_initialized():
        dist.destroy_process_group()
