"""Build a tiered :class:`RequestTrace` from a :class:`WorkloadSpec` (the pipeline is described in
:mod:`nitsum_opt.workloads.spec`)."""

from __future__ import annotations

import zlib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.workloads.errors import LoadReport
from nitsum_opt.workloads.formats import load_trace
from nitsum_opt.workloads.servegen import load_servegen
from nitsum_opt.workloads.spec import (
    ServeGenSource,
    Source,
    SourceBase,
    SyntheticSource,
    TraceSource,
    WorkloadSpec,
)
from nitsum_opt.workloads.synthetic import load_length_table
from nitsum_opt.workloads.trace import RequestTrace

BUNDLED_PREFIX = "bundled:"


class SourceReport(Frozen):
    """What one source contributed to a built workload."""

    name: str
    """Source name."""
    tier: str
    """Its tier."""
    requests: int = Field(ge=0)
    """Requests it contributed (before the workload-level ``duration_s`` cut)."""
    time_compression: float = Field(gt=0)
    """Factor its times were divided by (from ``time_compression`` or ``target_mean_rate_rps``)."""
    mean_rate_rps: float = Field(ge=0)
    """Its mean rate after scaling, before ``load_scale``."""
    clipped_requests: int = Field(default=0, ge=0)
    """Requests whose lengths were clipped to ``max_total_tokens``."""
    dropped_requests: int = Field(default=0, ge=0)
    """Requests dropped for exceeding ``max_total_tokens``."""
    load: LoadReport | None = None
    """The loader's report (``None`` for synthetic arrivals)."""


class BuiltWorkload(NamedTuple):
    """A built workload and how each source contributed."""

    trace: RequestTrace
    """All requests, tier indices in ``WorkloadSpec.tiers`` order."""
    sources: tuple[SourceReport, ...]
    """One report per source, in spec order."""


def resolve_path(path: str, base_dir: str | Path | None) -> Path:
    """``bundled:<p>`` → the packaged ``nitsum_opt/data/traces/<p>``; a relative path → under ``base_dir``."""
    if path.startswith(BUNDLED_PREFIX):
        bundled = Path(str(resources.files("nitsum_opt") / "data" / "traces")) / path[len(BUNDLED_PREFIX) :]
        if not bundled.is_file():
            raise FileNotFoundError(f"no bundled trace {path!r} (looked for {bundled})")
        return bundled
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = Path(base_dir) / candidate
    return candidate


def source_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of source ``name`` (independent of the other sources and of their order)."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _read_trace_source(source: TraceSource, base_dir: str | Path | None) -> tuple[RequestTrace, LoadReport]:
    end = None if source.window_duration_s is None else source.window_start_s + source.window_duration_s
    trace, report = load_trace(
        resolve_path(source.path, base_dir),
        source.format,
        skip_bad_rows=source.skip_bad_rows,
        source_name=source.name,
        max_duration_s=end,
    )
    if trace.end_s <= source.window_start_s:
        raise ValueError(
            f"source {source.name!r}: window_start_s={source.window_start_s} is at or after the end of "
            f"{source.path} ({trace.end_s:.1f} s after its first request)"
        )
    return trace.window(source.window_start_s, np.inf if end is None else end, rebase=True), report


def _read_servegen_source(
    source: ServeGenSource, base_dir: str | Path | None, seed: int
) -> tuple[RequestTrace, LoadReport]:
    datasets = None if source.datasets_path is None else resolve_path(source.datasets_path, base_dir)
    return load_servegen(
        resolve_path(source.windows_path, base_dir),
        datasets,
        skip_bad_rows=source.skip_bad_rows,
        source_name=source.name,
        start_s=source.start_s,
        duration_s=source.duration_s,
        clients=source.clients,
        top_clients=source.top_clients,
        rate_scale=source.rate_scale,
        missing_lengths=source.missing_lengths,
        seed=seed,
    )


