"""Loader of the Mooncake traces (``kvcache-ai/Mooncake``, ``FAST25-release/traces/*.jsonl``).

One JSON object per line: ``timestamp`` (arrival in **milliseconds** from the start of the trace),
``input_length`` and ``output_length`` (tokens) and ``hash_ids`` (the remapped hashes of the prompt's KV
blocks, for prefix-cache studies). ``hash_ids`` is checked to be a list of integers but is not kept: the
request trace carries lengths only. Blank lines are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from nitsum_opt.workloads.errors import LoadedTrace, RowCollector, default_source_name, open_text

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def _integer(value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    if value < minimum:
        raise ValueError(f"must be ≥ {minimum}")
    return value


def _check_record(record: object) -> tuple[int, int, int]:
    """``(timestamp_ms, input, output)``, or ``ValueError(column, message)``."""
    if not isinstance(record, dict):
        raise ValueError(None, "each line must be a JSON object")
    missing = [name for name in _FIELDS if name not in record]
    if missing:
        raise ValueError(None, f"missing field(s) {missing}; a Mooncake record has {list(_FIELDS)}")
    values = []
    for name, minimum in (("timestamp", 0), ("input_length", 1), ("output_length", 1)):
        try:
            values.append(_integer(record[name], minimum))
        except ValueError as exc:
            raise ValueError(name, str(exc)) from None
    hashes = record["hash_ids"]
    if not isinstance(hashes, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in hashes):
        raise ValueError("hash_ids", "expected a list of integers")
    return values[0], values[1], values[2]


def load_mooncake(
    path: str | Path,
    *,
    skip_bad_rows: bool = False,
    tier: str = "default",
    source_name: str | None = None,
    max_rows: int | None = None,
    max_duration_s: float | None = None,
) -> LoadedTrace:
    """Load a Mooncake JSONL trace."""
    rows = RowCollector(path, "mooncake", skip_bad_rows=skip_bad_rows, time_typecode="q", ticks_per_s=1000)
    with open_text(path) as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            if max_rows is not None and rows.rows_read >= max_rows:
                rows.stopped_early = True
                break
            rows.rows_read += 1
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.bad(line, f"not valid JSON ({exc.msg} at character {exc.pos})", value=text.strip()[:80])
                continue
            try:
                time_ms, inputs, outputs = _check_record(record)
            except ValueError as exc:
                column, reason = exc.args
                value = record.get(column) if column and isinstance(record, dict) else None
                rows.bad(line, reason, column, value)
                continue
            if rows.beyond(time_ms, max_duration_s):
                rows.rows_read -= 1
                rows.stopped_early = True
                break
            rows.add(time_ms, str(time_ms), inputs, outputs)
    return rows.finish(tier=tier, source_name=source_name or default_source_name(path), max_duration_s=max_duration_s)
