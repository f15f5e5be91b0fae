"""Shared fixtures of the runtime tests: a tiny Llama shape and one 4-rank gloo cluster for the session
(starting rank processes is the slow part of these tests, so they share one)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.ref_worker import ClusterConfig
from nitsum_runtime.scenarios import reference_groups


@pytest.fixture(scope="session")
def tiny_llama() -> ModelSpec:
    """2 layers, 8 query heads, 2 KV heads (replicated at TP4), vocabulary padded from 100 to 128."""
    return ModelSpec(
        name="tiny",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=8,
        num_kv_heads=2,
        intermediate_size=48,
        vocab_size=100,
        max_model_len=256,
    )


@pytest.fixture(scope="session")
def rank_cluster(tiny_llama: ModelSpec) -> Iterator[RankCluster]:
    """Four gloo rank processes (TP groups {0,1}, {2,3}, {0..3}) with float32 resident weights."""
    cfg = ClusterConfig(spec=tiny_llama, world_size=4, groups=reference_groups(4), block_size=4, seed=7)
    with RankCluster(cfg, call_timeout_s=60, start_timeout_s=120) as c:
        yield c


def _run_module(module: str, argv: list[str], timeout_s: float = 900.0) -> int:
    """``python -m module *argv`` in a child process (output to this test's capture): its exit status."""
    return subprocess.run([sys.executable, "-m", module, *argv], timeout=timeout_s, check=False).returncode


@pytest.fixture()
def run_module() -> Callable[..., int]:
    """Run a runtime command line in a child process, as a user runs it. GPU tests that start vLLM engines use it:
    the driver takes back all GPU memory the run held when the child exits, whereas in the pytest process the
    resident weights, shared with the killed engines over CUDA IPC, stayed allocated (measured on 2×H200: 19 GiB
    per GPU still held after a 40-request serving run, and the profiler test that came next found 10 of 140 GiB
    free)."""
    return _run_module
