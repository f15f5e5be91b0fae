"""The control loop on real vLLM engines (marked ``gpu``; 2 GPUs and vLLM 0.26 importable): the Nitsum controller
serves the committed llama8b-tight slice's first 100 s (epochs of 15 s) on TP 1 and TP 2 engines, every decision
is the simulator's, the TP 2 → TP 1 prefill/decode switch at 60 s is prepared ahead and migrates the KV of every
request in flight, and every engine step is logged. The full measurement is ``benchmarks/gpu/run_adaptive_h200.sh``
(``benchmarks/RESULTS.md``, "The runtime's control loop on 2×H200"); about 6 minutes (three engine starts)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from nitsum_opt.sim.decisions import decision_mismatches
from nitsum_opt.sim.fidelity import simulate_system, with_prepare_ahead
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice, read_slices, write_slices

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "examples/scenarios/llama8b-tight.yaml"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(GPUS < 2 or importlib.util.find_spec("vllm") is None, reason="needs 2 GPUs and vLLM")
def test_nitsum_switches_tp_mid_serve_on_vllm(tmp_path: Path, run_module: Callable[..., int]) -> None:
    full = read_slices(ROOT / "benchmarks/gpu/adaptive/slices.csv")[0]
    keep = full.arrival_s < 100.0
    piece = TraceSlice(
        name="first-100s",
        arrival_s=full.arrival_s[keep],
        input_tokens=full.input_tokens[keep],
        output_tokens=full.output_tokens[keep],
        tier=tuple(np.array(full.tier)[keep]),
        duration_s=100.0,
    )
    write_slices(tmp_path / "slices.csv", [piece])
    out = tmp_path / "out"
    argv = ["--scenario", str(SCENARIO), "--slices", str(tmp_path / "slices.csv"), "--slice", piece.name]
    argv += ["--systems", "nitsum", "--epoch-s", "15", "--drain-s", "20", "--out", str(out)]
    assert run_module("nitsum_runtime.bench_adaptive", argv) == 0  # a child: its GPU memory is freed when it exits
    meta = json.loads((out / "meta.json").read_text())
    info = meta["runs"]["nitsum"]
    kv = {int(tp): n for tp, n in meta["kv_cache_tokens_by_tp"].items()}
    scenario = with_prepare_ahead(Scenario.load(SCENARIO), True)  # as the run carried its switch out
    _, timeline = simulate_system(scenario, piece, "nitsum", 2, 15.0, 20.0, kv)
    assert decision_mismatches(info["epochs"], timeline, scenario.settings.switch.switch_s) == []
    switches = [e for e in info["epochs"] if e["action"] == "transition"]
    assert switches, info["epochs"]
    for e in switches:
        assert e["prepare_s"] > 0 and e["moved"] == e["migrated"] and not e["error"], e
    assert info["aborted"] == info["never_dispatched"] == 0 and info["migrated"] == info["handoffs"]
    assert (out / "nitsum" / "steps.csv.gz").stat().st_size > 0
