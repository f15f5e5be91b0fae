"""Azure 2023/2024, BurstGPT and Mooncake loaders on committed fixtures, including malformed rows."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from nitsum_opt.workloads import (
    TraceFormatError,
    detect_format,
    load_azure_2023,
    load_azure_2024,
    load_burstgpt,
    load_length_table,
    load_mooncake,
    load_trace,
)

FIXTURES = Path(__file__).parent / "fixtures"


def test_azure_2023_head_matches_the_file() -> None:
    trace, report = load_azure_2023(FIXTURES / "azure2023_conv_head.csv", tier="chat")
    assert len(trace) == 12 and report.rows_read == 12 and report.rows_skipped == 0
    assert trace.arrival_s[0] == 0.0
    # 18:15:50.9951690 - 18:15:46.6805900 = 4.3145790 s, exact to the 7th digit
    assert trace.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    assert trace.arrival_s[-1] == pytest.approx(9.427468, abs=1e-9)
    assert trace.input_tokens[:3].tolist() == [374, 396, 879] and trace.output_tokens[:3].tolist() == [
        44,
        109,
        55,
    ]
    assert trace.tier_names == ("chat",) and trace.source_names == ("azure2023_conv_head",)
    assert report.first_timestamp == "2023-11-16 18:15:46.6805900"


def test_azure_2023_malformed_row_names_file_line_column_value() -> None:
    path = FIXTURES / "azure2023_bad.csv"
    with pytest.raises(TraceFormatError) as caught:
        load_azure_2023(path)
    error = caught.value
    assert (error.line, error.column, error.value) == (4, "ContextTokens", "abc")
    assert str(path) in str(error) and ":4:" in str(error) and "skip-bad-rows" in str(error)


def test_azure_2023_skip_bad_rows_counts_each_bad_row_once() -> None:
    trace, report = load_azure_2023(FIXTURES / "azure2023_bad.csv", skip_bad_rows=True)
    assert report.rows_read == 7 and report.rows_skipped == 4 and len(trace) == 3
    assert [e.split(":")[1] for e in report.skipped_examples] == ["4", "5", "6", "7"]
    assert "azure2024" in report.skipped_examples[2]  # the offset row points to the other format


def test_azure_2024_offsets_and_varying_digits() -> None:
    trace, report = load_azure_2024(FIXTURES / "azure2024_sample.csv")
    assert len(trace) == 8 and report.rows_out_of_order == 0  # the +02:00 row is in order once in UTC
    expected = [0.0, 0.110127, 0.990127, 1.490127, 1.990128, 3.240127, 4.113583789, 59.990127]
    np.testing.assert_allclose(trace.arrival_s, expected, atol=1e-9)
    assert trace.input_tokens[5] == 1024  # "02:00:03.25+02:00" is 00:00:03.25 UTC, not two hours later
    with pytest.raises(TraceFormatError, match="azure2024"):
        load_azure_2023(FIXTURES / "azure2024_sample.csv")
    with pytest.raises(TraceFormatError, match="azure2023"):
        load_azure_2024(FIXTURES / "azure2023_conv_head.csv")


def test_max_duration_and_max_rows_stop_reading_early() -> None:
    trace, report = load_azure_2023(FIXTURES / "azure2023_conv_head.csv", max_duration_s=5.0)
    assert len(trace) == 4 and report.stopped_early and trace.end_s == 5.0
    assert report.rows_read == 4  # the row that crossed the limit is not counted
    trace, report = load_azure_2023(FIXTURES / "azure2023_conv_head.csv", max_rows=4)
    assert len(trace) == 4 and report.stopped_early


def test_gzip_is_read_transparently(tmp_path: Path) -> None:
    packed = tmp_path / "conv.csv.gz"
    with open(FIXTURES / "azure2023_conv_head.csv", "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = load_azure_2023(FIXTURES / "azure2023_conv_head.csv").trace
    assert load_azure_2023(packed).trace.with_source_name("x").equals(plain.with_source_name("x"))


def test_missing_column_and_empty_file(tmp_path: Path) -> None:
    bad_header = tmp_path / "t.csv"
    bad_header.write_text("TIMESTAMP,Context,GeneratedTokens\n2023-11-16 18:15:46.6805900,1,1\n")
    with pytest.raises(TraceFormatError, match=r"t.csv:1:.*ContextTokens"):
        load_azure_2023(bad_header)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(TraceFormatError, match="empty"):
        load_azure_2023(empty)
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_azure_2023(tmp_path / "nope.csv")


def test_burstgpt_drops_failures_by_default() -> None:
    trace, report = load_burstgpt(FIXTURES / "burstgpt_sample.csv")
    assert len(trace) == 5 and report.rows_read == 7 and report.rows_dropped == 2
    assert trace.arrival_s.tolist() == [0.0, 40.0, 113.0, 116.5, 126.0]
    assert trace.input_tokens.tolist() == [472, 1087, 417, 25, 1300]
    assert any("Response tokens = 0" in note for note in report.notes)
    assert report.first_timestamp == "5"


def test_burstgpt_keep_failures_and_filters() -> None:
    kept, report = load_burstgpt(FIXTURES / "burstgpt_sample.csv", keep_failures=True)
    assert len(kept) == 7 and report.rows_dropped == 0 and kept.output_tokens.min() == 1
    gpt4, report = load_burstgpt(FIXTURES / "burstgpt_sample.csv", models={"GPT-4"})
    assert gpt4.input_tokens.tolist() == [417, 1300] and report.rows_dropped == 5
    api, _ = load_burstgpt(FIXTURES / "burstgpt_sample.csv", log_types={"API log"})
    assert api.input_tokens.tolist() == [25, 1300]


def test_burstgpt_malformed_rows_and_extra_columns() -> None:
    with pytest.raises(TraceFormatError) as caught:
        load_burstgpt(FIXTURES / "burstgpt_bad.csv")
    assert (caught.value.line, caught.value.column, caught.value.value) == (3, "Total tokens", "1300")
    trace, report = load_burstgpt(FIXTURES / "burstgpt_bad.csv", skip_bad_rows=True)
    assert len(trace) == 2 and report.rows_skipped == 2 and ":4:" in report.skipped_examples[1]
    session, _ = load_burstgpt(FIXTURES / "burstgpt_session.csv")
    assert session.arrival_s.tolist() == [0.0, 1.5] and session.output_tokens.tolist() == [20, 30]


def test_mooncake_milliseconds_and_blank_lines() -> None:
    trace, report = load_mooncake(FIXTURES / "mooncake_sample.jsonl")
    assert len(trace) == 6 and report.rows_read == 6
    assert trace.arrival_s.tolist() == [0.0, 0.0, 3.0, 5.999, 9.0, 27.482]
    assert trace.output_tokens.tolist() == [500, 490, 316, 26, 1, 52]


def test_mooncake_malformed_records() -> None:
    path = FIXTURES / "mooncake_bad.jsonl"
    with pytest.raises(TraceFormatError, match=r"mooncake_bad.jsonl:2:.*hash_ids"):
        load_mooncake(path)
    trace, report = load_mooncake(path, skip_bad_rows=True)
    assert len(trace) == 2 and report.rows_skipped == 3
    assert "input_length" in report.skipped_examples[1] and "JSON" in report.skipped_examples[2]


def test_detect_format_and_load_trace() -> None:
    assert detect_format(FIXTURES / "azure2023_conv_head.csv") == "azure2023"
    assert detect_format(FIXTURES / "azure2024_sample.csv") == "azure2024"
    assert detect_format(FIXTURES / "burstgpt_sample.csv") == "burstgpt"
    assert detect_format(FIXTURES / "mooncake_sample.jsonl") == "mooncake"
    assert detect_format(FIXTURES / "toy_client_windows.csv") == "servegen"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_format(FIXTURES / "vidur_lengths_sample.csv")
    assert len(load_trace(FIXTURES / "mooncake_sample.jsonl").trace) == 6
    with pytest.raises(ValueError, match="formats are"):
        load_trace(FIXTURES / "mooncake_sample.jsonl", "parquet")


def test_vidur_length_table(tmp_path: Path) -> None:
    inputs, outputs = load_length_table(FIXTURES / "vidur_lengths_sample.csv")
    assert inputs.tolist() == [3772, 2015, 1500, 100] and outputs.tolist() == [54, 156, 500, 4000]
    bad = tmp_path / "v.csv"
    bad.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens\n10,5,16\n")
    with pytest.raises(TraceFormatError, match=r"v.csv:2:.*num_total_tokens"):
        load_length_table(bad)
