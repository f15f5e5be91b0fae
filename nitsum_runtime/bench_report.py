"""Markdown reports of the runtime benchmarks and the compact summary printed at the end of a GPU run.

Each report function takes a benchmark's summary (the dict its ``run_*`` function returns, also written to
``summary.json``) and the runner's arguments, and returns ``(markdown, passed)``. The vLLM report renders
partial summaries too (engines started so far, switches done so far), so that a run cut short by its time
limit still leaves a readable report. :func:`compact_summary` reads the ``summary.json`` files of a results
folder and returns a few lines per benchmark.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def report_kv(s: dict[str, Any], args: argparse.Namespace) -> tuple[str, bool]:
    """Markdown of benchmark (a) and whether its checks passed."""
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


def _probe_line(label: str, cmp: dict[str, Any] | None) -> str:
    if not cmp:
        return f"{label}: not run"
    if cmp["identical"]:
        return f"{label}: **identical** ({cmp['requests']} requests, {cmp['steps']} steps)"
    return (
        f"{label}: **differ** ({cmp['kind']}; {cmp['differing_requests']} of {cmp['requests']} requests; "
        f"first: {cmp['first_difference']})"
    )


def report_switch(s: dict[str, Any], args: argparse.Namespace) -> tuple[str, bool]:
    """Markdown of benchmark (b) and whether its checks passed."""
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
        f"- TP1 probes before/after the round trip bit-identical: **{rt['probe_bit_identical']}** "
        f"(engines {rt['probe_engines']})",
        f"- {_probe_line('before vs after', rt['probe_comparison'])}",
        f"- {_probe_line('control: before vs repeat, no switch in between', rt['probe_repeat'])}",
        f"- TP1 weights vs resident store when the probes ran: "
        f"{'bit-exact' if not rt['weight_mismatches'] else rt['weight_mismatches']}",
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


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key] * 1e3:.1f}" if key in row else "-"


def report_vllm(s: dict[str, Any], args: argparse.Namespace) -> tuple[str, bool]:
    """Markdown of benchmark (c) (complete or partial) and whether its checks passed."""
    c = s.get("checks", {})
    engines = s.get("engines", {})
    mism = {n: sum(len(x["mismatched"]) for x in e["check_fill"]) for n, e in engines.items()}
    within = all(v for k, v in c.items() if k.endswith("_within_tolerance"))
    ok = bool(s.get("complete")) and bool(c.get("tp1_probes_bit_identical"))
    ok = ok and bool(c.get("tp1_probe_repeat_identical")) and not c.get("weight_mismatches_at_probes")
    ok = ok and bool(c.get("no_request_lost")) and not any(mism.values()) and within
    switches = [r for r in s.get("switches", []) if r["switch"] != "start"]
    starts = [e["start_s"] for e in engines.values()]
    worst = max((r["pause_to_resume_s"] for r in switches), default=0.0)
    lines = [
        f"# (c) vLLM engines switching TP by weight reuse ({args.model}, {args.world} GPUs)"
        + ("" if s.get("complete") else " -- INCOMPLETE (partial results)"),
        "",
        f"- resident stores built in {s.get('store_build_s', 0):.1f} s",
        *[
            f"- engine {n}: start (restart cost) {e['start_s']:.1f} s, refill mismatches vs vLLM loaders "
            f"{mism[n]}, KV cache {e['kv_info'][0]}"
            for n, e in engines.items()
        ],
    ]
    if switches and starts:
        lines.append(
            f"- slowest switch, critical path pause->resume: **{worst * 1e3:.1f} ms** (target <= 500 ms); "
            f"engine restart {min(starts):.1f}-{max(starts):.1f} s: **{min(starts) / worst:.0f}x** faster"
        )
    if c:
        lines += [
            f"- {_probe_line('TP1 probes before vs after the round trip', c.get('tp1_probe_comparison'))}",
            f"- {_probe_line('control: TP1 probes run twice before any switch', c.get('tp1_probe_repeat'))}",
            f"- TP1 weights vs resident copy when the probes ran: "
            f"{c.get('weight_mismatches_at_probes') or 'bit-exact'}",
            f"- in-flight requests complete: {c.get('no_request_lost')} {c.get('in_flight_complete')}",
            *[
                f"- {k.removesuffix('_max_logprob_diff')}: max |sorted top-5 logprob diff| vs teacher-forced TP1 "
                f"{v:.4g} (tolerance {c.get('tolerance')}), greedy agreement "
                f"{c.get(k.replace('max_logprob_diff', 'greedy_agreement'), 0):.3f}"
                for k, v in c.items()
                if k.endswith("_max_logprob_diff")
            ],
        ]
    lines += [
        "",
        "| switch | in flight | pause->resume ms (critical path) | wake weights ms | fill ms | wake KV ms | "
        "old engine sleep ms | sleep | re-prefill first token ms | free GiB before -> both awake |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s.get("switches", []):
        where = "after resume" if r.get("sleep_after_resume") else ("inside" if "sleep_after_resume" in r else "-")
        free = (
            f"{r['free_gib_before_wake']:.1f} -> {r['free_gib_both_awake']:.1f}" if "free_gib_both_awake" in r else "-"
        )
        lines.append(
            f"| {r['switch']} | {r['in_flight']} | {_ms(r, 'pause_to_resume_s')} | {_ms(r, 'wake_weights_s')} | "
            f"{_ms(r, 'fill_s')} | {_ms(r, 'wake_kv_s')} | {_ms(r, 'sleep_s')} | {where} | "
            f"{_ms(r, 'reprefill_first_token_s')} | {free} |"
        )
    if s.get("error"):
        lines += ["", "Stopped by:", "", "```", s["error"].rstrip()[-3000:], "```"]
    return "\n".join(lines) + "\n", ok


def compact_summary(out: Path) -> str:
    """A few lines per benchmark found under ``out`` (``<part>/summary.json``)."""
    lines = []
    parts = (("(a) kv", "kv"), ("(b) switch", "switch"), ("(c) vllm", "vllm"), ("(d) pool", "pool"))
    for label, part in (*parts, ("(d) pool, KV migrated", "pool-kv")):
        path = out / part / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        lines.append(f"{label}: {s.get('status', '?')}")
        if part == "kv" and "p2p_gb_per_s" in s:
            lines.append(
                f"    p2p {s['p2p_gb_per_s']:.0f} GB/s, largest migration {s['largest_remote_ratio']:.2f}x p2p, "
                f"exact {s['all_exact']}"
            )
        elif part == "switch":
            lines += _switch_lines(s, out / part)
        elif part == "vllm":
            lines += _vllm_lines(s)
        elif part in ("pool", "pool-kv"):
            lines += _pool_lines(s)
        if s.get("error_summary"):
            lines.append(f"    stopped by: {s['error_summary'][:400]}")
    return "\n".join(lines) if lines else f"no summary.json under {out}"


def _switch_lines(s: dict[str, Any], folder: Path) -> list[str]:
    rt = s.get("round_trip")
    if rt is None and (folder / "round_trip.json").exists():  # the loop was cut short: the round trip is kept
        rt = json.loads((folder / "round_trip.json").read_text())
    if rt is None:
        return []
    worst = max((t["report"]["pause_to_resume_s"] for t in rt["transitions"]), default=0.0)
    lines = [
        f"    probes before/after identical {rt['probe_bit_identical']}, control (repeat) "
        f"{rt['probe_repeat']['identical']}, weights exact {not rt['weight_mismatches']}, max dlogprob "
        f"{rt['max_logprob_diff']:.3g} (tol {rt['tolerance']}), slowest round-trip switch {worst * 1e3:.1f} ms"
    ]
    for name, key in (("before/after", "probe_comparison"), ("control", "probe_repeat")):
        if rt[key]["first_difference"]:
            lines.append(f"    {name} first difference ({rt[key]['kind']}): {rt[key]['first_difference']}")
    if "loop" in s:
        loop = s["loop"]
        lines.append(f"    switch loop: {loop['switches']} switches, lost {loop['lost']} of {loop['submitted']}")
    return lines


def _vllm_lines(s: dict[str, Any]) -> list[str]:
    c = s.get("checks", {})
    starts = {n: round(e["start_s"], 1) for n, e in s.get("engines", {}).items()}
    sw = [
        f"{r['switch']} {r['pause_to_resume_s'] * 1e3:.0f} ms (+ sleep {r['sleep_s'] * 1e3:.0f} ms "
        f"{'after resume' if r.get('sleep_after_resume') else 'inside'})"
        for r in s.get("switches", [])
        if r["switch"] != "start"
    ]
    lines = [f"    engine start s {starts}; pause->resume: {'; '.join(sw) or 'none'}"]
    if c:
        diffs = {k.removesuffix("_max_logprob_diff"): round(v, 4) for k, v in c.items() if "max_logprob" in k}
        lines.append(
            f"    probes before/after identical {c.get('tp1_probes_bit_identical')}, control (repeat) "
            f"{c.get('tp1_probe_repeat_identical')}, no request lost {c.get('no_request_lost')}, "
            f"dlogprob vs TP1 {diffs}"
        )
        for name, key in (("before/after", "tp1_probe_comparison"), ("control", "tp1_probe_repeat")):
            cmp = c.get(key) or {}
            if cmp.get("first_difference"):
                lines.append(f"    {name} first difference ({cmp['kind']}): {cmp['first_difference']}")
    return lines


def _pool_lines(s: dict[str, Any]) -> list[str]:
    rows = s.get("switch_rows", [])
    starts = [f"{k} {e['started']['start_s']:.0f} s" for k, e in s.get("engines", {}).items()]
    lines = [f"    engines started: {', '.join(starts)}"]
    if rt := s.get("round_trip"):
        lines.append(
            f"    probes before/after identical {rt['probe_bit_identical']}, control "
            f"{rt['probe_repeat']['identical']}, weights exact {not rt['weight_mismatches']}, "
            f"max dlogprob {rt['max_logprob_diff']:.3g} (tol {rt['tolerance']}), ledger ok {rt['ledger_ok']}"
        )
    trip = [f"{r['switch']} {r['pause_to_resume_ms']:.0f} ms" for r in rows if r["phase"] == "round_trip"]
    if trip:
        lines.append(f"    round trip pause->resume: {', '.join(trip[1:])}")
    loop = sorted(r["pause_to_resume_ms"] for r in rows if r["phase"] == "loop")
    if loop:
        lost = f"lost {s['loop']['lost']} of {s['loop']['submitted']}" if "loop" in s else "unfinished"
        lines.append(
            f"    switch loop: {len(loop)} switches, {lost}; p50 {loop[len(loop) // 2]:.0f} ms, max {loop[-1]:.0f} ms"
        )
    if s.get("kv") == "migrate":
        moved = sum(int(r.get("migrated") or 0) for r in rows)
        mb = sum(float(r.get("kv_bytes") or 0) for r in rows) / 1e6
        fell_back = len(s.get("kv_errors") or [])
        lines.append(
            f"    KV migrated into vLLM engines: {moved} requests, {mb:.1f} MB; fallbacks to re-prefill {fell_back}"
        )
    return lines
