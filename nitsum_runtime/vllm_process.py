"""A vLLM engine in its own process, driven over a pipe (vLLM itself is imported via ``vllm_engine``).

:func:`engine_process` runs one vLLM engine (``LLM`` with sleep mode and the Nitsum worker extension) in its
own process and session, serving commands from a pipe: attach the resident store, fill weights,
sleep(level 2), wake weights / KV, generate (greedy, top-k and prompt log-probabilities), and step-by-step
requests (add, step, abort) for requests in flight across a switch. vLLM is imported inside the process only.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from nitsum_runtime.procs import watch_parent


def _top(logprobs: dict[int, Any] | None, k: int) -> list[list[float]]:
    """``[[token ids...], [logprobs...]]`` of the k most likely entries of one vLLM logprob dict."""
    if not logprobs:
        return [[], []]
    items = sorted(logprobs.items(), key=lambda kv: -kv[1].logprob)[:k]
    return [[int(t) for t, _ in items], [float(lp.logprob) for _, lp in items]]


class _Engine:
    def __init__(self, llm: Any, sampling_cls: Any) -> None:
        self.llm, self.sp = llm, sampling_cls
        self.partial: dict[str, list[int]] = {}
        self.external: dict[str, str] = {}

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

    def step(self, n: int) -> dict[str, Any]:
        finished = []
        for _ in range(n):
            for out in self.llm.llm_engine.step():
                rid = self.external.get(out.request_id, out.request_id)
                self.partial[rid] = list(out.outputs[0].token_ids)
                if out.finished:
                    finished.append(rid)
        return {"tokens": {r: list(t) for r, t in self.partial.items()}, "finished": finished}

    def abort(self, request_ids: list[str]) -> dict[str, list[int]]:
        """Stop requests (finished ones too) and hand back the tokens each generated on this engine."""
        known = [r for r in request_ids if r in self.partial]
        if known:
            self.llm.llm_engine.abort_request(known)
        return {r: self.partial.pop(r) for r in known}


def engine_process(conn: Any, gpu_ids: list[int], model_dir: str, llm_kwargs: dict[str, Any]) -> None:
    """Entry of an engine process: build the ``LLM`` on ``gpu_ids`` and serve ``(command, kwargs)`` pairs
    from ``conn`` until ``stop``; every answer is ``(ok, value or traceback)``."""
    os.setsid()
    watch_parent()
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
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
        eng = _Engine(llm, SamplingParams)
        conn.send((True, {"start_s": time.perf_counter() - t0}))
    except BaseException:
        conn.send((False, traceback.format_exc()))
        return
    commands = {
        "rpc": eng.rpc,
        "sleep": lambda: eng.timed(llm.sleep, level=2),
        "wake_weights": lambda: eng.timed(llm.wake_up, tags=["weights"]),
        "wake_kv": lambda: eng.timed(llm.wake_up, tags=["kv_cache"]),
        "generate": eng.generate,
        "add": eng.add,
        "step": eng.step,
        "abort": eng.abort,
    }
    while True:
        name, kwargs = conn.recv()
        if name == "stop":
            try:  # end vLLM's engine-core and worker processes before this one exits
                llm.llm_engine.engine_core.shutdown()
            finally:
                conn.send((True, None))
            break
        try:
            conn.send((True, commands[name](**kwargs)))
        except BaseException:
            conn.send((False, traceback.format_exc()))
