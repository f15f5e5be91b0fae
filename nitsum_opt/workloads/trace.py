"""The columnar request trace every loader returns and the simulator consumes.

A :class:`RequestTrace` is a frozen bundle of read-only numpy arrays, one entry per request, sorted by arrival
time. It never holds per-request Python objects, so a simulator can walk 100k+ requests with plain array
indexing (or :meth:`RequestTrace.rows` for a fast tuple iterator).

Time is in seconds on the trace's own clock: ``arrival_s`` lies in the observation interval
``[start_s, end_s]``; ``duration_s = end_s - start_s`` is the denominator of every mean rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from nitsum_opt.workloads.summary import TraceSummary, summarize

ARRIVAL_DTYPE = np.float64
TOKENS_DTYPE = np.int64
INDEX_DTYPE = np.int16
_MAX_NAMES = int(np.iinfo(INDEX_DTYPE).max)


def _frozen(values: object, dtype: type, name: str) -> np.ndarray:
    """A read-only private copy of ``values`` (never flips the flags of a caller's array)."""
    array = np.array(values, dtype=dtype, copy=True)
    if array.ndim != 1:
        raise ValueError(f"RequestTrace.{name} must be one-dimensional, got shape {array.shape}")
    array.setflags(write=False)
    return array


def _unpickle_trace(*fields: object) -> RequestTrace:
    """A pickled :class:`RequestTrace` again, columns read-only and re-validated."""
    for value in fields:
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return RequestTrace(*fields)  # type: ignore[arg-type]


def _per_request(value: int | Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    if np.isscalar(value):
        return np.full(max(n, 0), int(value), dtype=INDEX_DTYPE)  # type: ignore[arg-type]
    return np.asarray(value, dtype=INDEX_DTYPE)


@dataclass(frozen=True, eq=False, slots=True)
class RequestTrace:
    """Requests sorted by arrival, as columns. Build with :meth:`from_arrays`; every operation returns a new
    trace (array views where possible, never copies of the whole trace per request)."""

    arrival_s: np.ndarray
    """Arrival time of each request in seconds (float64, non-decreasing)."""
    input_tokens: np.ndarray
    """Prompt length of each request in tokens (int64, ≥ 1)."""
    output_tokens: np.ndarray
    """Tokens each request generates (int64, ≥ 1)."""
    tier: np.ndarray
    """Index of each request's SLO tier into :attr:`tier_names` (int16)."""
    source: np.ndarray
    """Index of each request's origin into :attr:`source_names` (int16)."""
    tier_names: tuple[str, ...]
    """Tier names; ``tier_names[tier[i]]`` is request ``i``'s tier."""
    source_names: tuple[str, ...]
    """Source names (trace file, generator); ``source_names[source[i]]`` is request ``i``'s origin."""
    start_s: float
    """Start of the observation interval (≤ the first arrival)."""
    end_s: float
    """End of the observation interval (≥ the last arrival)."""

    def __post_init__(self) -> None:
        self._validate()

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """Pickle through :func:`_unpickle_trace`: unpickled arrays are writable, and a trace's must not be."""
        return _unpickle_trace, tuple(getattr(self, name) for name in self.__dataclass_fields__)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        arrival_s: Sequence[float] | np.ndarray,
        input_tokens: Sequence[int] | np.ndarray,
        output_tokens: Sequence[int] | np.ndarray,
        *,
        tier: int | Sequence[int] | np.ndarray = 0,
        source: int | Sequence[int] | np.ndarray = 0,
        tier_names: Sequence[str] = ("default",),
        source_names: Sequence[str] = ("unknown",),
        start_s: float | None = None,
        end_s: float | None = None,
        sort: bool = True,
    ) -> RequestTrace:
        """Build a trace from columns (copied). ``tier``/``source`` may be one index for every request.
        ``sort=True`` orders by arrival (stable, so ties keep their input order); ``sort=False`` requires
        sorted input. ``start_s``/``end_s`` default to the first/last arrival (0/0 for an empty trace)."""
        arrival = np.asarray(arrival_s, dtype=ARRIVAL_DTYPE)
        n = arrival.shape[0] if arrival.ndim == 1 else -1
        tiers = _per_request(tier, n)
        sources = _per_request(source, n)
        inputs = np.asarray(input_tokens, dtype=TOKENS_DTYPE)
        outputs = np.asarray(output_tokens, dtype=TOKENS_DTYPE)
        if sort and arrival.ndim == 1 and n > 1 and bool(np.any(np.diff(arrival) < 0)):
            order = np.argsort(arrival, kind="stable")
            arrival, inputs, outputs = arrival[order], inputs[order], outputs[order]
            tiers, sources = tiers[order], sources[order]
        first = float(arrival.min()) if n > 0 else 0.0
        last = float(arrival.max()) if n > 0 else 0.0
        return cls(
            arrival_s=_frozen(arrival, ARRIVAL_DTYPE, "arrival_s"),
            input_tokens=_frozen(inputs, TOKENS_DTYPE, "input_tokens"),
            output_tokens=_frozen(outputs, TOKENS_DTYPE, "output_tokens"),
            tier=_frozen(tiers, INDEX_DTYPE, "tier"),
            source=_frozen(sources, INDEX_DTYPE, "source"),
            tier_names=tuple(tier_names),
            source_names=tuple(source_names),
            start_s=first if start_s is None else float(start_s),
            end_s=last if end_s is None else float(end_s),
        )

    @classmethod
    def empty(
        cls, tier_names: Sequence[str] = ("default",), source_names: Sequence[str] = ("unknown",)
    ) -> RequestTrace:
        """A trace with no requests (interval ``[0, 0]``)."""
        return cls.from_arrays([], [], [], tier_names=tier_names, source_names=source_names)

    def _replace(self, **changes: object) -> RequestTrace:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields.update(changes)
        return RequestTrace(**fields)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        n = self.arrival_s.shape[0]
        for name in ("arrival_s", "input_tokens", "output_tokens", "tier", "source"):
            column = getattr(self, name)
            if not isinstance(column, np.ndarray) or column.ndim != 1:
                raise ValueError(f"RequestTrace.{name} must be a one-dimensional numpy array")
            if column.shape[0] != n:
                raise ValueError(f"RequestTrace.{name} has {column.shape[0]} entries but arrival_s has {n}")
            if column.flags.writeable:
                raise ValueError(f"RequestTrace.{name} must be read-only; build traces with from_arrays()")
        self._validate_names()
        if n and not np.all(np.isfinite(self.arrival_s)):
            bad = int(np.argmin(np.isfinite(self.arrival_s)))
            raise ValueError(f"RequestTrace.arrival_s[{bad}] = {self.arrival_s[bad]} is non-finite")
        if not (np.isfinite(self.start_s) and np.isfinite(self.end_s)) or self.end_s < self.start_s:
            raise ValueError(f"RequestTrace interval [{self.start_s}, {self.end_s}] must be finite and ordered")
        if n == 0:
            return
        self._validate_arrivals()
        for name in ("input_tokens", "output_tokens"):
            column = getattr(self, name)
            bad = np.flatnonzero(column < 1)
            if bad.size:
                raise ValueError(
                    f"RequestTrace.{name}[{bad[0]}] = {column[bad[0]]}: every request needs ≥ 1 token "
                    f"({bad.size} requests violate it); drop or fix those rows before building the trace"
                )
        self._validate_indices("tier", self.tier_names)
        self._validate_indices("source", self.source_names)

    def _validate_names(self) -> None:
        for label, names in (("tier_names", self.tier_names), ("source_names", self.source_names)):
            if not names or len(set(names)) != len(names) or len(names) > _MAX_NAMES:
                raise ValueError(f"RequestTrace.{label} must be 1..{_MAX_NAMES} unique names, got {names}")
            if not all(isinstance(name, str) and name for name in names):
                raise ValueError(f"RequestTrace.{label} must be non-empty strings, got {names}")

    def _validate_arrivals(self) -> None:
        arrival = self.arrival_s
        if arrival[0] < 0:
            raise ValueError(f"RequestTrace.arrival_s[0] = {arrival[0]} is negative; times start at 0 or later")
        steps = np.diff(arrival)
        if steps.size and steps.min() < 0:
            i = int(np.argmin(steps))
            raise ValueError(
                f"RequestTrace.arrival_s is not sorted: [{i}] = {arrival[i]} > [{i + 1}] = {arrival[i + 1]}; "
                "build with from_arrays(..., sort=True)"
            )
        if arrival[0] < self.start_s or arrival[-1] > self.end_s:
            raise ValueError(
                f"arrivals [{arrival[0]}, {arrival[-1]}] lie outside the interval [{self.start_s}, {self.end_s}]"
            )

    def _validate_indices(self, name: str, names: tuple[str, ...]) -> None:
        column = getattr(self, name)
        low, high = int(column.min()), int(column.max())
        if low < 0 or high >= len(names):
            raise ValueError(f"RequestTrace.{name} holds index {low if low < 0 else high}, outside {names}")

    # ------------------------------------------------------------------ basic properties
    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def __repr__(self) -> str:
        return (
            f"RequestTrace({len(self)} requests, [{self.start_s:.3f}, {self.end_s:.3f}] s, "
            f"tiers={list(self.tier_names)}, sources={list(self.source_names)})"
        )

    @property
    def duration_s(self) -> float:
        """Length of the observation interval (the denominator of mean rates)."""
        return self.end_s - self.start_s

    @property
    def mean_rate_rps(self) -> float:
        """Requests per second over the observation interval (0 for an empty or zero-length trace)."""
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def tier_index(self, name: str) -> int:
        """Index of tier ``name``; the error lists the tiers."""
        try:
            return self.tier_names.index(name)
        except ValueError:
            raise KeyError(f"unknown tier {name!r}; this trace has tiers {list(self.tier_names)}") from None

    def tier_labels(self) -> np.ndarray:
        """Tier name of every request (an object array; for reports, not hot loops)."""
        return np.asarray(self.tier_names, dtype=object)[self.tier]

    def rows(self) -> Iterator[tuple[float, int, int, int]]:
        """Fast iterator of ``(arrival_s, input_tokens, output_tokens, tier)`` as Python scalars."""
        return zip(
            self.arrival_s.tolist(),
            self.input_tokens.tolist(),
            self.output_tokens.tolist(),
            self.tier.tolist(),
            strict=True,
        )

    def equals(self, other: RequestTrace) -> bool:
        """Same requests, names and interval (arrays compared exactly)."""
        return (
            self.tier_names == other.tier_names
            and self.source_names == other.source_names
            and self.start_s == other.start_s
            and self.end_s == other.end_s
            and all(
                np.array_equal(getattr(self, c), getattr(other, c))
                for c in ("arrival_s", "input_tokens", "output_tokens", "tier", "source")
            )
        )

    # ------------------------------------------------------------------ selection
    def take(self, index: slice | np.ndarray) -> RequestTrace:
        """The requests at ``index`` (a slice, a sorted integer array, or a boolean mask); same interval."""
        columns = {}
        for name in ("arrival_s", "input_tokens", "output_tokens", "tier", "source"):
            column = getattr(self, name)[index]
            column.setflags(write=False)  # fancy indexing returns a fresh array we own
            columns[name] = column
        return self._replace(**columns)

    def window(self, start_s: float, end_s: float, *, rebase: bool = False) -> RequestTrace:
        """Requests with ``start_s <= arrival < end_s``, on the interval clipped to ``[start_s, end_s]``.
        ``rebase=True`` shifts the clock so the window starts at 0."""
        if not end_s >= start_s:
            raise ValueError(f"window end {end_s} must be ≥ its start {start_s}")
        low = int(np.searchsorted(self.arrival_s, start_s, side="left"))
        high = int(np.searchsorted(self.arrival_s, end_s, side="left"))
        new_start = max(start_s, self.start_s)
        new_end = max(new_start, min(end_s, self.end_s))
        part = self.take(slice(low, high))._replace(start_s=new_start, end_s=new_end)
        return part.shift(-new_start) if rebase else part

    def thin(self, keep_fraction: float, seed: int = 0) -> RequestTrace:
        """Keep each request independently with probability ``keep_fraction`` (seeded): scales every rate
        down while keeping the timeline, unlike :meth:`compress_time`."""
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
        keep = np.random.default_rng(seed).random(len(self)) < keep_fraction
        return self.take(keep)

    def select_tier(self, name: str) -> RequestTrace:
        """Only the requests of tier ``name`` (names and interval kept)."""
        return self.take(self.tier == self.tier_index(name))

    # ------------------------------------------------------------------ time transforms
    def shift(self, offset_s: float) -> RequestTrace:
        """Move every arrival and the interval by ``offset_s`` (the result must not start before 0)."""
        arrival = self.arrival_s + offset_s
        arrival.setflags(write=False)
        return self._replace(arrival_s=arrival, start_s=self.start_s + offset_s, end_s=self.end_s + offset_s)

    def rebase(self) -> RequestTrace:
        """Shift the clock so the interval starts at 0."""
        return self.shift(-self.start_s)

    def compress_time(self, factor: float) -> RequestTrace:
        """Divide every time by ``factor``: factor 2 doubles the arrival rate and halves the duration."""
        if not (np.isfinite(factor) and factor > 0):
            raise ValueError(f"time compression factor {factor} must be a finite number > 0")
        arrival = self.arrival_s / factor
        arrival.setflags(write=False)
        return self._replace(arrival_s=arrival, start_s=self.start_s / factor, end_s=self.end_s / factor)

    def with_interval(self, start_s: float, end_s: float) -> RequestTrace:
        """The same requests declared over another observation interval (must contain every arrival)."""
        return self._replace(start_s=float(start_s), end_s=float(end_s))

    # ------------------------------------------------------------------ labels
    def with_tier(self, name: str) -> RequestTrace:
        """Every request assigned to tier ``name`` (the only tier of the result)."""
        tiers = np.zeros(len(self), dtype=INDEX_DTYPE)
        tiers.setflags(write=False)
        return self._replace(tier=tiers, tier_names=(name,))

    def with_source_name(self, name: str) -> RequestTrace:
        """Every request attributed to one source called ``name``."""
        sources = np.zeros(len(self), dtype=INDEX_DTYPE)
        sources.setflags(write=False)
        return self._replace(source=sources, source_names=(name,))

    def with_tier_names(self, tier_names: Sequence[str]) -> RequestTrace:
        """Re-index onto ``tier_names`` (must contain every tier in use; its order defines indices)."""
        mapping = _index_map(self.tier_names, tuple(tier_names), self.tier, "tier")
        tiers = mapping[self.tier]
        tiers.setflags(write=False)
        return self._replace(tier=tiers, tier_names=tuple(tier_names))

    def with_lengths(self, input_tokens: np.ndarray, output_tokens: np.ndarray) -> RequestTrace:
        """The same arrivals with new per-request lengths (copied, validated)."""
        return self._replace(
            input_tokens=_frozen(input_tokens, TOKENS_DTYPE, "input_tokens"),
            output_tokens=_frozen(output_tokens, TOKENS_DTYPE, "output_tokens"),
        )

    # ------------------------------------------------------------------ combination
    @classmethod
    def merge(cls, traces: Sequence[RequestTrace], tier_names: Sequence[str] | None = None) -> RequestTrace:
        """Interleave traces by arrival time (stable: ties keep the order of ``traces``). Tier and source
        names are unioned in order of first appearance unless ``tier_names`` fixes the tier order; the
        interval is the union of the inputs' intervals."""
        if not traces:
            raise ValueError("merge needs at least one trace")
        tiers = tuple(tier_names) if tier_names is not None else _union(t.tier_names for t in traces)
        sources = _union(t.source_names for t in traces)
        parts = [t.with_tier_names(tiers)._reindex_sources(sources) for t in traces]
        arrival = np.concatenate([p.arrival_s for p in parts])
        order = np.argsort(arrival, kind="stable")
        return cls.from_arrays(
            arrival[order],
            np.concatenate([p.input_tokens for p in parts])[order],
            np.concatenate([p.output_tokens for p in parts])[order],
            tier=np.concatenate([p.tier for p in parts])[order],
            source=np.concatenate([p.source for p in parts])[order],
            tier_names=tiers,
            source_names=sources,
            start_s=min(t.start_s for t in traces),
            end_s=max(t.end_s for t in traces),
            sort=False,
        )

    def concat(self, later: RequestTrace) -> RequestTrace:
        """Append ``later`` after this trace on the same clock (its arrivals must not precede ours)."""
        return RequestTrace.merge([self, later])

    def _reindex_sources(self, source_names: tuple[str, ...]) -> RequestTrace:
        mapping = _index_map(self.source_names, source_names, self.source, "source")
        sources = mapping[self.source]
        sources.setflags(write=False)
        return self._replace(source=sources, source_names=source_names)

    # ------------------------------------------------------------------ statistics
    def summary(self, peak_window_s: float = 60.0) -> TraceSummary:
        """Counts, span, rates and length percentiles, overall and per tier."""
        return summarize(self, peak_window_s=peak_window_s)

    def to_frame(self) -> object:
        """A pandas DataFrame with one row per request (for analysis and export, not for hot loops)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "arrival_s": self.arrival_s,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "tier": self.tier_labels(),
                "source": np.asarray(self.source_names, dtype=object)[self.source],
            }
        )


def _union(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    names: list[str] = []
    for group in groups:
        names.extend(n for n in group if n not in names)
    return tuple(names)


def _index_map(old: tuple[str, ...], new: tuple[str, ...], used: np.ndarray, label: str) -> np.ndarray:
    """``mapping[old_index] = new_index``; names no request uses may be absent from ``new``."""
    used_names = {old[i] for i in np.unique(used).tolist()}
    missing = sorted(name for name in used_names if name not in new)
    if missing:
        raise ValueError(f"{label} names {missing} are not among the target {label} names {list(new)}")
    return np.asarray([new.index(name) if name in new else 0 for name in old], dtype=INDEX_DTYPE)
