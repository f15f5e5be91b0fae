"""``PerformanceModel``: everything the planner and the simulator need about one model on one GPU type.

It bundles the model spec, the fitted mean and quantile iteration-time models, the KV-cache capacity per TP,
the held-out errors and provenance (profile hash, library versions). It is saved as plain JSON (parameters
only, never pickle): loading parses JSON, checks the format tag, the version and a SHA-256 over the canonical
content, then validates every field; a foreign, corrupted or edited file raises
:class:`PerformanceModelFileError` and no code from the file ever runs.
"""

from __future__ import annotations

import hashlib
import json
import platform
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .features import COMPOSITION_COLUMNS, FloatArray
from .heldout import HeldoutReport, evaluate_heldout, fit_models
from .latency import DEFAULT_QUANTILES, IterationTimeModel
from .memory import estimate_kv_cache_tokens, gpu_memory_gib
from .profile_schema import ProfileError, ProfileMeta, load_meta, load_profile, meta_path_for, profile_sha256
from .quantile import IterationTimeQuantileModel
from .spec import ModelSpec, model_preset
from .step_regime import StepRegimeLimits

FORMAT = "nitsum.performance-model"
FORMAT_VERSION = 2
MAX_FILE_BYTES = 16 * 1024 * 1024
PROFILES_DIR = Path(__file__).parent / "data" / "profiles"
#: Bundled profile sets, most preferred first (a plain model name resolves to the first set that has it).
BUNDLED_SETS: tuple[str, ...] = ("h200-vllm0.26", "h100-public-composed")


class PerformanceModelFileError(ValueError):
    """A performance-model file that is not ours, is corrupted, or was edited after it was written."""


class Provenance(BaseModel):
    """Where a performance model comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile_file: str
    """File name of the profile CSV it was fitted on."""
    profile_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the decompressed profile CSV."""
    profile_rows: int = Field(ge=1)
    """Rows of the profile."""
    profile_configs: int = Field(ge=1)
    """Distinct ``config_id`` values."""
    profile_command: str
    """Command that produced the profile (from its meta file)."""
    kv_cache_source: Literal["profile-meta", "estimated"]
    """Whether the KV capacities were measured (meta file) or estimated from GPU memory."""
    versions: dict[str, str]
    """Library versions used to fit."""


