"""Runner of the runtime benchmarks; writes CSV, JSON, PNG and a markdown report under ``--out``.

    python -m nitsum_runtime.gpu_bench kv     --out DIR     # (a) NCCL p2p vs KV migration bandwidth
    python -m nitsum_runtime.gpu_bench switch --out DIR     # (b) reference engine TP1->2->4->1, 100 switches
    python -m nitsum_runtime.gpu_bench vllm   --out DIR     # (c) vLLM engines, refill from resident weights
    python -m nitsum_runtime.gpu_bench pool   --out DIR     # (d) the executor on a pool of vLLM engines
    python -m nitsum_runtime.gpu_bench summary --out DIR    # a few lines per benchmark found under DIR

Defaults: Llama-3.1-8B shape, bf16, NCCL on all visible GPUs (at most 4). ``--model tiny --backend gloo
--world 2 --quick`` runs the same code on CPU in seconds (the CI smoke test). Exit status: 0 when every check
passed, 1 when a check failed (the report says which), 2 when the benchmark could not run (or was stopped by
SIGTERM, the GPU script's time limit: engines are closed and the partial report is written first). Every
benchmark writes ``summary.json`` (with ``status`` PASS, FAIL, ERROR or, while (c) runs, INCOMPLETE) and
``report.md``; (c) and (d) rewrite both as they go (engine starts, switches).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from nitsum_opt.models.spec import ModelSpec, model_preset
from nitsum_runtime.bench_report import compact_summary, report_kv, report_switch, report_vllm

#: A tiny Llama for CPU smoke runs of the benchmark code.
TINY = ModelSpec(
    name="tiny",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=8,
    num_kv_heads=4,
    intermediate_size=128,
    vocab_size=256,
    max_model_len=512,
)


def _spec(name: str) -> ModelSpec:
    return TINY if name == "tiny" else model_preset(name)


def _plot_kv(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the GPU image may lack it: the CSV and the report still carry every number
        path.with_suffix(".txt").write_text("matplotlib is not installed here; plot from kv_migration.csv\n")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    cases = sorted({r["case"] for r in summary["kv_rows"]})
    for case in cases:
        rows = sorted(
            (r for r in summary["kv_rows"] if r["case"] == case and r["link_bytes"]),
            key=lambda r: (r["tokens"], r["chunk_bytes"]),
        )
        best: dict[int, float] = {}
        for r in rows:
            best[r["tokens"]] = max(best.get(r["tokens"], 0.0), r["link_gb_per_s"])
        if best:
            ax.plot(list(best), list(best.values()), marker="o", label=case)
    ax.axhline(summary["p2p_gb_per_s"], color="k", linestyle="--", label="NCCL p2p (same run)")
    ax.axhline(0.7 * summary["p2p_gb_per_s"], color="grey", linestyle=":", label="70% of p2p")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of KV migrated")
    ax.set_ylabel("GB/s through the busiest link")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class BenchmarkInterrupted(RuntimeError):
    """SIGTERM (the GPU script's time limit) arrived: stop, clean up, write what was measured."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise BenchmarkInterrupted("stopped by SIGTERM (the step's time limit); results so far are partial")


