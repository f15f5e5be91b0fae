"""Value types shared by the latency models, the capacity table and the planner.

These live in ``nitsum_opt.models`` (not in ``nitsum_opt``) because the dependency arrows point one way,
``nitsum_opt -> models``: the capacity-table builder needs them and must not import the planner.
``nitsum_opt`` re-exports every name here.

All types are frozen pydantic models with ``extra="forbid"``; every numeric field carries its unit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: TP degrees a config may use. Powers of two, so instances pack exactly into NVLink nodes.
SUPPORTED_TP: tuple[int, ...] = (1, 2, 4, 8)

_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"


class Frozen(BaseModel):
    """Base of every value object: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Role(StrEnum):
    """What an instance does with a request."""

    PREFILL = "prefill"
    """Only the prompt pass; the KV cache is handed to a decode instance."""
    DECODE = "decode"
    """Only token generation, from KV handed over by a prefill instance."""
    COLOCATED = "colocated"
    """Both phases on the same instance (chunked prefill mixed into decode batches)."""


_CONFIG_KEY = re.compile(r"^tp(\d+)-(prefill|decode|colocated)$")


class ServingConfig(Frozen):
    """One candidate instance shape ``c = (tp, role)``; it occupies ``tp`` GPUs of one node."""

    tp: int = Field(ge=1)
    """Tensor-parallel degree: the number of GPUs of the instance, all inside one node."""
    role: Role
    """Which phase(s) the instance serves."""

    @field_validator("tp")
    @classmethod
    def _tp_power_of_two(cls, tp: int) -> int:
        if tp not in SUPPORTED_TP:
            raise ValueError(f"tp={tp} is not supported; use one of {list(SUPPORTED_TP)}")
        return tp

    @cached_property
    def key(self) -> str:
        """Stable text key, e.g. ``tp4-decode``; used in capacity tables and solver names."""
        return f"tp{self.tp}-{self.role.value}"

    @property
    def gpus(self) -> int:
        """GPUs one instance occupies (``g_c`` in the formulation)."""
        return self.tp

    @classmethod
    def parse(cls, key: str) -> ServingConfig:
        """Parse ``tp<N>-<role>`` (for example ``tp2-prefill``)."""
        match = _CONFIG_KEY.match(key.strip())
        if match is None:
            raise ValueError(
                f"config key {key!r} is not of the form tp<N>-<role> with role in "
                f"{[r.value for r in Role]}, e.g. 'tp2-decode'"
            )
        return cls(tp=int(match.group(1)), role=Role(match.group(2)))

    def __str__(self) -> str:
        return self.key


def all_configs(max_tp: int = 8, roles: Iterable[Role] = tuple(Role)) -> tuple[ServingConfig, ...]:
    """Every supported ``(tp, role)`` with ``tp <= max_tp``, in a stable order (tp, then role)."""
    return _all_configs(max_tp, tuple(Role(r) for r in roles))


@lru_cache(maxsize=64)
def _all_configs(max_tp: int, roles: tuple[Role, ...]) -> tuple[ServingConfig, ...]:
    return tuple(ServingConfig(tp=tp, role=role) for tp in SUPPORTED_TP if tp <= max_tp for role in roles)


class ModelSpec(Frozen):
    """Architecture of a decoder-only transformer (Llama layout), enough to derive FLOPs and bytes."""

    name: str = Field(pattern=_NAME_PATTERN)
    """Short identifier, e.g. ``llama-3.1-8b``."""
    num_layers: int = Field(ge=1)
    """Transformer blocks."""
    hidden_size: int = Field(ge=1)
    """Model width (``d_model``)."""
    num_attention_heads: int = Field(ge=1)
    """Query heads."""
    num_kv_heads: int = Field(ge=1)
    """Key/value heads (grouped-query attention); divides ``num_attention_heads``."""
    intermediate_size: int = Field(ge=1)
    """Width of the gated MLP."""
    vocab_size: int = Field(ge=1)
    """Vocabulary size (embedding and LM head rows)."""
    dtype_bytes: int = Field(default=2, ge=1, le=8)
    """Bytes per weight and KV element (2 for bf16)."""
    max_model_len: int = Field(default=8192, ge=16)
    """Longest prompt + output the engine accepts, in tokens."""
    tie_word_embeddings: bool = False
    """Whether the LM head shares the embedding matrix."""

    @model_validator(mode="after")
    def _check_heads(self) -> Self:
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs it to be"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def param_count(self) -> int:
        """Parameters (embeddings, attention, MLP, norms, LM head)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    @property
    def weight_bytes(self) -> int:
        """Bytes of one full weight copy."""
        return self.param_count * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies across all layers (K and V), before TP sharding."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


#: Published shapes of the bundled model presets (Hugging Face ``config.json`` of each model).
MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama-3.1-8b": ModelSpec(
        name="llama-3.1-8b",
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_model_len=8192,
    ),
    "qwen2.5-14b": ModelSpec(
        name="qwen2.5-14b",
        num_layers=48,
        hidden_size=5120,
        num_attention_heads=40,
        num_kv_heads=8,
        intermediate_size=13824,
        vocab_size=152064,
        max_model_len=8192,
    ),
}


def model_preset(name: str) -> ModelSpec:
    """Look up a bundled model shape by name; the error lists every valid name."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; bundled models are {sorted(MODEL_PRESETS)}") from None


