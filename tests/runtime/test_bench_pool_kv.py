"""The large-migration phase of benchmark (d) on CPU: the reference engines (gloo ranks) migrate every long
request at every switch, lose none, and the report judges the single-link switches against point-to-point."""

from __future__ import annotations

from typing import Any

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.bench_pool import release_resident_store
from nitsum_runtime.bench_pool_kv import bulk_lines, run_bulk_migrations
from nitsum_runtime.executor import TransitionReport
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.scenarios import build_reference_pool


def test_bulk_phase_migrates_every_request_and_loses_none(rank_cluster: RankCluster, tiny_llama: ModelSpec) -> None:
    pool = build_reference_pool(rank_cluster, num_blocks=128, prefix="bulk-")
    rows: list[dict[str, Any]] = []

    def row(k: int, label: str, r: TransitionReport) -> dict[str, Any]:
        moved = {"migrated": r.migrated, "bytes": r.kv_bytes_moved}
        rows.append({"k": k, "switch": label, "in_flight": len(r.moves), **moved})
        return rows[-1]

    try:
        path = ((0,), (0, 1), (0, 1, 2, 3), (0,))
        res = run_bulk_migrations(pool, tiny_llama, path, switches=4, requests=3, prompt_len=20, row=row)
    finally:
        pool.sleep_all()
    assert res["lost"] == 0 and res["switches"] == 4 and res["reprefilled"] == 0
    assert [r["switch"] for r in rows] == ["tp1->tp2", "tp2->tp4", "tp4->tp1", "tp1->tp2"]
    assert all(r["in_flight"] == 3 and r["migrated"] == 3 and r["bytes"] > 0 for r in rows)


def _row(switch: str, link_gb_per_s: float) -> dict[str, Any]:
    return {
        "phase": "bulk",
        "switch": switch,
        "kv_bytes": 9e8,
        "kv_copy_ms": 4.0,
        "kv_copy_gb_per_s": 225.0,
        "kv_link_gb_per_s": link_gb_per_s,
        "kv_arena_refs": 24,
        "kv_own_refs": 0,
    }


def test_bulk_report_judges_the_median_single_link_switch() -> None:
    summary = {
        "p2p": {"nccl_gb_per_s": 360.0, "copy_gb_per_s": 380.0},
        "bulk": {"lost": 0},
        "bulk_requests": 8,
        "bulk_prompt_len": 900,
        "switch_rows": [_row("tp1->tp2", 270.0), _row("tp2->tp1", 280.0), _row("tp1->tp2", 260.0)],
    }
    lines, ok = bulk_lines(summary)
    assert ok and any("p50 **270.0 GB/s = 0.75 x NCCL p2p**" in x for x in lines)
    assert sum(x.startswith("| tp") for x in lines) == 3
    # the TP2 -> TP4 switch uses two links at once: it is shown but not judged against one link's bandwidth
    summary["switch_rows"] = [_row("tp1->tp2", 240.0), _row("tp2->tp1", 250.0), _row("tp2->tp4", 900.0)]
    lines, ok = bulk_lines(summary)
    assert not ok and any("p50 **250.0 GB/s = 0.69 x NCCL p2p**" in x for x in lines)  # 0.69 < 0.70
    summary["bulk"] = {"lost": 1}
    summary["switch_rows"] = [_row("tp1->tp2", 300.0)]
    assert bulk_lines(summary)[1] is False  # a lost request fails the phase whatever the bandwidth
    assert bulk_lines({"switch_rows": []}) == ([], False)


def test_committed_4_gpu_run_reads_back() -> None:
    """The committed 4 x H200 `pool-kv` run: its summary re-renders to the KV lines of its report, and the bulk
    phase is judged at 0.77 x NCCL p2p over one link."""
    import json
    from pathlib import Path

    from nitsum_runtime.bench_pool_kv import kv_lines

    root = Path(__file__).resolve().parents[2] / "benchmarks/gpu/results/runtime-h200x4-pool-kv-2026-11-22/pool-kv"
    summary = json.loads((root / "summary.json").read_text())
    report = (root / "report.md").read_text().splitlines()
    lines, ok = bulk_lines(summary)
    assert ok and any("= 0.77 x NCCL p2p" in x for x in lines)
    assert all(x in report for x in kv_lines(summary) + [x for x in lines if x])


def test_release_resident_store_drops_the_stores_it_was_given() -> None:
    import weakref

    class Store:  # stands in for a ResidentWeightStore: only its lifetime matters here
        pass

    stores = [Store(), Store()]
    alive = [weakref.ref(s) for s in stores]
    release_resident_store(stores)
    assert stores == [] and all(ref() is None for ref in alive)
    release_resident_store(None)  # the toy engines publish no store
