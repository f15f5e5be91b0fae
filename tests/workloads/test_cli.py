"""``nitsum trace info`` and ``nitsum trace workload``."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nitsum_opt.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def test_info_prints_a_summary() -> None:
    result = runner.invoke(app, ["trace", "info", str(FIXTURES / "azure2023_conv_head.csv")])
    assert result.exit_code == 0, result.output
    assert "azure2023" in result.output and "12 requests" in result.output and "mean rate" in result.output


def test_info_json_and_explicit_format() -> None:
    result = runner.invoke(
        app, ["trace", "info", str(FIXTURES / "burstgpt_sample.csv"), "--format", "burstgpt", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["summary"]["requests"] == 5 and payload["load"]["rows_dropped"] == 2


def test_info_bad_rows_fail_or_are_skipped() -> None:
    path = str(FIXTURES / "azure2023_bad.csv")
    failed = runner.invoke(app, ["trace", "info", path])
    assert failed.exit_code == 2 and "azure2023_bad.csv:4" in failed.output and "ContextTokens" in failed.output
    skipped = runner.invoke(app, ["trace", "info", path, "--skip-bad-rows"])
    assert skipped.exit_code == 0 and "4 malformed rows skipped" in skipped.output


def test_info_servegen_sampling() -> None:
    result = runner.invoke(
        app, ["trace", "info", str(FIXTURES / "toy_client_windows.csv"), "--duration-s", "600", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["requests"] == 3600


def test_workload_default_json() -> None:
    result = runner.invoke(app, ["trace", "workload", "--json", "--load-scale", "2"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert list(payload["summary"]["tiers"]) == ["interactive", "standard", "background"]
    assert payload["summary"]["duration_s"] == 1710.0
