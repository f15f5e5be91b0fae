"""Placing profiling engines on GPUs (pure parts of the launcher)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from nitsum_runtime.profile_launch import Job, first_free_block, gpu_blocks, pack_parts, plan_jobs


def test_jobs_start_small_first() -> None:
    jobs = plan_jobs(["llama-3.1-8b", "qwen2.5-14b"], [4, 1, 2])
    assert [(j.model, j.tp) for j in jobs] == [
        ("llama-3.1-8b", 1),
        ("qwen2.5-14b", 1),
        ("llama-3.1-8b", 2),
        ("qwen2.5-14b", 2),
        ("llama-3.1-8b", 4),
        ("qwen2.5-14b", 4),
    ]
    assert Job("llama-3.1-8b", 2).stem == "llama-3.1-8b-tp2"


def test_blocks_are_aligned() -> None:
    assert gpu_blocks([0, 1, 2, 3], 2) == [(0, 1), (2, 3)]
    assert gpu_blocks([4, 5, 6, 7], 4) == [(4, 5, 6, 7)]
    assert gpu_blocks([0, 1, 2], 2) == [(0, 1)]
    with pytest.raises(ValueError, match="tp=0"):
        gpu_blocks([0], 0)


def test_packing_of_the_h200_plan() -> None:
    gpus = [0, 1, 2, 3]
    busy: set[int] = set()
    placed = []
    for tp in (1, 1, 2):  # llama TP1, qwen TP1, llama TP2 run side by side
        block = first_free_block(gpus, tp, busy)
        assert block is not None
        busy.update(block)
        placed.append(block)
    assert placed == [(0,), (1,), (2, 3)]
    assert first_free_block(gpus, 2, busy) is None  # qwen TP2 waits for a pair
    busy -= {0, 1}
    assert first_free_block(gpus, 2, busy) == (0, 1)
    assert first_free_block(gpus, 4, busy) is None


def test_pack_parts_archives_the_folder(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.csv").write_text("x\n")
    pack_parts(parts, tmp_path / "parts.tgz")
    with tarfile.open(tmp_path / "parts.tgz") as tar:
        assert tar.getnames() == ["parts", "parts/a.csv"]
