"""Benchmark (c): stock vLLM engines switching TP by weight reuse (no vLLM import in this process).

One vLLM engine per TP group (TP1 on GPU 0, TP2 on 0-1, TP4 on 0-3), each in its own process and session
(:func:`~nitsum_runtime.vllm_process.engine_process`), started once (CUDA graphs captured) and put to sleep
at level 2. This process holds the resident weight copy on every GPU and publishes CUDA IPC handles; a switch
is ``wake_up(weights)`` + ``collective_rpc("nitsum_fill_weights")`` + ``wake_up(kv_cache)`` of the target,
then ``sleep(2)`` of the source after the resume when memory allows (:mod:`.vllm_scenario`). Requests in
flight are re-prefilled on the target (prompt + tokens so far); KV migration into vLLM needs a KV connector
(not done here). Checks: the refill equals vLLM's own loaders bit for bit; TP1 probes before and after the
round trip are identical (and a repeat before it, the control); other TPs' top-k log-probabilities against
teacher-forced TP1 scoring; every in-flight request gets all its tokens once. Partial results are written
after every engine start and every switch.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.bench_pool import release_resident_store
from nitsum_runtime.engine_handle import EngineHandle
from nitsum_runtime.vllm_scenario import run_scenario
from nitsum_runtime.weights import ResidentWeightStore
from nitsum_runtime.worker_ext import publish_store


def write_model_dir(spec: ModelSpec, path: Path) -> None:
    """A ``config.json`` (Llama architecture) that vLLM loads with ``load_format='dummy'``."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_model_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def run_vllm_switch(
    out_dir: Path,
    spec: ModelSpec,
    world: int,
    seed: int = 0,
    gpu_memory_utilization: float = 0.3,
    max_model_len: int = 4096,
    start_timeout_s: float = 150.0,
    tolerance: float = 0.15,
    log: Any = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run benchmark (c) (see the module docstring); ``checkpoint(summary)`` gets the partial summary after
    every engine start and every switch (it is also written to ``vllm_switch.json`` each time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [g for g in ((0,), (0, 1), (0, 1, 2, 3)) if max(g) < world]
    llm_kwargs = {
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "enable_prefix_caching": False,
        "seed": seed,
        "dtype": "bfloat16",
        "max_num_seqs": 16,
        "async_scheduling": False,  # one step() = one executed batch: in-flight token counts are exact
        "disable_log_stats": True,
        "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16]},
    }
    summary: dict[str, Any] = {"engines": {}, "checks": {}, "complete": False}

    def save(partial: dict[str, Any] | None = None) -> None:
        if partial is not None:
            summary.update(partial)
        (out_dir / "vllm_switch.json").write_text(json.dumps(summary, indent=2, default=str))
        if checkpoint is not None:
            checkpoint(summary)

    engines: dict[int, EngineHandle] = {}
    with tempfile.TemporaryDirectory(prefix="nitsum-vllm-") as tmp:
        write_model_dir(spec, Path(tmp) / "model")
        t0 = time.perf_counter()
        stores = [ResidentWeightStore.dummy(spec, seed, torch.device("cuda", g), torch.bfloat16) for g in range(world)]
        torch.cuda.synchronize()
        handles = str(Path(tmp) / "store_handles.json")
        publish_store(stores, handles)
        summary["store_build_s"] = time.perf_counter() - t0
        log(f"resident stores: {world} x {stores[0].nbytes / 2**30:.1f} GiB in {summary['store_build_s']:.1f} s")
        budget_gib = gpu_memory_utilization * torch.cuda.mem_get_info(0)[1] / 2**30
        try:
            for g in groups:
                e = EngineHandle(f"tp{len(g)}", g, str(Path(tmp) / "model"), llm_kwargs)
                engines[len(g)] = e
                summary["engines"][e.name] = _start_engine(e, spec, handles, start_timeout_s, log)
                save()
            save(run_scenario(engines, spec, tolerance, log, budget_gib, checkpoint=save))
            summary["complete"] = True
        finally:
            for e in engines.values():
                e.close()
            release_resident_store(stores)
            save()
    return summary


def _start_engine(e: EngineHandle, spec: ModelSpec, handles: str, timeout_s: float, log: Any) -> dict[str, Any]:
    """Start ``e``, attach the resident store, fill and cross-check its weights, put it to sleep."""
    info = e.start(timeout_s)
    e.call("rpc", 60, method="nitsum_attach_store", args=(spec.model_dump_json(), handles))
    fill = e.call("rpc", 60, method="nitsum_fill_weights")
    check = e.call("rpc", 150, method="nitsum_check_fill")
    kv_info = e.call("rpc", 60, method="nitsum_kv_info")
    sleep_s = e.call("sleep", 60)
    log(
        f"engine {e.name} started in {info.start_s:.1f} s; refill vs vLLM loaders: "
        f"{sum(len(c['mismatched']) for c in check)} mismatched of {sum(c['checked'] for c in check)}; "
        f"KV cache {kv_info[0]}"
    )
    return {
        "start_s": info.start_s,
        "first_fill": fill,
        "check_fill": check,
        "kv_info": kv_info,
        "first_sleep_s": sleep_s,
    }
