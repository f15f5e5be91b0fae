"""PerformanceModel persistence: plain JSON round trip; tampered, corrupted or foreign files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nitsum_opt.models.bundle import (
    PerformanceModel,
    PerformanceModelFileError,
    bundled_models,
    fit_performance_model,
    load_performance_model,
)
from nitsum_opt.models.features import COMPOSITION_COLUMNS


def test_round_trip_is_exact(fitted: PerformanceModel, synthetic: pd.DataFrame, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "m.perf.json")
    text = path.read_text()
    assert text.lstrip().startswith("{") and "pickle" not in text  # plain JSON parameters
    loaded = PerformanceModel.load(path)
    x = synthetic[list(COMPOSITION_COLUMNS)].to_numpy(float)
    np.testing.assert_array_equal(loaded.predict_batch_ms(x), fitted.predict_batch_ms(x))
    np.testing.assert_array_equal(loaded.predict_quantiles_batch_ms(x), fitted.predict_quantiles_batch_ms(x))
    assert loaded.predict_ms(2, 1, 512, 131328, 8, 8192) == fitted.predict_ms(2, 1, 512, 131328, 8, 8192)
    assert loaded.kv_cache_tokens(2) == 1_000_000  # from the meta file
    assert loaded.doc.provenance.kv_cache_source == "profile-meta"
    assert loaded.doc.provenance.versions["scikit-learn"]
    assert loaded.to_json() == fitted.to_json()


def _doc(fitted: PerformanceModel) -> dict:
    return json.loads(fitted.to_json())


def test_tampered_coefficient_is_refused(fitted: PerformanceModel, tmp_path: Path) -> None:
    doc = _doc(fitted)
    doc["mean_model"]["coef"]["1"][0] *= 1.01
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(PerformanceModelFileError, match=r"hash mismatch.*edited or corrupted"):
        PerformanceModel.load(tmp_path / "t.json")


def test_corrupted_and_foreign_files_are_refused(fitted: PerformanceModel, tmp_path: Path) -> None:
    text = fitted.to_json()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(PerformanceModelFileError, match="not valid JSON"):
        PerformanceModel.load(tmp_path / "cut.json")
    (tmp_path / "foreign.json").write_text(json.dumps({"coef": [1, 2, 3]}))
    with pytest.raises(PerformanceModelFileError, match="not a performance model"):
        PerformanceModel.load(tmp_path / "foreign.json")
    (tmp_path / "pickle.json").write_bytes(b"\x80\x04\x95cos\nsystem\n.")  # a pickle is never unpickled
    with pytest.raises(PerformanceModelFileError, match="not valid JSON"):
        PerformanceModel.load(tmp_path / "pickle.json")
    doc = _doc(fitted)
    doc["format_version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(doc))
    with pytest.raises(PerformanceModelFileError, match="format_version 99"):
        PerformanceModel.load(tmp_path / "v.json")


def test_consistent_but_invalid_content_is_refused(fitted: PerformanceModel, tmp_path: Path) -> None:
    """A file re-hashed after a bad edit (negative coefficient) still fails validation."""
    import hashlib

    doc = _doc(fitted)
    doc.pop("content_sha256")
    doc["mean_model"]["coef"]["1"][0] = -1.0
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    doc["content_sha256"] = hashlib.sha256(canonical).hexdigest()
    (tmp_path / "neg.json").write_text(json.dumps(doc))
    with pytest.raises(PerformanceModelFileError, match=r"invalid content.*>= 0"):
        PerformanceModel.load(tmp_path / "neg.json")


def test_kv_capacity_falls_back_to_an_estimate_with_a_warning(h, synthetic: pd.DataFrame, tmp_path: Path) -> None:
    meta = h.meta_for(synthetic)
    del meta["per_tp"]["4"]
    meta["per_tp"]["1"] = {"kv_cache_tokens": 123}
    path = h.write_profile(synthetic, tmp_path / "llama-3.1-8b.csv.gz", meta)
    with pytest.warns(UserWarning, match=r"no measured kv_cache_tokens for tp \[4\]"):
        pm = fit_performance_model(path)
    assert pm.kv_cache_tokens(1) == 123 and pm.doc.provenance.kv_cache_source == "estimated"
    assert pm.kv_cache_tokens(4) > 1_000_000
    with pytest.raises(KeyError, match=r"no KV capacity for tp=8"):
        pm.kv_cache_tokens(8)


def test_bundled_model_resolves_by_name() -> None:
    assert {"h100-public-composed/llama-3.1-8b", "h200-vllm0.26/qwen2.5-14b"} <= set(bundled_models())
    pm = load_performance_model("llama-3.1-8b")  # a bare name prefers the measured H200 set
    assert pm.spec.name == "llama-3.1-8b" and pm.gpu == "NVIDIA H200" and pm.tps == (1, 2, 4)
    assert load_performance_model("h100-public-composed/llama-3.1-8b").tps == (1, 2, 4, 8)
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_performance_model("no-such-model")


@pytest.mark.parametrize(
    "name", ["h100-public-composed/llama-3.1-8b", "h200-vllm0.26/llama-3.1-8b", "h200-vllm0.26/qwen2.5-14b"]
)
def test_committed_model_matches_a_fresh_fit(h, name: str) -> None:
    """Every bundled JSON is reproducible from its committed profile (same data hash, same coefficients)."""
    committed = load_performance_model(name)
    fresh = fit_performance_model(h.REPO / "models" / "data" / "profiles" / f"{name}.csv.gz")
    assert fresh.doc.provenance.profile_sha256 == committed.doc.provenance.profile_sha256
    assert fresh.doc.mean_model == committed.doc.mean_model
    assert fresh.heldout == committed.heldout


def test_public_api_is_lazy_and_complete() -> None:
    import subprocess
    import sys

    code = (
        "import sys, nitsum_opt, nitsum_opt.models as m; "
        "assert 'sklearn' not in sys.modules and 'scipy' not in sys.modules, 'heavy import at import time'; "
        "assert m.load_performance_model and m.build_capacity_table and m.simulate_instance; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
