"""The serving loop on real vLLM engines (marked ``gpu``; 2 GPUs and vLLM 0.26 importable): the committed plans'
prefill/decode deployment serves the first 150 requests of the 8.98 req/s slice with every hand-off carrying its KV
through the Nitsum KV connector, nothing lost or aborted. The full measurement is
``benchmarks/gpu/run_serving_h200.sh`` (``benchmarks/RESULTS.md``, "The runtime serving deployments on 2×H200");
this is its smoke test, about 3 minutes (two engine starts)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nitsum_opt.sim.fidelity import read_measured
from nitsum_opt.sim.slices import read_slices

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(GPUS < 2 or importlib.util.find_spec("vllm") is None, reason="needs 2 GPUs and vLLM")
def test_prefill_decode_hand_offs_migrate_kv_on_vllm(tmp_path: Path, run_module: Callable[..., int]) -> None:
    slices = ROOT / "benchmarks/gpu/fidelity/slices.csv"
    args = ["--plans", str(ROOT / "benchmarks/gpu/serving/plans.json"), "--slices", str(slices)]
    args += ["--out", str(tmp_path), "--only", "pd", "--limit", "150", "--drain-s", "30"]
    assert run_module("nitsum_runtime.bench_serving", args) == 0  # a child: its GPU memory is freed when it exits
    meta = json.loads((tmp_path / "meta.json").read_text())
    first = meta["runs"]["pd/mean-8rps"]
    assert first["requests"] == 150 and first["aborted"] == 0 and first["never_dispatched"] == 0
    assert first["handoffs"] > 100 and first["migrated"] == first["handoffs"]
    timings = read_measured(tmp_path / "pd" / "measured.csv", read_slices(slices))["mean-8rps"]
    assert int(timings.completed.sum()) == 150
