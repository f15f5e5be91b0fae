"""Strict field parsers shared by the loaders: wall-clock timestamps, token counts, seconds.

Each parser takes the text of one field and returns a value or raises ``ValueError`` with a message that says
what was expected; the loaders add the file, line, column and value (see :mod:`~nitsum_opt.workloads.errors`).
"""

from __future__ import annotations

import math
import re
from datetime import date
from enum import StrEnum
from functools import lru_cache

NS_PER_S = 1_000_000_000

_TIMESTAMP = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<h>\d{2}):(?P<m>\d{2}):(?P<s>\d{2})"
    r"(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?"
)
_INTEGER = re.compile(r"\d+(?:\.0*)?")


class OffsetPolicy(StrEnum):
    """Whether a timestamp may, must or must not carry a UTC offset."""

    FORBID = "forbid"
    """Naive wall-clock time (Azure 2023)."""
    REQUIRE = "require"
    """Every timestamp names its offset, e.g. ``+00:00`` (Azure 2024)."""


@lru_cache(maxsize=4096)
def _days_since_epoch(day: str) -> int:
    try:
        return date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise ValueError(f"{day!r} is not a valid calendar date") from None


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _offset_ns(tz: str) -> int:
    if tz == "Z":
        return 0
    sign = -1 if tz[0] == "-" else 1
    digits = tz[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        raise ValueError(f"UTC offset {tz!r} is out of range")
    return sign * (hours * 3600 + minutes * 60) * NS_PER_S


def parse_timestamp_ns(text: str, offset: OffsetPolicy) -> int:
    """Nanoseconds since 1970-01-01 (UTC when an offset is given) of ``YYYY-MM-DD HH:MM:SS[.f][±HH:MM]``.

    The fraction may have 1 to 9 digits (Azure 2023 uses 7, Azure 2024 varies; Python's ``%f`` takes only 6,
    so this parser reads the digits itself and keeps 100 ns precision exactly). ``T`` may separate date and
    time; ``Z`` means ``+00:00``.
    """
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None:
        raise ValueError("expected a timestamp like '2023-11-16 18:15:46.6805900' (optionally '+00:00')")
    tz = match["tz"]
    if tz is None and offset is OffsetPolicy.REQUIRE:
        raise ValueError(
            "timestamp has no UTC offset (this format needs one, e.g. '+00:00'); "
            "naive timestamps are the Azure 2023 format: use --format azure2023"
        )
    if tz is not None and offset is OffsetPolicy.FORBID:
        raise ValueError(
            f"timestamp carries a UTC offset {tz!r}, which the Azure 2023 format never has; use --format azure2024"
        )
    hours, minutes, seconds = int(match["h"]), int(match["m"]), int(match["s"])
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"time of day {hours:02d}:{minutes:02d}:{seconds:02d} is out of range")
    frac = match["frac"] or ""
    frac_ns = int(frac.ljust(9, "0")) if frac else 0
    day_s = _days_since_epoch(match["date"]) * 86_400 + hours * 3600 + minutes * 60 + seconds
    return day_s * NS_PER_S + frac_ns - (_offset_ns(tz) if tz else 0)


def parse_tokens(text: str, minimum: int = 1) -> int:
    """A token count: a non-negative decimal integer (``12`` or ``12.0``) that is at least ``minimum``."""
    stripped = text.strip()
    if _INTEGER.fullmatch(stripped) is None:
        raise ValueError("expected a whole number of tokens")
    value = int(stripped.split(".", 1)[0])
    if value < minimum:
        raise ValueError(f"token count must be ≥ {minimum}")
    return value


def parse_seconds(text: str) -> float:
    """A finite, non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a finite number of seconds ≥ 0")
    return value
