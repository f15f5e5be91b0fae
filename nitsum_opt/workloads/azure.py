"""Loaders of the Azure LLM inference traces (``Azure/AzurePublicDataset``, CC-BY 4.0).

Both releases have the columns ``TIMESTAMP,ContextTokens,GeneratedTokens`` (invocation time, prompt tokens,
output tokens) and are sorted by time.

* **2023** (Splitwise, Patel et al., ISCA 2024; one hour, ``AzureLLMInferenceTrace_{conv,code}.csv``):
  ``TIMESTAMP`` is a naive wall-clock time with 7 fractional digits, e.g. ``2023-11-16 18:15:46.6805900``.
* **2024** (DynamoLLM, Stojkovic et al.; one week, ``AzureLLMInferenceTrace_{conv,code}_1week.csv``):
  ``TIMESTAMP`` carries a UTC offset and a varying number of fractional digits, e.g.
  ``2024-05-10 00:00:00.0098730+00:00`` or ``2024-05-10 00:00:01+00:00``.

Timestamps are parsed exactly to integer nanoseconds (:func:`~.parsing.parse_timestamp_ns`);
``arrival_s`` is the time since the earliest request. A row with 0 prompt or 0 output tokens is malformed
(no such row exists in the 2023 files). Reading streams line by line; ``max_duration_s`` stops at the first
row that lies that far after the first one, so "the first hour of the week" never reads the whole file.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

from nitsum_opt.workloads.errors import (
    LoadedTrace,
    RowCollector,
    default_source_name,
    header_indices,
    open_text,
)
from nitsum_opt.workloads.parsing import OffsetPolicy, parse_timestamp_ns, parse_tokens

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_azure_2023(
    path: str | Path,
    *,
    skip_bad_rows: bool = False,
    tier: str = "default",
    source_name: str | None = None,
    max_rows: int | None = None,
    max_duration_s: float | None = None,
) -> LoadedTrace:
    """Load a 2023 Azure LLM inference trace (naive timestamps; an offset is an error)."""
    return _load_azure(
        path, "azure2023", OffsetPolicy.FORBID, skip_bad_rows, tier, source_name, max_rows, max_duration_s
    )


def load_azure_2024(
    path: str | Path,
    *,
    skip_bad_rows: bool = False,
    tier: str = "default",
    source_name: str | None = None,
    max_rows: int | None = None,
    max_duration_s: float | None = None,
) -> LoadedTrace:
    """Load a 2024 week-long Azure LLM inference trace (every timestamp must carry a UTC offset)."""
    return _load_azure(
        path, "azure2024", OffsetPolicy.REQUIRE, skip_bad_rows, tier, source_name, max_rows, max_duration_s
    )


def _load_azure(
    path: str | Path,
    fmt: str,
    offset: OffsetPolicy,
    skip_bad_rows: bool,
    tier: str,
    source_name: str | None,
    max_rows: int | None,
    max_duration_s: float | None,
) -> LoadedTrace:
    rows = RowCollector(path, fmt, skip_bad_rows=skip_bad_rows, time_typecode="q", ticks_per_s=1_000_000_000)
    parse_time = partial(parse_timestamp_ns, offset=offset)
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        i_time, i_input, i_output = header_indices(header, AZURE_COLUMNS, path, fmt)
        width = len(header or ())
        for line, row in rows.csv_rows(reader, width, max_rows):
            time_ns = rows.field(line, AZURE_COLUMNS[0], row[i_time], parse_time)
            inputs = rows.field(line, AZURE_COLUMNS[1], row[i_input], parse_tokens)
            outputs = rows.field(line, AZURE_COLUMNS[2], row[i_output], parse_tokens)
            if time_ns is None or inputs is None or outputs is None:
                continue
            if rows.beyond(time_ns, max_duration_s):
                rows.rows_read -= 1
                rows.stopped_early = True
                break
            rows.add(time_ns, row[i_time].strip(), inputs, outputs)
    return rows.finish(tier=tier, source_name=source_name or default_source_name(path), max_duration_s=max_duration_s)
