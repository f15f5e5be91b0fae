"""The GPU benchmark code paths (a) and (b), run on CPU with gloo and a tiny model: files, checks, exit
codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from nitsum_runtime.gpu_bench import main

SMOKE = ["--model", "tiny", "--backend", "gloo", "--world", "2", "--quick", "--dtype", "float32"]


def test_kv_bandwidth_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    assert main(["kv", "--out", str(tmp_path), *SMOKE]) == 0
    out = tmp_path / "kv"
    rows = list(csv.DictReader((out / "kv_migration.csv").open()))
    assert {r["case"] for r in rows} == {"tp1->tp1 gpu0->gpu1", "tp1->tp2", "tp2->tp1"}
    assert all(r["exact"] == "True" for r in rows)
    assert (out / "kv_bandwidth.png").stat().st_size > 1000
    assert "KV migration vs" in (out / "report.md").read_text()


def test_switch_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    assert main(["switch", "--out", str(tmp_path), *SMOKE, "--tolerance", "1e-3"]) == 0
    summary = json.loads((tmp_path / "switch" / "summary.json").read_text())
    assert summary["round_trip"]["passed"] and summary["loop"]["lost"] == 0
    assert summary["loop"]["migrated"] > 0 and summary["loop"]["reprefilled"] > 0
    assert summary["same_weights_on_all_gpus"]
    steps = list(csv.DictReader((tmp_path / "switch" / "transitions.csv").open()))
    assert {"pause", "wake", "fill_weights", "move_requests", "route", "sleep", "resume"} <= {
        s["action"] for s in steps
    }


def test_failed_check_gives_exit_status_1(tmp_path: Path) -> None:
    # A tolerance no cross-TP comparison can meet: the benchmark runs, its check fails, the status says so.
    assert main(["switch", "--out", str(tmp_path), *SMOKE, "--tolerance", "0"]) == 1
    summary = json.loads((tmp_path / "switch" / "summary.json").read_text())
    assert summary["round_trip"]["max_logprob_diff"] > 0 and not summary["round_trip"]["passed"]


def test_missing_gpus_give_exit_status_2(tmp_path: Path) -> None:
    assert main(["kv", "--out", str(tmp_path), "--world", "64"]) == 2
