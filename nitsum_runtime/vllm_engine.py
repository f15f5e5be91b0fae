"""The one module of Nitsum that talks to vLLM (0.26.0): a thin adapter over ``vllm.LLMEngine``.

It does four things and no more:

* :func:`llama_config` / :func:`write_model_dir` turn a :class:`~nitsum_opt.models.spec.ModelSpec` into a
  model folder holding only a Hugging Face ``config.json`` (``LlamaForCausalLM`` with the spec's sizes),
  which vLLM loads with random weights (``load_format="dummy"``). Both are pure and need no vLLM.
* :meth:`InProcessVllmEngine.start` creates an engine with the settings profiling and serving need: no tokenizer,
  no prefix caching (repeated prompts would be served from cache), sleep mode on, CUDA graphs on, TP ``n``.
* :meth:`InProcessVllmEngine.add_request`, :meth:`~InProcessVllmEngine.step`,
  :meth:`~InProcessVllmEngine.abort`: requests from token ids, one engine iteration at a time, each step
  returning exactly what the scheduler ran.
* :meth:`~InProcessVllmEngine.sleep` / :meth:`~InProcessVllmEngine.wake_up` and the KV-cache capacity in tokens.

vLLM is imported lazily, inside the methods that need it, so that importing this module (and running the
CPU tests) works without vLLM or a GPU.

**Internals read, and why.** vLLM's public ``LLMEngine.step()`` returns request outputs, which say which
requests *finished a prompt or produced a token*, but not how many prompt tokens each request computed in
the step, nor its context: a partial prompt chunk produces no output at all. The profiler must know the
exact batch composition of every timed step, so the adapter runs the engine core in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by :func:`configure_environment`) and wraps the bound method
``schedule`` of ``llm_engine.engine_core.engine_core.scheduler`` (``InprocClient`` -> ``EngineCore`` ->
``Scheduler``) to keep a reference to the ``SchedulerOutput`` each step executes (``num_scheduled_tokens``,
and ``num_computed_tokens`` of new and running requests). The wrapper only stores a reference: parsing
happens after the step's timer stops. The same scheduler's config field ``long_prefill_token_threshold`` (a
documented engine argument, read on every ``schedule()`` call) is changed between experiments to set the
prompt chunk size of chunked prefill, which would otherwise need one engine per chunk size. Asynchronous
scheduling is turned off so that one ``step()`` is exactly one scheduled-and-executed batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.composition import ScheduledRequest, scheduled_of

#: Environment the adapter needs; set before vLLM is imported (child processes inherit it).
VLLM_ENVIRONMENT: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: its scheduler is readable
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # flashinfer is not installed on the offline GPU machines
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    # NVLink multicast can take a shared host's GPUs out of service; keep it off everywhere.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

#: Rotary base written into config.json (Llama 3.1's); it changes no cost the profiler measures.
ROPE_THETA = 500000.0


class EngineSettings(BaseModel):
    """Engine arguments Nitsum controls; everything else is vLLM 0.26.0's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: int = Field(ge=1)
    """Tensor-parallel degree (GPUs of the engine)."""
    max_num_seqs: int = Field(default=512, ge=1)
    """Most sequences in one step (also the largest decode CUDA graph)."""
    max_num_batched_tokens: int = Field(default=16384, ge=16)
    """Token budget of one step (vLLM's default for the LLM class on H100/H200)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Share of each GPU's memory the engine may take (weights, activations, KV cache)."""
    async_scheduling: bool = False
    """Off: one ``step()`` is one whole scheduled-and-executed batch (needed for per-step composition)."""
    seed: int = 0
    """Seed of vLLM's dummy weights and sampling."""

    def engine_args(self, model_dir: Path, spec: ModelSpec) -> dict[str, Any]:
        """Keyword arguments for ``vllm.EngineArgs``."""
        return {
            "model": str(model_dir),
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "enable_prefix_caching": False,
            "enable_sleep_mode": True,
            "enforce_eager": False,
            "dtype": "bfloat16",
            "tensor_parallel_size": self.tp,
            "max_model_len": spec.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "async_scheduling": self.async_scheduling,
            "seed": self.seed,
            "disable_log_stats": True,
        }


def llama_config(spec: ModelSpec) -> dict[str, Any]:
    """Hugging Face ``config.json`` content of a Llama-architecture model with the spec's sizes."""
    if spec.dtype_bytes != 2:
        raise ValueError(f"model {spec.name!r} has dtype_bytes={spec.dtype_bytes}; the profiler runs bf16 (2 bytes)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_model_len,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def write_model_dir(spec: ModelSpec, directory: Path) -> Path:
    """Write ``config.json`` for ``spec`` into ``directory`` (created) and return the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(llama_config(spec), indent=2) + "\n", encoding="utf-8")
    return directory


def llm_classes() -> tuple[Any, Any]:
    """vLLM's ``LLM`` and ``SamplingParams`` (for the runtime's engine processes)."""
    from vllm import LLM, SamplingParams

    return LLM, SamplingParams


def tensor_parallel_rank_and_size() -> tuple[int, int]:
    """``(world size, rank)`` of the calling vLLM worker's TP group (only valid inside a worker)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()


def vllm_version() -> str:
    """Import vLLM (the one place that does) and return its version."""
    import vllm

    return str(vllm.__version__)


