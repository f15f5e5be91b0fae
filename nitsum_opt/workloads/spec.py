"""``WorkloadSpec``: which sources feed which SLO tier, how they are windowed, scaled and mixed (YAML).

Pipeline (see :func:`nitsum_opt.workloads.builder.build_workload`), per source:

1. read it on its own clock starting at 0 (a trace file: the window ``[window_start_s, window_start_s +
   window_duration_s)`` of its time since the first request; ServeGen: its sampled span; synthetic: lengths
   drawn from a table with generated arrivals over ``duration_s``);
2. fit lengths into ``max_total_tokens`` (clip the prompt, or drop the request);
3. scale its rate: divide its times by ``time_compression``, or pick the factor that makes its mean rate
   ``target_mean_rate_rps`` (for a tier fed by one source this is the tier's target rate);
4. shift it by ``offset_s`` (this is how tiers are mixed over time) and label it with its tier.

Then all sources are merged by arrival time, the whole workload is compressed by ``load_scale`` (the knob of
a load sweep: 2 = every rate doubled, the timeline halved) and cut to ``[0, duration_s)``.

Paths are relative to the ``base_dir`` given to the builder (the YAML file's folder when built with
:func:`~nitsum_opt.workloads.builder.build_workload_file`), or ``bundled:<path>`` for data shipped in
``nitsum_opt/data/traces/``.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import Field, ValidationError, model_validator

from nitsum_opt.models.spec import Frozen
from nitsum_opt.workloads.synthetic import ArrivalProcess

TraceFormat = Literal["azure2023", "azure2024", "burstgpt", "mooncake"]
"""Formats of timed trace files (ServeGen has its own source kind)."""
LengthFormat = Literal["vidur", "azure2023", "azure2024", "burstgpt", "mooncake"]
"""Where a synthetic source takes its lengths from: a Vidur length table or any trace file."""

_NAME = r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$"
_TIER = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"


class SourceBase(Frozen):
    """Fields every source kind shares: its tier and the transforms applied to it."""

    name: str = Field(pattern=_NAME)
    """Unique source name (also seeds the source's random stream, so renaming changes its sample)."""
    tier: str = Field(pattern=_TIER)
    """SLO tier its requests belong to; must be listed in ``WorkloadSpec.tiers``."""
    offset_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Seconds by which the source starts after the workload's time 0 (after rate scaling)."""
    time_compression: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Divide the source's times by this factor (2 = twice the rate, half the duration)."""
    target_mean_rate_rps: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Instead of ``time_compression``: compress (or stretch) time so the mean rate is this many req/s."""
    max_total_tokens: int | None = Field(default=None, ge=2)
    """Longest prompt + output a request may have (the model's ``max_model_len``); ``None`` = no limit."""
    overlong: Literal["clip", "drop"] = "clip"
    """A longer request: ``clip`` shortens its prompt (and its output only if needed), ``drop`` removes it."""

    @model_validator(mode="after")
    def _one_rate_knob(self) -> Self:
        if self.target_mean_rate_rps is not None and self.time_compression != 1.0:
            raise ValueError(f"source {self.name!r}: set either time_compression or target_mean_rate_rps, not both")
        return self


class TraceSource(SourceBase):
    """Replay a timed trace file."""

    kind: Literal["trace"] = "trace"
    """Discriminator."""
    path: str = Field(min_length=1)
    """The file (``.gz`` is read transparently), relative to the base folder, or ``bundled:<path>``."""
    format: TraceFormat
    """Its format."""
    skip_bad_rows: bool = False
    """Skip malformed rows (counted in the build report) instead of failing."""
    window_start_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Start of the replayed window, in seconds since the file's first request."""
    window_duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Length of the replayed window (``None`` = to the end of the file)."""


class ServeGenSource(SourceBase):
    """Requests sampled from ServeGen per-client window data."""

    kind: Literal["servegen"] = "servegen"
    """Discriminator."""
    windows_path: str = Field(min_length=1)
    """The ``*_client_windows.csv[.gz]`` file."""
    datasets_path: str | None = None
    """The ``*_client_datasets.json[.gz]`` file (default: the sibling of ``windows_path``)."""
    start_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Start of the sampled span on ServeGen's timeline."""
    duration_s: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    """Length of the sampled span."""
    clients: tuple[int, ...] | None = None
    """Only these client ids (``None`` = all)."""
    top_clients: int | None = Field(default=None, ge=1)
    """Only the busiest N clients of the span."""
    rate_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Multiply every window's rate (thinning; keeps the timeline, unlike ``time_compression``)."""
    missing_lengths: Literal["pool", "drop", "error"] = "pool"
    """Clients without length data: borrow the present clients' pooled lengths, drop them, or fail."""
    skip_bad_rows: bool = False
    """Skip malformed window rows instead of failing."""


class SyntheticSource(SourceBase):
    """Lengths drawn (with replacement) from a table or trace file, with generated arrival times."""

    kind: Literal["synthetic"] = "synthetic"
    """Discriminator."""
    lengths_path: str = Field(min_length=1)
    """The length table or trace file."""
    lengths_format: LengthFormat = "vidur"
    """Its format (``vidur``: ``num_prefill_tokens,num_decode_tokens`` columns)."""
    arrivals: ArrivalProcess
    """The arrival process (``kind``: ``poisson``, ``gamma`` or ``piecewise``)."""
    duration_s: float = Field(gt=0, allow_inf_nan=False)
    """Length of the generated stretch, before rate scaling."""


Source = Annotated[TraceSource | ServeGenSource | SyntheticSource, Field(discriminator="kind")]
"""Any source kind, chosen in YAML by ``kind``."""


class WorkloadSpec(Frozen):
    """A tiered workload: sources mapped to SLO tiers, scaled, mixed over time, seeded."""

    name: str = Field(default="workload", pattern=_NAME)
    """Label for reports."""
    tiers: tuple[str, ...] = Field(min_length=1)
    """Tier names; their order is the tier index of the built trace."""
    sources: tuple[Source, ...] = Field(min_length=1)
    """The request sources."""
    seed: int = Field(default=0, ge=0)
    """Seed of every random draw (each source gets its own stream derived from it and its name)."""
    load_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Compress the whole merged workload's time by this factor (the load-sweep knob)."""
    duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Keep only ``[0, duration_s)`` of the scaled workload (``None`` = everything)."""

    @model_validator(mode="after")
    def _check_names(self) -> Self:
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"tier names must be unique, got {list(self.tiers)}")
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {duplicates}")
        for source in self.sources:
            if source.tier not in self.tiers:
                raise ValueError(
                    f"source {source.name!r} feeds tier {source.tier!r}, which is not in tiers {list(self.tiers)}"
                )
        return self

    def scaled(self, load_scale: float) -> WorkloadSpec:
        """The same workload at another ``load_scale``."""
        return WorkloadSpec.model_validate({**self.model_dump(), "load_scale": load_scale})

    def with_sources(self, keep: Collection[str]) -> WorkloadSpec:
        """Only the named sources (e.g. to study one tier)."""
        unknown = sorted(set(keep) - {s.name for s in self.sources})
        if unknown:
            raise KeyError(f"unknown sources {unknown}; sources are {[s.name for s in self.sources]}")
        return WorkloadSpec.model_validate(
            {**self.model_dump(), "sources": [s.model_dump() for s in self.sources if s.name in keep]}
        )

    # ------------------------------------------------------------------ YAML
    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back to an equal spec."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, origin: str = "<string>") -> WorkloadSpec:
        """Parse YAML text; errors name ``origin`` and the offending field."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{origin}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{origin}: a workload spec is a YAML mapping with keys tiers, sources, ...")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"{origin}: invalid workload spec:\n{exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> WorkloadSpec:
        """Read a YAML file."""
        return cls.from_yaml(Path(path).read_text(encoding="utf-8"), origin=str(path))

    def save(self, path: str | Path) -> None:
        """Write YAML to ``path``."""
        Path(path).write_text(self.to_yaml(), encoding="utf-8")
