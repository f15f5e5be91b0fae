"""The plan and schema commands, end to end through typer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nitsum_opt.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "planning" / "three_tiers_8gpu.yaml"
runner = CliRunner()


def test_plan_table() -> None:
    result = runner.invoke(app, ["plan", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "interactive" in result.output and "status optimal" in result.output


def test_plan_json_greedy_and_pulp() -> None:
    for args in (["--planner", "greedy"], ["--solver", "pulp"]):
        result = runner.invoke(app, ["plan", str(EXAMPLE), "--json", *args])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.output)
        assert sum(len(i["gpu_ids"]) for i in plan["instances"]) <= 8
        assert {t["tier"] for t in plan["tiers"]} == {"interactive", "standard", "background"}


def test_plan_exports_lp(tmp_path: Path) -> None:
    out = tmp_path / "model.lp"
    result = runner.invoke(app, ["plan", str(EXAMPLE), "--export", str(out)])
    assert result.exit_code == 0 and "gpu_budget" in out.read_text()


def test_bad_solver_and_bad_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(EXAMPLE), "--solver", "nope"])
    assert result.exit_code == 2 and "valid solvers" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [\n")
    result = runner.invoke(app, ["plan", str(bad)])
    assert result.exit_code == 2 and "malformed YAML" in result.output


def test_schema() -> None:
    result = runner.invoke(app, ["schema", "planning-input"])
    assert result.exit_code == 0 and json.loads(result.output)["title"] == "PlanningInput"
    result = runner.invoke(app, ["schema", "nope"])
    assert result.exit_code == 2 and "valid names" in result.output


def test_plan_prints_shared_row_and_no_shared_switch() -> None:
    pooled = EXAMPLE.with_name("pooled_two_tiers_4gpu.yaml")
    result = runner.invoke(app, ["plan", str(pooled)])
    assert result.exit_code == 0, result.output
    assert "* shared" in result.output and "3/4 GPUs" in result.output
    result = runner.invoke(app, ["plan", str(pooled), "--no-shared", "--json"])
    assert result.exit_code == 0, result.output
    assert {i["tier"] for i in json.loads(result.output)["instances"]} == {"a", "b"}


def test_plan_example_with_a_shared_prefill_decode_pair() -> None:
    example = EXAMPLE.with_name("shared_pd_pair_2gpu.yaml")
    result = runner.invoke(app, ["plan", str(example), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert sorted((i["tier"], i["role"]) for i in plan["instances"]) == [("*", "decode"), ("*", "prefill")]
    assert [t["admitted_rps"] for t in plan["tiers"]] == pytest.approx([1.0, 1.0])
