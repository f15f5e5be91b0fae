"""Load and validate profiling data: the per-iteration CSV and its metadata JSON.

The schema (agreed with the profiler, see ``PROFILE_SCHEMA.md`` in the project docs) has one row per timed
engine step; :data:`PROFILE_COLUMNS` lists the columns and their types. Every check raises
:class:`ProfileError`, whose message names the file, the column and the CSV line (header = line 1) and says
how to fix it. Checks:

* the file exists, is gzip or plain CSV, and has every column (extra columns are ignored);
* types: integer columns hold integers (no NaN, no fractions), string columns are non-empty;
* ``step_time_ms`` is finite and > 0;
* units: step times must look like milliseconds. Two tests: the median step lies in [``MIN_MEDIAN_STEP_MS``,
  ``MAX_MEDIAN_STEP_MS``] (a median below 0.5 looks like seconds, above 20,000 like microseconds); when the
  model spec is known, no step may beat its physical floor (weight shard at 20 TB/s, GEMM FLOPs at 5 PFLOP/s —
  faster than any GPU) and the median step must stay below 300x that floor (real steps are 1-50x; microseconds
  land near 1000x);
* composition consistency: a step has work; prefill sequences, tokens and attention pairs are all zero or all
  positive with ``pairs >= tokens``; decode context ``>= num_decode_seqs``; ``experiment`` is one of
  ``prefill``/``decode``/``mixed``; ``tp`` is a supported degree;
* one ``model`` and one ``gpu`` per file, and at least two TP degrees (a model over TP needs them).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .features import ArchitectureConstants
from .spec import SUPPORTED_TP, ModelSpec

#: Column -> kind ("int", "float", "str") of the profile CSV, in schema order.
PROFILE_COLUMNS: dict[str, str] = {
    "model": "str",
    "gpu": "str",
    "tp": "int",
    "experiment": "str",
    "config_id": "str",
    "repeat": "int",
    "num_prefill_seqs": "int",
    "prefill_tokens": "int",
    "prefill_context_tokens": "int",
    "prefill_attention_pairs": "int",
    "num_decode_seqs": "int",
    "decode_context_tokens": "int",
    "step_time_ms": "float",
}

EXPERIMENTS: tuple[str, ...] = ("prefill", "decode", "mixed")
MIN_MEDIAN_STEP_MS = 0.5
"""A median step below this is taken for seconds (an LLM engine step is never sub-0.5 ms on median)."""
MAX_MEDIAN_STEP_MS = 20_000.0
"""A median step above this (20 s) is taken for microseconds."""
MAX_PLAUSIBLE_BANDWIDTH_BYTES_PER_S = 20e12
"""No GPU streams its weight shard faster than this (H200: 4.8 TB/s); a faster step means wrong units."""
MAX_PLAUSIBLE_FLOPS_PER_S = 5e15
"""No GPU computes dense bf16 GEMMs faster than this (H200: ~1e15)."""
MAX_MEDIAN_FLOOR_RATIO = 300.0
"""Real engine steps take 1-50x their physical floor; a median above this means microseconds."""


class ProfileError(ValueError):
    """A profile file that breaks the schema; the message names the column/row and the fix."""


def _line(index: int) -> int:
    """CSV line number of data row ``index`` (0-based) when the header is line 1."""
    return int(index) + 2


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ProfileError(f"profile {path}: no such file; pass the path of a <model>.csv.gz profile")
    with path.open("rb") as fh:
        magic = fh.read(2)
    try:
        return pd.read_csv(path, compression="gzip" if magic == b"\x1f\x8b" else None, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as exc:
        raise ProfileError(f"profile {path}: not a readable (gzip) CSV file: {exc}") from None


def _coerce_columns(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise ProfileError(f"profile {path}: missing column(s) {missing}; the schema needs {list(PROFILE_COLUMNS)}")
    if df.empty:
        raise ProfileError(f"profile {path}: no data rows")
    out = pd.DataFrame(index=df.index)
    for col, kind in PROFILE_COLUMNS.items():
        raw = df[col].str.strip()
        if kind == "str":
            bad = raw == ""
            if bad.any():
                raise ProfileError(f"profile {path}: column {col!r} is empty at line {_line(bad.idxmax())}")
            out[col] = raw
            continue
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() | ~np.isfinite(num.to_numpy(dtype=float))
        if bad.any():
            i = bad.idxmax()
            raise ProfileError(
                f"profile {path}: column {col!r} line {_line(i)}: {df.at[i, col]!r} is not a finite number"
            )
        if kind == "int":
            frac = num != np.round(num)
            if frac.any():
                i = frac.idxmax()
                raise ProfileError(
                    f"profile {path}: column {col!r} line {_line(i)}: {df.at[i, col]!r} is not an integer"
                )
            neg = num < 0
            if neg.any():
                i = neg.idxmax()
                raise ProfileError(f"profile {path}: column {col!r} line {_line(i)}: {num[i]} is negative")
            out[col] = num.astype(np.int64)
        else:
            out[col] = num.astype(float)
    return out


def _first(mask: pd.Series) -> int | None:
    return int(mask.idxmax()) if bool(mask.any()) else None


def _check_rows(df: pd.DataFrame, path: Path) -> None:
    checks: list[tuple[pd.Series, str]] = [
        (df["step_time_ms"] <= 0, "step_time_ms must be > 0 (a step takes time)"),
        (~df["tp"].isin(SUPPORTED_TP), f"tp must be one of {list(SUPPORTED_TP)}"),
        (~df["experiment"].isin(EXPERIMENTS), f"experiment must be one of {list(EXPERIMENTS)}"),
        (
            (df["prefill_tokens"] == 0) & (df["num_decode_seqs"] == 0),
            "the step has no work (no prefill tokens, no decode sequences); drop the row",
        ),
        (
            (df["num_prefill_seqs"] > 0) != (df["prefill_tokens"] > 0),
            "num_prefill_seqs and prefill_tokens must both be zero or both positive",
        ),
        (
            df["prefill_attention_pairs"] < df["prefill_tokens"],
            "prefill_attention_pairs must be >= "
            "prefill_tokens (every new token attends at least to itself): Σ chunk·ctx + chunk·(chunk+1)/2",
        ),
        (df["prefill_tokens"] < df["num_prefill_seqs"], "prefill_tokens must be >= num_prefill_seqs"),
        (
            (df["prefill_tokens"] == 0) & (df["prefill_attention_pairs"] > 0),
            "prefill_attention_pairs must be 0 when prefill_tokens is 0",
        ),
        (
            df["decode_context_tokens"] < df["num_decode_seqs"],
            "decode_context_tokens must be >= num_decode_seqs (each decode sequence attends at least to its new token)",
        ),
        (
            (df["num_decode_seqs"] == 0) & (df["decode_context_tokens"] > 0),
            "decode_context_tokens must be 0 when num_decode_seqs is 0",
        ),
    ]
    for mask, message in checks:
        i = _first(mask)
        if i is not None:
            raise ProfileError(f"profile {path} line {_line(i)}: {message} (row: {df.loc[i].to_dict()})")


def _check_units(df: pd.DataFrame, path: Path, spec: ModelSpec | None) -> None:
    median = float(df["step_time_ms"].median())
    if median < MIN_MEDIAN_STEP_MS:
        raise ProfileError(
            f"profile {path}: column 'step_time_ms' has median {median:.6g}, which looks like seconds; the "
            "schema wants milliseconds (multiply by 1000)"
        )
    if median > MAX_MEDIAN_STEP_MS:
        raise ProfileError(
            f"profile {path}: column 'step_time_ms' has median {median:.6g}, which looks like microseconds; "
            "the schema wants milliseconds (divide by 1000)"
        )
    if spec is None:
        return
    consts = ArchitectureConstants.from_spec(spec)
    shard_bytes = (consts.layer_linear_params + consts.lm_head_params) * consts.dtype_bytes / df["tp"]
    tokens = df["prefill_tokens"] + df["num_decode_seqs"]
    flops = 2.0 * tokens * consts.layer_linear_params / df["tp"]
    floor_ms = np.maximum(shard_bytes / MAX_PLAUSIBLE_BANDWIDTH_BYTES_PER_S, flops / MAX_PLAUSIBLE_FLOPS_PER_S) * 1e3
    i = _first(df["step_time_ms"] < floor_ms)
    if i is not None:
        raise ProfileError(
            f"profile {path} line {_line(i)}: step_time_ms={df.at[i, 'step_time_ms']:.6g} is faster than the "
            f"physical floor of {spec.name} at tp={df.at[i, 'tp']} (weights at 20 TB/s, FLOPs at 5 PFLOP/s: "
            f"{floor_ms[i]:.3g} ms); are the times in milliseconds, and is the model spec right?"
        )
    ratio = float((df["step_time_ms"] / floor_ms).median())
    if ratio > MAX_MEDIAN_FLOOR_RATIO:
        raise ProfileError(
            f"profile {path}: column 'step_time_ms' is on median {ratio:,.0f}x the physical floor of "
            f"{spec.name}; "
            "real steps are 1-50x; the times look like microseconds (divide by 1000) or the spec is wrong"
        )


def _check_file_level(df: pd.DataFrame, path: Path) -> None:
    for col in ("model", "gpu"):
        values = sorted(df[col].unique())
        if len(values) != 1:
            raise ProfileError(
                f"profile {path}: column {col!r} holds {values}; one file holds one model on one GPU type "
                "(split the file)"
            )
    tps = sorted(int(t) for t in df["tp"].unique())
    if len(tps) < 2:
        raise ProfileError(
            f"profile {path}: column 'tp' holds only {tps}; a latency model over TP needs at least two TP "
            "degrees (profile TP 1, 2 and 4)"
        )


def load_profile(path: str | Path, spec: ModelSpec | None = None) -> pd.DataFrame:
    """Read and validate a profile CSV (gzip or plain). ``spec`` enables the bandwidth-floor unit check.

    Returns a DataFrame with exactly the :data:`PROFILE_COLUMNS` columns, typed (int64, float64, str).
    """
    p = Path(path)
    df = _coerce_columns(_read_csv(p), p)
    _check_rows(df, p)
    _check_file_level(df, p)
    _check_units(df, p, spec)
    if spec is not None and df["model"].iloc[0] != spec.name:
        raise ProfileError(
            f"profile {p}: column 'model' is {df['model'].iloc[0]!r} but the model spec is {spec.name!r}; "
            "pass the matching spec (or meta file)"
        )
    return df.reset_index(drop=True)


def profile_sha256(path: str | Path) -> str:
    """SHA-256 of the profile's *decompressed* bytes (independent of gzip header/mtime)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return hashlib.sha256(raw).hexdigest()


