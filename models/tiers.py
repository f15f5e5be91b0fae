"""What the capacity builder is asked for: tiers (SLO + length mix), engine knobs, the result type of one
cell, and the tiers file (YAML/JSON) the ``nitsum capacity-table`` command reads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .features import FloatArray
from .spec import LengthMix, ServingConfig, SloTarget, all_configs

DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256


class StepTimeSource(Protocol):
    """What the capacity builder and the request simulator need from a latency model."""

    def predict_batch_ms(self, composition: FloatArray, validate: bool = True) -> FloatArray:
        """Mean step time (ms) of every row (columns ``COMPOSITION_COLUMNS``); ``validate=False``: trusted
        input, no checks or range warnings."""
        ...

    def kv_cache_tokens(self, tp: int) -> int:
        """KV-cache capacity of one engine at TP ``tp``, tokens."""
        ...


class TierWorkload(BaseModel):
    """A tier as the capacity builder sees it: its SLO and its request-length mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
    """Tier name (row key of the capacity table)."""
    slo: SloTarget
    """TTFT/TPOT targets and the percentile that must meet them."""
    length_mix: LengthMix
    """Prompt/output length distribution of the tier's requests."""


class CapacityOptions(BaseModel):
    """Knobs of the capacity model (``None`` = take the engine's value from the profile, else the default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    """Token budget of one engine step (vLLM ``max_num_batched_tokens``)."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most sequences one engine runs at once (vLLM ``max_num_seqs``)."""
    rate_rel_tol: float = Field(default=0.01, gt=0, lt=0.5)
    """Relative tolerance of the bisection on the rate."""
    handoff_leave_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Pause of a prefill instance after each step, while the requests it prefilled leave for a decode instance
    (the runtime's hand-off; 0: free)."""
    handoff_arrive_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Pause of a decode instance before a step in which handed-off requests arrive (0: free)."""

    def resolved(self, engine_args: dict[str, object] | None = None) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) after falling back to engine args and defaults."""
        args = engine_args or {}

        def pick(value: int | None, key: str, default: int) -> int:
            if value is not None:
                return value
            found = args.get(key)
            return int(found) if isinstance(found, int | float) and found > 0 else default

        return (
            pick(self.max_num_batched_tokens, "max_num_batched_tokens", DEFAULT_MAX_NUM_BATCHED_TOKENS),
            pick(self.max_num_seqs, "max_num_seqs", DEFAULT_MAX_NUM_SEQS),
        )


class CellResult(BaseModel):
    """``R`` of one (tier, config) cell and what limits it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_rps: float = Field(ge=0)
    """Highest SLO-compliant arrival rate, requests/s."""
    binding: str
    """Constraint that fails just above ``rate_rps``: ttft, tpot, kv, max_num_seqs, stability or
    slo-unreachable.
    """
    batch_size: float = Field(ge=0)
    """Mean running decode sequences at ``rate_rps`` (0 for prefill)."""


class TiersFile(BaseModel):
    """A capacity-table request file (YAML or JSON): tiers, optional engine knobs and configs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: tuple[TierWorkload, ...] = Field(min_length=1)
    """Tiers, each with its SLO and length mix."""
    options: CapacityOptions = CapacityOptions()
    """Engine knobs and solver tolerance."""
    configs: tuple[str, ...] | None = None
    """Config keys to build (``tp2-decode``, ...); default every supported config the model covers."""

    def serving_configs(self, tps: Iterable[int]) -> list[ServingConfig]:
        """Requested configs, or every ``(tp, role)`` with a profiled ``tp``."""
        if self.configs is not None:
            return [ServingConfig.parse(k) for k in self.configs]
        allowed = set(tps)
        return [c for c in all_configs() if c.tp in allowed]


def load_tiers_file(path: str | Path) -> TiersFile:
    """Read and validate a tiers file; errors name the file and the offending field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tiers file {p}: no such file (see examples/capacity/tiers.yaml)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"tiers file {p}: not valid YAML: {exc}") from None
    try:
        return TiersFile.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"tiers file {p}: {exc}") from None
