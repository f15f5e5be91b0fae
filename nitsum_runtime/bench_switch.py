"""Benchmark (b): the reference engine at a real model shape switching TP with requests decoding.

Starts the rank cluster (one process per GPU, resident weights on each), pre-warms communicators and every
engine of the pool once (wake, fill, sleep), then runs :func:`~nitsum_runtime.scenarios.run_round_trip`
(TP1 -> TP2 -> TP4 -> TP1 with KV migration, then idle) and :func:`~nitsum_runtime.scenarios.run_switch_loop`
(``loop_switches`` switches, zero lost requests). Writes ``transitions.csv`` (every action of every switch),
``switch_loop.csv`` and returns a summary for the report.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.executor import TransitionExecutor, TransitionReport
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.ref_worker import ClusterConfig
from nitsum_runtime.scenarios import (
    TransitionSummary,
    build_reference_pool,
    reference_groups,
    run_round_trip,
    run_switch_loop,
)


def _path(world: int) -> tuple[tuple[int, ...], ...]:
    if world >= 4:
        return ((0,), (0, 1), (0, 1, 2, 3), (0,))
    if world >= 2:
        return ((0,), (0, 1), (0,))
    raise ValueError("the switch benchmark needs at least 2 ranks (GPUs)")


def _loop_layouts(world: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    if world >= 4:
        return (((0,),), ((0, 1),), ((0, 1, 2, 3),), ((2, 3),), ((0,), (1,)))
    return (((0,),), ((0, 1),), ((1,),), ((0,), (1,)))


def run_reference_switch(
    out_dir: Path,
    spec: ModelSpec,
    world: int,
    backend: str,
    dtype: str = "bfloat16",
    num_blocks: int = 1024,
    live: int = 4,
    prompt_len: int = 256,
    max_tokens: int = 32,
    steps_between: int = 4,
    loop_switches: int = 100,
    tolerance: float = 0.15,
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Run benchmark (b); see the module docstring."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = ClusterConfig(
        spec=spec,
        world_size=world,
        backend=backend,
        dtype=dtype,
        seed=seed,
        groups=reference_groups(world),
        block_size=16,
    )
    t0 = time.perf_counter()
    with RankCluster(cfg, call_timeout_s=120, start_timeout_s=300) as cluster:
        start_s = time.perf_counter() - t0
        log(f"cluster up in {start_s:.1f} s: {cluster.start_info[0]}")
        fingerprints = cluster.call(list(range(world)), "fingerprint")
        same_weights = all(bool((f == fingerprints[0]).all()) for f in fingerprints)
        warm_s = max(cluster.call(list(range(world)), "warmup"))
        pool = build_reference_pool(cluster, num_blocks=num_blocks)
        prewarm: list[dict[str, Any]] = []
        for engine in pool.engines.values():
            a = time.perf_counter()
            engine.wake()
            b = time.perf_counter()
            fill = engine.fill_weights()
            engine.sleep()
            prewarm.append(
                {
                    "engine": engine.engine_id,
                    "first_wake_s": b - a,
                    "fill_s": fill.seconds,
                    "fill_bytes": fill.bytes_copied,
                    "sleep_s": time.perf_counter() - b - fill.seconds,
                }
            )
        log(f"communicators warm in {warm_s:.2f} s; engines pre-warmed: {prewarm}")
        ex = TransitionExecutor(pool, spec, policy="migrate")
        rows: list[dict[str, Any]] = []

        def on_switch(s: TransitionSummary) -> None:
            log(
                f"  {s.label:<16} in flight {s.in_flight}  "
                f"pause->resume {s.report.pause_to_resume_s * 1e3:8.2f} ms"
                f"  migrated {s.report.migrated}  KV {s.report.kv_bytes_moved / 1e6:8.2f} MB"
            )
            for st in s.report.steps:
                rows.append(
                    {
                        "switch": s.label,
                        "in_flight": s.in_flight,
                        "pause_to_resume_s": s.report.pause_to_resume_s,
                        "action": st.kind,
                        "instance": st.instance_id,
                        "seconds": st.seconds,
                        "ok": st.ok,
                        "detail": st.detail,
                        "kv_bytes": s.report.kv_bytes_moved,
                        "weight_bytes": s.report.weight_bytes_filled,
                    }
                )

        rt = run_round_trip(
            pool,
            ex,
            spec,
            path=_path(world),
            live=live,
            prompt_len=prompt_len,
            max_tokens=max_tokens,
            steps_between=steps_between,
            tolerance=tolerance,
            on_switch=on_switch,
        )
        _write(out_dir / "transitions.csv", rows)
        (out_dir / "round_trip.json").write_text(rt.model_dump_json(indent=2))
        log(
            f"round trip: probes bit-identical={rt.probe_bit_identical} (control repeat identical="
            f"{rt.probe_repeat.identical}, weight mismatches {len(rt.weight_mismatches)}) "
            f"max |dlogprob|={rt.max_logprob_diff:.4g}"
            f" greedy agreement={rt.greedy_agreement:.3f} ledger ok={rt.ledger_ok}"
        )
        for name, cmp in (("before/after", rt.probe_comparison), ("control", rt.probe_repeat)):
            if not cmp.identical:
                log(f"  probes {name} first difference ({cmp.kind}): {cmp.first_difference}")
        pool.sleep_all()
        loop_rows: list[dict[str, Any]] = []
        ex_loop = TransitionExecutor(pool, spec, policy="migrate")

        def on_loop_switch(k: int, r: TransitionReport) -> None:
            loop_rows.append(
                {
                    "switch": k,
                    "policy": ex_loop.policy,
                    "pause_to_resume_s": r.pause_to_resume_s,
                    "migrated": r.migrated,
                    "reprefilled": r.reprefilled,
                    "kv_bytes": r.kv_bytes_moved,
                    "ok": r.ok,
                }
            )
            ex_loop.policy = "reprefill" if ex_loop.policy == "migrate" else "migrate"  # exercise both paths

        loop = run_switch_loop(
            pool, ex_loop, spec, loop_switches, layouts=_loop_layouts(world), on_switch=on_loop_switch
        )
        _write(out_dir / "switch_loop.csv", loop_rows)
        log(f"switch loop: {loop.switches} switches, {loop.submitted} requests, lost {loop.lost}")
        pool.sleep_all()
    return {
        "cluster_start_s": start_s,
        "same_weights_on_all_gpus": same_weights,
        "warmup_s": warm_s,
        "prewarm": prewarm,
        "round_trip": rt.model_dump(),
        "loop": loop.model_dump(),
    }


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    if rows:
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
