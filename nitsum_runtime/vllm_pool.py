"""An :class:`~nitsum_runtime.pool.EnginePool` of vLLM engines for one node, ready for the transition executor.

:func:`build_vllm_pool` starts one :class:`~nitsum_runtime.vllm_pool_engine.VllmEngine` per candidate TP group
(:func:`~nitsum_runtime.pool.candidate_groups`, or the groups given), each in its own process and session,
once: CUDA graphs captured, the resident store attached, the first refill cross-checked against vLLM's own
loaders, then asleep at level 2. ``TransitionExecutor(pool, spec)`` then carries plans out on them, rollback
included. Engines sharing a GPU know each other, so one that wakes first waits for the others' deferred
sleeps. The resident weight store itself is the caller's (one copy per GPU published with
:func:`~nitsum_runtime.worker_ext.publish_store`, kept alive while the pool runs); the toy engines of the tests
take :func:`~nitsum_runtime.toy_vllm.write_toy_store` instead.

Starting is the slow part (vLLM: about 50-80 s per engine on H200). Engines on disjoint GPUs can build at the
same time (``concurrent_starts``); it is off by default because vLLM engines of the same configuration share
one compile cache folder, and concurrent writers there are untested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec
from nitsum_runtime.engine_handle import EngineHandle
from nitsum_runtime.kv_ticket import CONNECTOR_CONFIG
from nitsum_runtime.pool import EnginePool, candidate_groups
from nitsum_runtime.vllm_engine import write_model_dir
from nitsum_runtime.vllm_pool_engine import VllmEngine
from nitsum_runtime.vllm_protocol import EngineStartReport, VllmDeadlines

#: Environment of every pool engine process: the engine core runs in it (see :mod:`.vllm_pool_engine`).
POOL_ENGINE_ENV: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


class VllmPoolSettings(Frozen):
    """How the pool's engines are built (vLLM 0.26 engine arguments and the pool's own choices)."""

    groups: tuple[tuple[int, ...], ...] | None = None
    """TP groups to start (node-local GPU ids); None: every candidate group of ``tps``."""
    tps: tuple[int, ...] = (1, 2, 4, 8)
    """TP degrees of the candidate groups (used when ``groups`` is None)."""
    gpu_memory_utilization: float = Field(default=0.3, gt=0, le=1)
    """Share of each GPU one engine may take awake (two are awake on a GPU during a switch)."""
    max_model_len: int = Field(default=4096, ge=16)
    """Longest prompt + output."""
    max_num_seqs: int = Field(default=16, ge=1)
    """Most requests in one step."""
    cudagraph_capture_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Decode batch sizes with a CUDA graph."""
    enforce_eager: bool = False
    """No CUDA graphs (faster start, slower steps)."""
    seed: int = 0
    """vLLM's seed (its dummy weights are overwritten by the refill anyway)."""
    check_fill_at_start: bool = True
    """Cross-check the first refill against vLLM's own loaders (a few seconds per engine)."""
    concurrent_starts: bool = False
    """Build engines on disjoint GPUs at the same time (see the module docstring)."""
    defer_sleep: bool = True
    """Sleep commands return at once; the memory is released before a sibling wakes."""
    kv_connector: bool = False
    """Run the Nitsum KV connector (:mod:`nitsum_runtime.kv_connector`) in every engine, so that requests moved
    between engines can bring their KV (the executor's ``migrate``) instead of recomputing it."""
    kv_arena_bytes: int = Field(default=2**30, ge=0)
    """Size of each worker's persistent KV exchange arena (:mod:`nitsum_runtime.kv_arena`), allocated and opened
    by the controller at start when ``kv_connector`` is on; migrations that do not fit use buffers of their own
    (slower: opened per migration). 1 GiB holds ~8k tokens of Llama-3.1-8B KV per TP1 worker; 0: no arena."""
    deadlines: VllmDeadlines = VllmDeadlines()
    """Command deadlines."""
    extra_llm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More ``LLM(...)`` keyword arguments (override the above)."""

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` (beyond the model folder, TP, sleep mode and worker extension)."""
        return {
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": False,  # a re-prefill must not be served from stale blocks
            "seed": self.seed,
            "dtype": "bfloat16",
            "max_num_seqs": self.max_num_seqs,
            "async_scheduling": False,  # one step() = one executed batch
            "disable_log_stats": True,
            "enforce_eager": self.enforce_eager,
            "compilation_config": {"cudagraph_capture_sizes": list(self.cudagraph_capture_sizes)},
            **({"kv_transfer_config": dict(CONNECTOR_CONFIG)} if self.kv_connector else {}),
            **self.extra_llm_kwargs,
        }