class PerformanceModelDoc(BaseModel):
    """The JSON document of a saved :class:`PerformanceModel` (everything but ``content_sha256`` is hashed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["nitsum.performance-model"]
    """Format tag; anything else is a foreign file."""
    format_version: Literal[2]
    """Version of this layout."""
    spec: ModelSpec
    """Architecture."""
    gpu: str
    """GPU type the profile was measured on."""
    kv_cache_tokens: dict[str, int]
    """KV capacity per TP degree (string keys), tokens."""
    engine_args: dict[str, Any]
    """Engine arguments of the profile (``max_num_batched_tokens``, ``max_num_seqs``, ...)."""
    feature_names: list[str]
    """Design-matrix columns of the mean model."""
    mean_model: dict[str, Any]
    """Learned parameters of :class:`IterationTimeModel`."""
    quantile_model: dict[str, Any]
    """Learned parameters of :class:`IterationTimeQuantileModel`."""
    heldout: HeldoutReport
    """Held-out errors (never on training data)."""
    provenance: Provenance
    """Data hash, command and versions."""


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "scikit-learn", "pandas", "pydantic", "nitsum"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


class PerformanceModel:
    """Latency and memory model of one LLM on one GPU type (one object per model × GPU).

    The simulator's API: :meth:`predict_ms` (mean step, pure Python), :meth:`predict_quantile_ms`,
    :meth:`predict_batch_ms` (vectorised), :meth:`kv_cache_tokens`.
    """

    def __init__(self, doc: PerformanceModelDoc, quantile_model: IterationTimeQuantileModel) -> None:
        self.doc = doc
        self.quantile_model = quantile_model
        self.mean_model: IterationTimeModel = quantile_model.mean_model_
        self.predict_ms = self.mean_model.predict_ms
        """``predict_ms(tp, num_prefill_seqs, prefill_tokens, prefill_attention_pairs, num_decode_seqs,
        decode_context_tokens) -> float``: mean step time in ms (bound straight to the fast path)."""
        self._kv = {int(tp): v for tp, v in doc.kv_cache_tokens.items()}

    # -- the simulator's API --------------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        """Architecture."""
        return self.doc.spec

    @property
    def gpu(self) -> str:
        """GPU type."""
        return self.doc.gpu

    @property
    def tps(self) -> tuple[int, ...]:
        """TP degrees the model covers."""
        return self.mean_model.tps_

    @property
    def quantiles(self) -> tuple[float, ...]:
        """Fitted quantile levels."""
        return tuple(self.quantile_model.quantiles)

    @property
    def engine_args(self) -> dict[str, Any]:
        """Engine arguments the profile was taken with."""
        return dict(self.doc.engine_args)

    @property
    def label(self) -> str:
        """Short provenance label, e.g. ``llama-3.1-8b@NVIDIA H200:profile 1a2b3c4d5e6f``."""
        return f"{self.spec.name}@{self.gpu}:profile {self.doc.provenance.profile_sha256[:12]}"

    @property
    def heldout(self) -> HeldoutReport:
        """Held-out errors per TP."""
        return self.doc.heldout

    def kv_cache_tokens(self, tp: int) -> int:
        """KV-cache capacity (tokens) of one engine at TP ``tp``."""
        try:
            return self._kv[tp]
        except KeyError:
            raise KeyError(f"no KV capacity for tp={tp}; the model covers tp {sorted(self._kv)}") from None

    def predict_quantile_ms(
        self,
        quantile: float,
        tp: int,
        num_prefill_seqs: int,
        prefill_tokens: int,
        prefill_attention_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """Quantile ``quantile`` (one of :attr:`quantiles`) of one step's time in ms."""
        return self.quantile_model.predict_quantile_ms(
            quantile,
            tp,
            num_prefill_seqs,
            prefill_tokens,
            prefill_attention_pairs,
            num_decode_seqs,
            decode_context_tokens,
        )

    def predict_batch_ms(self, composition: npt.ArrayLike, validate: bool = True) -> FloatArray:
        """Mean step time (ms) of every row of a composition matrix (columns ``COMPOSITION_COLUMNS``).

        ``validate=False`` skips input checks and range warnings (for trusted float64 matrices in hot loops).
        """
        if validate:
            return self.mean_model.predict(composition)
        return self.mean_model.predict_trusted(np.asarray(composition, dtype=float))

    def predict_quantiles_batch_ms(self, composition: npt.ArrayLike) -> FloatArray:
        """Quantiles (ms), shape ``(n, len(quantiles))``."""
        return self.quantile_model.predict(composition)

    # -- persistence ----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The JSON document with its content hash."""
        payload = self.doc.model_dump(mode="json")
        digest = hashlib.sha256(_canonical(payload)).hexdigest()
        return json.dumps({**payload, "content_sha256": digest}, indent=1, sort_keys=True, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the JSON document to ``path`` (parents created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json(), encoding="utf-8")
        return p

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "<string>") -> PerformanceModel:
        """Parse, verify (format, version, hash) and rebuild; raises :class:`PerformanceModelFileError`."""

        def fail(why: str) -> PerformanceModelFileError:
            return PerformanceModelFileError(f"performance model {origin}: {why}")

        def reject_constant(name: str) -> float:
            raise ValueError(f"{name} is not allowed")

        try:
            raw = json.loads(text, parse_constant=reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise fail(f"not valid JSON ({exc}); the file is corrupted or not a performance model") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise fail(
                f'not a performance model (expected "format": "{FORMAT}"); refit it with `nitsum models fit PROFILE`'
            )
        if raw.get("format_version") != FORMAT_VERSION:
            raise fail(
                f"format_version {raw.get('format_version')!r} is not supported (this version reads "
                f"{FORMAT_VERSION}); refit it with `nitsum models fit PROFILE`"
            )
        claimed = raw.pop("content_sha256", None)
        try:
            actual = hashlib.sha256(_canonical(raw)).hexdigest()
        except (TypeError, ValueError) as exc:
            raise fail(f"content cannot be hashed ({exc})") from None
        if claimed != actual:
            raise fail(
                "content hash mismatch: the file was edited or corrupted after it was written; refit it "
                "with `nitsum models fit PROFILE` instead of editing it"
            )
        try:
            doc = PerformanceModelDoc.model_validate(raw)
            mean = IterationTimeModel.from_params(doc.spec, doc.mean_model)
            quant = IterationTimeQuantileModel.from_params(mean, doc.quantile_model)
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            raise fail(f"invalid content: {exc}") from None
        if doc.feature_names != list(mean.feature_names_):
            raise fail("feature names do not match the mean model")
        if {int(k) for k in doc.kv_cache_tokens} != set(mean.tps_):
            raise fail("kv_cache_tokens must cover exactly the model's TP degrees")
        return cls(doc, quant)

    @classmethod
    def load(cls, path: str | Path) -> PerformanceModel:
        """Load a saved model from a file."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"performance model {p}: no such file")
        if p.stat().st_size > MAX_FILE_BYTES:
            raise PerformanceModelFileError(f"performance model {p}: larger than {MAX_FILE_BYTES} bytes; not ours")
        return cls.from_json(p.read_bytes(), origin=str(p))


def _kv_capacity(meta: ProfileMeta | None, spec: ModelSpec, gpu: str, tps: list[int]) -> tuple[dict[str, int], str]:
    measured = meta.kv_cache_tokens() if meta is not None else {}
    if all(tp in measured for tp in tps):
        return {str(tp): measured[tp] for tp in tps}, "profile-meta"
    missing = [tp for tp in tps if tp not in measured]
    warnings.warn(
        f"no measured kv_cache_tokens for tp {missing}; estimating them from GPU memory "
        "(nitsum_opt.models.memory.estimate_kv_cache_tokens, ±10 %)",
        stacklevel=3,
    )
    memory = gpu_memory_gib(gpu)
    out = {str(tp): measured.get(tp) or estimate_kv_cache_tokens(spec, tp, memory) for tp in tps}
    return out, "estimated"


def fit_performance_model(
    profile_path: str | Path,
    meta_path: str | Path | None = None,
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
    n_splits: int = 5,
    random_state: int = 0,
) -> PerformanceModel:
    """Validate a profile (+ meta), measure held-out errors, fit on all rows and bundle the result."""
    profile_path = Path(profile_path)
    mp = Path(meta_path) if meta_path is not None else meta_path_for(profile_path)
    meta = load_meta(mp) if mp.is_file() else None
    if meta is None and meta_path is not None:
        raise ProfileError(f"profile metadata {mp}: no such file")
    if meta is not None:
        spec = meta.model
    else:
        head = load_profile(profile_path)
        spec = model_preset(str(head["model"].iloc[0]))
        warnings.warn(f"no meta file {mp}; using the bundled spec of {spec.name!r}", stacklevel=2)
    df = load_profile(profile_path, spec)
    gpu = str(df["gpu"].iloc[0])
    if meta is not None and meta.gpu != gpu:
        raise ProfileError(f"profile {profile_path}: gpu {gpu!r} differs from the meta file's {meta.gpu!r}")
    limits = StepRegimeLimits.from_engine_args(meta.engine_args if meta is not None else {})
    report = evaluate_heldout(
        df, spec, n_splits=n_splits, quantiles=quantiles, random_state=random_state, limits=limits
    )
    qmodel = fit_models(df, spec, quantiles=quantiles, random_state=random_state, limits=limits)
    tps = sorted(int(t) for t in df["tp"].unique())
    kv, kv_source = _kv_capacity(meta, spec, gpu, tps)
    doc = PerformanceModelDoc(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        spec=spec,
        gpu=gpu,
        kv_cache_tokens=kv,
        engine_args=dict(meta.engine_args) if meta is not None else {},
        feature_names=list(qmodel.mean_model_.feature_names_),
        mean_model=qmodel.mean_model_.to_params(),
        quantile_model=qmodel.to_params(),
        heldout=report,
        provenance=Provenance(
            profile_file=profile_path.name,
            profile_sha256=profile_sha256(profile_path),
            profile_rows=len(df),
            profile_configs=int(df["config_id"].nunique()),
            profile_command=meta.command if meta is not None else "unknown",
            kv_cache_source=kv_source,
            versions=_versions(),
        ),
    )
    # Round-trip through JSON so that an in-memory model behaves exactly like a loaded one.
    return PerformanceModel.from_json(PerformanceModel(doc, qmodel).to_json(), origin=str(profile_path))


def default_model_path(profile_path: str | Path) -> Path:
    """``<dir>/<model>.perf.json`` next to ``<dir>/<model>.csv.gz``."""
    p = Path(profile_path)
    return p.with_name(p.name.removesuffix(".gz").removesuffix(".csv") + ".perf.json")


def bundled_models() -> dict[str, Path]:
    """Bundled fitted models, ``{"<set>/<model>": path}``."""
    out: dict[str, Path] = {}
    for set_name in BUNDLED_SETS:
        for path in sorted((PROFILES_DIR / set_name).glob("*.perf.json")):
            out[f"{set_name}/{path.name.removesuffix('.perf.json')}"] = path
    return out


def load_performance_model(name_or_path: str | Path) -> PerformanceModel:
    """Load a fitted model from a file path, a bundled ``<set>/<model>`` name or a bare ``<model>`` name (the
    most preferred bundled set that has it, see :data:`BUNDLED_SETS`)."""
    p = Path(name_or_path)
    if p.is_file():
        return PerformanceModel.load(p)
    bundled = bundled_models()
    key = str(name_or_path)
    if key in bundled:
        return PerformanceModel.load(bundled[key])
    for set_name in BUNDLED_SETS:
        if f"{set_name}/{key}" in bundled:
            return PerformanceModel.load(bundled[f"{set_name}/{key}"])
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a performance-model file nor a bundled model; "
        f"bundled: {sorted(bundled)}; "
        "fit one with `nitsum models fit PROFILE`"
    )


def composition_matrix(rows: npt.ArrayLike) -> FloatArray:
    """Helper for callers that build compositions: a float matrix with :data:`COMPOSITION_COLUMNS` columns."""
    arr = np.asarray(rows, dtype=float)
    return arr.reshape(-1, len(COMPOSITION_COLUMNS))
