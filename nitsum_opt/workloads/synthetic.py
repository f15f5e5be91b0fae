"""Length tables without timestamps, and the arrival processes that give them times.

A *length table* is a list of ``(input_tokens, output_tokens)`` pairs, e.g. Vidur's arXiv-summarization
table (``microsoft/vidur``,
``data/processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv``,
MIT; columns ``num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio``). A synthetic source draws
pairs from it with replacement and gives them arrival times from one of the processes below.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from nitsum_opt.models.spec import Frozen
from nitsum_opt.workloads.errors import RowCollector, header_indices, open_text
from nitsum_opt.workloads.parsing import parse_tokens

VIDUR_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")


def load_length_table(path: str | Path, *, skip_bad_rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(input_tokens, output_tokens)`` of a Vidur-style CSV (``num_prefill_tokens``, ``num_decode_tokens``,
    optional ``num_total_tokens`` that must equal their sum). Bad rows raise with file and line."""
    rows = RowCollector(path, "vidur", skip_bad_rows=skip_bad_rows, time_typecode="d", ticks_per_s=1)
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        i_in, i_out = header_indices(header, VIDUR_COLUMNS, path, "vidur length table")
        names = [h.strip() for h in header or ()]
        i_total = names.index("num_total_tokens") if "num_total_tokens" in names else None
        for row in reader:
            if not row:
                continue
            rows.rows_read += 1
            line = reader.line_num
            if len(row) != len(names):
                rows.bad(line, f"expected {len(names)} fields, found {len(row)}", value=",".join(row))
                continue
            inputs = rows.field(line, VIDUR_COLUMNS[0], row[i_in], parse_tokens)
            outputs = rows.field(line, VIDUR_COLUMNS[1], row[i_out], parse_tokens)
            if inputs is None or outputs is None:
                continue
            if i_total is not None:
                total = rows.field(line, "num_total_tokens", row[i_total], parse_tokens)
                if total is None:
                    continue
                if total != inputs + outputs:
                    rows.bad(line, f"num_total_tokens {total} != {inputs} + {outputs}", "num_total_tokens", total)
                    continue
            rows.add(0.0, "", inputs, outputs)
    if not rows.inputs:
        raise ValueError(f"{path}: the length table has no usable rows")
    return np.frombuffer(rows.inputs, dtype=np.int64).copy(), np.frombuffer(rows.outputs, dtype=np.int64).copy()


class PoissonArrivals(Frozen):
    """Memoryless arrivals at a constant rate."""

    kind: Literal["poisson"] = "poisson"
    """Discriminator."""
    rate_rps: float = Field(gt=0, allow_inf_nan=False)
    """Mean arrival rate in requests/s."""

    def sample(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        """Arrival times in ``[0, duration_s)``."""
        return _poisson(self.rate_rps, 0.0, duration_s, rng)


class GammaArrivals(Frozen):
    """A renewal process with Gamma gaps: rate plus burstiness (CV 1 = Poisson, > 1 = bursty)."""

    kind: Literal["gamma"] = "gamma"
    """Discriminator."""
    rate_rps: float = Field(gt=0, allow_inf_nan=False)
    """Mean arrival rate in requests/s."""
    cv: float = Field(gt=0, allow_inf_nan=False)
    """Coefficient of variation of the gaps."""

    def sample(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        """Arrival times in ``[0, duration_s)``."""
        shape = 1.0 / self.cv**2
        mean_gap = 1.0 / self.rate_rps
        times: list[np.ndarray] = []
        now = 0.0
        while now < duration_s:
            batch = np.cumsum(rng.gamma(shape, mean_gap / shape, max(16, int(2 * self.rate_rps * duration_s)))) + now
            times.append(batch[batch < duration_s])
            now = float(batch[-1])
        return np.concatenate(times) if times else np.zeros(0)


class RateSegment(Frozen):
    """A stretch of constant rate in a piecewise schedule."""

    duration_s: float = Field(gt=0, allow_inf_nan=False)
    """Length of the stretch."""
    rate_rps: float = Field(ge=0, allow_inf_nan=False)
    """Poisson rate during the stretch (0 = silence)."""


class PiecewiseArrivals(Frozen):
    """Poisson arrivals whose rate follows a schedule, e.g. a background batch that arrives mid-trace.
    After the last segment the schedule repeats."""

    kind: Literal["piecewise"] = "piecewise"
    """Discriminator."""
    segments: tuple[RateSegment, ...] = Field(min_length=1)
    """Consecutive stretches from time 0."""

    @model_validator(mode="after")
    def _some_rate(self) -> PiecewiseArrivals:
        if not any(s.rate_rps > 0 for s in self.segments):
            raise ValueError("a piecewise schedule needs at least one segment with rate_rps > 0")
        return self

    @property
    def mean_rate_rps(self) -> float:
        """Time-average rate over one cycle of the schedule."""
        return sum(s.rate_rps * s.duration_s for s in self.segments) / sum(s.duration_s for s in self.segments)

    def sample(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        """Arrival times in ``[0, duration_s)``."""
        parts, start = [], 0.0
        while start < duration_s:
            for segment in self.segments:
                end = min(start + segment.duration_s, duration_s)
                if segment.rate_rps > 0 and end > start:
                    parts.append(_poisson(segment.rate_rps, start, end, rng))
                start += segment.duration_s
                if start >= duration_s:
                    break
        return np.concatenate(parts) if parts else np.zeros(0)


ArrivalProcess = Annotated[PoissonArrivals | GammaArrivals | PiecewiseArrivals, Field(discriminator="kind")]
"""Any arrival process, chosen in YAML by ``kind``."""


def _poisson(rate_rps: float, start_s: float, end_s: float, rng: np.random.Generator) -> np.ndarray:
    count = rng.poisson(rate_rps * (end_s - start_s))
    return np.sort(rng.uniform(start_s, end_s, count))


def arrival_mean_rate_rps(process: PoissonArrivals | GammaArrivals | PiecewiseArrivals) -> float:
    """The long-run mean rate of an arrival process."""
    return process.mean_rate_rps if isinstance(process, PiecewiseArrivals) else process.rate_rps
