"""Measure the trace slices of a slice file on one vLLM engine: ``python -m nitsum_runtime.bench_fidelity``.

The GPU half of the simulator check (``benchmarks/gpu/run_fidelity_h200.sh``; the CPU half is
:mod:`nitsum_opt.sim.fidelity`): one ``InProcessVllmEngine`` (dummy weights of the model preset, vLLM's default
kernels, the scenario's engine settings: 8,192-token steps, 1,024 sequences) replays each slice open-loop
(:func:`~nitsum_runtime.replay.replay`) after a short warm-up. Written as it goes, so a run cut off keeps every
finished slice:

* ``OUT/measured.csv`` — ``slice,index,ttft_s,tpot_s,finish_s,late_add_s`` (empty cells: did not happen);
* ``OUT/steps-<slice>.csv.gz`` (``--log-steps``) — every step's wall time and batch composition
  (:class:`~nitsum_runtime.replay.StepRecord`), to check the latency model on exactly the steps the engine ran;
* ``OUT/meta.json`` — GPU, versions, engine settings, KV-cache tokens, engine start, per slice the steps, time
  inside ``step()``, wall time, aborted requests and how late arrivals were added.

The process leaves with ``os._exit`` (vLLM teardown can hang for minutes).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nitsum_opt.models.spec import model_preset
from nitsum_opt.sim.slices import TraceSlice, read_slices
from nitsum_runtime.replay import ReplayRequest, ReplayResult, StepRecord, replay
from nitsum_runtime.serving import ServingResult

STEP_HEADER = tuple(StepRecord.__dataclass_fields__)
"""Columns of ``steps-<slice>.csv.gz``."""

WARMUP_REQUESTS = ((2048, 16), (512, 64), (4096, 8), (128, 128), (1024, 32), (256, 256))
"""(prompt, output) tokens of the warm-up requests, all sent at once before the first slice."""


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def requests_of(piece: TraceSlice) -> list[ReplayRequest]:
    """The slice's requests for :func:`~nitsum_runtime.replay.replay`."""
    return [
        ReplayRequest(float(a), int(i), int(o))
        for a, i, o in zip(piece.arrival_s, piece.input_tokens, piece.output_tokens, strict=True)
    ]


def _cell(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6f}"


