"""A calibration fitted on the serving loop's step logs (``nitsum_opt.sim.runtime_calibration``)."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from nitsum_opt.sim.runtime_calibration import (
    SERVING_STEP_HEADER,
    fit_runtime_calibration,
    read_serving_steps,
    tp_of,
)
from tests.sim.test_calibration import LinearModel


def _write_log(path: Path, rows: list[tuple]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SERVING_STEP_HEADER)
        writer.writerows(rows)
    return path


def _steps(instance: str, n: int, seed: int, truth: tuple[float, float, float]) -> list[tuple]:
    """``n`` steps of ``instance`` whose round trips are ``a + b · model + c · sequences`` exactly."""
    rng = np.random.default_rng(seed)
    model, tp = LinearModel(), tp_of(instance)
    rows = []
    for _ in range(n):
        tokens = int(rng.integers(0, 2000))
        n_pre, n_dec = int(tokens > 0), int(rng.integers(1, 64))
        comp = (n_pre, tokens, tokens * (tokens + 1) // 2, n_dec, n_dec * 1000)
        ms = truth[0] + truth[1] * model.predict_ms(tp, *comp) + truth[2] * (n_pre + n_dec)
        rows.append((instance, ms / 1000, 0.9 * ms / 1000, *comp))
    return rows


def test_fit_pools_every_log_per_tp_and_recovers_the_truth(tmp_path: Path) -> None:
    tp1, tp2 = (0.5, 1.0, 0.05), (1.2, 0.95, 0.04)
    both = _steps("g0-tp1-colocated", 120, 1, tp1) + _steps("g0-tp2-colocated", 80, 2, tp2)
    a = _write_log(tmp_path / "a.csv.gz", both)
    b = _write_log(tmp_path / "b.csv.gz", _steps("g1-tp1-decode", 90, 3, tp1))
    cal = fit_runtime_calibration([a, b], LinearModel())
    assert sorted(cal) == [1, 2] and cal[1].steps == 210 and cal[2].steps == 80
    for tp, truth in ((1, tp1), (2, tp2)):
        assert (cal[tp].offset_ms, cal[tp].scale, cal[tp].per_seq_ms) == pytest.approx(truth, abs=1e-6)
    assert fit_runtime_calibration([a], LinearModel(), per_seq=False)[1].per_seq_ms == 0.0
    steps = read_serving_steps(a)
    assert set(steps) == {"g0-tp1-colocated", "g0-tp2-colocated"} and steps["g0-tp2-colocated"][2].shape == (80, 5)


def test_bad_logs_name_the_file_and_line(tmp_path: Path) -> None:
    good = _steps("g0-tp1-colocated", 3, 0, (0.0, 1.0, 0.0))
    path = _write_log(tmp_path / "bad.csv.gz", [*good, ("g0-colocated", 0.01, 0.01, 0, 0, 0, 1, 100)])
    with pytest.raises(ValueError, match=r"bad.csv.gz:5: .*'g0-colocated'"):
        read_serving_steps(path)
    path = _write_log(tmp_path / "text.csv.gz", [("g0-tp1-colocated", "fast", 0.01, 0, 0, 0, 1, 100)])
    with pytest.raises(ValueError, match=r"text.csv.gz:2: not a serving step row"):
        read_serving_steps(path)
    with pytest.raises(ValueError, match="no step logs"):
        fit_runtime_calibration([], LinearModel())


def test_the_bundled_runtime_scenario_carries_the_calibration_of_the_committed_logs() -> None:
    """``examples/scenarios/llama8b-tight-h200x2-runtime.yaml`` says its calibration was fitted on the committed
    2×H200 step logs: refitting them gives the same numbers (to the digits written)."""
    import warnings

    from nitsum_opt.sim.scenario import Scenario

    warnings.simplefilter("ignore")
    root = Path(__file__).resolve().parents[2]
    runs = root / "benchmarks/gpu/results/adaptive-h200x2-2026-11-23b"
    logs = [runs / "nitsum/nitsum/steps.csv.gz", *sorted((runs / "static").glob("*/steps.csv.gz"))]
    scenario = Scenario.load(root / "examples/scenarios/llama8b-tight-h200x2-runtime.yaml")
    base = scenario.model_copy(update={"latency_calibration": {}})
    fitted = fit_runtime_calibration(logs, base.iteration_model()[0])
    assert sorted(scenario.latency_calibration) == sorted(fitted) == [1, 2]
    for tp, cal in scenario.latency_calibration.items():
        assert cal.offset_ms == pytest.approx(fitted[tp].offset_ms, abs=1e-4)
        assert cal.scale == pytest.approx(fitted[tp].scale, abs=1e-4)
        assert cal.per_seq_ms == pytest.approx(fitted[tp].per_seq_ms, abs=1e-5)
        assert cal.steps == fitted[tp].steps
    assert scenario.cluster.total_gpus == 2 and scenario.settings.seat_safety == 0.95


def test_calibrate_command_prints_the_scenario_block_that_reproduces_the_bundled_runtime_scenario(
    tmp_path: Path,
) -> None:
    """``nitsum calibrate --scenario llama8b-tight.yaml LOGS...`` on the committed 2×H200 step logs prints the
    calibration that ``llama8b-tight-h200x2-runtime.yaml`` carries; bad input exits 2 naming the problem."""
    import yaml
    from typer.testing import CliRunner

    from nitsum_opt.cli import app

    root = Path(__file__).resolve().parents[2]
    runs = root / "benchmarks/gpu/results/adaptive-h200x2-2026-11-23b"
    logs = [str(runs / "nitsum/nitsum/steps.csv.gz"), *map(str, sorted((runs / "static").glob("*/steps.csv.gz")))]
    scenario = str(root / "examples/scenarios/llama8b-tight.yaml")
    runner = CliRunner()
    out = runner.invoke(app, ["calibrate", "--scenario", scenario, *logs])
    assert out.exit_code == 0, out.output
    block = yaml.safe_load(out.output.split("Add to the scenario YAML:")[1])["latency_calibration"]
    bundled = yaml.safe_load((root / "examples/scenarios/llama8b-tight-h200x2-runtime.yaml").read_text())
    for tp, cal in bundled["latency_calibration"].items():
        assert block[tp]["offset_ms"] == pytest.approx(cal["offset_ms"], abs=1e-4)
        assert block[tp]["per_seq_ms"] == pytest.approx(cal["per_seq_ms"], abs=1e-5)
        assert block[tp]["steps"] == cal["steps"]
    as_json = runner.invoke(app, ["calibrate", "--json", "--no-per-seq", "--scenario", scenario, logs[0]])
    assert as_json.exit_code == 0 and json_per_seq(as_json.output) == {0.0}
    missing = runner.invoke(app, ["calibrate", "--scenario", scenario, str(tmp_path / "none.csv.gz")])
    assert missing.exit_code == 2 and "no such step log" in missing.output
    bad = _write_log(tmp_path / "bad.csv.gz", [("g0-colocated", 0.01, 0.01, 0, 0, 0, 1, 100)])
    wrong = runner.invoke(app, ["calibrate", "--scenario", scenario, str(bad)])
    assert wrong.exit_code == 2 and "bad.csv.gz:2" in wrong.output


def json_per_seq(text: str) -> set[float]:
    import json

    return {c["per_seq_ms"] for c in json.loads(text).values()}
