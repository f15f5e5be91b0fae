"""Profile one model at one TP on the GPUs this process sees: ``python -m nitsum_runtime.profile_worker``.

The launcher (:mod:`nitsum_runtime.profile_launch`) starts one such process per engine, in its own process
group, with ``CUDA_VISIBLE_DEVICES`` set. The worker writes its part files as it goes (see
:mod:`nitsum_runtime.profile_io`), then ``<stem>.done``, and exits without tearing vLLM down (teardown can
hang for minutes; the launcher kills the process group once the marker exists).

Order: start the engine (timed), warm up, run the grid until the deadline, then time ``sleep(level=2)``,
``wake_up(["weights"])`` and ``wake_up(["kv_cache"])`` (three repeats each; sleeping discards the weights, so
it comes last: fresh memory may hold zeros, which would make later matrix products look faster).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nitsum_opt.models.spec import ModelSpec, model_preset
from nitsum_runtime.profile_grid import EngineLimits, build_grid
from nitsum_runtime.profile_io import CsvRowWriter, PartRecord, part_stem, write_part_record
from nitsum_runtime.profile_schema import TpRecord
from nitsum_runtime.profiler import Profiler

SLEEP_REPEATS = 3


def smoke_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with 2 layers (real layer shapes, seconds to start): what ``--smoke`` profiles."""
    return spec.model_copy(update={"name": f"{spec.name}-2l", "num_layers": 2})


def gpu_facts() -> tuple[str, str]:
    """``(GPU name, driver version)`` of the first visible GPU, from nvidia-smi (no CUDA context made)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={visible}", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        name, driver = (s.strip() for s in out.splitlines()[0].split(","))
        return name, driver
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        import torch

        return torch.cuda.get_device_name(0), "unknown"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_worker(args: argparse.Namespace) -> int:
    """Profile one engine; returns the process exit code."""
    from nitsum_runtime.vllm_engine import EngineSettings, InProcessVllmEngine, configure_environment, vllm_version

    configure_environment()
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    spec = model_preset(args.model)
    if args.smoke:
        spec = smoke_spec(spec)
    out_dir = Path(args.out)
    stem = part_stem(spec.name, args.tp)
    settings = EngineSettings(tp=args.tp)
    t_import = time.perf_counter()
    import torch

    version = vllm_version()
    import_s = time.perf_counter() - t_import
    gpu, driver = gpu_facts()
    engine_args = settings.engine_args(Path("<model-dir>"), spec)
    engine_args.pop("model")
    engine_args.pop("tensor_parallel_size")
    base = PartRecord(
        model=spec,
        tp=args.tp,
        gpu=gpu,
        driver=driver,
        vllm_version=version,
        torch_version=torch.__version__,
        cuda_version=str(torch.version.cuda),
        date=date,
        command=args.command,
        engine_args=engine_args,
    )
    write_part_record(base, out_dir / f"{stem}.json")
    _log(f"{stem}: starting engine on {gpu} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    # The folder outlives the engine's start on purpose: the process exits without cleanup (see main).
    model_dir = Path(tempfile.mkdtemp(prefix=f"nitsum-{stem}-")) / "model"
    engine = InProcessVllmEngine.start(spec, settings, model_dir)
    _log(f"{stem}: engine up in {engine.engine_start_s:.1f} s, KV cache {engine.kv_cache_tokens} tokens")
    limits = EngineLimits(
        max_model_len=spec.max_model_len,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        kv_cache_tokens=engine.kv_cache_tokens,
    )
    grid = build_grid(limits, smoke=args.smoke)
    t_prof = time.monotonic()
    deadline = t_prof + args.budget_s
    with CsvRowWriter(out_dir / f"{stem}.csv") as sink:
        prof = Profiler(
            engine=engine,
            grid=grid,
            sink=sink,
            model=spec.name,
            gpu=gpu,
            tp=args.tp,
            vocab_size=spec.vocab_size,
            max_model_len=spec.max_model_len,
            deadline=deadline,
            seed=args.seed,
            passes=args.passes,
            progress=lambda m: _log(f"{stem}: {m}"),
        )
        prof.run()
    profile_s = time.monotonic() - t_prof
    _log(f"{stem}: {prof.rows} rows in {profile_s:.1f} s; {len(prof.mismatches)} mismatches; timing sleep")
    sleeps: dict[str, list[float]] = {"sleep_s": [], "wake_weights_s": [], "wake_kv_s": []}
    for _ in range(SLEEP_REPEATS):
        sleeps["sleep_s"].append(engine.sleep(level=2))
        sleeps["wake_weights_s"].append(engine.wake_up(["weights"]))
        sleeps["wake_kv_s"].append(engine.wake_up(["kv_cache"]))
    record = TpRecord(
        kv_cache_tokens=engine.kv_cache_tokens,
        num_gpu_blocks=engine.num_gpu_blocks,
        block_size=engine.block_size,
        engine_start_s=round(engine.engine_start_s, 3),
        rows=prof.rows,
        **{k: round(statistics.median(v), 4) for k, v in sleeps.items()},
    )
    details: dict[str, Any] = {
        "vllm_import_s": round(import_s, 3),
        "profile_wall_s": round(profile_s, 1),
        "budget_s": args.budget_s,
        "seed": args.seed,
        "passes": args.passes,
        "warmup_prefill_tokens_per_s": round(prof.prefill_tokens_per_s),
        "sleep_wake_repeats_s": {k: [round(x, 4) for x in v] for k, v in sleeps.items()},
        "skipped": prof.skipped,
        "mismatches": prof.mismatches[:50],
        "num_mismatches": len(prof.mismatches),
        "grid": {
            "prefill": [asdict(c) for c in grid.prefill],
            "prefill_repeats": grid.prefill_repeats,
            "decode": [asdict(s) for s in grid.decode],
            "decode_steps": grid.decode_steps,
            "decode_warmup_steps": grid.decode_warmup_steps,
            "mixed": [asdict(c) for c in grid.mixed],
            "mixed_repeats": grid.mixed_repeats,
            "chunked_prefill": [asdict(c) for c in grid.chunked_prefill],
        },
    }
    write_part_record(base.model_copy(update={"record": record, "details": details}), out_dir / f"{stem}.json")
    (out_dir / f"{stem}.done").write_text("ok\n", encoding="utf-8")
    _log(
        f"{stem}: done; sleep {record.sleep_s:.3f} s, wake weights {record.wake_weights_s:.3f} s, "
        f"wake KV {record.wake_kv_s:.3f} s"
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the worker (the launcher builds them)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bundled model preset, e.g. llama-3.1-8b")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree (= visible GPUs)")
    p.add_argument("--out", required=True, help="folder for the part files")
    p.add_argument("--budget-s", type=float, default=150.0, help="seconds of stepping after the engine is up")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--passes", type=int, default=1, help="times the whole grid is measured (repeats spread in time)")
    p.add_argument("--smoke", action="store_true", help="2-layer model and a tiny grid")
    p.add_argument("--command", default=" ".join(sys.argv), help="command line recorded in the metadata")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run one worker and leave at once (no vLLM teardown), also after an error."""
    from nitsum_runtime.vllm_engine import run_then_exit

    args = parse_args(argv)
    run_then_exit(lambda: run_worker(args))


if __name__ == "__main__":
    main()