def _read_synthetic_source(
    source: SyntheticSource, base_dir: str | Path | None, rng: np.random.Generator
) -> tuple[RequestTrace, LoadReport | None]:
    path = resolve_path(source.lengths_path, base_dir)
    report = None
    if source.lengths_format == "vidur":
        inputs, outputs = load_length_table(path)
    else:
        table, report = load_trace(path, source.lengths_format)
        inputs, outputs = table.input_tokens, table.output_tokens
    arrival = source.arrivals.sample(source.duration_s, rng)
    pick = rng.integers(0, inputs.size, arrival.size)
    trace = RequestTrace.from_arrays(
        arrival,
        inputs[pick],
        outputs[pick],
        source_names=(source.name,),
        start_s=0.0,
        end_s=source.duration_s,
    )
    return trace, report


def fit_lengths(trace: RequestTrace, max_total_tokens: int | None, policy: str) -> tuple[RequestTrace, int, int]:
    """Apply a length limit: ``(trace, clipped, dropped)``. Clipping keeps the output when it fits (at most
    ``max_total_tokens - 1``) and shortens the prompt to the rest."""
    if max_total_tokens is None or len(trace) == 0:
        return trace, 0, 0
    over = trace.input_tokens + trace.output_tokens > max_total_tokens
    count = int(over.sum())
    if count == 0:
        return trace, 0, 0
    if policy == "drop":
        return trace.take(~over), 0, count
    outputs = np.minimum(trace.output_tokens, max_total_tokens - 1)
    inputs = np.minimum(trace.input_tokens, max_total_tokens - outputs)
    return trace.with_lengths(inputs, outputs), count, 0


def _rate_factor(source: SourceBase, trace: RequestTrace) -> float:
    if source.target_mean_rate_rps is None:
        return source.time_compression
    if trace.mean_rate_rps <= 0:
        raise ValueError(f"source {source.name!r} has no requests (or no duration): cannot reach a target rate")
    return source.target_mean_rate_rps / trace.mean_rate_rps


def build_source(source: Source, spec: WorkloadSpec, base_dir: str | Path | None) -> tuple[RequestTrace, SourceReport]:
    """One source's requests on the workload clock, labelled with its tier and name."""
    rng = source_rng(spec.seed, source.name)
    if isinstance(source, TraceSource):
        raw, load = _read_trace_source(source, base_dir)
    elif isinstance(source, ServeGenSource):
        raw, load = _read_servegen_source(source, base_dir, int(rng.integers(2**31)))
    else:
        raw, load = _read_synthetic_source(source, base_dir, rng)
    fitted, clipped, dropped = fit_lengths(raw, source.max_total_tokens, source.overlong)
    factor = _rate_factor(source, fitted)
    trace = fitted.compress_time(factor).shift(source.offset_s).with_tier(source.tier).with_source_name(source.name)
    report = SourceReport(
        name=source.name,
        tier=source.tier,
        requests=len(trace),
        time_compression=factor,
        mean_rate_rps=len(trace) / (trace.duration_s or 1.0),
        clipped_requests=clipped,
        dropped_requests=dropped,
        load=load,
    )
    return trace, report


def build_workload_detailed(spec: WorkloadSpec, base_dir: str | Path | None = None) -> BuiltWorkload:
    """Build the workload and report each source's contribution."""
    parts = [build_source(source, spec, base_dir) for source in spec.sources]
    merged = RequestTrace.merge([p[0] for p in parts], tier_names=spec.tiers).with_interval(
        0.0, max(p[0].end_s for p in parts)
    )
    trace = merged.compress_time(spec.load_scale)
    if spec.duration_s is not None:
        trace = trace.window(0.0, spec.duration_s).with_interval(0.0, spec.duration_s)
    return BuiltWorkload(trace, tuple(p[1] for p in parts))


def build_workload(spec: WorkloadSpec, base_dir: str | Path | None = None) -> RequestTrace:
    """Build the workload's requests (tier indices in ``spec.tiers`` order)."""
    return build_workload_detailed(spec, base_dir).trace


def build_workload_file(path: str | Path) -> BuiltWorkload:
    """Load a YAML :class:`WorkloadSpec` and build it, relative paths taken from the YAML's folder."""
    return build_workload_detailed(WorkloadSpec.load(path), base_dir=Path(path).parent)
