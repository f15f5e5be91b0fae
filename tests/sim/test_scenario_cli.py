"""Scenarios (validation, YAML examples) and the commands: simulate, capacity, bench goodput, bench sim-speed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nitsum_opt.cli import app
from nitsum_opt.io import ConfigError
from nitsum_opt.sim.scenario import Scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
TINY = EXAMPLES / "tiny.yaml"
runner = CliRunner()


def test_default_scenario_and_examples_validate() -> None:
    default = Scenario()
    assert default.cluster.total_gpus == 8 and default.model_spec.name == "llama-3.1-8b"
    assert [t.name for t in default.tiers] == ["interactive", "standard", "background"]
    spelled_out = Scenario.load(EXAMPLES / "default.yaml")
    assert spelled_out.model_dump(exclude={"latency_model"}) == default.model_dump(exclude={"latency_model"})
    tiny = Scenario.load(TINY)
    assert tiny.trace(1.0, TINY.parent).tier_names == ("chat", "batch")
    assert tiny.iteration_model()[1].startswith("roofline")


def test_bad_scenarios_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid systems"):
        Scenario(systems=("nitsum", "vllm"))
    with pytest.raises(ValueError, match="load_scales"):
        Scenario(load_scales=(1.0, -2.0))
    with pytest.raises(ValueError, match="unknown model"):
        Scenario(model="gpt-5")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncluster: {num_nodes: 0, gpus_per_node: 8}\n")
    with pytest.raises(ConfigError, match=r"cluster\.num_nodes"):
        Scenario.load(bad)
    mismatch = (
        TINY.read_text().replace("tiers: [chat, batch]", "tiers: [chat, bulk]").replace("tier: batch", "tier: bulk")
    )
    (tmp_path / "m.yaml").write_text(mismatch)
    with pytest.raises(ConfigError, match="workload tiers"):
        Scenario.load(tmp_path / "m.yaml")


def test_simulate_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(app, ["simulate", "--scenario", str(TINY), "--out", str(out), "--quiet", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "max load at ≥ 90 % attainment" in result.output
    for name in ("report.html", "results.json", "results.csv", "goodput.png", "tier_attainment.png", "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 5 and {r["system"] for r in rows} >= {"nitsum", "oracle-static"}
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["sweep"]["levels"]) == 2 and len(payload["summary"]["targets"]) == 2


def test_simulate_rejects_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--scenario", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(app, ["simulate", "--scenario", str(TINY), "--systems", "nitsum,foo"])
    assert result.exit_code == 2 and "valid systems" in result.output
    result = runner.invoke(app, ["simulate", "--scenario", str(TINY), "--loads", "2,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_capacity_answers_gpus_per_system() -> None:
    result = runner.invoke(
        app,
        [
            "capacity",
            "--scenario",
            str(TINY),
            "--systems",
            "vllm-static-tp1,nitsum",
            "--max-gpus",
            "2",
            "--load",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {row["system"] for row in data["systems"]} == {"vllm-static-tp1", "nitsum"}
    for row in data["systems"]:
        assert row["gpus"] in (1, 2) and row["attainment"] >= 0.9


def test_bench_goodput_json_and_sim_speed() -> None:
    result = runner.invoke(app, ["bench", "goodput", "--scenario", str(TINY), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    level = data["levels"][0]
    assert set(level["systems"]) == {"nitsum", "vllm-static-tp1", "vllm-static-tp2", "distserve", "oracle-static"}
    assert level["nitsum_vs_strongest_other"]["strongest_other"] in level["systems"]
    assert [t["target"] for t in data["targets"]] == [1.3, 3.0]
    result = runner.invoke(app, ["bench", "sim-speed", "--systems", "vllm-static-tp4", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    speed = json.loads(result.output)
    assert speed["requests"] > 30_000 and speed["rows"][0]["speed_x"] > 100


def test_qwen14b_tight_scenario_needs_more_than_tp1_for_interactive() -> None:
    from nitsum_opt.models import build_capacity_table
    from nitsum_opt.models.capacity import load_tiers_file
    from nitsum_opt.models.spec import Role, ServingConfig

    scenario = Scenario.load(EXAMPLES / "qwen14b-tight.yaml")
    model, source = scenario.iteration_model()
    assert scenario.model_spec.name == "qwen2.5-14b" and source.startswith("fitted")
    request = load_tiers_file(EXAMPLES.parent / "capacity" / "tiers-qwen14b-tight.yaml")
    slos = {t.name: (t.slo.ttft_slo_ms, t.slo.tpot_slo_ms) for t in request.tiers}
    assert slos == {t.name: (t.ttft_slo_ms, t.tpot_slo_ms) for t in scenario.tiers}  # same SLOs as the scenario
    interactive = [t for t in request.tiers if t.name == "interactive"]
    configs = [ServingConfig(tp=tp, role=Role.DECODE) for tp in (1, 2, 4)]
    rates = build_capacity_table(model, interactive, configs=configs, options=request.options).rates_rps["interactive"]
    assert rates["tp1-decode"] == 0.0 and rates["tp2-decode"] > 0.0 and rates["tp4-decode"] > rates["tp2-decode"]