def engine_id_of(gpu_ids: Sequence[int]) -> str:
    """``tp2-g0-1`` etc."""
    return f"tp{len(gpu_ids)}-g{'-'.join(map(str, gpu_ids))}"


def start_waves(groups: Sequence[tuple[int, ...]], concurrent: bool) -> list[list[tuple[int, ...]]]:
    """Groups in start order: one per wave, or (``concurrent``) each wave the next groups on disjoint GPUs."""
    if not concurrent:
        return [[g] for g in groups]
    waves: list[list[tuple[int, ...]]] = []
    for g in groups:
        for wave in waves:
            if not any(set(g) & set(h) for h in wave):
                wave.append(g)
                break
        else:
            waves.append([g])
    return waves


def build_vllm_pool(
    spec: ModelSpec,
    num_gpus: int,
    store_handles: Path,
    work_dir: Path,
    settings: VllmPoolSettings | None = None,
    target: Callable[..., None] | None = None,
    env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
    node: int = 0,
) -> tuple[EnginePool, list[EngineStartReport]]:
    """Start the engines (module docstring) and return the pool with one start report per engine. ``target``
    is the engine process entry (default: vLLM's, :func:`~nitsum_runtime.vllm_process.engine_process`); on any
    failure every engine started so far is killed before the error propagates."""
    settings = settings or VllmPoolSettings()
    groups = settings.groups or candidate_groups(num_gpus, settings.tps)
    bad = [g for g in groups if not g or max(g) >= num_gpus or min(g) < 0]
    if bad:
        raise ValueError(f"TP groups {bad} use GPUs outside 0..{num_gpus - 1}")
    model_dir = write_model_dir(spec, work_dir / "model")
    engines = {
        g: VllmEngine(
            EngineHandle(
                engine_id_of(g),
                g,
                str(model_dir),
                settings.llm_kwargs(),
                grace_s=settings.deadlines.grace_s,
                target=target,
                env={**POOL_ENGINE_ENV, **(env or {})},
            ),
            spec,
            str(store_handles),
            deadlines=settings.deadlines,
            check_fill_at_start=settings.check_fill_at_start,
            defer_sleep=settings.defer_sleep,
            kv_connector=settings.kv_connector,
            kv_arena_bytes=settings.kv_arena_bytes,
        )
        for g in groups
    }
    for g, e in engines.items():
        e.siblings = [o for h, o in engines.items() if h != g and set(h) & set(g)]
    reports: list[EngineStartReport] = []
    try:
        for wave in start_waves(list(engines), settings.concurrent_starts):
            for g in wave:
                engines[g].launch()
            for g in wave:
                reports.append(engines[g].finish_start())
                r = reports[-1]
                log(
                    f"engine {r.engine_id} started in {r.started.start_s:.1f} s; refill vs vLLM loaders: "
                    f"{len(r.mismatched)} mismatched of {r.checked}; asleep"
                )
    except BaseException:
        for e in engines.values():
            e.close()
        raise
    return EnginePool(list(engines.values()), node=node, gpus_per_node=num_gpus), reports


def close_pool(pool: EnginePool) -> None:
    """Kill every engine process of a vLLM pool."""
    for engine in pool.engines.values():
        close = getattr(engine, "close", None)
        if close is not None:
            close()
