"""The transition executor on a pool of real vLLM engines (marked ``gpu``; run on the H200 machine with vLLM 0.26
importable, e.g. ``bash benchmarks/gpu/run_runtime_h200.sh pool-test``).

4 GPUs: TP1 -> TP2 -> TP4 -> TP1; 2 GPUs: TP1 -> TP2 -> TP1 (``--world N`` in ``NITSUM_BENCH_ARGS`` picks it,
as for the benchmarks), Llama-3.1-8B shape, dummy weights from the resident store. Requests decode across every
switch and move by re-prefill; TP1 probes before and after the round trip are bit-identical (which needs
``VLLM_BATCH_INVARIANT=1``, the GPU script's default); 100 more switches with requests in flight lose none.
About 5.5 minutes on 4 GPUs (3 engine starts of 75-95 s), 3.5 on 2."""

from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

import pytest
import torch

from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_runtime.bench_pool import report_pool, run_vllm_pool_bench

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _world() -> int:
    args = shlex.split(os.environ.get("NITSUM_BENCH_ARGS", ""))
    if "--world" in args:
        return int(args[args.index("--world") + 1])
    return 4 if GPUS >= 4 else 2


@pytest.mark.skipif(GPUS < 2 or importlib.util.find_spec("vllm") is None, reason="needs 2 GPUs and vLLM")
def test_executor_switches_vllm_engines_round_trip_and_100_switches(tmp_path: Path) -> None:
    assert os.environ.get("VLLM_BATCH_INVARIANT") == "1", (
        "set VLLM_BATCH_INVARIANT=1 (the GPU script's default): without vLLM's batch-invariant kernels two "
        "identical TP1 runs already differ, so the bit-identity check would mean nothing"
    )
    world = _world()
    assert world <= GPUS, f"--world {world} but {GPUS} GPUs visible"
    summary = run_vllm_pool_bench(tmp_path, MODEL_PRESETS["llama-3.1-8b"], world, switches=100)
    report, ok = report_pool(summary, quick=False, title=f"executor on vLLM engines, {world} GPUs")
    print(report)
    rt, loop = summary["round_trip"], summary["loop"]
    assert all(not e["mismatched"] for e in summary["engines"].values()), report
    assert rt["probe_repeat"]["identical"], rt["probe_repeat"]  # control: the engine is run-to-run reproducible
    assert rt["probe_bit_identical"] and rt["ledger_ok"] and not rt["weight_mismatches"], rt["probe_comparison"]
    assert rt["max_logprob_diff"] <= 0.15, rt["max_logprob_diff_by_engine"]
    assert loop["switches"] == 100 and loop["lost"] == 0 and loop["completed"] == loop["submitted"]
    assert all(r["ok"] for r in summary["switch_rows"])
    assert ok, report


@pytest.mark.skipif(GPUS < 2 or importlib.util.find_spec("vllm") is None, reason="needs 2 GPUs and vLLM")
def test_executor_migrates_kv_into_vllm_engines(tmp_path: Path) -> None:
    """Same round trip with the in-flight requests' KV migrated through the Nitsum KV connector (every request
    of a busy switch migrated, none re-prefilled), then 20 loop switches alternating migrate / re-prefill.
    Run: ``bash benchmarks/gpu/run_runtime_h200.sh pool-kv-test``."""
    assert os.environ.get("VLLM_BATCH_INVARIANT") == "1", "set VLLM_BATCH_INVARIANT=1 (the GPU script's default)"
    world = _world()
    summary = run_vllm_pool_bench(
        tmp_path, MODEL_PRESETS["llama-3.1-8b"], world, switches=20, kv="migrate", bulk_switches=2
    )
    report, ok = report_pool(summary, quick=False, title=f"KV migrated into vLLM engines, {world} GPUs")
    print(report)
    rt, rows = summary["round_trip"], summary["switch_rows"]
    busy = [r for r in rows if r["phase"] == "round_trip" and r["in_flight"] and r["switch"] != "start"]
    assert busy and all(r["migrated"] == r["in_flight"] and r["kv_bytes"] > 0 for r in busy), busy
    assert not summary["kv_errors"], summary["kv_errors"]
    assert rt["probe_bit_identical"] and rt["ledger_ok"], rt["probe_comparison"]
    assert rt["max_logprob_diff"] <= 0.15, rt["max_logprob_diff_by_engine"]
    assert summary["loop"]["lost"] == 0 and ok, report
    # every buffer of every migration was a range of the engines' persistent arenas (opened at start)
    moved = [r for r in rows if r["kv_copy_ms"] > 0]
    assert moved and all(r["kv_arena_refs"] > 0 and r["kv_own_refs"] == 0 for r in moved), moved
    bulk = [r for r in rows if r["phase"] == "bulk"]
    assert len(bulk) == 2 and all(r["migrated"] == r["in_flight"] == 8 for r in bulk), bulk
    assert summary["bulk"]["lost"] == 0 and summary["p2p"]["nccl_gb_per_s"] > 0
