"""A CPU stand-in for vLLM 0.26 behind the engine-process command loop, so that the pool engine's whole pipe
path runs in tests without a GPU.

:func:`toy_engine_process` is :func:`~nitsum_runtime.vllm_process.engine_process` with :class:`ToyLLM` in
place of ``vllm.LLM``: the same session and parent watch, the same command object
(``vllm_process._Engine``), the same command table and watchdog. ``ToyLLM`` offers the part of vLLM's surface
that ``_Engine`` uses, with vLLM's observable behaviour read from its 0.26 source: ``add_request`` returns an
internal id (the external one plus a suffix) and rejects out-of-vocabulary tokens and prompts over
``max_model_len``; outputs are cumulative (all tokens and log-probability dicts so far, objects with
``.logprob``; prompt log-probabilities start with None); ``abort_request`` takes external ids; the in-process
scheduler keys requests by internal id and hands out KV blocks of ``block_size`` tokens; sleep level 2 aborts
requests and discards weights and KV; a partly woken engine (weights only) schedules nothing; weights are
undefined after a wake until the worker extension's ``nitsum_fill_weights`` copies the resident store in.

The model is a deterministic function of the weights and the context (:func:`toy_top`), independent of TP and
batch, so a switched request must produce exactly the tokens of an unswitched one, and an engine whose refill
was skipped produces other tokens. ``collective_rpc("toy_fault", ...)`` arms a real failure: the process exits,
hangs or raises at the next call of a method (``wake_up``, ``sleep``, ``step``, ``add_request``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nitsum_runtime.vllm_process import serve_engine
from nitsum_runtime.watchdog import watch_parent


def toy_top(weights: int, context: Sequence[int], k: int, vocab: int) -> tuple[list[int], list[float]]:
    """Top-k next-token ids (distinct while ``vocab > 7 (k - 1)``) and strictly decreasing log-probabilities."""
    h = weights % 2_147_483_647
    for t in context:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    first = h % vocab
    return [(first + 7 * j) % vocab for j in range(k)], [-(0.5 + j + (h % 1000) / 1000.0) for j in range(k)]


def toy_tokens(weights: int, prompt: Sequence[int], n: int, vocab: int) -> list[int]:
    """The ``n`` greedy tokens the toy model generates after ``prompt``."""
    out: list[int] = []
    for _ in range(n):
        out.append(toy_top(weights, [*prompt, *out], 1, vocab)[0][0])
    return out


def write_toy_store(path: Path, seed: int) -> Path:
    """The toy's resident weight store: a seed, published in a file as the real store publishes IPC handles."""
    path.write_text(json.dumps({"toy_seed": seed}))
    return path


def _lp_dict(weights: int, context: Sequence[int], k: int, vocab: int, actual: int | None = None) -> dict[int, Any]:
    ids, lps = toy_top(weights, context, k, vocab)
    out = {i: SimpleNamespace(logprob=lp) for i, lp in zip(ids, lps, strict=True)}
    if actual is not None and actual not in out:  # vLLM adds the actual token to prompt log-probabilities
        out[actual] = SimpleNamespace(logprob=lps[-1] - 1.0)
    return out


def _prompt_lps(weights: int, prompt: Sequence[int], k: int, vocab: int) -> list[dict[int, Any] | None]:
    return [None] + [_lp_dict(weights, prompt[:i], k, vocab, prompt[i]) for i in range(1, len(prompt))]


@dataclass
class ToySamplingParams:
    """The fields of ``vllm.SamplingParams`` the engine process sets."""

    temperature: float = 1.0
    max_tokens: int = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    ignore_eos: bool = False
    extra_args: dict[str, Any] | None = None


@dataclass
class _Req:
    request_id: str  # internal id, as vLLM's scheduler keys it
    external: str
    prompt: list[int]
    params: ToySamplingParams
    output: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Any]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    blocks: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


class _KvManager:
    def __init__(self, scheduler: _Scheduler) -> None:
        self.scheduler = scheduler

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        req = self.scheduler.requests.get(request_id)
        return (list(req.blocks) if req else [],)


