"""The switch scenario of benchmark (c) on started vLLM engines (TP1 on GPU 0, TP2 on 0-1, TP4 on 0-3).

TP1 probes (twice: the second run is the control that the engine is reproducible), live requests decoding
on TP1, then TP1 -> TP2 -> TP4 -> TP1; after each switch the live requests decode a few steps, and on TP2 and
TP4 the probes run too (their top-k log-probabilities are compared with teacher-forced TP1 scoring). At the
end the live requests decode to completion on TP1 and the probes run again: bit-identical to the first run.

A switch: *pause* (abort the source's requests, keeping the tokens they generated), wake the target's
weights, refill them from the resident copy, wake its KV cache, *resume* (re-add the requests: re-prefill of
prompt + tokens so far). The source's ``sleep(level=2)`` comes after the resume, overlapped with the target's
first step, when the target's GPUs have room for both engines awake (measured before waking it; else the
source sleeps first, inside pause -> resume). The critical path pause -> resume and the sleep are reported
separately. The engines hold no request while asleep, so nothing can run on an engine whose memory is gone.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.probe_check import Step, compare_probe_runs

#: Watchdog deadlines (s): one engine step, one generate / rpc call, wake or sleep.
STEP_S, CALL_S, MEMORY_S = 30.0, 90.0, 60.0
#: Free memory (GiB) kept beyond the target's budget before the source may stay awake during a switch.
HEADROOM_GIB = 4.0


def prompts(spec: ModelSpec, n: int, length: int, salt: int) -> list[list[int]]:
    """``n`` deterministic prompts of ``length``, ``length + 1``, ... tokens."""
    return [[(salt + 31 * i + 17 * j) % spec.vocab_size for j in range(length + i)] for i in range(n)]


def probe_steps(outs: Sequence[dict[str, Any]]) -> list[list[Step]]:
    """vLLM generate outputs as :mod:`.probe_check` runs."""
    return [[(t, top[0], top[1]) for t, top in zip(o["token_ids"], o["top"], strict=True)] for o in outs]


def min_free_gib(gpu_ids: Sequence[int]) -> float:
    """Smallest free memory over ``gpu_ids`` as the driver sees it (this process holds a context on each)."""
    return min(torch.cuda.mem_get_info(g)[0] for g in gpu_ids) / 2**30


class Switcher:
    """Switches between engines and keeps the ledger of the in-flight requests (tokens per request)."""

    def __init__(self, log: Any, budget_gib: float, free_gib: Callable[[Sequence[int]], float] = min_free_gib):
        self.log, self.budget_gib, self.free_gib = log, budget_gib, free_gib
        self.rows: list[dict[str, Any]] = []
        self.tokens: dict[str, list[int]] = {}
        self.prompts: dict[str, list[int]] = {}
        self.max_tokens: dict[str, int] = {}

    def wake(self, e: Any) -> dict[str, float]:
        t = {"wake_weights_s": e.call("wake_weights", MEMORY_S)}
        a = time.perf_counter()
        fill = e.call("rpc", CALL_S, method="nitsum_fill_weights")
        t["fill_s"] = time.perf_counter() - a
        t["fill_bytes"] = sum(r["bytes_copied"] for r in fill)
        t["wake_kv_s"] = e.call("wake_kv", MEMORY_S)
        return t

    def add_all(self, e: Any) -> None:
        for r, prompt in self.prompts.items():
            left = self.max_tokens[r] - len(self.tokens[r])
            if left > 0:
                e.call("add", CALL_S, request_id=r, prompt=prompt + self.tokens[r], max_tokens=left)

    def harvest(self, e: Any) -> int:
        """Stop every request on ``e``, keep the tokens it generated; returns how many are unfinished."""
        partial = e.call("abort", CALL_S, request_ids=list(self.prompts))
        for r, toks in partial.items():
            self.tokens[r] += toks
        return sum(len(self.tokens[r]) < self.max_tokens[r] for r in self.prompts)

    def unfinished(self) -> list[str]:
        return [r for r in self.prompts if len(self.tokens[r]) < self.max_tokens[r]]

    def switch(self, src: Any, dst: Any, label: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        in_flight = self.harvest(src)  # pause
        free_before = self.free_gib(dst.gpu_ids)
        overlap = free_before - self.budget_gib >= HEADROOM_GIB
        sleep_s = 0.0 if overlap else src.call("sleep", MEMORY_S)
        w = self.wake(dst)
        self.add_all(dst)  # resume
        resumed = time.perf_counter()
        free_awake = self.free_gib(dst.gpu_ids)
        if overlap:
            src.send("sleep", MEMORY_S)  # off the critical path, during the target's first step
        dst.call("step", CALL_S, n=1, step_timeout_s=STEP_S)
        first_token_s = time.perf_counter() - resumed
        if overlap:
            sleep_s = src.wait()
        row = {
            "switch": label,
            "in_flight": in_flight,
            "pause_to_resume_s": resumed - t0,
            "sleep_s": sleep_s,
            "sleep_after_resume": overlap,
            **w,
            "reprefill_first_token_s": first_token_s,
            "free_gib_before_wake": free_before,
            "free_gib_both_awake": free_awake,
        }
        self.rows.append(row)
        where = "after resume" if overlap else "inside"
        self.log(
            f"  vLLM {label:<10} pause->resume {row['pause_to_resume_s'] * 1e3:7.1f} ms (wake weights "
            f"{w['wake_weights_s'] * 1e3:.1f}, fill {w['fill_s'] * 1e3:.1f}, wake KV {w['wake_kv_s'] * 1e3:.1f}); "
            f"sleep {sleep_s * 1e3:.1f} ms {where}; re-prefill to first token {first_token_s * 1e3:.1f} ms; "
            f"free {free_before:.1f} -> {free_awake:.1f} GiB"
        )
        return row


def _generate(e: Any, ps: list[list[int]], max_tokens: int = 16, prompt_logprobs: bool = False) -> list[Any]:
    return e.call("generate", CALL_S, prompts=ps, max_tokens=max_tokens, k=5, prompt_logprobs=prompt_logprobs)


def _fill_mismatches(e: Any) -> list[str]:
    """Parameters of ``e`` that differ from the resident copy now (``engine rank r: name``)."""
    found = e.call("rpc", CALL_S, method="nitsum_fill_mismatches")
    return [f"{e.name} rank {r['rank']}: {n}" for r in found for n in r["mismatched"]]


def run_scenario(
    engines: dict[int, Any],
    spec: ModelSpec,
    tolerance: float,
    log: Any,
    budget_gib: float,
    checkpoint: Callable[[dict[str, Any]], None] = lambda _: None,
    live_max_tokens: int = 40,
    free_gib: Callable[[Sequence[int]], float] = min_free_gib,
) -> dict[str, Any]:
    """Run the scenario (module docstring) on ``engines`` (TP degree -> started, asleep engine)."""
    sw = Switcher(log, budget_gib, free_gib)
    order = [tp for tp in (1, 2, 4, 1) if tp in engines]
    probes = prompts(spec, 4, 48, salt=5)
    out: dict[str, Any] = {"switches": sw.rows, "checks": {}}
    first = engines[order[0]]
    w = sw.wake(first)
    sw.rows.append({"switch": "start", "in_flight": 0, "pause_to_resume_s": 0.0, "sleep_s": 0.0, **w})
    mismatches = _fill_mismatches(first)
    runs = {"tp1-before": _generate(first, probes), "tp1-repeat": _generate(first, probes)}
    for i, p in enumerate(prompts(spec, 3, 96, salt=11)):
        r = f"live{i}"
        sw.prompts[r], sw.tokens[r], sw.max_tokens[r] = p, [], live_max_tokens
    sw.add_all(first)
    first.call("step", CALL_S, n=8, step_timeout_s=STEP_S)
    checkpoint(out)
    for a, b in itertools.pairwise(order):
        sw.switch(engines[a], engines[b], f"tp{a}->tp{b}")
        engines[b].call("step", CALL_S, n=8, step_timeout_s=STEP_S)
        if b != 1:  # LLM.generate would also run the live requests: take them out, probe, put them back
            sw.harvest(engines[b])
            runs[f"tp{b}"] = _generate(engines[b], probes)
            sw.add_all(engines[b])
        checkpoint(out)
    last = engines[order[-1]]
    left = max((sw.max_tokens[r] - len(sw.tokens[r]) for r in sw.prompts), default=0)
    done = last.call("step", CALL_S + 2 * left, n=left + 2, step_timeout_s=STEP_S)  # stops when all finished
    sw.harvest(last)
    mismatches += _fill_mismatches(last)
    runs["tp1-after"] = _generate(last, probes)
    names = [f"probe{i}" for i in range(len(probes))]
    cmp = compare_probe_runs(probe_steps(runs["tp1-before"]), probe_steps(runs["tp1-after"]), names)
    ctl = compare_probe_runs(probe_steps(runs["tp1-before"]), probe_steps(runs["tp1-repeat"]), names)
    c = out["checks"]
    c["tp1_probes_bit_identical"] = cmp.identical
    c["tp1_probe_comparison"] = cmp.model_dump()
    c["tp1_probe_repeat_identical"] = ctl.identical
    c["tp1_probe_repeat"] = ctl.model_dump()
    c["weight_mismatches_at_probes"] = mismatches
    c["last_engine_idle_after_steps"] = not done["unfinished"]
    c["in_flight_complete"] = {r: len(t) for r, t in sw.tokens.items()}
    c["no_request_lost"] = not sw.unfinished() and all(len(t) == sw.max_tokens[r] for r, t in sw.tokens.items())
    for name, outs in runs.items():
        if not name.startswith("tp1"):
            diff, agree = score_against_tp1(last, probes, outs)
            c[f"{name}_max_logprob_diff"] = diff
            c[f"{name}_greedy_agreement"] = agree
            c[f"{name}_within_tolerance"] = diff <= tolerance
    c["tolerance"] = tolerance
    log(f"vLLM checks: {c}")
    checkpoint(out)
    return out


def _max_sorted_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for x, y in zip(sorted(a[1], reverse=True), sorted(b[1], reverse=True), strict=True))


def score_against_tp1(tp1: Any, probes: list[list[int]], outs: list[dict[str, Any]]) -> tuple[float, float]:
    """Teacher-forced TP1 scoring of another TP's probe outputs: max sorted top-k difference, agreement."""
    scored = _generate(tp1, [p + o["token_ids"][:-1] for p, o in zip(probes, outs, strict=True)], 1, True)
    diff, agree, total = 0.0, 0, 0
    for p, o, s in zip(probes, outs, scored, strict=True):
        rows = s["prompt_top"] + [s["top"][0]]
        for i, top in enumerate(o["top"]):
            ref = rows[len(p) - 1 + i]
            diff = max(diff, _max_sorted_diff(top, ref))
            agree += o["token_ids"][i] == ref[0][0]
            total += 1
    return diff, agree / max(1, total)
