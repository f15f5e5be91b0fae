"""The profile files the profiler writes: one CSV row per timed engine step, and a metadata JSON per model.

The schema is the one agreed with the latency models (``PROFILE_SCHEMA.md``; the reader and its checks live
in ``nitsum_opt.models``). This module holds the writer's side: the typed row and metadata, the column
order, and the consistency checks a row must pass before it is written, so that a bad row fails at the
source, with the step that produced it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nitsum_opt.models.spec import SUPPORTED_TP, ModelSpec


class ExperimentKind(StrEnum):
    """What a timed step held."""

    PREFILL = "prefill"
    """Only prompt tokens (one or more sequences, any chunk context)."""
    DECODE = "decode"
    """Only decode sequences, one new token each."""
    MIXED = "mixed"
    """Decode sequences and a prompt chunk in the same step (chunked prefill)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProfileRow(_Frozen):
    """One timed engine step (one CSV row)."""

    model: str = Field(min_length=1)
    """``ModelSpec.name`` of the profiled model."""
    gpu: str = Field(min_length=1)
    """GPU name, e.g. ``NVIDIA H200``."""
    tp: int
    """Tensor-parallel degree of the engine."""
    experiment: ExperimentKind
    """``prefill``, ``decode`` or ``mixed``: derived from the step's actual composition."""
    config_id: str = Field(min_length=1)
    """Batch configuration the step belongs to; steps of the same composition share it."""
    repeat: int = Field(ge=0)
    """Repeat index within the configuration."""
    num_prefill_seqs: int = Field(ge=0)
    """Sequences computing prompt tokens."""
    prefill_tokens: int = Field(ge=0)
    """Σ new prompt tokens computed."""
    prefill_context_tokens: int = Field(ge=0)
    """Σ prompt tokens already cached for those sequences before the step."""
    prefill_attention_pairs: int = Field(ge=0)
    """Σ chunk·ctx + chunk·(chunk+1)/2 over prefill sequences."""
    num_decode_seqs: int = Field(ge=0)
    """Sequences generating one token."""
    decode_context_tokens: int = Field(ge=0)
    """Σ keys the decode sequences attend to (prompt + generated tokens, the new one included)."""
    step_time_ms: float = Field(gt=0, allow_inf_nan=False)
    """Wall time of the step, milliseconds."""

    @model_validator(mode="after")
    def _consistent(self) -> ProfileRow:
        if self.tp not in SUPPORTED_TP:
            raise ValueError(f"tp={self.tp} is not one of {list(SUPPORTED_TP)}")
        if (self.num_prefill_seqs > 0) != (self.prefill_tokens > 0):
            raise ValueError(
                f"num_prefill_seqs={self.num_prefill_seqs} and prefill_tokens={self.prefill_tokens} must be "
                "both zero or both positive"
            )
        if self.prefill_tokens and not (
            self.prefill_tokens <= self.prefill_attention_pairs and self.num_prefill_seqs <= self.prefill_tokens
        ):
            raise ValueError(
                f"prefill_attention_pairs={self.prefill_attention_pairs} must be >= prefill_tokens="
                f"{self.prefill_tokens} >= num_prefill_seqs={self.num_prefill_seqs}"
            )
        if not self.prefill_tokens and (self.prefill_context_tokens or self.prefill_attention_pairs):
            raise ValueError("a step without prefill tokens has no prefill context or attention pairs")
        if self.decode_context_tokens < self.num_decode_seqs or (
            self.num_decode_seqs == 0 and self.decode_context_tokens
        ):
            raise ValueError(
                f"decode_context_tokens={self.decode_context_tokens} must be >= num_decode_seqs="
                f"{self.num_decode_seqs} and 0 when there are no decode sequences"
            )
        expected = _kind(self.num_prefill_seqs, self.num_decode_seqs)
        if self.experiment != expected:
            raise ValueError(
                f"experiment={self.experiment.value!r} but the composition (num_prefill_seqs="
                f"{self.num_prefill_seqs}, num_decode_seqs={self.num_decode_seqs}) is {expected.value!r}"
            )
        return self


def _kind(num_prefill_seqs: int, num_decode_seqs: int) -> ExperimentKind:
    if num_prefill_seqs and num_decode_seqs:
        return ExperimentKind.MIXED
    if num_prefill_seqs:
        return ExperimentKind.PREFILL
    if num_decode_seqs:
        return ExperimentKind.DECODE
    raise ValueError("a step with no prefill and no decode sequences did no work; it is not a profile row")


#: CSV columns in schema order (the order of :class:`ProfileRow`'s fields).
PROFILE_COLUMNS: tuple[str, ...] = tuple(ProfileRow.model_fields)


class TpRecord(_Frozen):
    """Per-TP facts of one profiled engine (``per_tp["<tp>"]`` in the metadata JSON)."""

    kv_cache_tokens: int = Field(ge=1)
    """KV-cache capacity in tokens (``num_gpu_blocks · block_size``)."""
    num_gpu_blocks: int = Field(ge=1)
    """KV blocks vLLM allocated on each GPU."""
    block_size: int = Field(ge=1)
    """Tokens per KV block."""
    engine_start_s: float = Field(ge=0)
    """Seconds from creating the engine to its first step being possible (weights, profiling run, KV
    allocation, torch.compile and CUDA-graph capture; the compile cache was empty)."""
    sleep_s: float = Field(ge=0)
    """Seconds of ``sleep(level=2)`` (weights and KV cache discarded), median of the repeats."""
    wake_weights_s: float = Field(ge=0)
    """Seconds of ``wake_up(tags=["weights"])``, median of the repeats."""
    wake_kv_s: float = Field(ge=0)
    """Seconds of ``wake_up(tags=["kv_cache"])``, median of the repeats."""
    rows: int = Field(ge=0)
    """CSV rows at this TP."""


class ProfileMeta(_Frozen):
    """``<model>.meta.json``: where and how a profile was measured."""

    model: ModelSpec
    """The profiled architecture."""
    gpu: str = Field(min_length=1)
    """GPU name."""
    driver: str
    """NVIDIA driver version."""
    vllm_version: str
    """vLLM version."""
    torch_version: str
    """torch version."""
    cuda_version: str
    """CUDA version torch was built with."""
    date: str
    """UTC date and time the profile was taken (ISO 8601)."""
    command: str = Field(min_length=1)
    """Exact command line that produced it."""
    engine_args: dict[str, Any]
    """Engine arguments common to every TP degree."""
    per_tp: dict[str, TpRecord] = Field(min_length=1)
    """Per-TP facts keyed by the TP degree as a string."""

    @model_validator(mode="after")
    def _tp_keys(self) -> ProfileMeta:
        bad = [k for k in self.per_tp if not k.isdigit() or int(k) not in SUPPORTED_TP]
        if bad:
            raise ValueError(f"per_tp keys {bad} are not TP degrees in {list(SUPPORTED_TP)}")
        return self
