"""Benchmark (d): the transition executor driving a pool of vLLM engines (no vLLM import in this process).

One :class:`~nitsum_runtime.vllm_pool_engine.VllmEngine` per TP group on the switch path (4 GPUs: TP1 on GPU 0,
TP2 on 0-1, TP4 on 0-3; 2 GPUs: TP1 and TP2), started once by :func:`~nitsum_runtime.vllm_pool.build_vllm_pool`
(resident weights on every GPU, refill cross-checked against vLLM's loaders, asleep at level 2). Then, through
``TransitionExecutor`` exactly as on the reference engine:

* :func:`~nitsum_runtime.scenarios.run_round_trip`: TP1 -> TP2 (-> TP4) -> TP1 with requests decoding (moved by
  re-prefill), then the same switches idle; TP1 probes before and after are bit-identical (and a control runs
  them twice before any switch; both need ``VLLM_BATCH_INVARIANT=1``), the TP1 weights equal the resident copy,
  every step's top-5 log-probabilities on other TPs are within ``tolerance`` of teacher-forced TP1 scoring;
* :func:`~nitsum_runtime.scenarios.run_switch_loop`: ``switches`` switches around the path with requests always
  in flight: none lost or duplicated (the pool's ledger checks every token).

Every switch is timed (pause -> resume, and each action); the old engine's sleep, sent after the commit, is
collected right after the switch and reported separately. ``engines="toy"`` runs the same code on CPU with
the stand-in of :mod:`nitsum_runtime.toy_vllm` (the CI smoke run). ``checkpoint(summary)`` gets the partial
summary after the engine starts, the round trip and every 10 loop switches.
"""

from __future__ import annotations

import csv
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.executor import TransitionExecutor, TransitionReport
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.scenarios import TransitionSummary, run_round_trip, run_switch_loop
from nitsum_runtime.vllm_pool import VllmPoolSettings, build_vllm_pool, close_pool
from nitsum_runtime.vllm_pool_engine import VllmEngine

ACTIONS = ("pause", "wake", "fill_weights", "move_requests", "route", "sleep", "resume")


def switch_path(world: int) -> tuple[tuple[int, ...], ...]:
    """TP1 -> TP2 -> TP4 -> TP1 on 4 GPUs or more, TP1 -> TP2 -> TP1 on 2 or 3."""
    if world >= 4:
        return ((0,), (0, 1), (0, 1, 2, 3), (0,))
    if world >= 2:
        return ((0,), (0, 1), (0,))
    raise ValueError(f"the pool benchmark needs at least 2 GPUs, got --world {world}")


def resident_store(spec: ModelSpec, world: int, seed: int, folder: Path, engines: str) -> tuple[Path, Any]:
    """Publish the resident weights (one copy per GPU; the stores must outlive the pool)."""
    if engines == "toy":
        from nitsum_runtime.toy_vllm import write_toy_store

        return write_toy_store(folder / "store.json", seed), None
    import torch

    from nitsum_runtime.weights import ResidentWeightStore
    from nitsum_runtime.worker_ext import publish_store

    stores = [ResidentWeightStore.dummy(spec, seed, torch.device("cuda", g), torch.bfloat16) for g in range(world)]
    torch.cuda.synchronize()
    handles = folder / "store_handles.json"
    publish_store(stores, handles)
    return handles, stores


def release_resident_store(stores: list[Any] | None) -> None:
    """Drop the resident weights (``stores`` is emptied) and hand what PyTorch can of their GPU memory back to the
    driver (``gc``, ``torch.cuda.ipc_collect``, ``empty_cache``). Blocks shared with engines over CUDA IPC may stay
    allocated while PyTorch still counts the killed engines as users: measured on 2×H200 (vLLM 0.26), a process
    that ran a 40-request serving deployment still held 19 GiB per GPU afterwards. Run pools in a process of their
    own (the GPU tests run the command lines in a child) where the GPUs must be left empty."""
    if stores is None:
        return
    stores.clear()
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()


