"""One entry point for every trace format: :func:`load_trace` and :func:`detect_format`."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from nitsum_opt.workloads.azure import load_azure_2023, load_azure_2024
from nitsum_opt.workloads.burstgpt import load_burstgpt
from nitsum_opt.workloads.errors import LoadedTrace, open_text
from nitsum_opt.workloads.mooncake import load_mooncake
from nitsum_opt.workloads.servegen import load_servegen
from nitsum_opt.workloads.servegen_data import WINDOW_COLUMNS

FormatName = Literal["azure2023", "azure2024", "burstgpt", "mooncake", "servegen"]
"""Every format :func:`load_trace` reads."""
FORMATS: tuple[str, ...] = get_args(FormatName)

_LOADERS: dict[str, Callable[..., LoadedTrace]] = {
    "azure2023": load_azure_2023,
    "azure2024": load_azure_2024,
    "burstgpt": load_burstgpt,
    "mooncake": load_mooncake,
    "servegen": load_servegen,
}


def load_trace(path: str | Path, format: str | None = None, **options: object) -> LoadedTrace:
    """Load ``path`` as ``format`` (detected from the content when ``None``). ``options`` go to the
    format's loader (all take ``skip_bad_rows``, ``tier``, ``source_name``; see each loader)."""
    fmt = format or detect_format(path)
    loader = _LOADERS.get(fmt)
    if loader is None:
        raise ValueError(f"unknown trace format {fmt!r}; formats are {list(FORMATS)}")
    return loader(path, **options)


def detect_format(path: str | Path) -> str:
    """Guess the format from the first lines: JSON objects → mooncake, else the CSV header (Azure 2023 vs
    2024 told apart by a UTC offset in the first timestamp)."""
    with open_text(path) as handle:
        first = handle.readline()
        second = handle.readline()
    if first.lstrip().startswith("{"):
        return "mooncake"
    header = [h.strip() for h in next(csv.reader([first]), [])]
    if header[:3] == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
        stamp = second.split(",", 1)[0].strip()
        return "azure2024" if stamp.endswith("Z") or stamp[-6:-5] in ("+", "-") else "azure2023"
    if {"Timestamp", "Request tokens", "Response tokens"} <= set(header):
        return "burstgpt"
    if list(WINDOW_COLUMNS) == header:
        return "servegen"
    raise ValueError(
        f"cannot tell the format of {str(path)!r} from its header {first.strip()[:80]!r}; pass one of {list(FORMATS)}"
    )
