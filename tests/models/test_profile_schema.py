"""Profile CSV and meta validation: every bad input names the column/line and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nitsum_opt.models.profile_schema import (
    PROFILE_COLUMNS,
    ProfileError,
    load_meta,
    load_profile,
    meta_path_for,
    profile_sha256,
)


def test_committed_public_profile_is_valid(h) -> None:
    df = load_profile(h.PUBLIC_PROFILE, h.SPEC)
    assert list(df.columns) == list(PROFILE_COLUMNS)
    assert sorted(df["tp"].unique()) == [1, 2, 4, 8]
    assert df["step_time_ms"].gt(0).all()


def test_plain_and_gzip_give_the_same_rows_and_hash(h, tmp_path: Path, synthetic: pd.DataFrame) -> None:
    gz = h.write_profile(synthetic, tmp_path / "a.csv.gz")
    plain = h.write_profile(synthetic, tmp_path / "b.csv", gz=False)
    pd.testing.assert_frame_equal(load_profile(gz), load_profile(plain))
    assert profile_sha256(gz) == profile_sha256(plain)


@pytest.fixture
def bad(h, tmp_path: Path):
    """``bad(df, match, spec=None)``: writing ``df`` and loading it fails with a message matching
    ``match``."""

    def check(df: pd.DataFrame, match: str, spec=None) -> None:
        path = h.write_profile(df, tmp_path / "bad.csv.gz")
        with pytest.raises(ProfileError, match=match):
            load_profile(path, spec)

    return check


def test_missing_column_is_named(bad, synthetic: pd.DataFrame) -> None:
    bad(synthetic.drop(columns=["decode_context_tokens"]), r"missing column.*decode_context_tokens")


@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0])
def test_bad_step_time_names_the_line(bad, synthetic: pd.DataFrame, value: float) -> None:
    df = synthetic.copy()
    df.loc[7, "step_time_ms"] = value
    bad(df, r"line 9")  # header is line 1, row index 7 is line 9


def test_seconds_are_recognised(bad, synthetic: pd.DataFrame) -> None:
    df = synthetic.assign(step_time_ms=synthetic["step_time_ms"] / 1000)
    bad(df, r"looks like seconds.*multiply by 1000")


def test_microseconds_are_recognised(h, bad, synthetic: pd.DataFrame) -> None:
    df = synthetic.assign(step_time_ms=synthetic["step_time_ms"] * 1000)
    bad(df, r"look like microseconds.*divide by 1000", spec=h.SPEC)
    bad(synthetic.assign(step_time_ms=synthetic["step_time_ms"] * 1e4), r"looks like microseconds")


def test_faster_than_physics_is_rejected(h, bad, synthetic: pd.DataFrame) -> None:
    df = synthetic.copy()
    df.loc[3, "step_time_ms"] = 0.05  # 16 GB shard in 50 µs = 320 TB/s
    bad(df, r"line 5.*faster than the physical floor", spec=h.SPEC)


def test_single_tp_is_rejected(bad, synthetic: pd.DataFrame) -> None:
    bad(synthetic[synthetic["tp"] == 2], r"only \[2\].*at least two TP degrees")


def test_fractional_integer_column(bad, synthetic: pd.DataFrame) -> None:
    df = synthetic.astype({"num_decode_seqs": float})
    df.loc[2, "num_decode_seqs"] = 2.5
    bad(df, r"'num_decode_seqs' line 4.*not an integer")


def test_inconsistent_composition(bad, synthetic: pd.DataFrame) -> None:
    df = synthetic.copy()
    row = int(np.flatnonzero(df["prefill_tokens"] > 0)[0])
    df.loc[row, "prefill_attention_pairs"] = 1
    bad(df, rf"line {row + 2}.*prefill_attention_pairs must be >= prefill_tokens")


def test_unknown_experiment_and_tp(bad, synthetic: pd.DataFrame) -> None:
    bad(synthetic.assign(experiment="warmup"), r"experiment must be one of")
    df = synthetic.copy()
    df.loc[0, "tp"] = 3
    bad(df, r"line 2: tp must be one of")


def test_two_models_in_one_file(bad, synthetic: pd.DataFrame) -> None:
    df = synthetic.copy()
    df.loc[0, "model"] = "qwen2.5-14b"
    bad(df, r"column 'model' holds")


def test_missing_file_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "nope.csv.gz")
    (tmp_path / "x.csv.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ProfileError, match="not a readable"):
        load_profile(tmp_path / "x.csv.gz")


def test_meta_round_trip_and_errors(h, tmp_path: Path, synthetic: pd.DataFrame) -> None:
    meta = h.meta_for(synthetic)
    path = h.write_profile(synthetic, tmp_path / "llama-3.1-8b.csv.gz", meta)
    loaded = load_meta(meta_path_for(path))
    assert loaded.model == h.SPEC and loaded.kv_cache_tokens() == {1: 500_000, 2: 1_000_000, 4: 2_000_000}

    bad = dict(meta, per_tp={"3": {"kv_cache_tokens": 10}})
    (tmp_path / "m.json").write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match=r"per_tp key '3'"):
        load_meta(tmp_path / "m.json")
    bad = dict(meta, per_tp={"1": {"num_gpu_blocks": 10}})
    (tmp_path / "m.json").write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match="kv_cache_tokens"):
        load_meta(tmp_path / "m.json")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_meta(tmp_path / "m.json")
    extra = dict(meta, new_field=1)
    (tmp_path / "m.json").write_text(json.dumps(extra))
    with pytest.warns(UserWarning, match="new_field"):
        load_meta(tmp_path / "m.json")