def _row(phase: str, k: int, label: str, r: TransitionReport, pool: EnginePool) -> dict[str, Any]:
    row: dict[str, Any] = {"phase": phase, "k": k, "switch": label, "in_flight": len(r.moves), "ok": r.ok}
    row["pause_to_resume_ms"] = r.pause_to_resume_s * 1e3
    for a in ACTIONS:
        row[f"{a}_ms"] = sum(s.seconds for s in r.steps if s.kind == a) * 1e3
    woken = [pool.routes.get(s.instance_id) for s in r.steps if s.kind == "wake"]
    timings = [e.timings for e in woken if isinstance(e, VllmEngine)]
    for key, col in (("wake_weights_s", "wake_weights_ms"), ("wake_kv_s", "wake_kv_ms"), ("fill_s", "fill_ms")):
        row[col] = sum(t.get(key, 0.0) for t in timings) * 1e3
    slept = 0.0
    for e in pool.engines.values():  # collect the old engines' sleeps (sent after the commit)
        if isinstance(e, VllmEngine) and e.handle.pending == "sleep":
            e.settle(raise_errors=True)
            slept += e.timings.get("sleep_s", 0.0)
    row["old_engine_sleep_ms"] = slept * 1e3
    row["migrated"], row["reprefilled"], row["kv_bytes"] = r.migrated, r.reprefilled, r.kv_bytes_moved
    row.update(_new_kv_moves(pool))
    row["policy"] = ""
    row["error"] = r.error[:300]
    return row


def _new_kv_moves(pool: EnginePool) -> dict[str, float]:
    """KV copies done since the last call (every engine's ``kv_moves``): ms and GB/s of the copies."""
    copy_s = moved = link = open_s = 0.0
    arena_refs = own_refs = 0
    for e in pool.engines.values():
        if isinstance(e, VllmEngine):
            seen = getattr(e, "_bench_seen", 0)
            for m in e.kv_moves[seen:]:
                copy_s, moved = copy_s + m.copy_s, moved + m.bytes_remote + m.bytes_local
                link, open_s = link + m.link_bytes, open_s + m.open_s
                arena_refs, own_refs = arena_refs + m.arena_refs, own_refs + m.own_refs
            e._bench_seen = len(e.kv_moves)  # type: ignore[attr-defined]
    return {
        "kv_copy_ms": copy_s * 1e3,
        "kv_copy_gb_per_s": moved / copy_s / 1e9 if copy_s > 0 else 0.0,
        "kv_link_gb_per_s": link / copy_s / 1e9 if copy_s > 0 else 0.0,
        "kv_open_ms": open_s * 1e3,
        "kv_arena_refs": arena_refs,
        "kv_own_refs": own_refs,
    }


def check_first_migration(row: dict[str, Any], pool: EnginePool) -> None:
    """Smoke check of ``kv="migrate"``: the first switch with requests in flight must have migrated them all,
    else stop now (clear message) instead of after the whole benchmark."""
    errors = [x for e in pool.engines.values() if isinstance(e, VllmEngine) for x in e.kv_errors]
    if row["in_flight"] and (row["migrated"] != row["in_flight"] or errors):
        raise RuntimeError(
            f"KV migration into vLLM failed at the first switch {row['switch']}: {row['migrated']} of "
            f"{row['in_flight']} requests migrated; errors: {errors or 'none (requests fell back to re-prefill)'}. "
            "The KV connector path (nitsum_runtime/kv_connector.py, kv_mover.py) is broken here; "
            "`--kv reprefill` runs the re-prefill baseline"
        )


