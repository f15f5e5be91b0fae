"""GPU checks of the runtime (marked ``gpu``: deselected by default; run with ``-m gpu`` on the H200 machine).

Small shapes (Llama-3.1-8B widths, few layers) so the whole file runs in about two minutes; the full-size
measurements are the benchmarks of ``benchmarks/gpu/run_runtime_h200.sh``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_runtime.bench_kv import run_kv_bandwidth
from nitsum_runtime.bench_vllm import EngineHandle, write_model_dir
from nitsum_runtime.executor import TransitionExecutor
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.ref_worker import ClusterConfig
from nitsum_runtime.scenarios import build_reference_pool, reference_groups, run_round_trip
from nitsum_runtime.sharding import shard_plan, slice_shard
from nitsum_runtime.weights import ResidentWeightStore, fill_shard
from nitsum_runtime.worker_ext import kv_from_wire, kv_to_wire, publish_store

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
#: Llama-3.1-8B widths with 4 layers: every sharding and KV path, a fraction of the time.
SHORT = MODEL_PRESETS["llama-3.1-8b"].model_copy(update={"name": "llama-8b-4l", "num_layers": 4})
needs = pytest.mark.skipif(GPUS < 4, reason="needs 4 GPUs")


@pytest.mark.skipif(GPUS < 1, reason="needs a GPU")
def test_fill_shard_on_gpu_matches_slices_and_is_fast() -> None:
    store = ResidentWeightStore.dummy(SHORT, seed=1, device="cuda:0")
    for tp in (1, 2, 4):
        plan = shard_plan(SHORT, tp, tp - 1)
        params = {n: torch.empty(s, dtype=torch.bfloat16, device="cuda:0") for n, s in plan.shapes.items()}
        fill_shard(store, params, tp, tp - 1)  # warm
        report = fill_shard(store, params, tp, tp - 1)
        expected = slice_shard(SHORT, store.tensors, tp, tp - 1)
        assert all(torch.equal(params[n], expected[n]) for n in expected)
        assert report.bytes_copied / report.seconds > 200e9, report  # HBM-speed copy, never host


@needs
def test_kv_migration_over_nccl_is_exact(tmp_path: Path) -> None:
    s = run_kv_bandwidth(
        tmp_path,
        SHORT,
        4,
        "nccl",
        tokens_list=[1000, 4096],
        p2p_sizes=[64 << 20],
        chunk_sweep=(4 << 20,),
        chunk_bytes=4 << 20,
        iters=2,
    )
    assert s["all_exact"]
    assert s["p2p_gb_per_s"] > 50


@needs
def test_reference_round_trip_on_nccl() -> None:
    cfg = ClusterConfig(spec=SHORT, world_size=4, backend="nccl", dtype="bfloat16", groups=reference_groups(4))
    with RankCluster(cfg, call_timeout_s=120) as cluster:
        cluster.call([0, 1, 2, 3], "warmup")
        pool = build_reference_pool(cluster, num_blocks=256)
        ex = TransitionExecutor(pool, SHORT, policy="migrate")
        res = run_round_trip(pool, ex, SHORT, live=3, prompt_len=64, max_tokens=16, steps_between=3, tolerance=0.15)
        pool.sleep_all()
    assert res.probe_repeat.identical, res.probe_repeat  # control: the engine is run-to-run reproducible
    assert res.probe_bit_identical and res.ledger_ok, res.probe_comparison
    assert res.weight_mismatches == ()
    assert res.max_logprob_diff <= 0.15, res.max_logprob_diff_by_engine
    assert all(t.report.ok for t in res.transitions)


@pytest.mark.skipif(GPUS < 2 or importlib.util.find_spec("vllm") is None, reason="needs 2 GPUs and vLLM")
def test_vllm_refill_matches_vllm_loaders(tmp_path: Path) -> None:
    spec = SHORT.model_copy(update={"num_layers": 2, "name": "llama-8b-2l"})
    stores = [ResidentWeightStore.dummy(spec, 3, torch.device("cuda", g)) for g in range(2)]
    handles = tmp_path / "handles.json"
    publish_store(stores, handles)
    write_model_dir(spec, tmp_path / "model")
    engine = EngineHandle(
        "tp2",
        (0, 1),
        str(tmp_path / "model"),
        {
            "gpu_memory_utilization": 0.25,
            "max_model_len": 2048,
            "enforce_eager": True,
            "enable_prefix_caching": False,
        },
    )
    try:
        engine.start(300)
        engine.call("rpc", method="nitsum_attach_store", args=(spec.model_dump_json(), str(handles)))
        fills = engine.call("rpc", method="nitsum_fill_weights")
        checks = engine.call("rpc", method="nitsum_check_fill")
        info = engine.call("rpc", method="nitsum_kv_info")
        data = kv_from_wire(engine.call("rpc", method="nitsum_read_kv", args=([3, 5], 20))[0])
        assert data.shape == (2, 20, 4, 256)
        new = torch.arange(data.numel(), dtype=torch.float32).view(data.shape).to(torch.bfloat16)
        engine.call("rpc", method="nitsum_write_kv", args=([3, 5], 20, kv_to_wire(new)))
        back = [kv_from_wire(w) for w in engine.call("rpc", method="nitsum_read_kv", args=([3, 5], 20))]
        engine.call("sleep")
        engine.call("wake_weights")
        engine.call("rpc", method="nitsum_fill_weights")
        engine.call("wake_kv")
        again = engine.call("generate", prompts=[[1, 2, 3, 4]], max_tokens=4, k=5, prompt_logprobs=False)
        engine.call("add", request_id="x", prompt=[5, 6, 7], max_tokens=3)
        stepped = engine.call("step", n=10, step_timeout_s=30)  # returns once "x" finished: no idle step
        state = engine.call("describe")
    finally:
        engine.close()
    assert [len(c["mismatched"]) for c in checks] == [0, 0] and checks[0]["checked"] > 0
    assert all(f["bytes_copied"] > 0 for f in fills)
    assert info[0]["nhd_contiguous"] and info[0]["logical_shape"][1:] == [4, 16, 256]
    assert all(torch.equal(b, new) for b in back)
    assert len(again[0]["token_ids"]) == 4
    assert stepped["steps"] < 10 and not stepped["unfinished"] and len(stepped["tokens"]["x"]) == 3
    assert state["memory"] == "awake" and state["unfinished_in_output_processor"] == 0
