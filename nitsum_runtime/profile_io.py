"""Reading and writing profile files: per-engine parts while profiling, merged per-model files at the end.

While an engine is profiled its rows go to ``parts/<model>-tp<N>.csv`` one at a time (flushed, plain CSV,
so a run killed at its time limit still leaves every row it measured) and its facts to
``parts/<model>-tp<N>.json`` (:class:`PartRecord`, rewritten as they become known). :func:`merge_parts` then
writes the files the latency models read (``PROFILE_SCHEMA.md``):

* ``<model>.csv.gz``: every TP of the model, rows in measurement order within each TP (gzip with a zero
  timestamp, so equal rows give equal bytes);
* ``<model>.meta.json``: :class:`~nitsum_runtime.profile_schema.ProfileMeta`;
* ``<model>.details.json``: what does not belong to the schema but explains a run (the grid, skipped
  configurations, plan/scheduler disagreements, every sleep/wake repeat).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.profile_schema import PROFILE_COLUMNS, ProfileMeta, ProfileRow, TpRecord


class ProfileFileError(ValueError):
    """A profile file that cannot be read or merged; the message names the file (and line) and the fix."""


class PartRecord(BaseModel):
    """Everything one profiled engine (one model at one TP) knows besides its rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec
    """The profiled architecture."""
    tp: int = Field(ge=1)
    """Tensor-parallel degree."""
    gpu: str
    """GPU name."""
    driver: str
    """NVIDIA driver version."""
    vllm_version: str
    """vLLM version."""
    torch_version: str
    """torch version."""
    cuda_version: str
    """CUDA version of torch."""
    date: str
    """UTC start of the engine's profiling (ISO 8601)."""
    command: str
    """Command line that launched the profile."""
    engine_args: dict[str, Any]
    """Engine arguments (the model folder excluded: it is a temporary path)."""
    record: TpRecord | None = None
    """Per-TP facts; ``None`` until the engine finished (a part without it is incomplete)."""
    details: dict[str, Any] = Field(default_factory=dict)
    """Run details (grid, skipped configurations, mismatches, sleep/wake repeats, timings)."""


def part_stem(model: str, tp: int) -> str:
    """File stem of an engine's part files, e.g. ``llama-3.1-8b-tp2``."""
    return f"{model}-tp{tp}"


class CsvRowWriter:
    """Appends :class:`ProfileRow` s to a plain CSV, flushing after each row; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = None
        self._writer: Any = None

    def __enter__(self) -> CsvRowWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(PROFILE_COLUMNS)
        self._fh.flush()
        return self

    def __call__(self, row: ProfileRow) -> None:
        if self._fh is None:
            raise RuntimeError(f"CsvRowWriter({self.path}) used outside its 'with' block")
        self._writer.writerow(_cells(row))
        self._fh.flush()

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _cells(row: ProfileRow) -> list[str]:
    out = []
    for name in PROFILE_COLUMNS:
        value = getattr(row, name)
        out.append(f"{value:.4f}" if isinstance(value, float) else str(value))
    return out


def read_rows(path: Path) -> list[ProfileRow]:
    """Read a profile CSV (plain or gzip) into validated rows; errors name the file and line."""
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    if header != PROFILE_COLUMNS:
        raise ProfileFileError(f"{path}: header {list(header)} is not the profile schema's {list(PROFILE_COLUMNS)}")
    rows = []
    for line, record in enumerate(reader, start=2):
        try:
            rows.append(ProfileRow.model_validate(record))
        except ValidationError as exc:
            raise ProfileFileError(f"{path} line {line}: {exc.errors()[0]['msg']} in {record}") from None
    return rows


def write_rows_gz(rows: Iterable[ProfileRow], path: Path) -> int:
    """Write rows as gzip CSV with a zero timestamp (reproducible bytes); returns the row count."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PROFILE_COLUMNS)
    n = 0
    for row in rows:
        writer.writerow(_cells(row))
        n += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue().encode("utf-8"))
    return n


def write_part_record(part: PartRecord, path: Path) -> None:
    """Write (or overwrite) an engine's part JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(part.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _load_part(path: Path) -> PartRecord:
    try:
        return PartRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ProfileFileError(f"{path}: not a profiler part record: {exc}") from None


def merge_parts(part_dirs: Iterable[Path], out_dir: Path) -> dict[str, Path]:
    """Merge every complete part found in ``part_dirs`` into per-model files in ``out_dir``.

    Returns ``{model: csv.gz path}``. A part whose engine did not finish (no per-TP record, or no CSV) is an
    error naming it: rerun that engine, or move its files away to publish the others.
    """
    by_model: dict[str, dict[int, tuple[PartRecord, Path]]] = {}
    for d in part_dirs:
        for jpath in sorted(Path(d).glob("*.json")):
            part = _load_part(jpath)
            csv_path = jpath.with_suffix(".csv")
            if part.record is None or not csv_path.is_file():
                raise ProfileFileError(
                    f"{jpath}: the {part.model.name} TP{part.tp} engine did not finish (no per-TP record or "
                    f"no {csv_path.name}); rerun it or move its part files out of {d}"
                )
            seen = by_model.setdefault(part.model.name, {})
            if part.tp in seen:
                raise ProfileFileError(f"{jpath}: {part.model.name} TP{part.tp} also in {seen[part.tp][1]}")
            seen[part.tp] = (part, csv_path)
    if not by_model:
        raise ProfileFileError(f"no part records (*.json) in {[str(d) for d in part_dirs]}")
    written = {}
    for model, parts in by_model.items():
        written[model] = _merge_model(model, parts, out_dir)
    return written


def _merge_model(model: str, parts: dict[int, tuple[PartRecord, Path]], out_dir: Path) -> Path:
    tps = sorted(parts)
    first = parts[tps[0]][0]
    rows: list[ProfileRow] = []
    per_tp: dict[str, TpRecord] = {}
    for tp in tps:
        part, csv_path = parts[tp]
        for field in ("model", "gpu", "engine_args", "vllm_version", "torch_version"):
            if getattr(part, field) != getattr(first, field):
                raise ProfileFileError(
                    f"{csv_path}: {field} differs between TP{tps[0]} and TP{tp} of {model}; a profile file "
                    "holds one model, GPU type and engine configuration"
                )
        tp_rows = read_rows(csv_path)
        if any(r.tp != tp or r.model != model for r in tp_rows):
            raise ProfileFileError(f"{csv_path}: rows of another model or TP than {model} TP{tp}")
        rows.extend(tp_rows)
        assert part.record is not None
        per_tp[str(tp)] = part.record.model_copy(update={"rows": len(tp_rows)})
    commands = list(dict.fromkeys(parts[tp][0].command for tp in tps))
    meta = ProfileMeta(
        model=first.model,
        gpu=first.gpu,
        driver=first.driver,
        vllm_version=first.vllm_version,
        torch_version=first.torch_version,
        cuda_version=first.cuda_version,
        date=min(parts[tp][0].date for tp in tps),
        command=" ; ".join(commands),
        engine_args=first.engine_args,
        per_tp=per_tp,
    )
    csv_out = out_dir / f"{model}.csv.gz"
    write_rows_gz(rows, csv_out)
    (out_dir / f"{model}.meta.json").write_text(meta.model_dump_json(indent=2) + "\n", encoding="utf-8")
    details = {
        str(tp): {"date": parts[tp][0].date, "command": parts[tp][0].command, **parts[tp][0].details} for tp in tps
    }
    (out_dir / f"{model}.details.json").write_text(json.dumps(details, indent=2) + "\n", encoding="utf-8")
    return csv_out
