"""Loader of the BurstGPT trace (``HPMLL/BurstGPT``; Wang et al., arXiv:2401.17644).

Columns (``data/BurstGPT_*.csv``): ``Timestamp`` (request submission time, seconds from 0:00:00 of the first
day), ``Model`` (``ChatGPT`` or ``GPT-4``), ``Request tokens``, ``Response tokens``, ``Total tokens``
(= request + response), ``Log Type`` (``Conversation log`` or ``API log``). Later releases add
``Session ID`` and ``Elapsed time``; extra columns are accepted and ignored.

**Failures.** The source README says rows whose ``Response tokens`` is 0 are failed requests (the
``*_without_fails_*`` files leave them out). They are not malformed: by default they are dropped and counted
in ``LoadReport.rows_dropped`` (a failed request generates nothing a simulator could serve). Pass
``keep_failures=True`` to keep them as 1-token outputs (the prompt was still processed). A row with 0
request tokens, or whose ``Total tokens`` is not request + response, is malformed.

``arrival_s`` is the time since the earliest kept request (``LoadReport.first_timestamp`` keeps the raw
offset from the first day's midnight).
"""

from __future__ import annotations

import csv
from collections.abc import Collection
from pathlib import Path

from nitsum_opt.workloads.errors import (
    LoadedTrace,
    RowCollector,
    default_source_name,
    header_indices,
    open_text,
)
from nitsum_opt.workloads.parsing import parse_seconds, parse_tokens

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


def _nonneg_tokens(text: str) -> int:
    return parse_tokens(text, minimum=0)


def load_burstgpt(
    path: str | Path,
    *,
    skip_bad_rows: bool = False,
    tier: str = "default",
    source_name: str | None = None,
    models: Collection[str] | None = None,
    log_types: Collection[str] | None = None,
    keep_failures: bool = False,
    max_rows: int | None = None,
    max_duration_s: float | None = None,
) -> LoadedTrace:
    """Load a BurstGPT CSV. ``models`` / ``log_types`` keep only those values (e.g. ``{"ChatGPT"}``);
    rows filtered out and failed requests (0 response tokens) are counted in ``rows_dropped``."""
    rows = RowCollector(path, "burstgpt", skip_bad_rows=skip_bad_rows, time_typecode="d", ticks_per_s=1)
    failures = filtered = 0
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        i_time, i_model, i_req, i_resp, i_total, i_log = header_indices(header, BURSTGPT_COLUMNS, path, "burstgpt")
        width = len(header or ())
        for line, row in rows.csv_rows(reader, width, max_rows):
            time_s = rows.field(line, "Timestamp", row[i_time], parse_seconds)
            request = rows.field(line, "Request tokens", row[i_req], parse_tokens)
            response = rows.field(line, "Response tokens", row[i_resp], _nonneg_tokens)
            total = rows.field(line, "Total tokens", row[i_total], _nonneg_tokens)
            if time_s is None or request is None or response is None or total is None:
                continue
            if total != request + response:
                rows.bad(
                    line,
                    f"Total tokens {total} != Request tokens {request} + Response tokens {response}",
                    "Total tokens",
                    row[i_total],
                )
                continue
            if rows.beyond(time_s, max_duration_s):
                rows.rows_read -= 1
                rows.stopped_early = True
                break
            if (models is not None and row[i_model].strip() not in models) or (
                log_types is not None and row[i_log].strip() not in log_types
            ):
                filtered += 1
                continue
            if response == 0:
                failures += 1
                if not keep_failures:
                    continue
            rows.add(time_s, row[i_time].strip(), request, max(response, 1))
    rows.rows_dropped = filtered + (0 if keep_failures else failures)
    if failures:
        action = "kept as 1-token outputs" if keep_failures else "dropped"
        rows.notes.append(f"{failures} failed requests (Response tokens = 0) {action}")
    if filtered:
        rows.notes.append(f"{filtered} rows dropped by the model/log-type filter")
    return rows.finish(tier=tier, source_name=source_name or default_source_name(path), max_duration_s=max_duration_s)
