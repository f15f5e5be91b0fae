"""The serving benchmark's whole path on CPU (toy vLLM engine processes): plans file in, one engine per GPU group,
every run served through the serving loop, ``measured.csv`` per deployment and ``meta.json`` out, readable by the
simulator-side comparison; and the plans file's checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nitsum_opt.models.spec import Role
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.sim.fidelity import read_measured
from nitsum_opt.sim.slices import TraceSlice, write_slices
from nitsum_opt.spec import Tier
from nitsum_runtime.bench_serving import ServingPlans

TIERS = (Tier(name="chat", ttft_slo_ms=500, tpot_slo_ms=50), Tier(name="batch", ttft_slo_ms=5000, tpot_slo_ms=200))


def _plans(runs: tuple[tuple[str, str], ...]) -> ServingPlans:
    pd = Deployment(
        instances=(
            DeployedInstance(tier=None, tp=1, role=Role.PREFILL, gpu_ids=(0,)),
            DeployedInstance(tier=None, tp=1, role=Role.DECODE, gpu_ids=(1,)),
        )
    )
    colo = Deployment(
        instances=tuple(
            DeployedInstance(tier=t, tp=1, role=Role.COLOCATED, gpu_ids=(g,)) for g, t in ((0, "chat"), (1, "batch"))
        ),
        admitted_rps={"chat": 50.0, "batch": 50.0},
        tier_priority=True,
        spill_over=True,
        central_queue=True,
    )
    return ServingPlans(model="llama-3.1-8b", tiers=TIERS, deployments={"pd": pd, "tiered": colo}, runs=runs)


def test_dry_run_on_toy_engines_writes_what_the_comparison_reads(
    tmp_path: Path, run_module: Callable[..., int]
) -> None:
    n = 16
    piece = TraceSlice(
        name="tiny",
        arrival_s=np.linspace(0.0, 0.3, n),
        input_tokens=np.full(n, 24),
        output_tokens=np.arange(1, n + 1),
        tier=tuple("chat" if k % 2 else "batch" for k in range(n)),
        duration_s=0.5,
    )
    write_slices(tmp_path / "slices.csv", [piece])
    plans = _plans((("pd", "tiny"), ("tiered", "tiny")))
    (tmp_path / "plans.json").write_text(plans.model_dump_json())
    out = tmp_path / "out"
    args = ["--plans", str(tmp_path / "plans.json"), "--slices", str(tmp_path / "slices.csv"), "--out", str(out)]
    # as the GPU test runs it: the command line, in a child process
    assert run_module("nitsum_runtime.bench_serving", [*args, "--engines", "toy", "--drain-s", "30"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["runs"]) == {"pd/tiny", "tiered/tiny"} and meta["engines"] == "toy"
    assert meta["runs"]["pd/tiny"]["handoffs"] == n - 1  # every request with more than one token
    assert meta["runs"]["tiered/tiny"]["handoffs"] == 0
    for dep in ("pd", "tiered"):
        timings = read_measured(out / dep / "measured.csv", [piece])["tiny"]
        assert timings.completed.all() and (timings.ttft_s > 0).all()
        assert meta["runs"][f"{dep}/tiny"]["aborted"] == 0


def test_plans_refuse_runs_of_unknown_deployments() -> None:
    with pytest.raises(ValueError, match=r"runs name deployments \['nope'\]"):
        _plans((("nope", "tiny"),))
    assert _plans((("pd", "tiny"),)).groups == ((0,), (1,))
