"""``nitsum profile`` / ``profile-merge`` as registered by the runtime plugin (no GPU, no vLLM here)."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nitsum_runtime.cli import parse_budgets, register
from nitsum_runtime.vllm_engine import vllm_missing_reason


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    register(app)
    return app


def test_entry_point_is_declared() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="nitsum.cli")}
    assert eps.get("runtime") == "nitsum_runtime.cli:register"


def test_budgets_parse_and_errors() -> None:
    assert parse_budgets("1=120,4=60") == {1: 120.0, 4: 60.0}
    with pytest.raises(typer.BadParameter, match="TP=SECONDS"):
        parse_budgets("1:120")


@pytest.mark.skipif(vllm_missing_reason() is None, reason="vLLM and a GPU are present")
def test_profile_without_vllm_or_gpu_says_why(tmp_path: Path) -> None:
    res = CliRunner().invoke(_app(), ["profile", "--out", str(tmp_path), "--tp", "1"])
    assert res.exit_code == 2
    assert "cannot profile here" in res.output


def test_profile_rejects_unknown_model_and_tp(tmp_path: Path) -> None:
    res = CliRunner().invoke(_app(), ["profile", "--out", str(tmp_path), "--model", "gpt-9"])
    assert res.exit_code != 0 and "unknown model" in res.output
    res = CliRunner().invoke(_app(), ["profile", "--out", str(tmp_path), "--tp", "3"])
    assert res.exit_code != 0 and "not supported" in res.output


def test_profile_merge_reports_missing_parts(tmp_path: Path) -> None:
    res = CliRunner().invoke(_app(), ["profile-merge", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "no part records" in res.output
