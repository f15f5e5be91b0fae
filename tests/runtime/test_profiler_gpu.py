"""End to end on a real GPU with vLLM: a 2-layer Llama profiled by a worker process (``-m gpu``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nitsum_runtime.profile_io import merge_parts, read_rows
from nitsum_runtime.profile_launch import launch, plan_jobs
from nitsum_runtime.profile_schema import ExperimentKind, ProfileMeta
from nitsum_runtime.vllm_engine import vllm_missing_reason

pytestmark = pytest.mark.gpu


def test_smoke_profile_on_one_gpu(tmp_path: Path) -> None:
    reason = vllm_missing_reason()
    if reason is not None:
        pytest.fail(f"the gpu tests need vLLM and a GPU: {reason}")
    parts = tmp_path / "parts"
    result = launch(plan_jobs(["llama-3.1-8b"], [1]), [0], parts, {1: 30.0}, 400.0, "pytest", smoke=True)
    assert result.outcome == {"llama-3.1-8b-tp1": "done"}, (parts / "llama-3.1-8b-tp1.log").read_text()[-3000:]
    written = merge_parts([parts], tmp_path / "out")
    rows = read_rows(written["llama-3.1-8b-2l"])
    assert {r.experiment for r in rows} == set(ExperimentKind)
    meta = ProfileMeta.model_validate_json((tmp_path / "out" / "llama-3.1-8b-2l.meta.json").read_text())
    rec = meta.per_tp["1"]
    assert rec.rows == len(rows) and rec.kv_cache_tokens > 100_000 and rec.engine_start_s > 0
    details = (tmp_path / "out" / "llama-3.1-8b-2l.details.json").read_text()
    assert '"num_mismatches": 0' in details, details
