"""A vLLM engine in its own process, driven over a pipe (vLLM itself is imported via ``vllm_engine``).

:func:`engine_process` runs one vLLM engine (``LLM`` with sleep mode and the Nitsum worker extension) in its
own process and session, serving commands from a pipe: attach the resident store, fill weights,
sleep(level 2), wake weights / KV, generate (greedy, top-k and prompt log-probabilities), and step-by-step
requests (add, step, abort) for requests in flight across a switch, and, for the pool engine
(:class:`~nitsum_runtime.vllm_pool_engine.VllmEngine`), typed commands: ``add_many`` (all or nothing),
``step_events`` (new tokens with their top-k) and ``kv_blocks`` (where a request's KV lives). The command set is
:class:`~nitsum_runtime.vllm_protocol.EngineCommands`. vLLM is imported inside the process only.

Engine core in this process: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in ``env`` (the pool engine's setting)
vLLM runs its engine core in-process (``InprocClient``): one ``step()`` is exactly one scheduler iteration, an
engine nobody steps makes no progress (what *pause* means), and the scheduler can be read for ``kv_blocks``. With
vLLM's default (a separate engine-core process, benchmark (c)) the core's busy loop keeps stepping on its own
whenever requests are unfinished, and ``step()`` only collects its outputs.

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

from nitsum_runtime.composition import scheduled_of, step_counts
from nitsum_runtime.vllm_protocol import (
    AddSpec,
    EngineStarted,
    KvBlocks,
    StepAnswer,
    StepRow,
    command_table,
    new_tokens,
    top_of,
)
from nitsum_runtime.watchdog import Progress, process_tree, serve_commands, watch_parent


def _top(logprobs: dict[int, Any] | None, k: int) -> list[list[float]]:
    """``[[token ids...], [logprobs...]]`` of the k most likely entries of one vLLM logprob dict."""
    top = top_of(logprobs, k)
    return [list(top.token_ids), list(top.logprobs)]


def run_steps(
    step: Callable[[], list[Any]],
    has_unfinished: Callable[[], bool],
    n: int,
    progress: Progress,
    step_timeout_s: float,
    after_step: Callable[[float], None] | None = None,
) -> tuple[int, list[Any]]:
    """Up to ``n`` engine steps, stopping when no request is unfinished (a step then would wait forever);
    each step is one watchdog unit of ``step_timeout_s``; ``after_step`` gets each step's seconds. Returns (steps
    run, their outputs)."""
    outputs: list[Any] = []
    for k in range(n):
        if not has_unfinished():
            return k, outputs
        progress.begin(f"step {k + 1} of {n}", step_timeout_s)
        t0 = time.perf_counter()
        outputs += step()
        if after_step is not None:
            after_step(time.perf_counter() - t0)
    return n, outputs


class _Engine:
    def __init__(self, llm: Any, sampling_cls: Any, progress: Progress) -> None:
        self.llm, self.sp, self.progress = llm, sampling_cls, progress
        self.partial: dict[str, list[int]] = {}
        self.external: dict[str, str] = {}
        self.internal: dict[str, str] = {}
        self.top_k: dict[str, int] = {}  # requests added by add_many: k of their log-probabilities
        self.reported: dict[str, int] = {}  # tokens step_events already handed out
        self.memory = "awake"  # what sleep/wake left resident: awake | asleep | weights (KV still asleep)
        self.steps_run = 0
        self.last_run_s = 0.0  # seconds inside the engine's step() calls of the latest command
        sched = self._scheduler()
        self.start_budget = None if sched is None else int(sched.max_num_scheduled_tokens)  # what buffers hold
        self.prompt_len: dict[str, int] = {}  # internal id -> prompt tokens, to tell prefill from decode
        self.step_log: list[StepRow] = []  # the latest command's steps: seconds and composition
        self.last_schedule: Any = None
        if sched is not None and hasattr(sched, "schedule"):
            original = sched.schedule

            def recording_schedule(*args: Any, **kwargs: Any) -> Any:
                self.last_schedule = original(*args, **kwargs)
                return self.last_schedule

            sched.schedule = recording_schedule

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
        self._add(request_id, prompt, params)

    def _add(self, request_id: str, prompt: list[int], params: Any) -> None:
        internal = self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        self.prompt_len[internal] = len(prompt)
        self.external[internal] = request_id
        self.internal[request_id] = internal
        self.partial[request_id] = []

    def add_many(self, requests: list[AddSpec]) -> None:
        """Add requests with top-k log-probabilities; on a failure abort the ones added, then raise."""
        added: list[str] = []
        try:
            for r in requests:
                if r.request_id in self.partial:
                    raise ValueError(f"request {r.request_id!r} is already in this engine")
                params = self.sp(
                    temperature=0.0,
                    max_tokens=r.max_tokens,
                    logprobs=r.top_k or None,
                    prompt_logprobs=r.top_k if r.prompt_logprobs and r.top_k else None,
                    detokenize=False,
                    ignore_eos=True,
                    **({"extra_args": {"kv_transfer_params": r.kv_transfer_params}} if r.kv_transfer_params else {}),
                )
                self._add(r.request_id, list(r.prompt_token_ids), params)
                self.top_k[r.request_id], self.reported[r.request_id] = r.top_k, 0
                added.append(r.request_id)
        except BaseException:
            self.abort(added)
            raise

    def _run(self, n: int, step_timeout_s: float) -> tuple[int, list[Any], bool]:
        le = self.llm.llm_engine
        self.step_log = []
        t0 = time.perf_counter()
        ran, outputs = run_steps(le.step, le.has_unfinished_requests, n, self.progress, step_timeout_s, self._logged)
        self.last_run_s = time.perf_counter() - t0
        self.steps_run += ran
        return ran, outputs, bool(le.has_unfinished_requests())

    def _logged(self, seconds: float) -> None:
        """Log one step: its seconds and what the scheduler ran (nothing when the scheduler is not readable)."""
        if self.last_schedule is not None:
            self.step_log.append((seconds, *step_counts(scheduled_of(self.last_schedule), self.prompt_len)))
            self.last_schedule = None

    def step(self, n: int, step_timeout_s: float = 60.0) -> dict[str, Any]:
        """Up to ``n`` steps (fewer when every request finished); tokens so far of every request."""
        ran, outputs, unfinished = self._run(n, step_timeout_s)
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
            "unfinished": unfinished,
        }

    def step_events(self, n: int, step_timeout_s: float) -> StepAnswer:
        """Up to ``n`` steps; for requests added by :meth:`add_many`, the tokens not handed out yet."""
        ran, outputs, unfinished = self._run(n, step_timeout_s)
        latest: dict[str, Any] = {}
        for out in outputs:  # cumulative outputs: the last one of a request holds everything
            latest[self.external.get(out.request_id, out.request_id)] = out
        events = []
        for rid, out in latest.items():
            c = out.outputs[0]
            self.partial[rid] = list(c.token_ids)
            if rid not in self.top_k:
                continue
            ev = new_tokens(
                rid, c.token_ids, c.logprobs, out.prompt_logprobs, self.reported[rid], self.top_k[rid], out.finished
            )
            self.reported[rid] += len(ev.token_ids)
            if ev.token_ids or ev.finished:
                events.append(ev)
            if out.finished:
                self._forget(rid)
        return StepAnswer(
            events=tuple(events),
            steps=ran,
            unfinished=unfinished,
            engine_s=self.last_run_s,
            step_log=tuple(self.step_log),
        )

    def _forget(self, rid: str) -> list[int]:
        internal = self.internal.pop(rid, "")
        self.prompt_len.pop(internal, None)
        self.external.pop(internal, None)
        self.top_k.pop(rid, None)
        self.reported.pop(rid, None)
        return self.partial.pop(rid)

    def kv_blocks(self, request_ids: list[str]) -> list[KvBlocks]:
        """Block ids and computed tokens of the requests with KV, read from the in-process scheduler (empty
        with a separate engine-core process)."""
        sched = self._scheduler()
        if sched is None:
            return []
        out = []
        for rid in request_ids:
            req = sched.requests.get(self.internal.get(rid, ""))
            if req is None or not req.num_computed_tokens:
                continue
            blocks = sched.kv_cache_manager.get_block_ids(req.request_id)[0]
            out.append(KvBlocks(request_id=rid, block_ids=tuple(blocks), num_computed_tokens=req.num_computed_tokens))
        return out

    def set_step_budget(self, tokens: int | None) -> int:
        """Cap the tokens one step schedules at ``tokens`` (``None``: the budget the engine started with, which is
        also the most it takes: its buffers and CUDA graphs are sized for it); returns the budget now in force."""
        sched = self._scheduler()
        if sched is None or self.start_budget is None:
            raise RuntimeError("the engine core runs in another process: its step budget cannot be changed")
        if tokens is not None and tokens < 1:
            raise ValueError(f"step budget {tokens} must be >= 1 or None")
        budget = self.start_budget if tokens is None else min(int(tokens), self.start_budget)
        sched.max_num_scheduled_tokens = budget
        return budget

    def _scheduler(self) -> Any:
        core = getattr(self.llm.llm_engine.engine_core, "engine_core", None)  # InprocClient -> EngineCore
        return getattr(core, "scheduler", None)

    def started(self, start_s: float) -> EngineStarted:
        cfg = self.llm.llm_engine.vllm_config
        return EngineStarted(
            start_s=start_s,
            pid=os.getpid(),
            children=tuple(process_tree()),
            max_model_len=cfg.model_config.max_model_len,
            block_size=cfg.cache_config.block_size,
            num_gpu_blocks=cfg.cache_config.num_gpu_blocks or 0,
            kv_blocks_readable=self._scheduler() is not None,
        )

    def abort(self, request_ids: list[str]) -> dict[str, list[int]]:
        """Stop requests (finished ones too) and hand back the tokens each generated on this engine."""
        known = [r for r in request_ids if r in self.partial]
        if known:
            self.llm.llm_engine.abort_request(known)
        return {r: self._forget(r) for r in known}


def engine_process(
    conn: Any, gpu_ids: list[int], model_dir: str, llm_kwargs: dict[str, Any], env: dict[str, str] | None = None
) -> None:
    """Entry of an engine process: lead a new session, set ``env``, build the ``LLM`` on ``gpu_ids`` and serve
    it (:func:`serve_engine`)."""
    os.setsid()
    watch_parent()
    os.environ.update(env or {})
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))

    def build() -> tuple[Any, Any]:
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
        return llm, SamplingParams

    serve_engine(conn, build)


def serve_engine(conn: Any, build: Callable[[], tuple[Any, Any]]) -> None:
    """Build ``(LLM, SamplingParams)`` and serve ``(command, kwargs, deadline_s)`` from ``conn`` until ``stop``
    (:func:`~nitsum_runtime.watchdog.serve_commands`); every answer is ``(ok, value or traceback or watchdog
    report)``, the first one :class:`~nitsum_runtime.vllm_protocol.EngineStarted`. ``build`` makes a vLLM
    ``LLM`` here, or the CPU stand-in in :mod:`nitsum_runtime.toy_vllm`."""
    progress = Progress()
    try:
        t0 = time.perf_counter()
        llm, sampling_cls = build()
        eng = _Engine(llm, sampling_cls, progress)
        conn.send((True, eng.started(time.perf_counter() - t0)))
    except BaseException:
        conn.send((False, traceback.format_exc()))
        return
    serve_commands(conn, command_table(eng), eng.describe, progress)
    try:  # "stop": end vLLM's engine-core and worker processes before this one exits
        llm.llm_engine.engine_core.shutdown()
    finally:
        conn.send((True, None))