class _Scheduler:
    def __init__(self, num_blocks: int, budget: int) -> None:
        self.max_num_scheduled_tokens = budget  # read and set like vLLM's; the toy steps every request anyway
        self.requests: dict[str, _Req] = {}
        self.free = list(range(num_blocks))
        self.kv_cache_manager = _KvManager(self)

    def schedule(self) -> Any:
        """This step's plan in the shape of vLLM's ``SchedulerOutput`` (every request computes all its tokens not
        yet in its KV: the prompt at first, then one)."""
        new = [r for r in self.requests.values() if not r.num_computed_tokens]
        cached = [r for r in self.requests.values() if r.num_computed_tokens]
        return SimpleNamespace(
            num_scheduled_tokens={
                r.request_id: len(r.prompt) + len(r.output) - r.num_computed_tokens for r in self.requests.values()
            },
            scheduled_new_reqs=[SimpleNamespace(req_id=r.request_id, num_computed_tokens=0) for r in new],
            scheduled_cached_reqs=SimpleNamespace(
                req_ids=[r.request_id for r in cached], num_computed_tokens=[r.num_computed_tokens for r in cached]
            ),
        )


class ToyLLMEngine:
    """The ``llm_engine`` of :class:`ToyLLM` (in-process engine core)."""

    def __init__(self, llm: ToyLLM) -> None:
        self.llm = llm
        self.scheduler = _Scheduler(llm.num_gpu_blocks, llm.max_num_batched_tokens)
        self.engine_core = SimpleNamespace(engine_core=SimpleNamespace(scheduler=self.scheduler), shutdown=lambda: None)
        self.output_processor = SimpleNamespace(get_num_unfinished_requests=lambda: len(self.by_external))
        self.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=llm.max_model_len),
            cache_config=SimpleNamespace(block_size=llm.block_size, num_gpu_blocks=llm.num_gpu_blocks),
        )
        self.by_external: dict[str, _Req] = {}
        self.added = 0

    def add_request(self, request_id: str, prompt: dict[str, list[int]], params: ToySamplingParams) -> str:
        self.llm.fault_point("add_request")
        tokens = list(prompt["prompt_token_ids"])
        bad = [t for t in tokens if not 0 <= t < self.llm.vocab]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary")
        if len(tokens) > self.llm.max_model_len:
            raise ValueError(f"prompt of {len(tokens)} tokens is longer than max_model_len {self.llm.max_model_len}")
        self.added += 1
        req = _Req(f"{request_id}-{self.added:08x}", request_id, tokens, params)
        self.scheduler.requests[req.request_id] = req
        self.by_external[request_id] = req
        return req.request_id

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        for rid in request_ids:
            req = self.by_external.pop(rid, None)
            if req is not None:
                self._release(req)

    def _release(self, req: _Req) -> None:
        self.scheduler.requests.pop(req.request_id, None)
        self.scheduler.free += req.blocks
        req.blocks = []

    def has_unfinished_requests(self) -> bool:
        return bool(self.by_external)

    def step(self) -> list[Any]:
        """One scheduler iteration: every request whose KV fits gets its next token (prefill included)."""
        self.llm.fault_point("step")
        if self.llm.memory != "awake":
            return []  # the scheduler stays paused until weights and KV are both awake
        self.scheduler.schedule()  # what vLLM's engine core would ask its scheduler (and the engine process logs)
        outputs = []
        for req in list(self.scheduler.requests.values()):
            total = len(req.prompt) + len(req.output)
            need = -(-total // self.llm.block_size) - len(req.blocks)
            if need > len(self.scheduler.free):
                continue  # waits for blocks, as vLLM's scheduler would
            req.blocks += [self.scheduler.free.pop(0) for _ in range(max(0, need))]
            req.num_computed_tokens = total
            context = [*req.prompt, *req.output]
            if req.params.prompt_logprobs and req.prompt_logprobs is None:  # computed with the prefill
                req.prompt_logprobs = _prompt_lps(
                    self.llm.weights_value(), req.prompt, req.params.prompt_logprobs, self.llm.vocab
                )
            req.logprobs.append(_lp_dict(self.llm.weights_value(), context, req.params.logprobs or 1, self.llm.vocab))
            req.output.append(toy_top(self.llm.weights_value(), context, 1, self.llm.vocab)[0][0])
            finished = len(req.output) >= req.params.max_tokens
            outputs.append(self._output(req, finished))
            if finished:
                self.by_external.pop(req.external, None)
                self._release(req)
        return outputs

    def _output(self, req: _Req, finished: bool) -> Any:
        completion = SimpleNamespace(
            token_ids=list(req.output), logprobs=list(req.logprobs) if req.params.logprobs else None
        )
        return SimpleNamespace(
            request_id=req.external, outputs=[completion], finished=finished, prompt_logprobs=req.prompt_logprobs
        )


class ToyLLM:
    """The part of ``vllm.LLM`` the engine process uses, on CPU (module docstring)."""

    def __init__(self, model_dir: str, gpu_ids: Sequence[int], llm_kwargs: dict[str, Any]) -> None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.vocab = int(config["vocab_size"])
        self.layers = int(config["num_hidden_layers"])
        self.tp = len(gpu_ids)
        self.max_model_len = int(llm_kwargs.get("max_model_len", config["max_position_embeddings"]))
        self.block_size = int(llm_kwargs.get("block_size", 16))
        self.num_gpu_blocks = int(llm_kwargs.get("num_gpu_blocks_override") or 256)
        self.max_num_batched_tokens = int(llm_kwargs.get("max_num_batched_tokens") or 8192)
        self.dummy_seed = int(llm_kwargs.get("seed", 0))
        self.memory = "awake"
        self.weights: int | None = -1 - self.dummy_seed  # vLLM's dummy weights: not the resident store's
        self.store: int | None = None
        self.faults: dict[str, tuple[str, int]] = {}
        self.calls: list[tuple[str, float, float]] = []  # (what, wall-clock start, end) of sleeps and wakes
        self.sleep_s = float(os.environ.get("NITSUM_TOY_SLEEP_S", "0"))  # how long a sleep takes
        self.llm_engine = ToyLLMEngine(self)

    def weights_value(self) -> int:
        if self.weights is None:
            raise RuntimeError("toy engine: weights are asleep")
        return self.weights

    def fault_point(self, name: str) -> None:
        action, after = self.faults.get(name, ("", 0))
        if not action:
            return
        if after > 0:
            self.faults[name] = (action, after - 1)
            return
        del self.faults[name]
        if action == "exit":
            os._exit(17)  # a crash: no answer, no cleanup
        if action == "hang":
            time.sleep(3600)  # stuck in a call: the watchdog must report it
        raise RuntimeError(f"toy fault injected in {name}")

    def _log(self, name: str, started: float) -> None:
        self.calls.append((name, started, time.time()))

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        started = time.time()
        self.fault_point("sleep")
        if level != 2:
            raise ValueError("the toy engine models sleep level 2 only")
        for req in list(self.llm_engine.scheduler.requests.values()):  # mode "abort"
            self.llm_engine._release(req)
        time.sleep(self.sleep_s)
        self.memory, self.weights = "asleep", None
        self.llm_engine.scheduler.free = list(range(self.num_gpu_blocks))
        self._log("sleep", started)

    def wake_up(self, tags: list[str] | None = None) -> None:
        started = time.time()
        self.fault_point("wake_up")
        tags = tags or ["weights", "kv_cache"]
        if "weights" in tags:
            self.weights = -1 - self.dummy_seed  # undefined contents until refilled
            self.memory = "weights" if self.memory == "asleep" else "awake"
        if "kv_cache" in tags:
            if self.memory == "asleep":
                raise RuntimeError("toy engine: wake the weights before the KV cache")
            self.memory = "awake"
        self._log(f"wake_up {'+'.join(tags)}", started)

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        if method == "toy_fault":
            name, action, after = args
            self.faults[name] = (action, after)
            return [None] * self.tp
        if method == "toy_calls":
            return [list(self.calls)] * self.tp
        fn = getattr(self, f"_rpc_{method.removeprefix('nitsum_')}", None)
        if not method.startswith("nitsum_") or fn is None:
            raise AttributeError(f"toy worker has no method {method!r}")
        return [fn(rank, *args) for rank in range(self.tp)]

    def _rpc_attach_store(self, rank: int, spec_json: str, handles_path: str) -> dict[str, Any]:
        self.store = int(json.loads(Path(handles_path).read_text())["toy_seed"])
        return {"uuid": f"toy-gpu-rank{rank}", "store_bytes": 8}

    def _rpc_fill_weights(self, rank: int) -> dict[str, Any]:
        if self.store is None:
            raise RuntimeError("nitsum_attach_store must run before nitsum_fill_weights")
        if self.weights is None:
            raise RuntimeError("toy engine: cannot fill weights while they are asleep")
        self.weights = self.store
        return {"tp": self.tp, "rank": rank, "params": 1, "bytes_copied": 1000 * self.layers, "seconds": 1e-4}

    def _rpc_fill_mismatches(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "tp": self.tp, "mismatched": [] if self.weights == self.store else ["toy.weights"]}

    def _rpc_check_fill(self, rank: int) -> dict[str, Any]:
        return {**self._rpc_fill_mismatches(rank), "checked": 1}

    def _rpc_mem_info(self, rank: int) -> dict[str, Any]:
        """A GPU of ``NITSUM_TOY_GPU_BYTES`` (default 80e9) where this engine, awake, holds
        ``NITSUM_TOY_ENGINE_BYTES`` (default 10e9), and others hold the number in the file
        ``NITSUM_TOY_OTHERS_FILE`` names (read at every call; none: 0)."""
        total = int(float(os.environ.get("NITSUM_TOY_GPU_BYTES", "80e9")))
        mine = int(float(os.environ.get("NITSUM_TOY_ENGINE_BYTES", "10e9"))) if self.memory != "asleep" else 0
        others_file = Path(os.environ.get("NITSUM_TOY_OTHERS_FILE", "/nonexistent"))
        others = int(float(others_file.read_text())) if others_file.is_file() else 0
        return {"rank": rank, "free_bytes": max(0, total - mine - others), "total_bytes": total}

    def _rpc_kv_info(self, rank: int) -> dict[str, Any]:
        return {"layers": self.layers, "block_size": self.block_size, "num_gpu_blocks": self.num_gpu_blocks}

    def generate(self, prompts: list[dict[str, list[int]]], params: ToySamplingParams, use_tqdm: bool) -> list[Any]:
        outs = []
        for p in prompts:
            req = _Req("gen", "gen", list(p["prompt_token_ids"]), params)
            w, k = self.weights_value(), params.logprobs or 1
            for _ in range(params.max_tokens):
                context = [*req.prompt, *req.output]
                req.logprobs.append(_lp_dict(w, context, k, self.vocab))
                req.output.append(toy_top(w, context, 1, self.vocab)[0][0])
            if params.prompt_logprobs:
                req.prompt_logprobs = _prompt_lps(w, req.prompt, params.prompt_logprobs, self.vocab)
            outs.append(self.llm_engine._output(req, True))
        return outs


def toy_engine_process(
    conn: Any, gpu_ids: list[int], model_dir: str, llm_kwargs: dict[str, Any], env: dict[str, str] | None = None
) -> None:
    """Entry of a toy engine process (same signature and protocol as :func:`~nitsum_runtime.vllm_process.
    engine_process`)."""
    os.setsid()
    watch_parent()
    os.environ.update(env or {})
    serve_engine(conn, lambda: (ToyLLM(model_dir, gpu_ids, llm_kwargs), ToySamplingParams))
