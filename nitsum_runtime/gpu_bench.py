"""Runner of the runtime benchmarks; writes CSV, JSON, PNG and a markdown report under ``--out``.

    python -m nitsum_runtime.gpu_bench kv     --out DIR     # (a) NCCL p2p vs KV migration bandwidth
    python -m nitsum_runtime.gpu_bench switch --out DIR     # (b) reference engine TP1->2->4->1, 100 switches
    python -m nitsum_runtime.gpu_bench vllm   --out DIR     # (c) vLLM engines, refill from resident weights

Defaults: Llama-3.1-8B shape, bf16, NCCL on all visible GPUs (at most 4). ``--model tiny --backend gloo
--world 2 --quick`` runs the same code on CPU in seconds (the CI smoke test). Exit status: 0 when every check
passed, 1 when a check failed (the report says which), 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from nitsum_opt.models.spec import ModelSpec, model_preset

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


def _report_kv(s: dict[str, Any], args: argparse.Namespace) -> tuple[str, bool]:
    ok = s["all_exact"] and (args.quick or s["largest_remote_ratio"] >= 0.7)
    lines = [
        f"# (a) KV migration vs NCCL point-to-point ({args.model}, {args.backend}, {args.world} ranks)",
        "",
        f"{args.backend} p2p GPU0->GPU1 best: **{s['p2p_gb_per_s']:.1f} GB/s**; largest remote migration "
        f"(tp1->tp1 gpu0->gpu1, best chunk {s['largest_remote_best_chunk_bytes'] >> 10} KiB): "
        f"**{s['largest_remote_ratio']:.2f} x p2p** (target >= 0.70); every "
        f"migration bit-exact: **{s['all_exact']}**",
        "",
        "| case | tokens | chunk MiB | link MB | time ms | link GB/s | x p2p | exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["kv_rows"]:
        lines.append(
            f"| {r['case']} | {r['tokens']} | {r['chunk_bytes'] >> 20} | {r['link_bytes'] / 1e6:.1f} | "
            f"{r['seconds_min'] * 1e3:.3f} | {r['link_gb_per_s']:.1f} | "
            f"{r['link_gb_per_s'] / s['p2p_gb_per_s']:.2f} | {r['exact']} |"
        )
    lines += ["", "| p2p bytes | time ms | GB/s |", "|---|---|---|"]
    lines += [f"| {r['bytes']} | {r['seconds_min'] * 1e3:.3f} | {r['gb_per_s']:.1f} |" for r in s["p2p_rows"]]
    return "\n".join(lines) + "\n", ok


def _report_switch(s: dict[str, Any], args: argparse.Namespace) -> tuple[str, bool]:
    rt, loop = s["round_trip"], s["loop"]
    times = sorted(loop["pause_to_resume_s"])
    p50 = times[len(times) // 2] if times else 0.0
    worst = max((t["report"]["pause_to_resume_s"] for t in rt["transitions"] if t["label"] != "start"), default=0)
    ok = rt["passed"] and loop["lost"] == 0 and s["same_weights_on_all_gpus"] and (args.quick or worst <= 0.5)
    lines = [
        f"# (b) Reference engine TP switching ({args.model}, {args.backend}, {args.world} ranks)",
        "",
        f"- cluster start (processes, NCCL, resident weights): {s['cluster_start_s']:.1f} s; "
        f"same weights on all GPUs: {s['same_weights_on_all_gpus']}",
        f"- TP1 probes before/after the round trip bit-identical: **{rt['probe_bit_identical']}**",
        f"- max |sorted top-5 logprob diff| vs teacher-forced TP1: **{rt['max_logprob_diff']:.4g}** "
        f"(tolerance {rt['tolerance']}); per engine {rt['max_logprob_diff_by_engine']}",
        f"- greedy agreement with TP1: {rt['greedy_agreement']:.3f}; ledger ok: {rt['ledger_ok']}",
        f"- switch loop: {loop['switches']} switches, {loop['submitted']} requests, lost **{loop['lost']}**, "
        f"{loop['migrated']} migrations, {loop['reprefilled']} re-prefills; "
        f"pause->resume p50 {p50 * 1e3:.1f} ms, max {max(times, default=0) * 1e3:.1f} ms",
        f"- slowest round-trip switch {worst * 1e3:.1f} ms (target <= 500 ms)",
        "",
        "| switch | in flight | pause->resume ms | migrated | KV MB | weights GB | steps (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in rt["transitions"]:
        r = t["report"]
        steps = ", ".join(f"{x['kind']} {x['seconds'] * 1e3:.1f}" for x in r["steps"])
        lines.append(
            f"| {t['label']} | {t['in_flight']} | {r['pause_to_resume_s'] * 1e3:.1f} | "
            f"{sum(m['method'] == 'migrate' for m in r['moves'])} | {r['kv_bytes_moved'] / 1e6:.1f} | "
            f"{r['weight_bytes_filled'] / 1e9:.2f} | {steps} |"
        )
    return "\n".join(lines) + "\n", ok


def _report_vllm(s: dict[str, Any], args: argparse.Namespace) -> tuple[str, bool]:
    c = s.get("checks", {})
    mism = {n: sum(len(x["mismatched"]) for x in e["check_fill"]) for n, e in s["engines"].items()}
    within = all(v for k, v in c.items() if k.endswith("_within_tolerance"))
    ok = bool(c.get("tp1_probes_bit_identical")) and bool(c.get("no_request_lost")) and not any(mism.values())
    ok = ok and within
    lines = [
        f"# (c) vLLM engines switching TP by weight reuse ({args.model}, {args.world} GPUs)",
        "",
        f"- resident stores built in {s.get('store_build_s', 0):.1f} s",
        *[
            f"- engine {n}: start (restart cost) {e['start_s']:.1f} s, refill mismatches vs vLLM loaders "
            f"{mism[n]}, KV cache {e['kv_info'][0]}"
            for n, e in s["engines"].items()
        ],
        f"- checks: {json.dumps(c)}",
        "",
        "| switch | in flight | pause->resume ms | sleep ms | wake weights ms | fill ms | wake KV ms | "
        "re-prefill first token ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s.get("switches", []):
        lines.append(
            f"| {r['switch']} | {r['in_flight']} | {r['pause_to_resume_s'] * 1e3:.1f} | "
            f"{r['sleep_s'] * 1e3:.1f} | {r['wake_weights_s'] * 1e3:.1f} | {r['fill_s'] * 1e3:.1f} | "
            f"{r['wake_kv_s'] * 1e3:.1f} | {r['reprefill_first_token_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines) + "\n", ok


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) / args.part
    out.mkdir(parents=True, exist_ok=True)
    spec = _spec(args.model)
    t0 = time.perf_counter()
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
            report, ok = _report_kv(summary, args)
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
            report, ok = _report_switch(summary, args)
        else:
            from nitsum_runtime.bench_vllm import run_vllm_switch

            summary = run_vllm_switch(out, spec, args.world, tolerance=args.tolerance)
            report, ok = _report_vllm(summary, args)
    except Exception:
        msg = traceback.format_exc()
        (out / "ERROR.txt").write_text(msg)
        print(f"benchmark {args.part} could not run:\n{msg}", file=sys.stderr)
        return 2
    report += f"\nWall time {time.perf_counter() - t0:.1f} s. Command: `{' '.join(sys.argv)}`\n"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(report)
    print(report)
    print(f"{args.part}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nitsum_runtime.gpu_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("part", choices=["kv", "switch", "vllm"])
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
    args = p.parse_args(argv)
    if args.backend == "nccl":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < args.world:
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            print(f"need {args.world} CUDA GPUs, found {found}", file=sys.stderr)
            return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
