"""Serve trace slices under given deployments on vLLM engines with the runtime's serving loop:
``python -m nitsum_runtime.bench_serving``.

The GPU half of the serving check (``benchmarks/gpu/run_serving_h200.sh``; the CPU half, which simulates the same
deployments on the same slices, is ``benchmarks/sim/serving_fidelity.py``). A *plans file*
(:class:`ServingPlans`, written by ``benchmarks/sim/serving_fidelity.py plans``) names the tiers, the deployments
and the (deployment, slice) runs. One vLLM engine is started per GPU group the deployments use (dummy weights
refilled from a resident copy, the Nitsum KV connector on, so prefill → decode hand-offs move the KV), then for
each deployment :class:`~nitsum_runtime.serving.PlanServer` wakes its engines, serves a short warm-up, and serves
each of its slices open-loop. Written as it goes (a run cut off keeps every finished slice):

* ``OUT/<deployment>/measured.csv`` — ``slice,index,ttft_s,tpot_s,finish_s,late_add_s`` (the format of
  :mod:`nitsum_runtime.bench_fidelity`, read by :func:`nitsum_opt.sim.fidelity.read_measured`);
* ``OUT/meta.json`` — GPU, versions, engine settings and starts, KV-cache tokens per engine, and per run the
  hand-offs (migrated or re-prefilled, wall time of each batch), steps per instance, requests held centrally,
  classes at arrival, aborted and never dispatched requests.

``--engines toy`` runs the same code on CPU with the toy vLLM stand-in (a dry run; no KV path, so hand-offs
re-prefill). The process leaves with ``os._exit`` (vLLM teardown can hang for minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator

from nitsum_opt.models.spec import Frozen, ModelSpec, model_preset
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.sim.slices import TraceSlice, read_slices
from nitsum_opt.spec import Tier
from nitsum_runtime.bench_fidelity import WARMUP_REQUESTS, write_rows
from nitsum_runtime.bench_pool import release_resident_store, resident_store
from nitsum_runtime.pool import EnginePool
from nitsum_runtime.serving import PlanServer, ServingResult, TieredRequest
from nitsum_runtime.vllm_pool import VllmPoolSettings, build_vllm_pool, close_pool


class ServingPlans(Frozen):
    """What to serve: tiers, named deployments and the runs (deployment, slice name), in order."""

    model: str = Field(min_length=1)
    """Model preset (:func:`~nitsum_opt.models.spec.model_preset`)."""
    tiers: tuple[Tier, ...] = Field(min_length=1)
    """SLO tiers (the slices' tier names must be among them)."""
    deployments: dict[str, Deployment]
    """Deployments by name (instance GPU ids are node-local)."""
    runs: tuple[tuple[str, str], ...] = Field(min_length=1)
    """``(deployment, slice)`` pairs; runs of one deployment are served together, in this order."""
    max_num_batched_tokens: int = Field(default=8192, ge=16)
    """Every engine's step token budget (the simulated deployments use the same)."""
    max_num_seqs: int = Field(default=1024, ge=1)
    """Every engine's sequence limit."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        unknown = sorted({d for d, _ in self.runs} - set(self.deployments))
        if unknown:
            raise ValueError(f"runs name deployments {unknown}; the plans file has {sorted(self.deployments)}")
        return self

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """GPU groups of every instance of the deployments that runs use (one engine each)."""
        used = {d for d, _ in self.runs}
        gs = {i.gpu_ids for name in used for i in self.deployments[name].instances}
        return tuple(sorted(gs, key=lambda g: (len(g), g)))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tiered_requests(piece: TraceSlice, limit: int | None = None) -> list[TieredRequest]:
    """The slice's requests (the first ``limit`` of them) for :meth:`PlanServer.serve`."""
    rows = zip(piece.arrival_s, piece.input_tokens, piece.output_tokens, piece.tier, strict=True)
    out = [TieredRequest(float(a), int(i), int(o), str(t)) for a, i, o, t in rows]
    return out[:limit] if limit else out


def _times_ms(name: str, seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds) or [0.0]
    return {
        f"{name}_batches": len(seconds),
        f"{name}_p50_ms": round(1000 * statistics.median(ordered), 3),
        f"{name}_max_ms": round(1000 * ordered[-1], 3),
        f"{name}_total_s": round(sum(seconds), 3),
    }


def run_summary(piece: TraceSlice, res: ServingResult) -> dict[str, Any]:
    """What meta.json keeps per run."""
    late = sorted(x for x in res.late_adds if x == x) or [0.0]
    return {
        "requests": len(res.timings),
        "offered_rps": round(piece.offered_rps, 3),
        "duration_s": piece.duration_s,
        "wall_s": round(res.wall_s, 3),
        "steps": res.steps,
        "handoffs": res.handoffs,
        "migrated": res.migrated,
        **_times_ms("leave", res.leave_s),
        **_times_ms("arrive", res.arrive_s),
        "busy_s": {k: round(v, 3) for k, v in res.busy_s.items()},
        "engine_s": {k: round(v, 3) for k, v in res.engine_s.items()},
        "max_held": res.max_held,
        "classes": dict(Counter(str(c) for c in res.classes)),
        "aborted": res.aborted,
        "never_dispatched": res.never_dispatched,
        "late_add_p50_ms": round(1000 * statistics.median(late), 3),
        "late_add_max_ms": round(1000 * late[-1], 3),
    }


def _pool_settings(plans: ServingPlans, args: argparse.Namespace) -> VllmPoolSettings:
    return pool_settings(
        args, plans.groups, model_preset(plans.model).max_model_len, plans.max_num_seqs, plans.max_num_batched_tokens
    )


def pool_settings(
    args: argparse.Namespace,
    groups: tuple[tuple[int, ...], ...],
    max_model_len: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> VllmPoolSettings:
    """A serving benchmark's engines: one per group, vLLM's default CUDA-graph sizes and the Nitsum KV connector
    unless ``--no-kv-connector`` (``--engines vllm``), or toy engines with a KV cache large enough for real prompts
    (``--engines toy``)."""
    extra: dict[str, Any] = {"max_num_batched_tokens": max_num_batched_tokens}
    if args.engines == "vllm":
        extra["compilation_config"] = {}  # vLLM's default CUDA-graph sizes (the pool's default is for switch tests)
    else:
        extra["num_gpu_blocks_override"] = 8192  # the toy's KV cache (256 blocks by default) would hold few prompts
    return VllmPoolSettings(
        groups=groups,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        kv_connector=args.engines == "vllm" and args.kv_connector,
        kv_arena_bytes=args.kv_arena_gib << 30,
        concurrent_starts=args.engines == "toy",
        check_fill_at_start=False,
        extra_llm_kwargs=extra,
    )


def serve_deployment(
    base: EnginePool, plans: ServingPlans, name: str, pieces: list[TraceSlice], args: argparse.Namespace, meta: dict
) -> None:
    """Serve every slice of deployment ``name`` (warm-up first); rows and meta written after each."""
    spec = model_preset(plans.model)
    pool = EnginePool(list(base.engines.values()), node=0, gpus_per_node=base.gpus_per_node)
    server = PlanServer(pool, plans.deployments[name], plans.tiers)
    server.wake()
    warm = [TieredRequest(0.0, p, o, plans.tiers[0].name) for p, o in WARMUP_REQUESTS]
    server.serve(warm, vocab_size=spec.vocab_size, max_model_len=spec.max_model_len, prefix="warm-")
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    try:
        for piece in pieces:
            key = f"{name}/{piece.name}"
            left = args.deadline_s - (time.monotonic() - args.t_start)
            if left < piece.duration_s + args.drain_s:
                _log(f"{key}: skipped, {left:.0f} s left < {piece.duration_s + args.drain_s:.0f} s it may take")
                meta["runs"][key] = {"skipped": f"{left:.0f} s left before the deadline"}
                continue
            _log(f"{key}: {len(piece)} requests over {piece.duration_s:g} s ({piece.offered_rps:.2f} req/s)")
            res = server.serve(
                tiered_requests(piece, args.limit),
                vocab_size=spec.vocab_size,
                max_model_len=spec.max_model_len,
                drain_s=args.drain_s,
                seed=args.seed,
                prefix=f"{piece.name}-",
                progress=lambda m, k=key: _log(f"{k}: {m}"),
            )
            write_rows(out / "measured.csv", piece.name, res)
            meta["runs"][key] = run_summary(piece, res)
            (Path(args.out) / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            _log(f"{key}: done, {meta['runs'][key]}")
    finally:
        pool.sleep_all()


def run(args: argparse.Namespace) -> int:
    """Start the engines, serve every run that fits the deadline; returns the exit code."""
    args.t_start = time.monotonic()
    plans = ServingPlans.model_validate_json(Path(args.plans).read_text(encoding="utf-8"))
    slices = {s.name: s for s in read_slices(args.slices)}
    missing = sorted({s for _, s in plans.runs} - set(slices))
    if missing:
        raise SystemExit(f"{args.plans}: runs name slices {missing}, not in {args.slices} ({sorted(slices)})")
    only = [x for x in args.only.split(",") if x]
    runs = [r for r in plans.runs if not only or r[0] in only]
    if not runs:
        raise SystemExit(f"--only {args.only}: no run of deployments {sorted(plans.deployments)}")
    plans = plans.model_copy(update={"runs": tuple(runs)})
    spec = model_preset(plans.model)
    world = max(g for group in plans.groups for g in group) + 1
    settings = _pool_settings(plans, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"command": args.command, "engines": args.engines, "settings": settings.model_dump()}
    meta["drain_s"] = args.drain_s
    meta["runs"] = {}
    with started_pool(spec, world, settings, args, meta) as base:
        for name in dict.fromkeys(d for d, _ in runs):
            pieces = [slices[s] for d, s in runs if d == name]
            serve_deployment(base, plans, name, pieces, args, meta)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--plans", required=True, help="plans file (ServingPlans JSON)")
    p.add_argument("--slices", required=True, help="slice file (nitsum_opt.sim.slices)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--only", default="", help="comma-separated deployment names (default: every run)")
    add_engine_args(p, gpu_memory_utilization=0.8, drain_s=60.0)
    return p.parse_args(argv)


def add_engine_args(p: argparse.ArgumentParser, gpu_memory_utilization: float, drain_s: float) -> None:
    """The options every serving benchmark on a vLLM pool takes (engines, memory, drain, deadline, seed, ...)."""
    p.add_argument("--engines", choices=["vllm", "toy"], default="vllm", help="toy: a CPU dry run")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=gpu_memory_utilization, help="vLLM's share of each GPU"
    )
    p.add_argument("--kv-arena-gib", type=int, default=4, help="KV exchange arena per worker (GiB)")
    p.add_argument(
        "--kv-connector",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the Nitsum KV connector in every vLLM engine (off: moved requests re-prefill; to time its cost)",
    )
    p.add_argument("--drain-s", type=float, default=drain_s, help="seconds after the last arrival before aborting")
    p.add_argument("--deadline-s", type=float, default=540.0, help="skip runs that could end after this")
    p.add_argument("--limit", type=int, default=0, help="serve only the first N requests of each slice (dry runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and dummy weights")
    p.add_argument("--command", default=" ".join(sys.argv), help="command line recorded in meta.json")


@contextmanager
def started_pool(
    spec: ModelSpec, world: int, settings: VllmPoolSettings, args: argparse.Namespace, meta: dict[str, Any]
) -> Iterator[EnginePool]:
    """One engine per group of ``settings`` on ``world`` GPUs (vLLM, or the toy with ``--engines toy``), started
    with a resident weight store; engine starts and KV capacity go to ``meta``, which is written to
    ``OUT/meta.json`` when the block ends (also after an error), then the engines close."""
    target = engine_target(args.engines, meta)
    with tempfile.TemporaryDirectory(prefix="nitsum-pool-") as tmp:
        handles, stores = resident_store(spec, world, args.seed, Path(tmp), args.engines)
        base, reports = build_vllm_pool(spec, world, handles, Path(tmp), settings, target=target, log=_log)
        try:
            meta["engine_starts"] = {r.engine_id: round(r.started.start_s, 2) for r in reports}
            meta["kv_cache_tokens"] = {r.engine_id: r.started.num_gpu_blocks * r.started.block_size for r in reports}
            yield base
        finally:
            (Path(args.out) / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            close_pool(base)
            release_resident_store(stores)


def engine_target(engines: str, meta: dict[str, Any]) -> Any:
    """The engine-process entry for ``build_vllm_pool``: vLLM's (``None``; the GPU and versions recorded in
    ``meta``) or the CPU toy's."""
    if engines == "vllm":
        from nitsum_runtime.profile_worker import gpu_facts
        from nitsum_runtime.vllm_engine import configure_environment, vllm_version

        configure_environment()
        meta.update(gpu=gpu_facts()[0], vllm_version=vllm_version())
        return None
    from nitsum_runtime.toy_vllm import toy_engine_process

    return toy_engine_process


def main(argv: list[str] | None = None) -> None:
    """Run, then leave at once (no vLLM teardown), also after an error."""
    from nitsum_runtime.vllm_engine import run_then_exit

    run_then_exit(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