class LengthBucket(Frozen):
    """One point of an empirical request-length distribution."""

    input_tokens: int = Field(ge=1)
    """Prompt length in tokens."""
    output_tokens: int = Field(ge=1)
    """Generated tokens."""
    weight: float = Field(gt=0, allow_inf_nan=False)
    """Relative frequency (normalised over the mix)."""


class LengthMix(Frozen):
    """Empirical joint distribution of prompt and output lengths of a tier's requests."""

    buckets: tuple[LengthBucket, ...] = Field(min_length=1)
    """Points of the distribution; weights need not sum to one."""

    @property
    def probabilities(self) -> tuple[float, ...]:
        """Bucket weights normalised to sum to one."""
        total = sum(b.weight for b in self.buckets)
        return tuple(b.weight / total for b in self.buckets)

    @property
    def mean_input_tokens(self) -> float:
        """Expected prompt length."""
        return sum(p * b.input_tokens for p, b in zip(self.probabilities, self.buckets, strict=True))

    @property
    def mean_output_tokens(self) -> float:
        """Expected output length."""
        return sum(p * b.output_tokens for p, b in zip(self.probabilities, self.buckets, strict=True))

    @classmethod
    def single(cls, input_tokens: int, output_tokens: int) -> LengthMix:
        """A mix where every request has the same lengths."""
        return cls(buckets=(LengthBucket(input_tokens=input_tokens, output_tokens=output_tokens, weight=1.0),))

    @classmethod
    def from_samples(
        cls, input_tokens: Iterable[int], output_tokens: Iterable[int], max_buckets: int = 32
    ) -> LengthMix:
        """Compress per-request lengths into at most ``max_buckets`` buckets (quantile bins on input length,
        mean output length per bin), keeping the mean of both lengths exact."""
        pairs = sorted(zip(input_tokens, output_tokens, strict=True))
        if not pairs:
            raise ValueError("LengthMix.from_samples needs at least one request")
        n_bins = max(1, min(max_buckets, len(pairs)))
        buckets: list[LengthBucket] = []
        for i in range(n_bins):
            chunk = pairs[i * len(pairs) // n_bins : (i + 1) * len(pairs) // n_bins]
            if not chunk:
                continue
            mean_in = sum(p[0] for p in chunk) / len(chunk)
            mean_out = sum(p[1] for p in chunk) / len(chunk)
            buckets.append(
                LengthBucket(
                    input_tokens=max(1, round(mean_in)),
                    output_tokens=max(1, round(mean_out)),
                    weight=float(len(chunk)),
                )
            )
        return cls(buckets=tuple(buckets))


class SloTarget(Frozen):
    """Latency targets of one tier, as the capacity builder needs them."""

    ttft_slo_ms: float = Field(gt=0, allow_inf_nan=False)
    """Time to first token the percentile must meet, in ms (queueing included)."""
    tpot_slo_ms: float = Field(gt=0, allow_inf_nan=False)
    """Mean time per output token (after the first) the percentile must meet, in ms."""
    slo_percentile: float = Field(default=90.0, gt=0, lt=100)
    """Share of requests, in percent, that must meet both targets."""


RateRps = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class CapacityTable(Frozen):
    """``R[t,c]``: the highest SLO-compliant request rate one instance of config ``c`` sustains for tier ``t``.

    For a prefill instance it is the rate of prompts it can prefill within the tier's TTFT percentile; for a
    decode instance the rate of requests whose whole output it can generate within the TPOT target (KV-cache
    memory included); for a colocated instance the rate of whole requests.
    """

    rates_rps: dict[str, dict[str, RateRps]]
    """``rates_rps[tier][config_key]`` in requests per second, e.g. ``rates_rps['chat']['tp2-decode']``."""
    source: str = ""
    """Where the numbers come from (latency-model hash, profile, or 'user')."""

    @field_validator("rates_rps")
    @classmethod
    def _check_keys(cls, rates: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for tier, row in rates.items():
            for key in row:
                try:
                    ServingConfig.parse(key)
                except ValueError as exc:
                    raise ValueError(f"capacity table, tier {tier!r}: {exc}") from None
        return rates

    def rate_rps(self, tier: str, config: ServingConfig) -> float:
        """``R[tier, config]``; a missing cell is an error that names it."""
        row = self.rates_rps.get(tier)
        if row is None:
            raise KeyError(
                f"capacity table has no row for tier {tier!r} (rows: {sorted(self.rates_rps)}); "
                "rebuild it for this tier or fix the tier name"
            )
        if config.key not in row:
            raise KeyError(
                f"capacity table has no cell [{tier!r}, {config.key!r}]; add it (0 if the config cannot meet "
                f"the tier's SLO) or drop {config.key!r} from the planning input's configs"
            )
        return row[config.key]

    def missing_cells(self, tiers: Iterable[str], configs: Iterable[ServingConfig]) -> list[str]:
        """``tier/config`` cells that are needed but absent."""
        config_list = list(configs)
        return [f"{tier}/{c.key}" for tier in tiers for c in config_list if c.key not in self.rates_rps.get(tier, {})]

    @classmethod
    def from_mapping(cls, rates: Mapping[str, Mapping[ServingConfig | str, float]], source: str = "") -> Self:
        """Build from ``{tier: {config or key: rate}}``."""
        return cls(
            rates_rps={
                tier: {(k.key if isinstance(k, ServingConfig) else k): float(v) for k, v in row.items()}
                for tier, row in rates.items()
            },
            source=source,
        )