class PerTpMeta(BaseModel):
    """Per-TP facts the profiler records next to the rows."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kv_cache_tokens: int = Field(ge=1)
    """KV-cache capacity of one engine at this TP, in tokens (vLLM's ``num_gpu_blocks · block_size``)."""
    num_gpu_blocks: int | None = Field(default=None, ge=1)
    """KV blocks vLLM allocated."""
    block_size: int | None = Field(default=None, ge=1)
    """Tokens per KV block."""
    engine_start_s: float | None = Field(default=None, ge=0)
    """Engine start time, seconds."""
    sleep_s: float | None = Field(default=None, ge=0)
    """``sleep(level=2)`` time, seconds."""
    wake_weights_s: float | None = Field(default=None, ge=0)
    """Wake time of the weights, seconds."""
    wake_kv_s: float | None = Field(default=None, ge=0)
    """Wake time of the KV cache, seconds."""
    rows: int | None = Field(default=None, ge=0)
    """Rows of the CSV at this TP."""


class ProfileMeta(BaseModel):
    """The ``<model>.meta.json`` next to a profile CSV."""

    model_config = ConfigDict(frozen=True, extra="allow")

    model: ModelSpec
    """Architecture the profile was measured with."""
    gpu: str = Field(min_length=1)
    """GPU name (``torch.cuda.get_device_name``)."""
    command: str = Field(min_length=1)
    """Exact command line that produced the profile."""
    per_tp: dict[str, PerTpMeta] = Field(min_length=1)
    """Per-TP facts keyed by the TP degree as a string (``"1"``, ``"2"``, ...)."""
    driver: str | None = None
    """GPU driver version."""
    vllm_version: str | None = None
    """vLLM version."""
    torch_version: str | None = None
    """torch version."""
    cuda_version: str | None = None
    """CUDA version."""
    date: str | None = None
    """When the profile was taken (ISO 8601)."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Engine arguments common to every TP."""

    def kv_cache_tokens(self) -> dict[int, int]:
        """KV capacity per TP degree (int keys)."""
        return {int(tp): m.kv_cache_tokens for tp, m in self.per_tp.items()}


def meta_path_for(profile_path: str | Path) -> Path:
    """``<dir>/<model>.meta.json`` for ``<dir>/<model>.csv[.gz]``."""
    p = Path(profile_path)
    stem = p.name.removesuffix(".gz").removesuffix(".csv")
    return p.with_name(f"{stem}.meta.json")


def load_meta(path: str | Path) -> ProfileMeta:
    """Read and validate a profile metadata JSON; unknown keys are kept but reported in a warning."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile metadata {p}: no such file; it sits next to the CSV as <model>.meta.json")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"profile metadata {p}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ProfileError(f"profile metadata {p}: expected an object with a 'model' object (ModelSpec fields)")
    model_fields = set(ModelSpec.model_fields)
    extra_model_keys = sorted(set(raw["model"]) - model_fields)
    raw = {**raw, "model": {k: v for k, v in raw["model"].items() if k in model_fields}}
    for tp in raw.get("per_tp", {}) or {}:
        if not str(tp).isdigit() or int(tp) not in SUPPORTED_TP:
            raise ProfileError(f"profile metadata {p}: per_tp key {tp!r} is not a TP degree in {SUPPORTED_TP}")
    try:
        meta = ProfileMeta.model_validate(raw)
    except ValidationError as exc:
        raise ProfileError(f"profile metadata {p}: {exc}") from None
    unknown = sorted(meta.model_extra or {}) + [f"model.{k}" for k in extra_model_keys]
    for tp, m in meta.per_tp.items():
        unknown += [f"per_tp.{tp}.{k}" for k in sorted(m.model_extra or {})]
    if unknown:
        warnings.warn(f"profile metadata {p}: ignoring keys not in the schema: {unknown}", stacklevel=2)
    return meta