def _write(out: Path, summary: dict[str, Any], report: str, status: str) -> None:
    summary["status"] = status
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(report)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) / (args.part + ("-kv" if args.part == "pool" and args.kv == "migrate" else ""))
    out.mkdir(parents=True, exist_ok=True)
    spec = _spec(args.model)
    t0 = time.perf_counter()
    partial: dict[str, Any] = {}
    footer = f"\nCommand: `{' '.join(sys.argv)}`\n"

    def render(s: dict[str, Any]) -> tuple[str, bool]:
        if args.part == "pool":
            from nitsum_runtime.bench_pool import report_pool

            kv = ", KV migrated" if args.kv == "migrate" else ""
            title = f"(d) Transition executor on {args.engines} engines ({args.model}, {args.world} GPUs{kv})"
            return report_pool(s, args.quick, title)
        return report_vllm(s, args)

    def checkpoint(s: dict[str, Any]) -> None:  # partial results of the vLLM benchmarks, as they come
        partial.clear()
        partial.update(s)
        _write(out, partial, render(partial)[0] + footer, "INCOMPLETE")

    try:
        if args.part == "kv":
            from nitsum_runtime.bench_kv import run_kv_bandwidth

            tokens = [64, 256] if args.quick else [1024, 4096, 16384, 32768]
            sizes = [1 << 20] if args.quick else [64 << 20, 256 << 20, 1 << 30]
            summary = run_kv_bandwidth(
                out,
                spec,
                args.world,
                args.backend,
                tokens,
                sizes,
                chunk_sweep=(4096, 1 << 20) if args.quick else (16 << 20, 64 << 20, 256 << 20),
                chunk_bytes=1 << 20 if args.quick else 64 << 20,
                iters=1 if args.quick else 5,
                dtype=args.dtype,
            )
            _plot_kv(summary, out / "kv_bandwidth.png")
            report, ok = report_kv(summary, args)
        elif args.part == "switch":
            from nitsum_runtime.bench_switch import run_reference_switch

            summary = run_reference_switch(
                out,
                spec,
                args.world,
                args.backend,
                dtype=args.dtype,
                num_blocks=64 if args.quick else 1024,
                live=2 if args.quick else 4,
                prompt_len=8 if args.quick else 256,
                max_tokens=6 if args.quick else 32,
                steps_between=1 if args.quick else 4,
                loop_switches=4 if args.quick else 100,
                tolerance=args.tolerance,
            )
            report, ok = report_switch(summary, args)
        elif args.part == "pool":
            from nitsum_runtime.bench_pool import run_vllm_pool_bench

            summary = run_vllm_pool_bench(
                out,
                spec,
                args.world,
                engines=args.engines,
                switches=args.switches,
                live=2 if args.quick else 4,
                prompt_len=8 if args.quick else 256,
                max_tokens=6 if args.quick else 32,
                steps_between=1 if args.quick else 4,
                tolerance=args.tolerance,
                kv=args.kv,
                bulk_switches=args.bulk_switches,
                bulk_requests=args.bulk_requests,
                bulk_prompt_len=args.bulk_prompt_len,
                checkpoint=checkpoint,
            )
            report, ok = render(summary)
        else:
            from nitsum_runtime.bench_vllm import run_vllm_switch

            summary = run_vllm_switch(out, spec, args.world, tolerance=args.tolerance, checkpoint=checkpoint)
            report, ok = report_vllm(summary, args)
    except Exception as exc:
        msg = traceback.format_exc()
        (out / "ERROR.txt").write_text(msg)
        print(f"benchmark {args.part} could not run:\n{msg}", file=sys.stderr)
        if partial:  # a vLLM benchmark got somewhere: keep its partial report, with what stopped it
            partial["error"] = msg
            partial["error_summary"] = _one_line(exc)
            _write(out, partial, render(partial)[0] + footer, "ERROR")
        else:
            _write(
                out,
                {"error": msg, "error_summary": _one_line(exc)},
                f"# {args.part}: ERROR\n\n```\n{msg}```\n",
                "ERROR",
            )
        return 2
    report += f"\nWall time {time.perf_counter() - t0:.1f} s.{footer}"
    _write(out, summary, report, "PASS" if ok else "FAIL")
    print(report)
    print(f"{args.part}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _one_line(exc: BaseException) -> str:
    """Exception type and the first two lines of its message (for the compact summary)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' | '.join(lines[:2])}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nitsum_runtime.gpu_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("part", choices=["kv", "switch", "vllm", "pool", "summary"])
    p.add_argument("--out", required=True, help="folder for CSV/JSON/PNG/markdown results")
    p.add_argument("--model", default="llama-3.1-8b", help="bundled model shape, or 'tiny' for smoke runs")
    p.add_argument("--world", type=int, default=4, help="ranks = GPUs used (GPU ids 0..world-1)")
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.15,
        help="max |sorted top-5 logprob diff| accepted across TP degrees (bf16)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    p.add_argument("--engines", default="vllm", choices=["vllm", "toy"], help="(d): vLLM engines, or the CPU stand-in")
    p.add_argument("--switches", type=int, default=100, help="(d): switches of the loop")
    p.add_argument(
        "--kv",
        default="reprefill",
        choices=["reprefill", "migrate"],
        help="(d): move in-flight requests by re-prefill, or migrate their KV through the Nitsum KV connector "
        "(loop switches then alternate migrate / re-prefill); results in pool-kv/",
    )
    p.add_argument(
        "--bulk-switches",
        type=int,
        default=6,
        help="(d) with --kv migrate: switches with long requests in flight, all migrated, timed against NCCL "
        "point-to-point bandwidth measured in the same run (0: skip)",
    )
    p.add_argument("--bulk-requests", type=int, default=8, help="(d) bulk phase: requests in flight")
    p.add_argument("--bulk-prompt-len", type=int, default=900, help="(d) bulk phase: prompt tokens per request")
    args = p.parse_args(argv)
    if args.part == "summary":
        print(compact_summary(Path(args.out)))
        return 0
    if args.backend == "nccl" and not (args.part == "pool" and args.engines == "toy"):
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < args.world:
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            print(f"need {args.world} CUDA GPUs, found {found}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
