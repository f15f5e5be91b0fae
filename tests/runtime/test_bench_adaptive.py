"""The adaptive benchmark's whole path on CPU (toy vLLM engine processes): one engine per candidate TP group of 2
GPUs, each system's controller built like the simulator's, re-planning at runtime, ``measured.csv`` per system and
``meta.json`` with every epoch's decision out, readable by the simulator-side comparison."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from nitsum_opt.sim.decisions import decision_mismatches
from nitsum_opt.sim.fidelity import read_measured, simulate_system, with_prepare_ahead
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice, write_slices
from nitsum_runtime.bench_adaptive import SERVING_STEP_HEADER, adaptive_pool_settings, parse_args, run

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "examples/scenarios/llama8b-tight.yaml"


def test_dry_run_on_toy_engines_decides_like_the_simulator(tmp_path: Path) -> None:
    n = 60
    rng = np.random.default_rng(3)
    piece = TraceSlice(
        name="tiny",
        arrival_s=np.sort(rng.uniform(0.0, 3.0, n)),
        input_tokens=rng.integers(20, 400, n),
        output_tokens=rng.integers(2, 40, n),
        tier=tuple(("interactive", "standard", "background")[k % 3] for k in range(n)),
        duration_s=3.0,
    )
    write_slices(tmp_path / "slices.csv", [piece])
    out = tmp_path / "out"
    argv = ["--scenario", str(SCENARIO), "--slices", str(tmp_path / "slices.csv"), "--slice", "tiny"]
    argv += ["--systems", "nitsum,vllm-static-tp1", "--epoch-s", "1", "--drain-s", "30", "--out", str(out)]
    assert run(parse_args([*argv, "--engines", "toy", "--planner-process"])) == 0  # decisions made in a child
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["runs"]) == {"nitsum", "vllm-static-tp1"} and meta["engines"] == "toy"
    assert set(meta["kv_cache_tokens"]) == {"tp1-g0", "tp1-g1", "tp2-g0-1"}
    nitsum = meta["runs"]["nitsum"]
    assert [e["at_s"] for e in nitsum["epochs"]] == [0.0, 1.0, 2.0]
    assert nitsum["aborted"] == 0 and nitsum["never_dispatched"] == 0
    assert [e["action"] for e in meta["runs"]["vllm-static-tp1"]["epochs"]] == ["start"]
    real = read_measured(out / "nitsum" / "measured.csv", [piece])["tiny"]
    assert real.completed.all()
    # the step log: every generated token came from exactly one scheduled sequence of one logged step
    with gzip.open(out / "nitsum" / "steps.csv.gz", "rt") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(SERVING_STEP_HEADER)
    assert {r["instance"] for r in rows} <= {e for e in nitsum["steps"]}
    assert sum(int(r["num_prefill_seqs"]) + int(r["num_decode_seqs"]) for r in rows) == piece.output_tokens.sum()
    assert all(float(r["step_time_s"]) > 0 and float(r["round_trip_s"]) > 0 for r in rows)
    for key, busy_s in nitsum["busy_s"].items():  # the round trips add up to each instance's busy time
        logged = sum(float(r["round_trip_s"]) for r in rows if r["instance"] == key)
        assert logged == pytest.approx(busy_s, rel=1e-3, abs=2e-3), key
    kv = {int(tp): v for tp, v in meta["kv_cache_tokens_by_tp"].items()}
    scenario = with_prepare_ahead(Scenario.load(SCENARIO), meta["prepare_ahead"])
    _, timeline = simulate_system(scenario, piece, "nitsum", 2, 1.0, 30.0, kv)
    assert decision_mismatches(nitsum["epochs"], timeline, scenario.settings.switch.switch_s) == []


def test_the_kv_connector_is_on_for_vllm_engines_unless_turned_off() -> None:
    scenario = Scenario.load(SCENARIO)
    base = ["--scenario", "s", "--slices", "x", "--slice", "y", "--out", "o"]
    on = adaptive_pool_settings(scenario, parse_args(base))
    off = adaptive_pool_settings(scenario, parse_args([*base, "--no-kv-connector"]))
    toy = adaptive_pool_settings(scenario, parse_args([*base, "--engines", "toy"]))
    assert on.kv_connector and "kv_transfer_config" in on.llm_kwargs()
    assert not off.kv_connector and "kv_transfer_config" not in off.llm_kwargs()
    assert not toy.kv_connector
    assert on.groups == off.groups == ((0,), (1,), (0, 1))
