"""Errors and load reports of the trace loaders, and the row collector they share.

A malformed row stops the load with a :class:`TraceFormatError` that names the file, the line, the column and
the value. With ``skip_bad_rows=True`` the row is skipped instead, and the returned :class:`LoadReport` says
how many rows were skipped and shows the first few reasons.
"""

from __future__ import annotations

import gzip
import io
import logging
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.workloads.trace import RequestTrace

logger = logging.getLogger(__name__)

T = TypeVar("T")

SKIP_HINT = "fix the row, or pass skip_bad_rows=True (CLI: --skip-bad-rows) to skip malformed rows and count them"


class TraceFormatError(ValueError):
    """A trace file that cannot be read as its format; the message names the file, line, column and value."""

    def __init__(
        self, path: str | Path, line: int | None, reason: str, column: str | None = None, value: object = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        self.value = value
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f" column {column!r}" if column is not None else ""
        text = repr(value)
        shown = f" value {text if len(text) <= 80 else text[:77] + '...'}" if value is not None else ""
        detail = f"{what}{shown}".strip()
        super().__init__(f"{where}: {detail}: {reason}" if detail else f"{where}: {reason}")


class LoadReport(Frozen):
    """What a loader read, kept, skipped and dropped."""

    path: str
    """The file (or files) read."""
    format: str
    """The trace format it was read as."""
    rows_read: int = Field(ge=0)
    """Data rows seen (header and blank lines excluded)."""
    requests: int = Field(ge=0)
    """Requests in the returned trace."""
    rows_skipped: int = Field(default=0, ge=0)
    """Malformed rows skipped because ``skip_bad_rows`` was set."""
    skipped_examples: tuple[str, ...] = ()
    """The first few skip reasons (file:line: column value: reason)."""
    rows_dropped: int = Field(default=0, ge=0)
    """Well-formed rows left out on purpose (e.g. BurstGPT failures, a model filter); see ``notes``."""
    rows_out_of_order: int = Field(default=0, ge=0)
    """Rows whose time was earlier than the previous row's (the trace was sorted, stably)."""
    stopped_early: bool = False
    """Reading stopped at ``max_rows`` or ``max_duration_s`` before the end of the file."""
    first_timestamp: str = ""
    """The raw timestamp text of the earliest request (time 0 of the trace)."""
    notes: tuple[str, ...] = ()
    """Anything else the caller should know (dropped rows, fallbacks, ignored columns)."""


class LoadedTrace(NamedTuple):
    """A loader's result: the trace and its :class:`LoadReport`."""

    trace: RequestTrace
    """The requests, sorted, with arrival 0 at the earliest request."""
    report: LoadReport
    """Rows read, skipped and dropped."""


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, transparently decompressing gzip (detected by its magic bytes)."""
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist or is not a file")
    with open(file_path, "rb") as raw:
        magic = raw.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(file_path, "rt", encoding="utf-8-sig", newline="")  # type: ignore[return-value]
    return open(file_path, encoding="utf-8-sig", newline="")


class RowCollector:
    """Accumulates ``(time, input_tokens, output_tokens)`` rows in compact arrays and handles bad rows.

    ``time`` is stored as given in ``time_typecode`` (``'q'`` integer ticks, ``'d'`` float) and converted to
    seconds relative to the earliest request by dividing by ``ticks_per_s`` at the end.
    """

    def __init__(
        self, path: str | Path, fmt: str, *, skip_bad_rows: bool, time_typecode: str, ticks_per_s: int
    ) -> None:
        self.path = str(path)
        self.fmt = fmt
        self.skip_bad_rows = skip_bad_rows
        self.ticks_per_s = ticks_per_s
        self.times: array = array(time_typecode)
        self.first_raw_time = ""
        self.inputs: array = array("q")
        self.outputs: array = array("q")
        self.rows_read = 0
        self.rows_skipped = 0
        self.rows_dropped = 0
        self.examples: list[str] = []
        self.notes: list[str] = []
        self.stopped_early = False
        self._first_time: float | None = None
        self._min_time: float | None = None
        self._last_bad_line: int | None = None

    def csv_rows(
        self, reader: Iterator[list[str]], width: int, max_rows: int | None
    ) -> Iterator[tuple[int, list[str]]]:
        """``(line, row)`` for each data row of a ``csv.reader`` that has ``width`` fields: empty lines are skipped,
        rows are counted in ``rows_read``, reading stops after ``max_rows`` (``stopped_early``), and a row with
        another number of fields is a bad row."""
        for row in reader:
            if not row:
                continue
            line = reader.line_num  # type: ignore[attr-defined]
            if max_rows is not None and self.rows_read >= max_rows:
                self.stopped_early = True
                return
            self.rows_read += 1
            if len(row) != width:
                self.bad(line, f"expected {width} comma-separated fields, found {len(row)}", value=",".join(row))
                continue
            yield line, row

    def bad(self, line: int, reason: str, column: str | None = None, value: object = None) -> None:
        """Record a malformed row: raise, or count it when skipping."""
        error = TraceFormatError(self.path, line, reason, column, value)
        if not self.skip_bad_rows:
            raise TraceFormatError(self.path, line, f"{reason}; {SKIP_HINT}", column, value)
        if line == self._last_bad_line:
            return  # a second bad field of the same row: the row is counted once
        self._last_bad_line = line
        self.rows_skipped += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    def field(self, line: int, column: str, text: str, parser: Callable[[str], T]) -> T | None:
        """Parse one field; on failure record the bad row and return ``None``."""
        try:
            return parser(text)
        except ValueError as exc:
            self.bad(line, str(exc), column, text)
            return None

    def add(self, time: float, raw_time: str, input_tokens: int, output_tokens: int) -> None:
        """Append one good row."""
        self.times.append(time)
        self.inputs.append(input_tokens)
        self.outputs.append(output_tokens)
        if self._min_time is None or time < self._min_time:
            self._min_time = time
            self.first_raw_time = raw_time

    def beyond(self, time: float, max_duration_s: float | None) -> bool:
        """Whether ``time`` lies more than ``max_duration_s`` after the first row's (files are sorted)."""
        if self._first_time is None:
            self._first_time = time
        if max_duration_s is None:
            return False
        return (time - self._first_time) / self.ticks_per_s >= max_duration_s

    def finish(self, *, tier: str, source_name: str, max_duration_s: float | None = None) -> LoadedTrace:
        """Sort (stably), rebase to the earliest request and build the trace and report."""
        times = np.frombuffer(self.times, dtype=np.int64 if self.times.typecode == "q" else np.float64)
        out_of_order = int(np.count_nonzero(np.diff(times) < 0)) if times.size > 1 else 0
        relative = (times - times.min()) / self.ticks_per_s if times.size else times.astype(np.float64)
        end_s = max_duration_s if self.stopped_early and max_duration_s is not None else None
        trace = RequestTrace.from_arrays(
            relative,
            np.frombuffer(self.inputs, dtype=np.int64),
            np.frombuffer(self.outputs, dtype=np.int64),
            tier_names=(tier,),
            source_names=(source_name,),
            start_s=0.0,
            end_s=end_s,
        )
        if self.rows_skipped:
            logger.warning("%s: skipped %d malformed rows", self.path, self.rows_skipped)
        report = LoadReport(
            path=self.path,
            format=self.fmt,
            rows_read=self.rows_read,
            requests=len(trace),
            rows_skipped=self.rows_skipped,
            skipped_examples=tuple(self.examples),
            rows_dropped=self.rows_dropped,
            rows_out_of_order=out_of_order,
            stopped_early=self.stopped_early,
            first_timestamp=self.first_raw_time,
            notes=tuple(self.notes),
        )
        return LoadedTrace(trace, report)


def default_source_name(path: str | Path) -> str:
    """A source name from a file name: the stem without ``.csv``/``.jsonl``/``.gz`` suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".csv", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or "trace"


def header_indices(header: list[str] | None, required: tuple[str, ...], path: str | Path, fmt: str) -> list[int]:
    """Positions of the ``required`` columns in a CSV header; a clear error when the file is empty or a
    column is missing (extra columns are allowed)."""
    if header is None:
        raise TraceFormatError(path, 1, f"the file is empty; a {fmt} trace starts with the header {','.join(required)}")
    names = [name.strip() for name in header]
    missing = [name for name in required if name not in names]
    if missing:
        raise TraceFormatError(
            path,
            1,
            f"header {','.join(names)!r} lacks column(s) {missing}; a {fmt} trace has the columns "
            f"{','.join(required)} (is --format right?)",
        )
    return [names.index(name) for name in required]
