"""Readers of the ServeGen per-client data (``alibaba/ServeGen`` ``data/``, Apache-2.0; Xiang et al.,
arXiv:2505.09999), in the layout of ``shared/data/traces/servegen`` (README section A3).

* ``<category>_<model>_client_windows.csv[.gz]``: ``client_id,window_start_s,rate_rps,iat_cv,iat_dist,
  iat_shape,iat_scale``: per client and 600 s window, the mean request rate and a fitted inter-arrival
  distribution (``Gamma`` = ``gamma(a=shape, scale=scale)``, ``Weibull`` = ``weibull_min(c=shape,
  scale=scale)``, empty = no requests).
* ``<category>_<model>_client_datasets.json[.gz]``: ``{client_id: {window_start_s: {field: "<python dict
  literal {value: probability}>"}}}``, the per-6-hour empirical length distributions. The literals are parsed
  with :func:`ast.literal_eval` (never ``eval``), lazily: only the (client, window) cells a sample needs.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nitsum_opt.workloads.errors import RowCollector, TraceFormatError, header_indices, open_text

WINDOW_S = 600
"""Length of a ServeGen rate window."""
DATASET_WINDOW_S = 21_600
"""Length of a ServeGen length-distribution window (6 h)."""
WINDOW_COLUMNS = ("client_id", "window_start_s", "rate_rps", "iat_cv", "iat_dist", "iat_shape", "iat_scale")
DISTRIBUTIONS = ("", "Gamma", "Weibull")
"""Codes of ``ServeGenWindows.dist``: 0 = none, 1 = Gamma, 2 = Weibull."""


@dataclass(frozen=True)
class ServeGenWindows:
    """The rows of a ``*_client_windows.csv``, as columns (rows with a rate of 0 are kept)."""

    path: str
    client_id: np.ndarray
    window_start_s: np.ndarray
    rate_rps: np.ndarray
    dist: np.ndarray
    shape: np.ndarray
    scale: np.ndarray
    rows_skipped: int = 0
    skipped_examples: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.client_id.shape[0])

    def requests_per_client(self, start_s: float, end_s: float) -> dict[int, float]:
        """Expected requests of each client in windows starting in ``[start_s, end_s)`` (Σ rate × 600 s)."""
        mask = (self.window_start_s >= start_s) & (self.window_start_s < end_s)
        totals = np.bincount(self.client_id[mask], weights=self.rate_rps[mask] * WINDOW_S)
        return {int(c): float(totals[c]) for c in np.flatnonzero(totals)}


def _parse_window_row(row: list[str], idx: list[int]) -> tuple[int, int, float, int, float, float]:
    """Raise ``ValueError((column, value), reason)`` on the first bad field."""

    def number(i: int, name: str, integer: bool = False) -> float:
        text = row[idx[i]].strip()
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise ValueError((name, text), f"expected {'an integer' if integer else 'a number'}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError((name, text), "expected a finite value ≥ 0")
        return value

    client, start = int(number(0, "client_id", True)), int(number(1, "window_start_s", True))
    if start % WINDOW_S:
        raise ValueError(("window_start_s", row[idx[1]]), f"expected a multiple of the {WINDOW_S} s window")
    rate, shape, scale = number(2, "rate_rps"), number(5, "iat_shape"), number(6, "iat_scale")
    number(3, "iat_cv")
    name = row[idx[4]].strip()
    if name not in DISTRIBUTIONS:
        raise ValueError(("iat_dist", name), f"expected one of {list(DISTRIBUTIONS)}")
    dist = DISTRIBUTIONS.index(name)
    if dist == 0 and rate > 0:
        raise ValueError(("iat_dist", name), f"rate_rps={rate} > 0 but no inter-arrival distribution is given")
    if dist > 0 and not (shape > 0 and scale > 0):
        raise ValueError(("iat_shape", row[idx[5]]), f"{name} needs shape > 0 and scale > 0, got {shape}, {scale}")
    return client, start, rate, dist, shape, scale


def read_servegen_windows(path: str | Path, *, skip_bad_rows: bool = False) -> ServeGenWindows:
    """Read and validate a ServeGen ``*_client_windows.csv[.gz]``; bad rows raise (file, line, column,
    value) or, with ``skip_bad_rows``, are skipped and counted."""
    errors = RowCollector(path, "servegen", skip_bad_rows=skip_bad_rows, time_typecode="d", ticks_per_s=1)
    columns: list[list[float]] = [[] for _ in range(6)]
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        idx = header_indices(header, WINDOW_COLUMNS, path, "servegen windows")
        width = len(header or ())
        for row in reader:
            if not row:
                continue
            if len(row) != width:
                errors.bad(reader.line_num, f"expected {width} fields, found {len(row)}", value=",".join(row))
                continue
            try:
                values = _parse_window_row(row, idx)
            except ValueError as exc:
                (column, value), reason = exc.args
                errors.bad(reader.line_num, reason, column, value)
                continue
            for target, value in zip(columns, values, strict=True):
                target.append(value)
    return ServeGenWindows(
        path=str(path),
        client_id=np.asarray(columns[0], dtype=np.int64),
        window_start_s=np.asarray(columns[1], dtype=np.int64),
        rate_rps=np.asarray(columns[2], dtype=np.float64),
        dist=np.asarray(columns[3], dtype=np.int8),
        shape=np.asarray(columns[4], dtype=np.float64),
        scale=np.asarray(columns[5], dtype=np.float64),
        rows_skipped=errors.rows_skipped,
        skipped_examples=tuple(errors.examples),
    )


@dataclass(frozen=True)
class Pmf:
    """An empirical distribution: sorted values and their cumulative probabilities (last = 1)."""

    values: np.ndarray
    cdf: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` independent draws."""
        index = np.searchsorted(self.cdf, rng.random(n), side="right")
        return self.values[np.minimum(index, self.values.size - 1)]

    @property
    def mean(self) -> float:
        """Expected value."""
        return float(np.dot(self.values, np.diff(self.cdf, prepend=0.0)))


