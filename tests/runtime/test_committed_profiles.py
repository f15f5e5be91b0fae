"""The bundled H200 profiles ship inside ``nitsum_opt.models`` and follow the schema."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

import pytest

from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_runtime.profile_io import read_rows
from nitsum_runtime.profile_schema import ExperimentKind, ProfileMeta


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-14b"])
def test_bundled_profile_is_complete_and_consistent(model: str) -> None:
    folder = files("nitsum_opt.models").joinpath("data/profiles/h200-vllm0.26")
    with (
        as_file(folder.joinpath(f"{model}.csv.gz")) as csv_path,
        as_file(folder.joinpath(f"{model}.meta.json")) as meta_path,
    ):
        rows = read_rows(Path(csv_path))
        meta = ProfileMeta.model_validate_json(Path(meta_path).read_text())
    assert meta.model == MODEL_PRESETS[model]
    assert meta.gpu == "NVIDIA H200" and meta.vllm_version == "0.26.0"
    assert sorted(meta.per_tp) == ["1", "2", "4"]
    for tp, rec in meta.per_tp.items():
        tp_rows = [r for r in rows if r.tp == int(tp)]
        assert rec.rows == len(tp_rows) > 500
        assert {r.experiment for r in tp_rows} == set(ExperimentKind)
        # the KV cache holds the largest decode batch the grid ran at this TP
        assert rec.kv_cache_tokens > max(r.decode_context_tokens for r in tp_rows)
    assert all(r.model == model and r.gpu == meta.gpu for r in rows)
