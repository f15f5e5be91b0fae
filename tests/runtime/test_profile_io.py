"""Profile files: rows written incrementally, read back and validated; parts merged per model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_runtime.profile_io import (
    CsvRowWriter,
    PartRecord,
    ProfileFileError,
    merge_parts,
    part_stem,
    read_rows,
    write_part_record,
)
from nitsum_runtime.profile_schema import PROFILE_COLUMNS, ExperimentKind, ProfileMeta, ProfileRow, TpRecord

SPEC = MODEL_PRESETS["llama-3.1-8b"]


def _row(tp: int = 1, **kw: object) -> ProfileRow:
    base: dict[str, object] = dict(
        model=SPEC.name,
        gpu="NVIDIA H200",
        tp=tp,
        experiment="decode",
        config_id="decode-c128-b4",
        repeat=0,
        num_prefill_seqs=0,
        prefill_tokens=0,
        prefill_context_tokens=0,
        prefill_attention_pairs=0,
        num_decode_seqs=4,
        decode_context_tokens=4 * 130,
        step_time_ms=7.25,
    )
    base.update(kw)
    return ProfileRow.model_validate(base)


def test_columns_are_the_agreed_schema() -> None:
    assert PROFILE_COLUMNS == (
        "model",
        "gpu",
        "tp",
        "experiment",
        "config_id",
        "repeat",
        "num_prefill_seqs",
        "prefill_tokens",
        "prefill_context_tokens",
        "prefill_attention_pairs",
        "num_decode_seqs",
        "decode_context_tokens",
        "step_time_ms",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step_time_ms": 0.0}, "greater than 0"),
        ({"step_time_ms": float("nan")}, "finite"),
        ({"tp": 3}, "tp=3"),
        ({"experiment": "prefill"}, "is 'decode'"),
        ({"num_prefill_seqs": 1}, "both zero or both positive"),
        ({"decode_context_tokens": 3}, "decode_context_tokens=3"),
        (
            {"num_prefill_seqs": 1, "prefill_tokens": 4, "prefill_attention_pairs": 3, "experiment": "mixed"},
            "prefill_attention_pairs=3",
        ),
    ],
)
def test_inconsistent_rows_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _row(**change)


def test_rows_round_trip_through_the_incremental_writer(tmp_path: Path) -> None:
    rows = [_row(repeat=i, step_time_ms=7 + i / 3) for i in range(3)]
    rows.append(
        _row(
            experiment="mixed",
            config_id="mixed-x",
            num_prefill_seqs=1,
            prefill_tokens=512,
            prefill_context_tokens=1024,
            prefill_attention_pairs=512 * 1024 + 512 * 513 // 2,
        )
    )
    path = tmp_path / "p.csv"
    with CsvRowWriter(path) as sink:
        for r in rows[:2]:
            sink(r)
        # a run killed here still leaves a readable file with every row written so far
        assert len(read_rows(path)) == 2
        for r in rows[2:]:
            sink(r)
    back = read_rows(path)
    assert [b.model_dump(exclude={"step_time_ms"}) for b in back] == [
        r.model_dump(exclude={"step_time_ms"}) for r in rows
    ]
    assert all(abs(b.step_time_ms - r.step_time_ms) < 1e-4 for b, r in zip(back, rows, strict=True))
    assert back[3].experiment is ExperimentKind.MIXED


def test_bad_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    good = ",".join(["llama-3.1-8b", "H200", "1", "decode", "c", "0", "0", "0", "0", "0", "1", "10", "5.0"])
    bad = good.replace(",5.0", ",-5.0")
    path.write_text(",".join(PROFILE_COLUMNS) + "\n" + good + "\n" + bad + "\n")
    with pytest.raises(ProfileFileError, match="line 3"):
        read_rows(path)
    path.write_text("model,gpu\nx,y\n")
    with pytest.raises(ProfileFileError, match="header"):
        read_rows(path)


def _part(tmp: Path, tp: int, finished: bool = True, rows: int = 2) -> None:
    stem = part_stem(SPEC.name, tp)
    with CsvRowWriter(tmp / f"{stem}.csv") as sink:
        for i in range(rows):
            sink(_row(tp=tp, repeat=i))
    record = TpRecord(
        kv_cache_tokens=1000 * tp,
        num_gpu_blocks=62 * tp,
        block_size=16,
        engine_start_s=40.0,
        sleep_s=0.1,
        wake_weights_s=0.2,
        wake_kv_s=0.3,
        rows=rows,
    )
    part = PartRecord(
        model=SPEC,
        tp=tp,
        gpu="NVIDIA H200",
        driver="580",
        vllm_version="0.26.0",
        torch_version="2.11.0",
        cuda_version="13.0",
        date=f"2026-11-2{tp}T00:00:00+00:00",
        command=f"nitsum profile --tp {tp}",
        engine_args={"max_num_seqs": 512},
        record=record if finished else None,
        details={"skipped": []},
    )
    write_part_record(part, tmp / f"{stem}.json")


def test_merge_writes_schema_files_from_parts_of_two_runs(tmp_path: Path) -> None:
    run1, run2, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _part(run1, 1)
    _part(run1, 2, rows=3)
    _part(run2, 4)
    written = merge_parts([run1, run2], out)
    assert written == {SPEC.name: out / f"{SPEC.name}.csv.gz"}
    rows = read_rows(written[SPEC.name])
    assert [r.tp for r in rows] == [1, 1, 2, 2, 2, 4, 4]
    meta = ProfileMeta.model_validate_json((out / f"{SPEC.name}.meta.json").read_text())
    assert meta.model == SPEC
    assert {k: v.rows for k, v in meta.per_tp.items()} == {"1": 2, "2": 3, "4": 2}
    assert meta.per_tp["4"].kv_cache_tokens == 4000
    assert meta.command == "nitsum profile --tp 1 ; nitsum profile --tp 2 ; nitsum profile --tp 4"
    raw = json.loads((out / f"{SPEC.name}.meta.json").read_text())
    assert set(raw) == {
        "model",
        "gpu",
        "driver",
        "vllm_version",
        "torch_version",
        "cuda_version",
        "date",
        "command",
        "engine_args",
        "per_tp",
    }
    details = json.loads((out / f"{SPEC.name}.details.json").read_text())
    assert set(details) == {"1", "2", "4"}
    # reproducible bytes: merging again gives the same gzip file
    first = written[SPEC.name].read_bytes()
    merge_parts([run1, run2], out)
    assert written[SPEC.name].read_bytes() == first
    assert gzip.decompress(first).decode().splitlines()[0] == ",".join(PROFILE_COLUMNS)


def test_merge_refuses_unfinished_and_duplicate_parts(tmp_path: Path) -> None:
    _part(tmp_path / "a", 1, finished=False)
    with pytest.raises(ProfileFileError, match="did not finish"):
        merge_parts([tmp_path / "a"], tmp_path / "out")
    _part(tmp_path / "b", 2)
    _part(tmp_path / "c", 2)
    with pytest.raises(ProfileFileError, match="also in"):
        merge_parts([tmp_path / "b", tmp_path / "c"], tmp_path / "out")
    with pytest.raises(ProfileFileError, match="no part records"):
        merge_parts([tmp_path / "empty"], tmp_path / "out")
