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

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.vllm_scenario import run_scenario
from nitsum_runtime.watchdog import process_tree
from nitsum_runtime.weights import ResidentWeightStore
from nitsum_runtime.worker_ext import publish_store


class EngineHandle:
    """One vLLM engine process driven over a pipe (:func:`~nitsum_runtime.vllm_process.engine_process`).

    Every command carries a deadline that the engine's watchdog enforces (an overdue command, or one engine
    step, is answered with the engine's state and where it blocks); this side waits ``grace_s`` longer and
    then reports the process tree. :meth:`send` / :meth:`wait` let a command run while another engine works
    (the old engine's sleep during the new one's first step). :meth:`close` kills the process group."""

    def __init__(
        self, name: str, gpu_ids: tuple[int, ...], model_dir: str, llm_kwargs: dict[str, Any], grace_s: float = 20.0
    ) -> None:
        self.name, self.gpu_ids, self.model_dir, self.llm_kwargs = name, gpu_ids, model_dir, llm_kwargs
        self.grace_s = grace_s
        self.proc: Any = None
        self.conn: Any = None
        self._pending: tuple[str, float] | None = None

    def start(self, timeout_s: float) -> dict[str, Any]:
        from nitsum_runtime.vllm_process import engine_process

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=engine_process, args=(child, list(self.gpu_ids), self.model_dir, self.llm_kwargs)
        )
        self.proc.start()
        return self._answer(timeout_s, "start")

    def send(self, name: str, timeout_s: float = 120.0, **kwargs: Any) -> None:
        """Start command ``name`` (its watchdog deadline: ``timeout_s``); collect the answer with :meth:`wait`."""
        if self._pending is not None:
            raise RuntimeError(f"engine {self.name}: {self._pending[0]!r} is still running; wait() for it first")
        self.conn.send((name, kwargs, timeout_s))
        self._pending = (name, timeout_s)

    def wait(self) -> Any:
        """Answer of the command started by :meth:`send`."""
        if self._pending is None:
            raise RuntimeError(f"engine {self.name}: no command is running")
        name, timeout_s = self._pending
        self._pending = None
        return self._answer(timeout_s + self.grace_s, name)

    def call(self, name: str, timeout_s: float = 120.0, **kwargs: Any) -> Any:
        """Run command ``name`` and return its answer."""
        self.send(name, timeout_s, **kwargs)
        return self.wait()

    def _answer(self, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"engine {self.name} died during {what!r} (exit {self.proc.exitcode})")
            if time.monotonic() > deadline:
                tree = process_tree(self.proc.pid)
                raise TimeoutError(
                    f"engine {self.name}: {what!r} got no answer within {timeout_s:.0f} s, not even from its "
                    f"watchdog (process {self.proc.pid} alive; children: {tree})"
                )
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"engine {self.name}: {what!r} failed:\n{value}")
        return value

    def close(self) -> None:
        """Kill the engine's process group (engine, engine core, workers). No orderly shutdown: it can take
        minutes, and vLLM 0.26 unmaps the memory of an engine asleep at level 2 a second time when it frees
        it (``CuMemAllocator._python_free_callback`` skips that only on ROCm), printing "CUDA Error: invalid
        argument at cumem_allocator.cpp" per allocation; the driver frees everything when the processes end."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.join(timeout=30)
        self.proc = None


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
            del stores
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
        f"engine {e.name} started in {info['start_s']:.1f} s; refill vs vLLM loaders: "
        f"{sum(len(c['mismatched']) for c in check)} mismatched of {sum(c['checked'] for c in check)}; "
        f"KV cache {kv_info[0]}"
    )
    return {
        "start_s": info["start_s"],
        "first_fill": fill,
        "check_fill": check,
        "kv_info": kv_info,
        "first_sleep_s": sleep_s,
    }
