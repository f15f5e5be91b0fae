"""The switch logic of benchmark (c) without vLLM (which needs GPUs): the old engine sleeps after the resume
when the target's GPUs have room for both, inside the switch otherwise; the requests' ledger is exact; the
report renders partial results.

``ToyEngine`` speaks the command protocol of :class:`~nitsum_runtime.bench_vllm.EngineHandle` (call / send /
wait) with a trivial token generator, and logs every command with the time it ran."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_runtime.bench_report import compact_summary, report_vllm
from nitsum_runtime.vllm_scenario import Switcher, run_scenario


def _next(context: list[int], k: int = 5) -> list[list[Any]]:
    """The toy model: top-k ids and log-probabilities of the next token, a function of the context only."""
    first = (31 * sum(context) + len(context)) % 97
    return [[(first + j) % 97 for j in range(k)], [-1.0 - j for j in range(k)]]


class ToyEngine:
    def __init__(self, name: str, gpu_ids: tuple[int, ...], log: list[tuple[str, str]]) -> None:
        self.name, self.gpu_ids, self.log = name, gpu_ids, log
        self.reqs: dict[str, tuple[list[int], int, list[int]]] = {}  # id -> prompt, max_tokens, generated
        self.pending: tuple[str, dict[str, Any]] | None = None

    def call(self, name: str, timeout_s: float = 0, **kw: Any) -> Any:
        self.log.append((self.name, name if name != "rpc" else kw["method"]))
        if name in ("wake_weights", "wake_kv", "sleep"):
            return 0.01
        if name == "rpc":
            return [{"bytes_copied": 100, "rank": 0, "mismatched": []}]
        if name == "add":
            self.reqs[kw["request_id"]] = (kw["prompt"], kw["max_tokens"], [])
            return None
        if name == "step":
            for _ in range(kw["n"]):
                for prompt, limit, out in self.reqs.values():
                    if len(out) < limit:
                        out.append(_next(prompt + out)[0][0])
            return {"unfinished": any(len(o) < m for _, m, o in self.reqs.values())}
        if name == "abort":
            return {r: self.reqs.pop(r)[2] for r in kw["request_ids"] if r in self.reqs}
        if name == "generate":
            return [self._generate(p, kw["max_tokens"]) for p in kw["prompts"]]
        raise KeyError(name)

    def _generate(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        out: list[int] = []
        top = []
        for _ in range(max_tokens):
            top.append(_next(prompt + out))
            out.append(top[-1][0][0])
        return {"token_ids": out, "top": top, "prompt_top": [_next(prompt[: i + 1]) for i in range(len(prompt) - 1)]}

    def send(self, name: str, timeout_s: float = 0, **kw: Any) -> None:
        self.log.append((self.name, f"send {name}"))
        self.pending = (name, kw)

    def wait(self) -> Any:
        assert self.pending is not None
        name, kw = self.pending
        self.pending = None
        return self.call(name, **kw)


def _switcher(free_gib: float, log: list[tuple[str, str]]) -> tuple[Switcher, ToyEngine, ToyEngine]:
    sw = Switcher(lambda _: None, budget_gib=40.0, free_gib=lambda _: free_gib)
    src, dst = ToyEngine("tp1", (0,), log), ToyEngine("tp2", (0, 1), log)
    sw.prompts = {"a": [1, 2, 3], "b": [4, 5]}
    sw.tokens = {"a": [], "b": []}
    sw.max_tokens = {"a": 6, "b": 3}
    sw.add_all(src)
    src.call("step", n=2)
    log.clear()
    return sw, src, dst


def _tokens(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(_next(prompt + out)[0][0])
    return out


def test_old_engine_sleeps_after_the_resume_when_both_fit() -> None:
    log: list[tuple[str, str]] = []
    sw, src, dst = _switcher(free_gib=60.0, log=log)
    row = sw.switch(src, dst, "tp1->tp2")
    assert log == [
        ("tp1", "abort"),
        ("tp2", "wake_weights"),
        ("tp2", "nitsum_fill_weights"),
        ("tp2", "wake_kv"),
        ("tp2", "add"),
        ("tp2", "add"),
        ("tp1", "send sleep"),  # after the resume: off the critical path
        ("tp2", "step"),
        ("tp1", "sleep"),
    ]
    assert row["sleep_after_resume"] and row["in_flight"] == 2 and row["fill_bytes"] == 100
    assert sw.tokens == {"a": _tokens([1, 2, 3], 2), "b": _tokens([4, 5], 2)}  # harvested from tp1
    assert dst.reqs["a"][0] == [1, 2, 3, *sw.tokens["a"]] and dst.reqs["a"][1] == 4  # re-prefill, 4 tokens left
    dst.call("step", n=10)
    assert sw.harvest(dst) == 0 and not sw.unfinished()
    assert sw.tokens == {"a": _tokens([1, 2, 3], 6), "b": _tokens([4, 5], 3)}  # as if never switched


def test_whole_scenario_on_toy_engines() -> None:
    log: list[tuple[str, str]] = []
    engines = {tp: ToyEngine(f"tp{tp}", tuple(range(tp)), log) for tp in (1, 2, 4)}
    spec = MODEL_PRESETS["llama-3.1-8b"]
    saved: list[int] = []
    out = run_scenario(
        engines,
        spec,
        0.15,
        log=lambda _: None,
        budget_gib=40.0,
        checkpoint=lambda s: saved.append(len(s["switches"])),
        free_gib=lambda _: 80.0,
    )
    c = out["checks"]
    assert c["tp1_probes_bit_identical"] and c["tp1_probe_repeat_identical"] and c["no_request_lost"]
    assert c["tp1_probe_comparison"]["steps"] == 4 * 16 and c["weight_mismatches_at_probes"] == []
    assert c["last_engine_idle_after_steps"] and set(c["in_flight_complete"].values()) == {40}
    assert c["tp2_max_logprob_diff"] == 0.0 and c["tp4_greedy_agreement"] == 1.0 and c["tp4_within_tolerance"]
    assert [r["switch"] for r in out["switches"]] == ["start", "tp1->tp2", "tp2->tp4", "tp4->tp1"]
    assert all(r["sleep_after_resume"] and r["in_flight"] == 3 for r in out["switches"][1:])
    assert saved == [1, 2, 3, 4, 4]  # a checkpoint after the first steps, after every switch, at the end
    assert ("tp4", "sleep") in log and log[-1] == ("tp1", "generate")


def test_old_engine_sleeps_first_when_memory_is_short() -> None:
    log: list[tuple[str, str]] = []
    sw, src, dst = _switcher(free_gib=43.0, log=log)  # 40 GiB budget + less than 4 GiB headroom
    row = sw.switch(src, dst, "tp1->tp2")
    assert log[:3] == [("tp1", "abort"), ("tp1", "sleep"), ("tp2", "wake_weights")]
    assert not row["sleep_after_resume"] and ("tp1", "send sleep") not in log


def test_report_of_a_partial_and_of_a_failed_run(tmp_path: Any) -> None:
    args = argparse.Namespace(model="llama-3.1-8b", world=4)
    engine = {"start_s": 50.0, "check_fill": [{"mismatched": []}], "kv_info": [{"layers": 32}]}
    switch = {
        "switch": "tp1->tp2",
        "in_flight": 3,
        "pause_to_resume_s": 0.2,
        "sleep_s": 0.05,
        "sleep_after_resume": True,
        "wake_weights_s": 0.1,
        "fill_s": 0.01,
        "wake_kv_s": 0.05,
        "reprefill_first_token_s": 0.06,
        "free_gib_before_wake": 70.0,
        "free_gib_both_awake": 30.0,
    }
    partial = {"engines": {"tp1": engine, "tp2": engine}, "switches": [{"switch": "start", "in_flight": 0}, switch]}
    text, ok = report_vllm(partial, args)
    assert not ok and "INCOMPLETE" in text and "**200.0 ms**" in text and "**250x** faster" in text
    assert "| tp1->tp2 | 3 | 200.0 | 100.0 | 10.0 | 50.0 | 50.0 | after resume | 60.0 | 70.0 -> 30.0 |" in text
    folder = tmp_path / "vllm"
    folder.mkdir()
    failed = {**partial, "status": "ERROR", "error_summary": "RuntimeError: engine tp1: 'step' failed: | watchdog"}
    (folder / "summary.json").write_text(json.dumps(failed))
    lines = compact_summary(tmp_path).splitlines()
    assert lines[0] == "(c) vllm: ERROR"
    assert "tp1->tp2 200 ms (+ sleep 50 ms after resume)" in lines[1]
    assert lines[-1] == "    stopped by: RuntimeError: engine tp1: 'step' failed: | watchdog"
