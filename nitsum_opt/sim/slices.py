"""Trace slices for checking the simulator against a real engine: the same requests, replayed on a GPU and simulated.

A *slice* is a window of a workload compressed to a target arrival rate, with its clock starting at 0. A slice file
is a CSV with one row per request::

    slice,arrival_s,input_tokens,output_tokens,tier
    mean-6rps,0.0312,1020,128,interactive

``make_slices`` cuts them from a trace, ``write_slices`` / ``read_slices`` store them (reading checks every row
and names the file and line of a bad one). The GPU side (:mod:`nitsum_runtime.bench_fidelity`) replays each slice
on vLLM; :mod:`nitsum_opt.sim.fidelity` simulates the same slices and compares. Only numpy here, so the GPU
machine can read slice files without the planner's dependencies.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nitsum_opt.workloads.trace import RequestTrace

HEADER = ("slice", "arrival_s", "input_tokens", "output_tokens", "tier")


@dataclass(frozen=True)
class TraceSlice:
    """One slice: requests sorted by arrival, clock from 0, observed over ``[0, duration_s]``."""

    name: str
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    tier: tuple[str, ...]
    duration_s: float

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def offered_rps(self) -> float:
        """Requests per second over the slice."""
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def to_trace(self, tier_names: Sequence[str]) -> RequestTrace:
        """As a :class:`RequestTrace` over ``[0, duration_s]`` with the given tier order (every tier must be
        among ``tier_names``)."""
        index = {name: k for k, name in enumerate(tier_names)}
        unknown = sorted(set(self.tier) - set(index))
        if unknown:
            raise ValueError(f"slice {self.name!r}: tiers {unknown} are not among {list(tier_names)}")
        return RequestTrace.from_arrays(
            self.arrival_s,
            self.input_tokens,
            self.output_tokens,
            tier=np.array([index[t] for t in self.tier], dtype=np.int64),
            tier_names=tuple(tier_names),
            start_s=0.0,
            end_s=self.duration_s,
        )


def make_slices(
    trace: RequestTrace, rates_rps: Sequence[float], window_s: float, start_s: float = 0.0
) -> list[TraceSlice]:
    """Per target rate ``r``: ``trace`` compressed ``r / mean rate``-fold, the requests of
    ``[start_s / f, start_s / f + window_s)`` of it (``start_s`` on the uncompressed clock), clock from 0, named
    ``mean-<r>rps`` (the window's own rate, :attr:`TraceSlice.offered_rps`, differs where the trace is burstier)."""
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s={window_s} must be a finite number > 0")
    if not trace.start_s <= start_s < trace.end_s:
        raise ValueError(f"start_s={start_s} must lie in the trace's interval [{trace.start_s}, {trace.end_s})")
    base_rate = trace.mean_rate_rps
    out = []
    for rate in rates_rps:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate {rate} req/s must be a finite number > 0")
        factor = rate / base_rate
        fast = trace.compress_time(factor)
        begin = start_s / factor
        if begin + window_s > fast.end_s:
            raise ValueError(
                f"rate {rate:g} req/s: the window [{begin:.0f}, {begin + window_s:.0f}) s runs past the compressed "
                f"trace's end {fast.end_s:.0f} s; use a smaller start_s or window_s"
            )
        part = fast.window(begin, begin + window_s, rebase=True)
        out.append(
            TraceSlice(
                name=f"mean-{rate:g}rps",
                arrival_s=np.asarray(part.arrival_s, dtype=float),
                input_tokens=np.asarray(part.input_tokens, dtype=np.int64),
                output_tokens=np.asarray(part.output_tokens, dtype=np.int64),
                tier=tuple(part.tier_names[k] for k in part.tier),
                duration_s=float(window_s),
            )
        )
    return out


def write_slices(path: str | Path, slices: Sequence[TraceSlice]) -> None:
    """Write ``slices`` as one CSV (see the module docstring); a slice's duration is its window, stored as a
    comment line ``# duration <name> <seconds>`` before the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        for s in slices:
            fh.write(f"# duration {s.name} {s.duration_s:g}\n")
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for s in slices:
            for i in range(len(s)):
                writer.writerow(
                    (s.name, f"{s.arrival_s[i]:.6f}", int(s.input_tokens[i]), int(s.output_tokens[i]), s.tier[i])
                )


def _parse_row(path: Path, line: int, row: list[str]) -> tuple[str, float, int, int, str]:
    where = f"{path}:{line}"
    if len(row) != len(HEADER):
        raise ValueError(f"{where}: expected {len(HEADER)} columns {', '.join(HEADER)}, got {len(row)}: {row}")
    name, arrival, n_in, n_out, tier = row
    try:
        values = float(arrival), int(n_in), int(n_out)
    except ValueError:
        raise ValueError(f"{where}: arrival_s, input_tokens, output_tokens must be numbers, got {row[1:4]}") from None
    if not (math.isfinite(values[0]) and values[0] >= 0) or values[1] < 1 or values[2] < 1:
        raise ValueError(f"{where}: need arrival_s ≥ 0 and token counts ≥ 1, got {row[1:4]}")
    if not name or not tier:
        raise ValueError(f"{where}: slice and tier must not be empty")
    return name, values[0], values[1], values[2], tier


def read_slices(path: str | Path) -> list[TraceSlice]:
    """Read a slice file; every row is checked (columns, numbers, arrivals non-decreasing within a slice, a
    duration line for each slice) and a bad one raises ``ValueError`` naming its file and line."""
    path = Path(path)
    durations: dict[str, float] = {}
    rows: dict[str, list[tuple[float, int, int, str]]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        lines = fh.read().splitlines()
    body_start = 0
    for body_start, text in enumerate(lines):
        if not text.startswith("#"):
            break
        parts = text.split()
        if len(parts) != 4 or parts[1] != "duration":
            raise ValueError(f"{path}:{body_start + 1}: expected '# duration <slice> <seconds>', got {text!r}")
        durations[parts[2]] = float(parts[3])
    reader = csv.reader(lines[body_start:])
    header = next(reader, None)
    if header is None or tuple(header) != HEADER:
        raise ValueError(f"{path}:{body_start + 1}: expected the header {','.join(HEADER)}, got {header}")
    for offset, row in enumerate(reader):
        line = body_start + 2 + offset
        name, arrival, n_in, n_out, tier = _parse_row(path, line, row)
        kept = rows.setdefault(name, [])
        if kept and arrival < kept[-1][0]:
            raise ValueError(f"{path}:{line}: arrival {arrival} s of slice {name!r} is before the previous one")
        kept.append((arrival, n_in, n_out, tier))
    missing = sorted(set(rows) - set(durations))
    if missing:
        raise ValueError(f"{path}: no '# duration' line for slices {missing}")
    return [
        TraceSlice(
            name=name,
            arrival_s=np.array([r[0] for r in kept], dtype=float),
            input_tokens=np.array([r[1] for r in kept], dtype=np.int64),
            output_tokens=np.array([r[2] for r in kept], dtype=np.int64),
            tier=tuple(r[3] for r in kept),
            duration_s=durations[name],
        )
        for name, kept in rows.items()
    ]


__all__ = ["HEADER", "TraceSlice", "make_slices", "read_slices", "write_slices"]