def configure_environment() -> None:
    """Set :data:`VLLM_ENVIRONMENT` in this process (call before the first vLLM import)."""
    os.environ.update(VLLM_ENVIRONMENT)


def run_then_exit(run: Callable[[], int]) -> NoReturn:
    """Call ``run`` and leave the process at once with its exit code (1 after printing an exception), skipping
    interpreter teardown: vLLM's can hang for minutes, and the launcher or the caller has what it needs by then."""
    try:
        code = run()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def vllm_missing_reason() -> str | None:
    """Why vLLM cannot run here (not installed, or no CUDA GPU), or ``None`` when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed; install the GPU build (pip install 'nitsum[runtime,vllm]')"
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vLLM is not importable ({exc}); install vllm==0.26.0 (pip install 'nitsum[vllm]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False); run on a GPU machine"
    return None


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one engine step did."""

    step_time_s: float
    """Wall time of ``LLMEngine.step()``."""
    scheduled: tuple[ScheduledRequest, ...]
    """Every request the step ran, with its new tokens and prior context (empty: nothing ran)."""
    finished: frozenset[str]
    """Requests that finished in this step (by reaching their ``max_tokens``)."""


class InProcessVllmEngine:
    """One vLLM ``LLMEngine`` with requests given as token ids; create it with :meth:`start`."""

    def __init__(self, llm_engine: Any, settings: EngineSettings, engine_start_s: float) -> None:
        self._engine = llm_engine
        self.settings = settings
        self.engine_start_s = engine_start_s
        """Seconds :meth:`start` spent creating the engine."""
        self._external_of: dict[str, str] = {}
        self._internal_of: dict[str, str] = {}
        self._next_id = 0
        self._last_schedule: Any = None
        self._scheduler = llm_engine.engine_core.engine_core.scheduler
        original = self._scheduler.schedule

        def recording_schedule(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self._last_schedule = out
            return out

        self._scheduler.schedule = recording_schedule

    @classmethod
    def start(cls, spec: ModelSpec, settings: EngineSettings, model_dir: Path) -> InProcessVllmEngine:
        """Write the model folder, create the engine and time its start."""
        configure_environment()
        from vllm import EngineArgs, LLMEngine

        write_model_dir(spec, model_dir)
        args = EngineArgs(**settings.engine_args(model_dir, spec))
        t0 = time.perf_counter()
        llm_engine = LLMEngine.from_engine_args(args)
        return cls(llm_engine, settings, time.perf_counter() - t0)

    # --- capacity ---------------------------------------------------------------------------------
    @property
    def num_gpu_blocks(self) -> int:
        """KV-cache blocks per GPU."""
        return int(self._engine.vllm_config.cache_config.num_gpu_blocks)

    @property
    def block_size(self) -> int:
        """Tokens per KV-cache block."""
        return int(self._engine.vllm_config.cache_config.block_size)

    @property
    def kv_cache_tokens(self) -> int:
        """KV-cache capacity of the engine in tokens (one full-attention KV group: blocks · block size)."""
        return self.num_gpu_blocks * self.block_size

    # --- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], max_tokens: int) -> str:
        """Queue a request; returns the engine's (internal) request id that :meth:`step` reports."""
        from vllm import SamplingParams

        external = f"r{self._next_id}"
        self._next_id += 1
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        internal = self._engine.add_request(external, {"prompt_token_ids": prompt_token_ids}, params)
        self._external_of[internal] = external
        self._internal_of[external] = internal
        return internal

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (by the ids :meth:`add_request` returned); their KV blocks are freed at once."""
        externals = [self._external_of.pop(r) for r in request_ids]
        for e in externals:
            del self._internal_of[e]
        if externals:
            self._engine.abort_request(externals)

    def set_prefill_chunk_limit(self, tokens: int | None) -> None:
        """Cap the prompt tokens one request computes per step (``None``: only the step budget caps it)."""
        if tokens is not None and tokens < 1:
            raise ValueError(f"prefill chunk limit {tokens} must be >= 1 or None")
        self._scheduler.scheduler_config.long_prefill_token_threshold = tokens or 0

    def has_unfinished_requests(self) -> bool:
        """Whether any request is still queued or running."""
        return bool(self._engine.has_unfinished_requests())

    def step(self) -> StepResult:
        """Run one engine iteration and report what it scheduled and how long it took."""
        self._last_schedule = None
        t0 = time.perf_counter()
        outputs = self._engine.step()
        elapsed = time.perf_counter() - t0
        sched = self._last_schedule
        scheduled: list[ScheduledRequest] = [] if sched is None else scheduled_of(sched)
        finished = set()
        for out in outputs:
            if out.finished:
                internal = self._internal_of.pop(out.request_id, None)
                if internal is not None:
                    del self._external_of[internal]
                    finished.add(internal)
        return StepResult(elapsed, tuple(scheduled), frozenset(finished))

    # --- sleep mode ---------------------------------------------------------------------------------
    def sleep(self, level: int = 2) -> float:
        """Put the engine to sleep (level 2 discards weights and KV cache); returns the seconds it took."""
        t0 = time.perf_counter()
        self._engine.sleep(level=level)
        return time.perf_counter() - t0

    def wake_up(self, tags: list[str]) -> float:
        """Wake the given parts (``["weights"]``, ``["kv_cache"]``); returns the seconds it took."""
        t0 = time.perf_counter()
        self._engine.wake_up(tags=tags)
        return time.perf_counter() - t0
