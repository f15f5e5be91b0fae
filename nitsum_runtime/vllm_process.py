"""A vLLM engine in its own process, driven over a pipe (vLLM itself is imported via ``vllm_engine``).

:func:`engine_process` runs one vLLM engine (``LLM`` with sleep mode and the Nitsum worker extension) in its
own process and session, serving commands from a pipe: attach the resident store, fill weights,
sleep(level 2), wake weights / KV, generate (greedy, top-k and prompt log-probabilities), and step-by-step
requests (add, step, abort) for requests in flight across a switch. vLLM is imported inside the process only.

Stepping: vLLM 0.26's ``LLMEngine.step()`` (``v1/engine/llm_engine.py``) blocks in
``SyncMPClient.get_output()`` until the engine core sends outputs, and an engine core without requests sends
none (``EngineCore.step`` returns ``{}``; ``run_busy_loop`` then waits for input): a step on an engine whose
requests have all finished waits forever. :func:`run_steps` stops as soon as nothing is unfinished, as
``LLM._run_engine`` does. Every command runs under the watchdog of :mod:`.watchdog` (each engine step has
its own deadline), which answers with the engine's state and the stuck thread's stack instead of silence.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from nitsum_runtime.procs import watch_parent
from nitsum_runtime.watchdog import Progress, process_tree, serve_commands


def _top(logprobs: dict[int, Any] | None, k: int) -> list[list[float]]:
    """``[[token ids...], [logprobs...]]`` of the k most likely entries of one vLLM logprob dict."""
    if not logprobs:
        return [[], []]
    items = sorted(logprobs.items(), key=lambda kv: -kv[1].logprob)[:k]
    return [[int(t) for t, _ in items], [float(lp.logprob) for _, lp in items]]


def run_steps(
    step: Callable[[], list[Any]],
    has_unfinished: Callable[[], bool],
    n: int,
    progress: Progress,
    step_timeout_s: float,
) -> tuple[int, list[Any]]:
    """Up to ``n`` engine steps, stopping when no request is unfinished (a step then would wait forever);
    each step is one watchdog unit of ``step_timeout_s``. Returns (steps run, their outputs)."""
    outputs: list[Any] = []
    for k in range(n):
        if not has_unfinished():
            return k, outputs
        progress.begin(f"step {k + 1} of {n}", step_timeout_s)
        outputs += step()
    return n, outputs


class _Engine:
    def __init__(self, llm: Any, sampling_cls: Any, progress: Progress) -> None:
        self.llm, self.sp, self.progress = llm, sampling_cls, progress
        self.partial: dict[str, list[int]] = {}
        self.external: dict[str, str] = {}
        self.memory = "awake"  # what sleep/wake left resident: awake | asleep | weights (KV still asleep)
        self.steps_run = 0

    def describe(self) -> dict[str, Any]:
        """State for watchdog reports: read from Python objects only (the engine may be stuck)."""
        le = self.llm.llm_engine
        resources = getattr(le.engine_core, "resources", None)
        return {
            "memory": self.memory,
            "steps_run": self.steps_run,
            "unfinished_in_output_processor": le.output_processor.get_num_unfinished_requests(),
            "tokens_per_request": {r: len(t) for r, t in self.partial.items()},
            "engine_core_dead": getattr(resources, "engine_dead", None),
        }

    def sleep(self) -> float:
        t = self.timed(self.llm.sleep, level=2)
        self.memory = "asleep"
        return t

    def wake(self, tags: list[str]) -> float:
        t = self.timed(self.llm.wake_up, tags=tags)
        self.memory = "awake" if "kv_cache" in tags else "weights"
        return t

    def rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return self.llm.collective_rpc(method, args=args)

    def timed(self, fn: Any, *args: Any, **kwargs: Any) -> float:
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        return time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], max_tokens: int, k: int, prompt_logprobs: bool) -> list[Any]:
        params = self.sp(
            temperature=0.0,
            max_tokens=max_tokens,
            logprobs=k,
            detokenize=False,
            prompt_logprobs=k if prompt_logprobs else None,
            ignore_eos=True,
        )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            result.append(
                {
                    "token_ids": list(c.token_ids),
                    "top": [_top(lp, k) for lp in (c.logprobs or [])],
                    "prompt_top": [_top(lp, k) for lp in (o.prompt_logprobs or [])[1:]],
                }
            )
        return result

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = self.sp(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
        internal = self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        self.external[internal] = request_id
        self.partial[request_id] = []

    def step(self, n: int, step_timeout_s: float = 60.0) -> dict[str, Any]:
        """Up to ``n`` steps (fewer when every request finished); tokens so far of every request."""
        le = self.llm.llm_engine
        ran, outputs = run_steps(le.step, le.has_unfinished_requests, n, self.progress, step_timeout_s)
        self.steps_run += ran
        finished = []
        for out in outputs:
            rid = self.external.get(out.request_id, out.request_id)
            self.partial[rid] = list(out.outputs[0].token_ids)
            if out.finished:
                finished.append(rid)
        return {
            "tokens": {r: list(t) for r, t in self.partial.items()},
            "finished": finished,
            "steps": ran,
            "unfinished": bool(le.has_unfinished_requests()),
        }

    def abort(self, request_ids: list[str]) -> dict[str, list[int]]:
        """Stop requests (finished ones too) and hand back the tokens each generated on this engine."""
        known = [r for r in request_ids if r in self.partial]
        if known:
            self.llm.llm_engine.abort_request(known)
        return {r: self.partial.pop(r) for r in known}


def engine_process(conn: Any, gpu_ids: list[int], model_dir: str, llm_kwargs: dict[str, Any]) -> None:
    """Entry of an engine process: build the ``LLM`` on ``gpu_ids`` and serve ``(command, kwargs, deadline_s)``
    from ``conn`` until ``stop`` (:func:`~nitsum_runtime.watchdog.serve_commands`); every answer is
    ``(ok, value or traceback or watchdog report)``."""
    os.setsid()
    watch_parent()
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
    progress = Progress()
    try:
        t0 = time.perf_counter()
        from nitsum_runtime.vllm_engine import llm_classes

        LLM, SamplingParams = llm_classes()

        llm = LLM(
            model=model_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            tensor_parallel_size=len(gpu_ids),
            enable_sleep_mode=True,
            worker_extension_cls="nitsum_runtime.worker_ext.NitsumWorkerExtension",
            **llm_kwargs,
        )
        eng = _Engine(llm, SamplingParams, progress)
        conn.send((True, {"start_s": time.perf_counter() - t0, "pid": os.getpid(), "children": process_tree()}))
    except BaseException:
        conn.send((False, traceback.format_exc()))
        return
    commands = {
        "rpc": eng.rpc,
        "sleep": eng.sleep,
        "wake_weights": lambda: eng.wake(["weights"]),
        "wake_kv": lambda: eng.wake(["kv_cache"]),
        "generate": eng.generate,
        "add": eng.add,
        "step": eng.step,
        "abort": eng.abort,
        "describe": eng.describe,
    }
    serve_commands(conn, commands, eng.describe, progress)
    try:  # "stop": end vLLM's engine-core and worker processes before this one exits
        llm.llm_engine.engine_core.shutdown()
    finally:
        conn.send((True, None))
