"""Benchmark (c): stock vLLM engines switching TP by weight reuse (no vLLM import in this process).

One vLLM engine per TP group (TP1 on GPU 0, TP2 on 0-1, TP4 on 0-3), each in its own process and session
(:func:`~nitsum_runtime.vllm_process.engine_process`), started once (CUDA graphs captured) and put to sleep
at level 2. This process holds the resident weight copy on every GPU and publishes CUDA IPC handles; a switch
is ``sleep(2)`` of the source, ``wake_up(weights)`` + ``collective_rpc("nitsum_fill_weights")`` +
``wake_up(kv_cache)`` of the target. Requests in flight are re-prefilled on the target (prompt + tokens so
far); KV migration into vLLM needs a KV connector (not done here). Checks: the refill equals vLLM's own
loaders bit for bit; TP1 probes before and after the round trip are identical; other TPs' top-k
log-probabilities against teacher-forced TP1 scoring; every in-flight request gets all its tokens once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.weights import ResidentWeightStore
from nitsum_runtime.worker_ext import publish_store


class EngineHandle:
    """One vLLM engine process driven over a pipe, with timeouts; killed by process group on close."""

    def __init__(self, name: str, gpu_ids: tuple[int, ...], model_dir: str, llm_kwargs: dict[str, Any]) -> None:
        self.name, self.gpu_ids, self.model_dir, self.llm_kwargs = name, gpu_ids, model_dir, llm_kwargs
        self.proc: Any = None
        self.conn: Any = None

    def start(self, timeout_s: float) -> dict[str, Any]:
        from nitsum_runtime.vllm_process import engine_process

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=engine_process, args=(child, list(self.gpu_ids), self.model_dir, self.llm_kwargs)
        )
        self.proc.start()
        return self._answer(timeout_s, "start")

    def call(self, name: str, timeout_s: float = 180.0, **kwargs: Any) -> Any:
        self.conn.send((name, kwargs))
        return self._answer(timeout_s, name)

    def _answer(self, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"engine {self.name} died during {what!r} (exit {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine {self.name}: {what!r} got no answer within {timeout_s:.0f} s")
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"engine {self.name}: {what!r} failed:\n{value}")
        return value

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            if self.proc.is_alive():
                self.conn.send(("stop", {}))
                self.proc.join(timeout=20)
        if self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.join(timeout=10)


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


def _prompts(spec: ModelSpec, n: int, length: int, salt: int) -> list[list[int]]:
    return [[(salt + 31 * i + 17 * j) % spec.vocab_size for j in range(length + i)] for i in range(n)]


def _max_sorted_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for x, y in zip(sorted(a[1], reverse=True), sorted(b[1], reverse=True), strict=True))


class _Switcher:
    """Switches between engines and keeps the in-flight requests' ledger (tokens per request, all engines)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.rows: list[dict[str, Any]] = []
        self.tokens: dict[str, list[int]] = {}
        self.prompts: dict[str, list[int]] = {}
        self.max_tokens: dict[str, int] = {}

    def wake(self, e: EngineHandle) -> dict[str, float]:
        t = {"wake_weights_s": e.call("wake_weights")}
        a = time.perf_counter()
        fill = e.call("rpc", method="nitsum_fill_weights")
        t["fill_s"] = time.perf_counter() - a
        t["fill_bytes"] = sum(r["bytes_copied"] for r in fill)
        t["wake_kv_s"] = e.call("wake_kv")
        return t

    def add_all(self, e: EngineHandle) -> None:
        for r, prompt in self.prompts.items():
            left = self.max_tokens[r] - len(self.tokens[r])
            if left > 0:
                e.call("add", request_id=r, prompt=prompt + self.tokens[r], max_tokens=left)

    def harvest(self, e: EngineHandle) -> int:
        """Stop every request on ``e``, keep the tokens it generated; returns how many are unfinished."""
        partial = e.call("abort", request_ids=list(self.prompts))
        unfinished = 0
        for r, toks in partial.items():
            self.tokens[r] += toks
            unfinished += len(self.tokens[r]) < self.max_tokens[r]
        return unfinished

    def switch(self, src: EngineHandle, dst: EngineHandle, label: str) -> None:
        t0 = time.perf_counter()
        in_flight = self.harvest(src)
        sleep_s = src.call("sleep")
        w = self.wake(dst)
        resumed = time.perf_counter()
        self.add_all(dst)
        dst.call("step", n=1)
        first_token_s = time.perf_counter() - resumed
        row = {
            "switch": label,
            "in_flight": in_flight,
            "sleep_s": sleep_s,
            **w,
            "pause_to_resume_s": resumed - t0,
            "reprefill_first_token_s": first_token_s,
        }
        self.rows.append(row)
        self.log(
            f"  vLLM {label:<10} pause->resume {row['pause_to_resume_s'] * 1e3:8.1f} ms (sleep "
            f"{sleep_s * 1e3:.1f}, wake weights {w['wake_weights_s'] * 1e3:.1f}, "
            f"fill {w['fill_s'] * 1e3:.1f}, "
            f"wake KV {w['wake_kv_s'] * 1e3:.1f}); re-prefill to first token {first_token_s * 1e3:.1f} ms"
        )


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
) -> dict[str, Any]:
    """Run benchmark (c) (see the module docstring); the summary is also written to ``vllm_switch.json``."""
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
    summary: dict[str, Any] = {"engines": {}, "checks": {}}
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
        try:
            for g in groups:
                e = EngineHandle(f"tp{len(g)}", g, str(Path(tmp) / "model"), llm_kwargs)
                engines[len(g)] = e
                info = e.start(start_timeout_s)
                e.call("rpc", method="nitsum_attach_store", args=(spec.model_dump_json(), handles))
                fill = e.call("rpc", method="nitsum_fill_weights")
                check = e.call("rpc", method="nitsum_check_fill", timeout_s=300)
                kv_info = e.call("rpc", method="nitsum_kv_info")
                sleep_s = e.call("sleep")
                summary["engines"][e.name] = {
                    "start_s": info["start_s"],
                    "first_fill": fill,
                    "check_fill": check,
                    "kv_info": kv_info,
                    "first_sleep_s": sleep_s,
                }
                log(
                    f"engine {e.name} started in {info['start_s']:.1f} s; refill vs vLLM loaders: "
                    f"{sum(len(c['mismatched']) for c in check)} mismatched of "
                    f"{sum(c['checked'] for c in check)}; "
                    f"KV cache {kv_info[0]}"
                )
            summary.update(_scenario(engines, spec, tolerance, log))
        finally:
            for e in engines.values():
                e.close()
            del stores
    (out_dir / "vllm_switch.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _scenario(engines: dict[int, EngineHandle], spec: ModelSpec, tolerance: float, log: Any) -> dict[str, Any]:
    sw = _Switcher(log)
    order = [tp for tp in (1, 2, 4, 1) if tp in engines]
    probes = _prompts(spec, 4, 48, salt=5)
    out: dict[str, Any] = {}
    first = engines[order[0]]
    w = sw.wake(first)
    sw.rows.append(
        {
            "switch": "start",
            "in_flight": 0,
            "sleep_s": 0.0,
            **w,
            "pause_to_resume_s": 0.0,
            "reprefill_first_token_s": 0.0,
        }
    )
    probe_out = {"tp1-before": first.call("generate", prompts=probes, max_tokens=16, k=5, prompt_logprobs=False)}
    for i, p in enumerate(_prompts(spec, 3, 96, salt=11)):
        r = f"live{i}"
        sw.prompts[r], sw.tokens[r], sw.max_tokens[r] = p, [], 40
    sw.add_all(first)
    first.call("step", n=8)
    for a, b in itertools.pairwise(order):
        sw.switch(engines[a], engines[b], f"tp{a}->tp{b}")
        engines[b].call("step", n=8)
        if b != 1:  # LLM.generate would also run the live requests: take them out, probe, put them back
            sw.harvest(engines[b])
            probe_out[f"tp{b}"] = engines[b].call("generate", prompts=probes, max_tokens=16, k=5, prompt_logprobs=False)
            sw.add_all(engines[b])
    last = engines[order[-1]]
    last.call("step", n=64)
    sw.harvest(last)
    probe_out["tp1-after"] = last.call("generate", prompts=probes, max_tokens=16, k=5, prompt_logprobs=False)
    out["switches"] = sw.rows
    out["checks"] = {
        "tp1_probes_bit_identical": probe_out["tp1-before"] == probe_out["tp1-after"],
        "in_flight_complete": {r: len(t) for r, t in sw.tokens.items()},
        "no_request_lost": all(len(t) == sw.max_tokens[r] for r, t in sw.tokens.items()),
    }
    for name, outs in probe_out.items():
        if not name.startswith("tp1"):
            diff, agree = _score(last, probes, outs)
            out["checks"][f"{name}_max_logprob_diff"] = diff
            out["checks"][f"{name}_greedy_agreement"] = agree
            out["checks"][f"{name}_within_tolerance"] = diff <= tolerance
    out["checks"]["tolerance"] = tolerance
    log(f"vLLM checks: {out['checks']}")
    return out


def _score(tp1: EngineHandle, probes: list[list[int]], outs: list[dict[str, Any]]) -> tuple[float, float]:
    """Teacher-forced TP1 scoring of another TP's probe outputs: max sorted top-k difference, agreement."""
    scored = tp1.call(
        "generate",
        prompts=[p + o["token_ids"][:-1] for p, o in zip(probes, outs, strict=True)],
        max_tokens=1,
        k=5,
        prompt_logprobs=True,
    )
    diff, agree, total = 0.0, 0, 0
    for p, o, s in zip(probes, outs, scored, strict=True):
        rows = s["prompt_top"] + [s["top"][0]]
        for i, top in enumerate(o["top"]):
            ref = rows[len(p) - 1 + i]
            diff = max(diff, _max_sorted_diff(top, ref))
            agree += o["token_ids"][i] == ref[0][0]
            total += 1
    return diff, agree / max(1, total)
