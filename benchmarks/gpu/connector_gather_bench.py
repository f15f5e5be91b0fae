"""Where the KV connector's per-step cost at TP > 1 comes from: vLLM 0.26's multiprocess executor, when a KV
connector is configured, waits for every worker's step output and aggregates them (``KVOutputAggregator``) instead
of reading only the output rank's. This times the same decode steps of one engine with the Nitsum KV connector on,
alternately with that gather (``gather``, vLLM's behaviour) and with the output rank only (``rank0``: the
executor's ``kv_output_aggregator`` set to ``None``), in interleaved blocks so drift cancels.

    python benchmarks/gpu/connector_gather_bench.py --out OUT [--tp 2] [--batches 16,48] [--steps 150] [--rounds 6]
        [--no-kv-connector]  (the same steps on a plain engine)

Writes ``OUT/steps.csv`` (batch, round, mode, step, step_ms) and ``OUT/summary.json`` (median per batch and mode).
Needs vLLM 0.26 importable and ``--tp`` GPUs (``benchmarks/gpu/serving_env.sh`` sets the environment).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from nitsum_opt.models.spec import model_preset
from nitsum_runtime.kv_ticket import CONNECTOR_CONFIG
from nitsum_runtime.vllm_engine import configure_environment, run_then_exit, write_model_dir


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def start_engine(args: argparse.Namespace, model_dir: Path):  # type: ignore[no-untyped-def]
    """A vLLM engine (engine core in this process) of ``--tp`` GPUs with the Nitsum KV connector."""
    configure_environment()
    from vllm import EngineArgs, LLMEngine

    spec = model_preset(args.model)
    write_model_dir(spec, model_dir)
    engine_args = EngineArgs(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        dtype="bfloat16",
        tensor_parallel_size=args.tp,
        max_model_len=spec.max_model_len,
        max_num_seqs=1024,
        max_num_batched_tokens=8192,
        gpu_memory_utilization=0.5,
        async_scheduling=False,
        disable_log_stats=True,
        kv_transfer_config=dict(CONNECTOR_CONFIG) if args.kv_connector else None,
    )
    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_args(engine_args)
    what = "with" if args.kv_connector else "without"
    _log(f"engine TP{args.tp} {what} the Nitsum KV connector started in {time.perf_counter() - t0:.1f} s")
    return engine, spec


def timed_steps(engine, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        engine, spec = start_engine(args, Path(tmp) / "model")
        summary = measure(engine, spec, args, out)
    _log(f"wrote {out}: {summary}")
    return 0


def measure(engine, spec, args: argparse.Namespace, out: Path) -> dict:  # type: ignore[no-untyped-def]
    """Decode blocks alternating gather / rank0 at each batch size; rows and summary written to ``out``."""
    from vllm import SamplingParams

    executor = engine.engine_core.engine_core.model_executor
    gather = executor.kv_output_aggregator
    if gather is None and args.kv_connector:
        raise SystemExit("the executor has no KV output aggregator: is this a multiprocess executor (TP > 1)?")
    modes = ("gather", "rank0") if args.kv_connector else ("no-connector",)
    rng = np.random.default_rng(0)
    rows: list[tuple[int, int, str, int, float]] = []
    summary: dict[str, dict[str, float]] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        params = SamplingParams(max_tokens=args.steps * args.rounds + 200, ignore_eos=True, temperature=0.0)
        ids = [f"b{batch}-{k}" for k in range(batch)]
        for rid in ids:
            prompt = rng.integers(10, spec.vocab_size - 10, args.prompt_tokens).tolist()
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        timed_steps(engine, 40)  # prefill and settle into pure decode steps
        for r in range(args.rounds):
            mode = modes[r % len(modes)]
            executor.kv_output_aggregator = gather if mode == "gather" else None
            for k, ms in enumerate(timed_steps(engine, args.steps)):
                rows.append((batch, r, mode, k, ms))
        executor.kv_output_aggregator = gather
        engine.abort_request(ids)
        timed_steps(engine, 3)
        for mode in modes:
            times = [ms for b, _, m, _, ms in rows if b == batch and m == mode]
            summary.setdefault(str(batch), {})[f"{mode}_p50_ms"] = statistics.median(times)
            summary[str(batch)][f"{mode}_mean_ms"] = statistics.fmean(times)
        _log(f"decode batch {batch}: {summary[str(batch)]}")
    with (out / "steps.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("batch", "round", "mode", "step", "step_ms"))
        writer.writerows((b, r, m, k, f"{ms:.4f}") for b, r, m, k, ms in rows)
    meta = {"command": args.command, "tp": args.tp, "model": args.model, "prompt_tokens": args.prompt_tokens}
    (out / "summary.json").write_text(json.dumps({**meta, "batches": summary}, indent=2), encoding="utf-8")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batches", default="16,48", help="decode batch sizes (sequences), comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=150, help="steps per block")
    p.add_argument("--rounds", type=int, default=6, help="blocks per batch, alternating gather / rank0")
    p.add_argument("--kv-connector", action=argparse.BooleanOptionalAction, default=True, help="off: a plain engine")
    p.add_argument("--command", default="python benchmarks/gpu/connector_gather_bench.py")
    run_then_exit(lambda: run(p.parse_args()))


if __name__ == "__main__":
    main()
