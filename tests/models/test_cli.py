"""``nitsum models fit|report|plot|list`` and ``nitsum capacity-table`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nitsum_opt.cli import app

runner = CliRunner()


def text(result) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_fit_then_report_json(synthetic_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.perf.json"
    result = runner.invoke(app, ["models", "fit", str(synthetic_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "MAPE" in text(result) and "saved" in text(result)
    result = runner.invoke(app, ["models", "report", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["per_tp"]) == {"1", "2", "4"}
    assert all(v["mean_mape_pct"] < 5 and "0.9" in v["coverage_pct"] for v in report["per_tp"].values())


def test_report_of_the_bundled_model_and_list() -> None:
    result = runner.invoke(app, ["models", "report"])
    assert result.exit_code == 0 and "llama-3.1-8b" in text(result)
    result = runner.invoke(app, ["models", "list"])
    assert "h100-public-composed/llama-3.1-8b" in text(result)


def test_capacity_table_json(h) -> None:
    result = runner.invoke(
        app, ["capacity-table", "--model", "llama-3.1-8b", "--tiers", str(h.EXAMPLE_TIERS), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert set(payload["rates_rps"]) == {"interactive", "agents", "background"}
    assert len(payload["rates_rps"]["interactive"]) == 9  # the bundled H200 model: TP 1, 2, 4 × 3 roles
    assert all(r > 0 for row in payload["rates_rps"].values() for r in row.values())


def test_plot_writes_three_pngs(h, tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "plot", str(h.PUBLIC_PROFILE), "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["tp_effect_decode.png", "tp_effect_prefill.png", "tp_effect_throughput.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_bad_inputs_exit_2_with_a_message(tmp_path: Path, h) -> None:
    result = runner.invoke(app, ["models", "fit", str(tmp_path / "missing.csv.gz")])
    assert result.exit_code == 2 and "no such file" in text(result)
    bad = tmp_path / "tiers.yaml"
    bad.write_text("tiers:\n  - name: x\n    slo: {ttft_slo_ms: -1, tpot_slo_ms: 5}\n")
    result = runner.invoke(app, ["capacity-table", "--tiers", str(bad)])
    assert result.exit_code == 2 and "ttft_slo_ms" in text(result)
    result = runner.invoke(app, ["models", "report", str(h.EXAMPLE_TIERS)])
    assert result.exit_code == 2 and "not valid JSON" in text(result)