def parse_pmf(text: str, where: str, path: str) -> Pmf | None:
    """Parse one ``{value: probability}`` literal with ``ast.literal_eval``; ``None`` for ``{}``."""
    try:
        table = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise TraceFormatError(path, None, "not a Python dict literal {value: probability}", where, text) from None
    if not isinstance(table, dict):
        raise TraceFormatError(path, None, "expected a dict {value: probability}", where, text)
    if not table:
        return None
    values = np.asarray(list(table.keys()), dtype=np.float64)
    probs = np.asarray(list(table.values()), dtype=np.float64)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(probs))) or probs.min() < 0 or values.min() < 0:
        raise TraceFormatError(path, None, "values and probabilities must be finite and ≥ 0", where, text)
    total = probs.sum()
    if not total > 0:
        raise TraceFormatError(path, None, "probabilities sum to 0", where, text)
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(probs[order]) / total
    cdf[-1] = 1.0
    return Pmf(values=values[order], cdf=cdf)


@dataclass
class ServeGenDatasets:
    """The per-client, per-6-h length distributions of one model, parsed lazily and cached."""

    path: str
    raw: dict[int, dict[int, dict[str, str]]]
    _cache: dict[tuple[int, int], dict[str, Pmf] | None] = field(default_factory=dict)

    @property
    def clients(self) -> frozenset[int]:
        """Clients that have length data."""
        return frozenset(self.raw)

    def fields(self) -> tuple[str, ...]:
        """The distribution fields (e.g. ``input_tokens``, ``output_tokens``), from the first entry."""
        for windows in self.raw.values():
            for cells in windows.values():
                return tuple(cells)
        return ()

    def cell(self, client: int, window_s: int) -> dict[str, Pmf] | None:
        """The parsed distributions of ``client`` in the 6-h window starting at ``window_s`` (``None`` when
        the window is absent or empty)."""
        key = (client, window_s)
        if key not in self._cache:
            cells = self.raw.get(client, {}).get(window_s)
            parsed: dict[str, Pmf] | None = None
            if cells is not None:
                pmfs = {
                    name: parse_pmf(text, f"[{client}][{window_s}][{name}]", self.path) for name, text in cells.items()
                }
                parsed = None if any(p is None for p in pmfs.values()) else pmfs  # type: ignore[assignment]
            self._cache[key] = parsed
        return self._cache[key]

    def lookup(self, client: int, window_s: int) -> dict[str, Pmf] | None:
        """The distributions for a request of ``client`` at a time in 6-h window ``window_s``: that window,
        else the latest earlier non-empty one (ServeGen's rule), else the earliest later one; ``None`` when
        the client has no length data at all."""
        windows = sorted(self.raw.get(client, {}))
        earlier = [w for w in windows if w <= window_s][::-1]
        later = [w for w in windows if w > window_s]
        for candidate in (*earlier, *later):
            cells = self.cell(client, candidate)
            if cells is not None:
                return cells
        return None


def read_servegen_datasets(path: str | Path) -> ServeGenDatasets:
    """Read a ServeGen ``*_client_datasets.json[.gz]`` (structure checked; literals parsed on demand)."""
    with open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise TraceFormatError(path, None, "expected a JSON object {client_id: {window_start_s: {field: pmf}}}")
    raw: dict[int, dict[int, dict[str, str]]] = {}
    for client_key, windows in data.items():
        try:
            client = int(client_key)
            if not isinstance(windows, dict):
                raise ValueError
            raw[client] = {int(w): dict(cells) for w, cells in windows.items()}
        except (ValueError, TypeError):
            raise TraceFormatError(
                path, None, "expected {window_start_s: {field: '<dict literal>'}}", f"[{client_key}]"
            ) from None
        for window, cells in raw[client].items():
            if window % DATASET_WINDOW_S or not all(isinstance(v, str) for v in cells.values()):
                raise TraceFormatError(
                    path,
                    None,
                    f"expected a multiple of {DATASET_WINDOW_S} s mapping to {{field: '<dict literal>'}}",
                    f"[{client}][{window}]",
                )
    return ServeGenDatasets(path=str(path), raw=raw)


def datasets_path_for(windows_path: str | Path) -> Path:
    """``x_client_windows.csv[.gz]`` → the existing ``x_client_datasets.json[.gz]`` in the same folder."""
    path = Path(windows_path)
    name = path.name.replace("_client_windows.csv", "_client_datasets.json")
    if name == path.name:
        raise ValueError(f"{path.name!r} is not named *_client_windows.csv[.gz]; pass datasets_path explicitly")
    stem = name.removesuffix(".gz")
    candidates = [path.with_name(name), path.with_name(stem + ".gz"), path.with_name(stem)]
    return next((c for c in candidates if c.is_file()), candidates[0])
