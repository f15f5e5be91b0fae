"""Timestamp and field parsers: 7 fractional digits, varying digits, UTC offsets, bad values."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from nitsum_opt.workloads.parsing import OffsetPolicy, parse_seconds, parse_timestamp_ns, parse_tokens

FORBID, REQUIRE = OffsetPolicy.FORBID, OffsetPolicy.REQUIRE
BASE_NS = int(datetime(2023, 11, 16, 18, 15, 46, tzinfo=UTC).timestamp()) * 10**9


def test_seven_fractional_digits_are_exact_to_100_ns() -> None:
    assert parse_timestamp_ns("2023-11-16 18:15:46.6805900", FORBID) == BASE_NS + 680_590_000
    assert parse_timestamp_ns("2023-11-16 18:15:46.6805901", FORBID) == BASE_NS + 680_590_100


@pytest.mark.parametrize(
    ("fraction", "nanoseconds"),
    [("", 0), (".5", 500_000_000), (".12", 120_000_000), (".000001", 1_000), (".123456789", 123_456_789)],
)
def test_varying_fractional_digits(fraction: str, nanoseconds: int) -> None:
    assert parse_timestamp_ns(f"2023-11-16 18:15:46{fraction}+00:00", REQUIRE) == BASE_NS + nanoseconds


@pytest.mark.parametrize(("suffix", "shift_h"), [("+00:00", 0), ("Z", 0), ("+02:00", -2), ("-0530", 5.5)])
def test_utc_offsets_are_applied(suffix: str, shift_h: float) -> None:
    value = parse_timestamp_ns(f"2023-11-16T18:15:46{suffix}", REQUIRE)
    assert value == BASE_NS + int(shift_h * 3600) * 10**9


def test_offset_policy_is_enforced() -> None:
    with pytest.raises(ValueError, match="azure2024"):
        parse_timestamp_ns("2023-11-16 18:15:46.6805900+00:00", FORBID)
    with pytest.raises(ValueError, match="azure2023"):
        parse_timestamp_ns("2024-05-10 00:00:00.01", REQUIRE)


@pytest.mark.parametrize(
    "text", ["2023-02-30 00:00:00", "2023-11-16 24:00:00", "2023-11-16 18:61:00", "yesterday", "2023-11-16"]
)
def test_bad_timestamps(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp_ns(text, FORBID)


def test_token_and_seconds_parsers() -> None:
    assert parse_tokens(" 42 ") == 42 and parse_tokens("7.0") == 7 and parse_tokens("0", minimum=0) == 0
    for bad in ("0", "-3", "1.5", "", "1e3"):
        with pytest.raises(ValueError):
            parse_tokens(bad)
    assert parse_seconds("121.5") == 121.5
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(ValueError):
            parse_seconds(bad)