def write_rows(path: Path, name: str, result: ReplayResult | ServingResult) -> None:
    """Append one slice's per-request rows to ``measured.csv`` (header on first write; an empty cell: did not
    happen)."""
    new = not path.exists()
    with path.open("a", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(("slice", "index", "ttft_s", "tpot_s", "finish_s", "late_add_s"))
        for i, (t, late) in enumerate(zip(result.timings, result.late_adds, strict=False)):
            writer.writerow((name, i, _cell(t.ttft_s), _cell(t.tpot_s), _cell(t.finish_s), _cell(late)))


def write_steps(path: Path, records: list[StepRecord]) -> None:
    """One slice's step log as gzip CSV (:data:`STEP_HEADER`)."""
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(STEP_HEADER)
        for r in records:
            writer.writerow((f"{r.step_time_s:.7f}", *(getattr(r, k) for k in STEP_HEADER[1:])))


def slice_summary(piece: TraceSlice, result: ReplayResult) -> dict[str, Any]:
    """What meta.json keeps per slice."""
    late = sorted(result.late_adds) or [0.0]
    return {
        "requests": len(piece),
        "offered_rps": round(piece.offered_rps, 3),
        "duration_s": piece.duration_s,
        "steps": result.steps,
        "busy_s": round(result.busy_s, 3),
        "wall_s": round(result.wall_s, 3),
        "aborted": result.aborted,
        "late_add_p50_ms": round(1000 * statistics.median(late), 3),
        "late_add_max_ms": round(1000 * late[-1], 3),
    }


def run(args: argparse.Namespace) -> int:
    """Start the engine, warm it up, replay every slice that fits the deadline; returns the exit code."""
    from nitsum_runtime.profile_worker import gpu_facts
    from nitsum_runtime.vllm_engine import EngineSettings, InProcessVllmEngine, configure_environment, vllm_version

    t_start = time.monotonic()
    configure_environment()
    slices = read_slices(args.slices)
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - {s.name for s in slices})
    if unknown:
        raise SystemExit(
            f"--only {','.join(unknown)}: no such slice in {args.slices}; it has {[s.name for s in slices]}"
        )
    wanted = [s for s in slices if not only or s.name in only]
    spec = model_preset(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measured = out / "measured.csv"
    measured.unlink(missing_ok=True)  # a new run: rows are appended slice by slice
    settings = EngineSettings(
        tp=args.tp,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    import torch

    gpu, driver = gpu_facts()
    meta: dict[str, Any] = {
        "command": args.command,
        "gpu": gpu,
        "driver": driver,
        "vllm_version": vllm_version(),
        "torch_version": torch.__version__,
        "model": spec.name,
        "engine_settings": settings.model_dump(),
        "drain_s": args.drain_s,
        "seed": args.seed,
        "slices": {},
    }
    model_dir = Path(tempfile.mkdtemp(prefix="nitsum-fidelity-")) / "model"
    engine = InProcessVllmEngine.start(spec, settings, model_dir)
    meta.update(engine_start_s=round(engine.engine_start_s, 2), kv_cache_tokens=engine.kv_cache_tokens)
    _log(f"engine up in {engine.engine_start_s:.1f} s on {gpu}, KV cache {engine.kv_cache_tokens} tokens")
    warm = [ReplayRequest(0.0, p, o) for p, o in WARMUP_REQUESTS]
    replay(engine, warm, vocab_size=spec.vocab_size, max_model_len=spec.max_model_len, seed=args.seed + 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for piece in wanted:
        left = args.deadline_s - (time.monotonic() - t_start)
        if left < piece.duration_s + args.drain_s:
            _log(f"{piece.name}: skipped, {left:.0f} s left < {piece.duration_s + args.drain_s:.0f} s it may take")
            meta["slices"][piece.name] = {"skipped": f"{left:.0f} s left before the deadline"}
            continue
        _log(f"{piece.name}: {len(piece)} requests over {piece.duration_s:g} s ({piece.offered_rps:.2f} req/s)")
        result = replay(
            engine,
            requests_of(piece),
            vocab_size=spec.vocab_size,
            max_model_len=spec.max_model_len,
            drain_s=args.drain_s,
            seed=args.seed,
            progress=lambda m, name=piece.name: _log(f"{name}: {m}"),
            log_steps=args.log_steps,
        )
        write_rows(measured, piece.name, result)
        if args.log_steps:
            write_steps(out / f"steps-{piece.name}.csv.gz", result.step_log)
        meta["slices"][piece.name] = slice_summary(piece, result)
        (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _log(f"{piece.name}: done, {meta['slices'][piece.name]}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--slices", required=True, help="slice file (nitsum_opt.sim.slices)")
    p.add_argument("--out", required=True, help="folder for measured.csv and meta.json")
    p.add_argument("--model", default="llama-3.1-8b", help="bundled model preset")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (= visible GPUs)")
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="vLLM's memory share (less: a smaller KV cache)"
    )
    p.add_argument("--drain-s", type=float, default=60.0, help="seconds after the last arrival before aborting")
    p.add_argument("--deadline-s", type=float, default=540.0, help="skip slices that could end after this")
    p.add_argument("--only", default="", help="comma-separated slice names (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--log-steps", action="store_true", help="also write every step's time and composition")
    p.add_argument("--command", default=" ".join(sys.argv), help="command line recorded in meta.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run, then leave at once (no vLLM teardown), also after an error."""
    from nitsum_runtime.vllm_engine import run_then_exit

    run_then_exit(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
