"""The command protocol between a controller and an engine process (a vLLM engine, or its CPU stand-in).

The controller sends ``(command, kwargs, deadline_s)`` over a pipe (:class:`~nitsum_runtime.engine_handle.
EngineHandle`); the engine process serves it with :func:`~nitsum_runtime.watchdog.serve_commands` and answers
``(ok, value)``. :class:`EngineCommands` is the command set, the same on both engine sides
(:func:`nitsum_runtime.vllm_process.engine_process` runs vLLM, :func:`nitsum_runtime.toy_engine.
toy_engine_process` a deterministic toy model on CPU for the tests); :func:`command_table` turns one into the
name -> callable table the command loop serves, so the two sides cannot drift apart. Values crossing the pipe
that the pool engine reads are the pydantic models below.

``new_tokens`` converts vLLM's cumulative outputs (every step's ``RequestOutput`` carries all tokens and
log-probabilities so far) into the tokens not reported yet; it takes plain values, so the toy engine runs the
same conversion and the CPU tests cover it. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_runtime.engine import TopK


class EngineStarted(Frozen):
    """Answer of an engine process once its engine is built."""

    start_s: float = Field(ge=0)
    """Seconds to build the engine (vLLM: ``LLM(...)`` with CUDA graphs)."""
    pid: int
    """The engine process (leader of its own session: kill its group to end everything under it)."""
    children: tuple[dict[str, Any], ...] = ()
    """Processes under it right after the start (vLLM workers)."""
    max_model_len: int = Field(ge=1)
    """Longest sequence (prompt + output) the engine accepts."""
    block_size: int = Field(ge=1)
    """Tokens per KV-cache block."""
    num_gpu_blocks: int = Field(ge=0)
    """KV-cache blocks per GPU."""
    kv_blocks_readable: bool
    """Whether :meth:`EngineCommands.kv_blocks` can read the scheduler (engine core in this process)."""


class AddSpec(Frozen):
    """A request to add, as the engine process needs it."""

    request_id: str = Field(min_length=1)
    """External id (vLLM adds its own suffix internally)."""
    prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    """Prompt (for a re-prefill: the original prompt followed by the tokens generated so far)."""
    max_tokens: int = Field(ge=1)
    """Tokens still to generate."""
    top_k: int = Field(ge=0)
    """Log-probabilities returned per generated token (0: none; vLLM then computes none)."""
    prompt_logprobs: bool = False
    """Also return the top-k of every prompt position (with the first new token)."""
    kv_transfer_params: dict[str, Any] | None = None
    """Passed to vLLM as ``SamplingParams.extra_args["kv_transfer_params"]`` (a KV import ticket of
    :mod:`nitsum_runtime.kv_import`: the engine's KV connector reports those tokens as computed)."""


class NewTokens(Frozen):
    """Tokens of one request produced since the previous answer."""

    request_id: str
    """External id."""
    token_ids: tuple[int, ...]
    """New tokens, in order."""
    top: tuple[TopK, ...]
    """Top-k of each new token (same length as ``token_ids``)."""
    finished: bool
    """Whether the request finished with the last of them."""
    prompt_top: tuple[TopK, ...] = ()
    """With prompt log-probabilities: top-k after each prompt position but the last (first answer only)."""


StepRow = tuple[float, int, int, int, int, int]
"""One engine step: its seconds inside ``step()``, then ``(num_prefill_seqs, prefill_tokens,
prefill_attention_pairs, num_decode_seqs, decode_context_tokens)`` (the latency model's terms)."""


class StepAnswer(Frozen):
    """Answer of :meth:`EngineCommands.step_events`."""

    events: tuple[NewTokens, ...]
    """Requests that produced tokens (a request still in prefill produces none)."""
    steps: int = Field(ge=0)
    """Engine steps run (fewer than asked when nothing was unfinished)."""
    unfinished: bool
    """Whether requests remain."""
    engine_s: float = Field(default=0.0, ge=0)
    """Seconds spent inside the engine's ``step()`` calls (the rest of a step command's round trip is output
    processing, the pipe and the controller)."""
    step_log: tuple[StepRow, ...] = ()
    """Each step's seconds and composition (empty when the engine's scheduler is not readable)."""


class KvBlocks(Frozen):
    """Where a request's KV lives in the engine process's cache."""

    request_id: str
    """External id."""
    block_ids: tuple[int, ...]
    """Its blocks (first KV-cache group), in order."""
    num_computed_tokens: int = Field(ge=0)
    """Tokens whose KV is in those blocks."""


class VllmDeadlines(Frozen):
    """Deadlines (seconds) of the commands to a vLLM engine process, enforced by its watchdog."""

    start_s: float = Field(default=300.0, gt=0)
    """Building the engine (measured on H200: 47-60 s, 75-82 s with batch-invariant kernels)."""
    step_s: float = Field(default=30.0, gt=0)
    """One engine step."""
    call_s: float = Field(default=90.0, gt=0)
    """A worker RPC (refill, checks), adding, aborting or locating requests."""
    memory_s: float = Field(default=60.0, gt=0)
    """Sleep or wake."""
    grace_s: float = Field(default=20.0, ge=0)
    """Extra wait for the watchdog's own answer before the process is declared lost."""


class EngineStartReport(Frozen):
    """What :meth:`VllmEngine.start` did."""

    engine_id: str
    """Engine."""
    started: EngineStarted
    """The process's start answer (build time, limits)."""
    fill_bytes: int = Field(ge=0)
    """Bytes of the first refill from the resident store, all ranks."""
    checked: int = Field(ge=0)
    """Parameters cross-checked against vLLM's own weight loaders (0: check skipped)."""
    mismatched: tuple[str, ...]
    """``rank r: name`` of every parameter whose refill differs from vLLM's loaders (must be empty)."""
    sleep_s: float = Field(ge=0)
    """The first sleep."""


class EngineCommands(Protocol):
    """Commands an engine process serves (keyword arguments, as sent over the pipe)."""

    def rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Run a worker-extension method on every TP rank (``collective_rpc``); one answer per rank."""
        ...

    def sleep(self) -> float:
        """Sleep at level 2 (weights and KV discarded); seconds."""
        ...

    def wake(self, tags: list[str]) -> float:
        """Wake ``["weights"]`` or ``["kv_cache"]``; seconds."""
        ...

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        """Add one greedy request without log-probabilities (the benchmark scenario's path)."""
        ...

    def add_many(self, requests: list[AddSpec]) -> None:
        """Add requests, all or nothing: on a failure the ones already added are aborted."""
        ...

    def step(self, n: int, step_timeout_s: float = 60.0) -> dict[str, Any]:
        """Up to ``n`` steps; every request's tokens so far (the benchmark scenario's path)."""
        ...

    def step_events(self, n: int, step_timeout_s: float) -> StepAnswer:
        """Up to ``n`` steps; the tokens not reported yet, with their top-k."""
        ...

    def abort(self, request_ids: list[str]) -> dict[str, list[int]]:
        """Stop requests; the tokens each generated here."""
        ...

    def set_step_budget(self, tokens: int | None) -> int:
        """Cap the tokens one step schedules (``None``: the start budget); the budget now in force."""
        ...

    def kv_blocks(self, request_ids: list[str]) -> list[KvBlocks]:
        """KV location of the requests that have some (empty when the scheduler cannot be read)."""
        ...

    def generate(self, prompts: list[list[int]], max_tokens: int, k: int, prompt_logprobs: bool) -> list[Any]:
        """Offline greedy generation of whole prompts (probes of the benchmark scenario)."""
        ...

    def describe(self) -> dict[str, Any]:
        """State for watchdog reports."""
        ...


def command_table(engine: EngineCommands) -> dict[str, Callable[..., Any]]:
    """Command name -> callable, for :func:`~nitsum_runtime.watchdog.serve_commands`."""
    return {
        "rpc": engine.rpc,
        "sleep": engine.sleep,
        "wake_weights": lambda: engine.wake(["weights"]),
        "wake_kv": lambda: engine.wake(["kv_cache"]),
        "add": engine.add,
        "add_many": engine.add_many,
        "step": engine.step,
        "step_events": engine.step_events,
        "abort": engine.abort,
        "kv_blocks": engine.kv_blocks,
        "set_step_budget": engine.set_step_budget,
        "generate": engine.generate,
        "describe": engine.describe,
    }


NO_TOP = TopK(token_ids=(), logprobs=())
"""The ``top`` of a token of a request added with ``top_k=0``."""


def top_of(logprobs: Mapping[int, Any] | None, k: int) -> TopK:
    """The k most likely entries of one vLLM log-probability dict (token id -> object with ``.logprob``);
    vLLM adds the sampled token when it is not among them, hence the sort and cut."""
    if not logprobs:
        return TopK(token_ids=(), logprobs=())
    items = sorted(logprobs.items(), key=lambda kv: -kv[1].logprob)[:k]
    return TopK(token_ids=tuple(int(t) for t, _ in items), logprobs=tuple(float(lp.logprob) for _, lp in items))


def new_tokens(
    request_id: str,
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Any]] | None,
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
    reported: int,
    k: int,
    finished: bool,
) -> NewTokens:
    """The tokens of a cumulative output after the first ``reported`` ones. ``prompt_logprobs`` (vLLM's: one
    entry per prompt token, the first None) becomes ``prompt_top`` on the first answer only."""
    if reported > len(token_ids):
        raise ValueError(f"request {request_id!r}: {reported} tokens reported, the engine has {len(token_ids)}")
    if k == 0:  # added without log-probabilities
        new = tuple(int(t) for t in token_ids[reported:])
        return NewTokens(request_id=request_id, token_ids=new, top=(NO_TOP,) * len(new), finished=finished)
    if logprobs is None or len(logprobs) != len(token_ids):
        got = "none" if logprobs is None else len(logprobs)
        raise ValueError(
            f"request {request_id!r}: {len(token_ids)} tokens but {got} log-probability rows; the request "
            "must be added with logprobs=k"
        )
    prompt_top: tuple[TopK, ...] = ()
    if reported == 0 and prompt_logprobs:
        prompt_top = tuple(top_of(lp, k) for lp in prompt_logprobs[1:])
    return NewTokens(
        request_id=request_id,
        token_ids=tuple(int(t) for t in token_ids[reported:]),
        top=tuple(top_of(lp, k) for lp in logprobs[reported:]),
        finished=finished,
        prompt_top=prompt_top,
    )