def run_vllm_pool_bench(
    out_dir: Path,
    spec: ModelSpec,
    world: int,
    engines: Literal["vllm", "toy"] = "vllm",
    switches: int = 100,
    live: int = 4,
    prompt_len: int = 256,
    max_tokens: int = 32,
    steps_between: int = 4,
    tolerance: float = 0.15,
    seed: int = 0,
    settings: VllmPoolSettings | None = None,
    kv: Literal["reprefill", "migrate"] = "reprefill",
    bulk_switches: int = 0,
    bulk_requests: int = 8,
    bulk_prompt_len: int = 900,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] = lambda _: None,
) -> dict[str, Any]:
    """Run benchmark (d) (module docstring); returns the summary, also written as ``summary`` checkpoints.
    ``bulk_switches > 0`` with ``kv="migrate"``: then large migrations against point-to-point bandwidth
    (:mod:`nitsum_runtime.bench_pool_kv`; the p2p reference only on vLLM engines, i.e. GPUs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = switch_path(world)
    groups = tuple(dict.fromkeys(path))
    settings = (settings or VllmPoolSettings()).model_copy(update={"groups": groups, "kv_connector": kv == "migrate"})
    if engines == "toy":
        settings = settings.model_copy(update={"max_model_len": spec.max_model_len, "concurrent_starts": True})
    summary: dict[str, Any] = {"engines": {}, "switch_rows": [], "complete": False, "path": path, "kv": kv}
    rows: list[dict[str, Any]] = summary["switch_rows"]
    with tempfile.TemporaryDirectory(prefix="nitsum-pool-") as tmp:
        t0 = time.perf_counter()
        handles, stores = resident_store(spec, world, seed, Path(tmp), engines)
        summary["store_build_s"] = time.perf_counter() - t0
        log(f"resident weights on {world} GPUs in {summary['store_build_s']:.1f} s; starting {len(groups)} engines")
        bulk = kv == "migrate" and bulk_switches > 0
        if bulk and engines == "vllm":
            from nitsum_runtime.bench_pool_kv import measure_p2p

            summary["p2p"] = measure_p2p()
            p2p = summary["p2p"]
            log(f"p2p GPU0->GPU1: NCCL {p2p['nccl_gb_per_s']:.1f} GB/s, own copy {p2p['copy_gb_per_s']:.1f} GB/s")
        target = None
        if engines == "toy":
            from nitsum_runtime.toy_vllm import toy_engine_process as target
        pool, reports = build_vllm_pool(spec, world, handles, Path(tmp), settings, target=target, log=log)
        try:
            summary["engines"] = {r.engine_id: r.model_dump() for r in reports}
            checkpoint(summary)
            ex = TransitionExecutor(pool, spec, policy=kv)
            checked = [kv != "migrate"]

            def on_switch(s: TransitionSummary) -> None:
                rows.append(_row("round_trip", len(rows), s.label, s.report, pool))
                log(_line(rows[-1]))
                if not checked[0] and rows[-1]["in_flight"]:
                    check_first_migration(rows[-1], pool)
                    checked[0] = True

            rt = run_round_trip(
                pool,
                ex,
                spec,
                path=path,
                live=live,
                prompt_len=prompt_len,
                max_tokens=max_tokens,
                steps_between=steps_between,
                tolerance=tolerance,
                on_switch=on_switch,
            )
            summary["round_trip"] = rt.model_dump()
            log(
                f"round trip: probes bit-identical {rt.probe_bit_identical} (control {rt.probe_repeat.identical}), "
                f"weights exact {not rt.weight_mismatches}, max |dlogprob| {rt.max_logprob_diff:.4g}, "
                f"ledger ok {rt.ledger_ok}"
            )
            checkpoint(summary)
            pool.sleep_all()
            loop_pool = EnginePool(list(pool.engines.values()), node=0, gpus_per_node=world)
            loop_ex = TransitionExecutor(loop_pool, spec, policy=kv)
            labels = [f"tp{len(a)}->tp{len(b)}" for a, b in itertools.pairwise(path)]

            def on_loop(k: int, r: TransitionReport) -> None:
                rows.append(_row("loop", k, labels[k % len(labels)], r, loop_pool))
                rows[-1]["policy"] = loop_ex.policy
                if kv == "migrate":  # alternate: migrate on even switches, re-prefill on odd ones (comparison)
                    loop_ex.policy = "reprefill" if k % 2 == 0 else "migrate"
                if k % 10 == 9:
                    log(_line(rows[-1]))
                    checkpoint(summary)

            loop = run_switch_loop(
                loop_pool, loop_ex, spec, switches, layouts=[[g] for g in path[:-1]], on_switch=on_loop
            )
            summary["loop"] = loop.model_dump()
            summary["kv_errors"] = [x for e in pool.engines.values() if isinstance(e, VllmEngine) for x in e.kv_errors]
            log(f"switch loop: {loop.switches} switches, {loop.submitted} requests, lost {loop.lost}")
            loop_pool.sleep_all()
            if bulk:
                summary.update(bulk_requests=bulk_requests, bulk_prompt_len=bulk_prompt_len)
                bulk_pool = EnginePool(list(pool.engines.values()), node=0, gpus_per_node=world)

                def on_bulk(k: int, label: str, r: TransitionReport) -> dict[str, Any]:
                    rows.append(_row("bulk", k, label, r, bulk_pool))
                    log(_line(rows[-1]))
                    return rows[-1]

                from nitsum_runtime.bench_pool_kv import run_bulk_migrations

                summary["bulk"] = run_bulk_migrations(
                    bulk_pool, spec, path, bulk_switches, bulk_requests, bulk_prompt_len, on_bulk
                )
                bulk_pool.sleep_all()
            summary["complete"] = True
        finally:
            close_pool(pool)
            release_resident_store(stores)
            _write_csv(out_dir / "switches.csv", rows)
            plot_switches(rows, out_dir / "switches.png")
    return summary


def _line(row: dict[str, Any]) -> str:
    return (
        f"  {row['phase']:<10} {row['k']:>3} {row['switch']:<16} in flight {row['in_flight']}  "
        f"pause->resume {row['pause_to_resume_ms']:7.1f} ms (wake {row['wake_ms']:.1f}, fill "
        f"{row['fill_weights_ms']:.1f}, move {row['move_requests_ms']:.1f} [{row['migrated']} migrated, "
        f"{row['kv_bytes'] / 1e6:.1f} MB, copy {row['kv_copy_ms']:.2f} ms = {row['kv_copy_gb_per_s']:.1f} GB/s], "
        f"sleep sent {row['sleep_ms']:.1f}); "
        f"old engine sleep {row['old_engine_sleep_ms']:.1f} ms after"
    )


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if rows:
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def plot_switches(rows: list[dict[str, Any]], path: Path) -> None:
    """Pause -> resume of every loop switch, by transition (PNG; a note instead when matplotlib is missing)."""
    loop = [r for r in rows if r["phase"] == "loop"]
    if not loop:
        return
    try:
        import matplotlib
    except ImportError:  # the GPU image may lack it: the CSV carries every number
        path.with_suffix(".txt").write_text("matplotlib is not installed here; plot from switches.csv\n")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label in dict.fromkeys(r["switch"] for r in loop):
        mine = [r for r in loop if r["switch"] == label]
        ax.plot([r["k"] for r in mine], [r["pause_to_resume_ms"] for r in mine], "o", ms=3, label=label)
    ax.axhline(500, color="grey", linestyle=":", label="target 500 ms")
    ax.set_xlabel("switch")
    ax.set_ylabel("pause -> resume (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_pool(s: dict[str, Any], quick: bool, title: str) -> tuple[str, bool]:
    """Markdown of benchmark (d) (complete or partial) and whether its checks passed."""
    rt, loop = s.get("round_trip"), s.get("loop")
    rows = s.get("switch_rows", [])
    busy = [r for r in rows if r["phase"] == "round_trip" and r["in_flight"] and r["switch"] != "start"]
    worst = max((r["pause_to_resume_ms"] for r in busy), default=0.0)
    loop_ms = sorted(r["pause_to_resume_ms"] for r in rows if r["phase"] == "loop")
    starts = [e["started"]["start_s"] for e in s.get("engines", {}).values()]
    mism = [m for e in s.get("engines", {}).values() for m in e["mismatched"]]
    ok = bool(s.get("complete")) and bool(rt and rt["passed"]) and bool(loop and loop["lost"] == 0)
    ok = ok and all(r["ok"] for r in rows) and not mism and (quick or worst <= 500.0)
    if s.get("kv") == "migrate":  # every request moved by a migrate switch kept its KV
        from nitsum_runtime.bench_pool_kv import migrating

        ok = ok and not s.get("kv_errors") and all(r["migrated"] == r["in_flight"] for r in migrating(rows))
    lines = [f"# {title}" + ("" if s.get("complete") else " -- INCOMPLETE (partial results)"), ""]
    lines.append(f"- resident weights built in {s.get('store_build_s', 0):.1f} s")
    for e in s.get("engines", {}).values():
        lines.append(
            f"- engine {e['engine_id']}: start (= restart cost) {e['started']['start_s']:.1f} s, refill "
            f"mismatches vs vLLM loaders {len(e['mismatched'])} of {e['checked']}"
        )
    if rt:
        lines += [
            f"- TP1 probes before/after the round trip bit-identical: **{rt['probe_bit_identical']}** "
            f"(control, twice before any switch: {rt['probe_repeat']['identical']}; engines {rt['probe_engines']})",
            f"- TP1 weights vs resident copy at the probes: {rt['weight_mismatches'] or 'bit-exact'}",
            f"- max |sorted top-5 logprob diff| vs teacher-forced TP1: **{rt['max_logprob_diff']:.4g}** "
            f"(tolerance {rt['tolerance']}); per engine {rt['max_logprob_diff_by_engine']}; greedy agreement "
            f"{rt['greedy_agreement']:.3f}; ledger ok {rt['ledger_ok']}",
        ]
    if busy and starts and worst > 0 and min(starts) > 0:
        lines.append(
            f"- slowest switch with requests in flight, pause->resume: **{worst:.1f} ms** (target <= 500 ms); "
            f"engine start {min(starts):.1f}-{max(starts):.1f} s: **{min(starts) * 1e3 / worst:.0f}x** faster"
        )
    if loop_ms:
        lost = f"lost **{loop['lost']}** of {loop['submitted']}" if loop else "loop not finished"
        lines.append(
            f"- switch loop: {len(loop_ms)} switches, {lost}; pause->resume p50 {loop_ms[len(loop_ms) // 2]:.1f} ms, "
            f"p90 {loop_ms[int(0.9 * (len(loop_ms) - 1))]:.1f} ms, max {loop_ms[-1]:.1f} ms"
        )
    lines += [
        "",
        "| switch | in flight | pause->resume ms | wake weights | wake KV | fill | move (re-prefill add) | "
        "sleep sent | old engine sleep (after) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["phase"] == "round_trip":
            lines.append(
                f"| {r['switch']} | {r['in_flight']} | {r['pause_to_resume_ms']:.1f} | {r['wake_weights_ms']:.1f} | "
                f"{r['wake_kv_ms']:.1f} | {r['fill_ms']:.1f} | {r['move_requests_ms']:.1f} | {r['sleep_ms']:.1f} | "
                f"{r['old_engine_sleep_ms']:.1f} |"
            )
    if s.get("kv") == "migrate":
        from nitsum_runtime.bench_pool_kv import bulk_lines, kv_lines

        lines += ["", *kv_lines(s)]
        more, _ = bulk_lines(s)
        lines += more
        if s.get("bulk"):
            ok = ok and s["bulk"]["lost"] == 0
    if s.get("error"):
        lines += ["", "Stopped by:", "", "```", s["error"].rstrip()[-3000:], "```"]
    return "\n".join(lines) + "\n", ok
