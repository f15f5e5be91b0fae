"""Serve one trace slice with systems that decide at runtime (``nitsum`` re-planning every epoch, and static
baselines) on vLLM engines: ``python -m nitsum_runtime.bench_adaptive``.

The GPU half of the adaptive check (``benchmarks/gpu/run_adaptive_h200.sh``; the CPU half, which simulates the same
systems on the same slice with the same inputs, is ``benchmarks/sim/adaptive_fidelity.py``). One vLLM engine is
started per candidate TP group of ``--gpus`` GPUs (dummy weights refilled from a resident copy, the Nitsum KV
connector on), all asleep. Then per system: its controller is built exactly as the simulator builds it
(:func:`nitsum_opt.sim.fidelity.slice_control`, with the engines' measured KV capacity),
:class:`~nitsum_runtime.adaptive.AdaptiveServer` brings up its first deployment, serves a short warm-up, and serves
the slice open-loop while the controller re-plans every epoch (TP switches with KV migration included).
Written as it goes:

* ``OUT/<system>/measured.csv`` — per-request rows (:func:`nitsum_opt.sim.fidelity.read_measured`'s format);
* ``OUT/<system>/steps.csv.gz`` — every engine step: instance, round trip, seconds inside vLLM's step and the
  step's composition (for fitting the simulator's ``latency_calibration`` on the runtime's own steps);
* ``OUT/meta.json`` — GPU, versions, engine starts and KV capacity, and per system the run summary and every
  epoch's decision (:class:`~nitsum_runtime.adaptive.EpochRecord`: action, deployment, stall, moved requests).

``--engines toy`` runs the same code on CPU with the toy vLLM stand-in (a dry run).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import time
from pathlib import Path
from typing import Any

from nitsum_opt.sim.fidelity import slice_control
from nitsum_opt.sim.runtime_calibration import SERVING_STEP_HEADER
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice, read_slices
from nitsum_runtime.adaptive import AdaptiveServer
from nitsum_runtime.bench_fidelity import WARMUP_REQUESTS, write_rows
from nitsum_runtime.bench_serving import add_engine_args, pool_settings, run_summary, started_pool, tiered_requests
from nitsum_runtime.executor import TransitionExecutor
from nitsum_runtime.planner_process import PlannerProcess
from nitsum_runtime.pool import EnginePool, candidate_groups
from nitsum_runtime.serving import TieredRequest
from nitsum_runtime.vllm_pool import VllmPoolSettings


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def adaptive_pool_settings(scenario: Scenario, args: argparse.Namespace) -> VllmPoolSettings:
    """One engine per candidate TP group of ``--gpus`` GPUs (up to ``--max-tp``) at the scenario's engine settings."""
    engine = scenario.settings.engine
    tps = tuple(tp for tp in (1, 2, 4, 8) if tp <= args.gpus and tp <= args.max_tp)
    groups = candidate_groups(args.gpus, tps)
    return pool_settings(
        args, groups, scenario.model_spec.max_model_len, engine.max_num_seqs, engine.max_num_batched_tokens
    )


