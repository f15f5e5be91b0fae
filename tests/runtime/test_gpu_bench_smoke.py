"""The GPU benchmark code paths (a) and (b), run on CPU with gloo and a tiny model: files, checks, exit
codes."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from nitsum_runtime.bench_report import compact_summary
from nitsum_runtime.gpu_bench import main
from nitsum_runtime.watchdog import process_tree

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


def test_sigterm_stops_a_benchmark_cleanly_with_a_report(tmp_path: Path) -> None:
    # The GPU script's time limit sends SIGTERM: processes are closed, the summary says why, status 2.
    cmd = [sys.executable, "-m", "nitsum_runtime.gpu_bench", "switch", "--out", str(tmp_path), *SMOKE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    children: list[int] = []
    while len(children) < 2 and time.monotonic() < deadline:  # both rank processes are up
        time.sleep(0.2)
        children = [p["pid"] for p in process_tree(proc.pid) if p["name"].startswith("python")]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 2
    summary = json.loads((tmp_path / "switch" / "summary.json").read_text())
    assert summary["status"] == "ERROR" and summary["error_summary"].startswith("BenchmarkInterrupted: stopped by")
    time.sleep(1.5)  # rank processes also exit on their own once their parent is gone
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
    assert children and not alive


def _state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return text[text.rindex(")") + 2]


def test_pool_benchmark_runs_on_cpu_with_toy_engines(tmp_path: Path) -> None:
    # Benchmark (d) end to end on engine processes running the CPU stand-in for vLLM: the GPU run's code path.
    args = ["pool", "--out", str(tmp_path), *SMOKE[:4], "--world", "4", "--quick", "--engines", "toy"]
    assert main([*args, "--switches", "9"]) == 0
    summary = json.loads((tmp_path / "pool" / "summary.json").read_text())
    assert summary["status"] == "PASS" and summary["complete"] and summary["loop"]["lost"] == 0
    assert summary["round_trip"]["probe_bit_identical"] and summary["round_trip"]["max_logprob_diff"] == 0.0
    rows = list(csv.DictReader((tmp_path / "pool" / "switches.csv").open()))
    assert [r["switch"] for r in rows if r["phase"] == "round_trip"][1:4] == ["tp1->tp2", "tp2->tp4", "tp4->tp1"]
    assert sum(r["phase"] == "loop" for r in rows) == 9 and all(r["ok"] == "True" for r in rows)
    assert "(d) pool: PASS" in compact_summary(tmp_path)


def test_pool_kv_benchmark_fails_fast_without_a_kv_path(tmp_path: Path) -> None:
    # --kv migrate on engines that cannot take KV (here: no GPU for the CUDA IPC copies) stops at the first switch
    # with requests in flight, naming the cause, instead of passing on re-prefill.
    args = ["pool", "--out", str(tmp_path), *SMOKE[:4], "--world", "2", "--quick", "--engines", "toy"]
    assert main([*args, "--switches", "2", "--kv", "migrate"]) == 2  # stopped: could not run
    error = (tmp_path / "pool-kv" / "ERROR.txt").read_text()
    assert "KV migration into vLLM failed at the first switch" in error and "0 of 2 requests migrated" in error


def test_compact_summary_reads_the_kv_migration_run() -> None:
    # the committed 2 x H200 run of `run_runtime_h200.sh pool-kv` (KV migrated into vLLM engines)
    out = Path(__file__).resolve().parents[2] / "benchmarks/gpu/results/runtime-h200x2-pool-kv-2026-11-22"
    text = compact_summary(out)
    assert "(d) pool, KV migrated: PASS" in text
    assert "KV migrated into vLLM engines: 68 requests" in text and "fallbacks to re-prefill 0" in text