def serve_system(
    base: EnginePool,
    scenario: Scenario,
    piece: TraceSlice,
    system: str,
    kv_tokens: dict[int, int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Serve the slice with ``system`` deciding; rows written to ``OUT/<system>/measured.csv``; its meta entry."""
    spec = scenario.model_spec
    pool = EnginePool(list(base.engines.values()), node=0, gpus_per_node=args.gpus)
    ctx, controller, trace = slice_control(
        scenario, piece, system, args.gpus, args.epoch_s, args.drain_s, kv_tokens or None
    )
    executor = TransitionExecutor(pool, spec, link_gb_per_s=ctx.settings.switch.kv_migration_gb_s)
    planner = PlannerProcess(controller, ctx) if args.planner_process and not controller.is_static else None
    server = AdaptiveServer(pool, planner or controller, ctx, executor, prepare_ahead=args.prepare_ahead)
    try:
        start = server.start(trace.window(trace.start_s, trace.start_s + args.epoch_s))
        _log(f"{system}: first deployment {start.deployment} (planned in {start.plan_ms:.0f} ms)")
        assert server.server is not None
        warm = [TieredRequest(0.0, p, o, scenario.tiers[0].name) for p, o in WARMUP_REQUESTS]
        server.server.serve(warm, vocab_size=spec.vocab_size, max_model_len=spec.max_model_len, prefix="warm-")
        res = server.serve(
            tiered_requests(piece, args.limit),
            vocab_size=spec.vocab_size,
            max_model_len=spec.max_model_len,
            duration_s=piece.duration_s,
            drain_s=args.drain_s,
            seed=args.seed,
            prefix=f"{system}-",
            progress=lambda m: _log(f"{system}: {m}"),
            log_steps=args.log_steps,
        )
    finally:
        pool.sleep_all()
        if planner is not None:
            planner.close()
    out = Path(args.out) / system
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "measured.csv", piece.name, res.serving)
    if res.serving.step_log:
        write_serving_steps(out / "steps.csv.gz", res.serving.step_log)
    return {
        **run_summary(piece, res.serving),
        "step_budgets": res.serving.step_budgets,
        "epochs": [start.model_dump(), *(e.model_dump() for e in res.epochs)],
    }


def write_serving_steps(path: Path, rows: list[tuple[str, float, float, int, int, int, int, int]]) -> None:
    """The step log as gzip CSV (:data:`~nitsum_opt.sim.runtime_calibration.SERVING_STEP_HEADER`, read back by
    :func:`~nitsum_opt.sim.runtime_calibration.read_serving_steps`)."""
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SERVING_STEP_HEADER)
        for key, round_trip, step_s, *counts in rows:
            writer.writerow((key, f"{round_trip:.7f}", f"{step_s:.7f}", *counts))


def run(args: argparse.Namespace) -> int:
    """Start the engines, serve the slice with every system that fits the deadline; returns the exit code."""
    t_start = time.monotonic()
    scenario = Scenario.load(args.scenario)
    pieces = {s.name: s for s in read_slices(args.slices)}
    if args.slice not in pieces:
        raise SystemExit(f"--slice {args.slice}: not in {args.slices} ({sorted(pieces)})")
    piece = pieces[args.slice]
    systems = [s for s in args.systems.split(",") if s]
    spec = scenario.model_spec
    settings = adaptive_pool_settings(scenario, args)
    meta: dict[str, Any] = {"command": args.command, "engines": args.engines, "settings": settings.model_dump()}
    meta.update(slice=piece.name, requests=len(piece), epoch_s=args.epoch_s, drain_s=args.drain_s, runs={})
    meta.update(prepare_ahead=args.prepare_ahead, log_steps=args.log_steps, planner_process=args.planner_process)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with started_pool(spec, args.gpus, settings, args, meta) as base:
        kv = meta["kv_cache_tokens"]
        kv_by_tp: dict[int, int] = {}
        for engine in base.engines.values():  # the smallest engine of each TP bounds what the plan may use
            tp = len(engine.gpu_ids)
            kv_by_tp[tp] = min(kv_by_tp.get(tp, kv[engine.engine_id]), kv[engine.engine_id])
        meta["kv_cache_tokens_by_tp"] = kv_by_tp
        for system in systems:
            left = args.deadline_s - (time.monotonic() - t_start)
            if left < piece.duration_s + args.drain_s:
                _log(f"{system}: skipped, {left:.0f} s left < {piece.duration_s + args.drain_s:.0f} s")
                meta["runs"][system] = {"skipped": f"{left:.0f} s left before the deadline"}
                continue
            _log(f"{system}: {len(piece)} requests over {piece.duration_s:g} s ({piece.offered_rps:.2f} req/s)")
            meta["runs"][system] = serve_system(base, scenario, piece, system, kv_by_tp, args)
            (Path(args.out) / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            _log(f"{system}: done, {[(e['action'], e['deployment']) for e in meta['runs'][system]['epochs']]}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--scenario", required=True, help="scenario YAML (tiers, model, settings)")
    p.add_argument("--slices", required=True, help="slice file (nitsum_opt.sim.slices)")
    p.add_argument("--slice", required=True, help="the slice to serve")
    p.add_argument("--systems", default="nitsum", help="comma-separated systems, served one after the other")
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the node (engines on every candidate TP group)")
    p.add_argument("--max-tp", type=int, default=8, help="largest TP degree to start engines for")
    p.add_argument("--epoch-s", type=float, default=15.0, help="seconds between re-plans")
    p.add_argument("--out", required=True, help="results folder")
    # 0.3 per engine: during a switch a GPU holds two awake engines, the resident weights and the KV arenas
    # (0.4 ran out of memory on 2×H200 with TP 1 and TP 2 engines)
    add_engine_args(p, gpu_memory_utilization=0.3, drain_s=20.0)
    p.add_argument(
        "--prepare-ahead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wake and fill a transition's new engines while the old deployment serves (else during the cut-over)",
    )
    p.add_argument(
        "--planner-process",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run an adaptive system's controller in its own process (default: a thread of the serving process)",
    )
    p.add_argument(
        "--log-steps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write every engine step's time and composition (OUT/<system>/steps.csv.gz)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run, then leave at once (no vLLM teardown), also after an error."""
    from nitsum_runtime.vllm_engine import run_then_exit

    run_then_exit(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
