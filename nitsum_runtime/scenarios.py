"""End-to-end TP-switch scenarios on a reference-engine pool, shared by the CPU tests and the H200 benchmark.

* :func:`run_round_trip`: one instance goes TP1 -> TP2 -> TP4 -> TP1 while requests decode (their KV migrated
  at every switch), then the same switches with no request in flight. Checks: probe requests run alone on the
  TP1 engine before and after give bit-identical tokens and log-probabilities (same engine, same GPU, same
  batch, same KV placement; a second probe run before any switch is the control that the engine itself is
  run-to-run reproducible, and the engine's weights are compared bit for bit with the resident store before
  both runs); every step of the switched requests is compared with a teacher-forced TP1 scoring of the same
  tokens (sorted top-k log-probabilities within ``tolerance``); the pool's ledger has every request complete
  exactly once. A difference is reported with where and how it first appears (:mod:`.probe_check`).
* :func:`run_switch_loop`: ``n`` switches through a cycle of layouts with requests always in flight, new ones
  submitted as others finish; zero lost or duplicated requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec, Role
from nitsum_opt.plan import Instance, Plan, PlanStatus, Provenance, TierAllocation
from nitsum_runtime.engine import GenerationRequest, TokenEvent
from nitsum_runtime.executor import TransitionExecutor, TransitionReport
from nitsum_runtime.pool import EnginePool, candidate_groups
from nitsum_runtime.probe_check import ProbeComparison, Step, compare_probe_runs
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.ref_model import TopK
from nitsum_runtime.reference_engine import ReferenceEngine

TIER = "chat"


def pinned_plan(groups: Sequence[Sequence[int]], tier: str = TIER, node: int = 0) -> Plan:
    """A plan with one colocated instance of ``tier`` per GPU group (for tests and benchmarks)."""
    instances = tuple(
        Instance(
            instance_id=f"{tier}/tp{len(g)}-colocated/{i}",
            tier=tier,
            tp=len(g),
            role=Role.COLOCATED,
            node=node,
            gpu_ids=tuple(g),
        )
        for i, g in enumerate(sorted(groups))
    )
    alloc = TierAllocation(
        tier=tier,
        demand_rps=0,
        admitted_rps=0,
        best_effort_rps=0,
        admission_fraction=1,
        prefill_capacity_rps=0,
        decode_capacity_rps=0,
        gpus=sum(len(g) for g in groups),
    )
    prov = Provenance(input_hash="pinned", planner="pinned", nitsum_version="0.1.0")
    return Plan(
        instances=instances,
        tiers=(alloc,),
        objective=0.0,
        status=PlanStatus.PINNED,
        solve_time_ms=0.0,
        provenance=prov,
    )


def build_reference_pool(
    cluster: RankCluster,
    num_blocks: int,
    tps: Sequence[int] = (1, 2, 4),
    max_batch_tokens: int = 4096,
    chunk_bytes: int = 64 << 20,
    prefix: str = "",
) -> EnginePool:
    """One (asleep) reference engine per candidate group of the cluster's GPUs; ``prefix`` keeps the engine
    ids of several pools on one cluster apart."""
    groups = candidate_groups(cluster.cfg.world_size, tps)
    engines = [
        ReferenceEngine(
            cluster,
            g,
            num_blocks,
            max_batch_tokens,
            chunk_bytes,
            engine_id=f"{prefix}tp{len(g)}-g{'-'.join(map(str, g))}",
        )
        for g in groups
    ]
    return EnginePool(engines, node=0, gpus_per_node=cluster.cfg.world_size)


def reference_groups(world_size: int, tps: Sequence[int] = (1, 2, 4)) -> tuple[tuple[int, ...], ...]:
    """The multi-GPU groups a cluster must create process groups for."""
    return tuple(g for g in candidate_groups(world_size, tps) if len(g) > 1)


class TransitionSummary(Frozen):
    """One switch of a scenario."""

    label: str
    """``tp1->tp2`` etc."""
    in_flight: int = Field(ge=0)
    """Requests in flight during the switch."""
    report: TransitionReport
    """The executor's report."""


class RoundTripResult(Frozen):
    """What :func:`run_round_trip` measured and checked."""

    transitions: tuple[TransitionSummary, ...]
    """Every switch (with requests, then without)."""
    probe_bit_identical: bool
    """TP1 probe outputs before and after the round trip are identical, tokens and log-probabilities."""
    probe_comparison: ProbeComparison
    """Before vs after the round trip, with the first difference if any."""
    probe_repeat: ProbeComparison
    """Control: the probes run twice in a row before any switch (same engine, nothing in between)."""
    probe_engines: tuple[str, ...]
    """Engines that produced the probe tokens (before, repeat, after): one TP1 engine on one GPU."""
    weight_mismatches: tuple[str, ...]
    """``before:`` / ``after:`` + ``rank r: name`` of every TP1 engine parameter that differed from the
    resident store when the probes ran (empty: bit-exact refills)."""
    max_logprob_diff: float
    """Largest |difference| of sorted top-k log-probabilities vs teacher-forced TP1, over every step."""
    max_logprob_diff_by_engine: dict[str, float]
    """The same, per engine that produced the token."""
    greedy_agreement: float
    """Share of switched-run tokens equal to the TP1 teacher-forced greedy choice."""
    tolerance: float
    """Tolerance the log-probability check used."""
    requests: int
    """Live requests."""
    ledger_ok: bool
    """Every request finished exactly once with all its tokens in order."""
    passed: bool
    """All checks passed."""


def _probe_requests(spec: ModelSpec, n: int, prompt_len: int, max_tokens: int, tag: str) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            request_id=f"{tag}{i}",
            prompt_token_ids=tuple((7 * i + 13 * j + 1) % spec.vocab_size for j in range(prompt_len + i)),
            max_tokens=max_tokens,
        )
        for i in range(n)
    ]


def _run_probes(pool: EnginePool, probes: Sequence[GenerationRequest], tag: str) -> list[list[Step]]:
    """Submit copies of ``probes`` (ids prefixed by ``tag``), decode them to the end, return their steps."""
    reqs = [p.model_copy(update={"request_id": f"{tag}{p.request_id}"}) for p in probes]
    for r in reqs:
        pool.submit(TIER, r)
    _drain(pool, [r.request_id for r in reqs])
    return [[(e.token_id, e.top.token_ids, e.top.logprobs) for e in pool.outputs[r.request_id]] for r in reqs]


def _probe_engines(pool: EnginePool, tag: str) -> set[str]:
    return {e.engine_id for rid, evs in pool.outputs.items() if rid.startswith(tag) for e in evs}


def _weight_mismatches(pool: EnginePool, gpu_ids: Sequence[int], when: str) -> list[str]:
    check = getattr(pool.engine(gpu_ids), "check_weights", None)
    if check is None:
        return []
    return [f"{when}: rank {r}: {name}" for r, names in check().items() for name in names]


def _drain(pool: EnginePool, ids: Sequence[str], max_steps: int = 100_000) -> None:
    for _ in range(max_steps):
        if all(r in pool.finished for r in ids):
            return
        pool.step()
    raise RuntimeError(f"requests {[r for r in ids if r not in pool.finished]} did not finish")


def _sorted_diff(a: TopK, b: TopK) -> float:
    return max(
        abs(x - y) for x, y in zip(sorted(a.logprobs, reverse=True), sorted(b.logprobs, reverse=True), strict=True)
    )


def run_round_trip(
    pool: EnginePool,
    executor: TransitionExecutor,
    spec: ModelSpec,
    path: Sequence[Sequence[int]] = ((0,), (0, 1), (0, 1, 2, 3), (0,)),
    live: int = 4,
    prompt_len: int = 24,
    max_tokens: int = 24,
    steps_between: int = 3,
    probes: int = 2,
    tolerance: float = 1e-3,
    on_switch: Callable[[TransitionSummary], None] | None = None,
) -> RoundTripResult:
    """Switch one instance along ``path`` with ``live`` requests decoding (see module docstring)."""
    if tuple(path[0]) != tuple(path[-1]):
        raise ValueError(f"path {list(path)} must end on the GPU group it starts on: the probes compare one engine")
    plans = [pinned_plan([g]) for g in path]
    transitions: list[TransitionSummary] = []

    def switch(cur: Plan | None, nxt: Plan, label: str) -> None:
        in_flight = len(pool.unfinished())
        report = executor.execute(cur, nxt)
        if not report.ok:
            raise RuntimeError(f"switch {label} failed: {report.error}")
        summary = TransitionSummary(label=label, in_flight=in_flight, report=report)
        transitions.append(summary)
        if on_switch is not None:
            on_switch(summary)

    switch(None, plans[0], "start")
    probe_reqs = _probe_requests(spec, probes, prompt_len, max_tokens, "")
    mismatches = _weight_mismatches(pool, path[0], "before")
    before = _run_probes(pool, probe_reqs, "probe-a")
    repeat = _run_probes(pool, probe_reqs, "probe-r")
    reqs = _probe_requests(spec, live, prompt_len + 3, max_tokens, "live")
    for r in reqs:
        pool.submit(TIER, r)
    for _ in range(steps_between):
        pool.step()
    labels = [f"tp{len(a)}->tp{len(b)}" for a, b in itertools.pairwise(path)]
    for (cur, nxt), label in zip(itertools.pairwise(plans), labels, strict=True):
        switch(cur, nxt, label)
        for _ in range(steps_between):
            pool.step()
    _drain(pool, [r.request_id for r in reqs])
    for (cur, nxt), label in zip(itertools.pairwise(plans), labels, strict=True):
        switch(cur, nxt, f"{label} idle")
    mismatches += _weight_mismatches(pool, path[-1], "after")
    after = _run_probes(pool, probe_reqs, "probe-b")
    names = [r.request_id for r in probe_reqs]
    comparison = compare_probe_runs(before, after, names)
    control = compare_probe_runs(before, repeat, names)
    engines = tuple(sorted(_probe_engines(pool, "probe-")))
    identical = comparison.identical and len(engines) == 1
    diffs, agree, total = _teacher_forced(pool, reqs)
    by_engine: dict[str, float] = {}
    for engine_id, d in diffs:
        by_engine[engine_id] = max(by_engine.get(engine_id, 0.0), d)
    max_diff = max((d for _, d in diffs), default=0.0)
    ledger_ok = not pool.unfinished() and all(len(pool.outputs[r.request_id]) == r.max_tokens for r in reqs)
    return RoundTripResult(
        transitions=tuple(transitions),
        probe_bit_identical=identical,
        probe_comparison=comparison,
        probe_repeat=control,
        probe_engines=engines,
        weight_mismatches=tuple(mismatches),
        max_logprob_diff=max_diff,
        max_logprob_diff_by_engine=by_engine,
        greedy_agreement=agree / max(1, total),
        tolerance=tolerance,
        requests=len(reqs),
        ledger_ok=ledger_ok,
        passed=identical and control.identical and not mismatches and ledger_ok and max_diff <= tolerance,
    )


def _teacher_forced(pool: EnginePool, reqs: Sequence[GenerationRequest]) -> tuple[list[tuple[str, float]], int, int]:
    """Score each live request's tokens at the current (TP1) instance and compare step by step."""
    scoring = []
    for r in reqs:
        out = [e.token_id for e in pool.outputs[r.request_id]]
        scoring.append(
            GenerationRequest(
                request_id=f"score-{r.request_id}",
                prompt_token_ids=r.prompt_token_ids + tuple(out[:-1]),
                max_tokens=1,
                top_k=r.top_k,
                prompt_logprobs=True,
            )
        )
    for s in scoring:
        pool.submit(TIER, s)
    _drain(pool, [s.request_id for s in scoring])
    diffs: list[tuple[str, float]] = []
    agree = total = 0
    for r, s in zip(reqs, scoring, strict=True):
        ev = pool.outputs[s.request_id][0]
        rows = [*ev.prompt_top, ev.top]
        got: list[TokenEvent] = pool.outputs[r.request_id]
        for i, e in enumerate(got):
            ref = rows[len(r.prompt_token_ids) - 1 + i]
            diffs.append((e.engine_id, _sorted_diff(e.top, ref)))
            agree += e.token_id == ref.token_ids[0]
            total += 1
    return diffs, agree, total


class SwitchLoopResult(Frozen):
    """What :func:`run_switch_loop` measured."""

    switches: int = Field(ge=0)
    """Switches carried out."""
    submitted: int = Field(ge=0)
    """Requests submitted."""
    completed: int = Field(ge=0)
    """Requests finished with all their tokens."""
    lost: int = Field(ge=0)
    """Requests not finished at the end (must be 0)."""
    pause_to_resume_s: tuple[float, ...]
    """Switch time of every switch."""
    migrated: int = Field(ge=0)
    """Request migrations."""
    reprefilled: int = Field(ge=0)
    """Request re-prefills."""


def run_switch_loop(
    pool: EnginePool,
    executor: TransitionExecutor,
    spec: ModelSpec,
    switches: int,
    layouts: Sequence[Sequence[Sequence[int]]] = (
        ((0,),),
        ((0, 1),),
        ((0, 1, 2, 3),),
        ((2, 3),),
        ((0,), (1,)),
    ),
    in_flight: int = 3,
    prompt_len: int = 16,
    max_tokens: int = 8,
    steps_between: int = 1,
    on_switch: Callable[[int, TransitionReport], None] | None = None,
) -> SwitchLoopResult:
    """``switches`` switches through ``layouts`` (each a list of GPU groups), requests always in flight."""
    plans = [pinned_plan(groups) for groups in layouts]
    report = executor.execute(None, plans[0])
    if not report.ok:
        raise RuntimeError(f"loop start failed: {report.error}")
    submitted = 0
    times: list[float] = []
    migrated = reprefilled = 0
    for k in range(switches):
        while len(pool.unfinished()) < in_flight:
            req = _probe_requests(spec, 1, prompt_len + submitted % 5, max_tokens, f"loop{submitted}-")[0]
            pool.submit(TIER, req)
            submitted += 1
        for _ in range(steps_between):
            pool.step()
        report = executor.execute(plans[k % len(plans)], plans[(k + 1) % len(plans)])
        if not report.ok:
            raise RuntimeError(f"switch {k} failed: {report.error}")
        times.append(report.pause_to_resume_s)
        migrated += report.migrated
        reprefilled += report.reprefilled
        if on_switch is not None:
            on_switch(k, report)
    _drain(pool, pool.unfinished())
    completed = sum(1 for r in pool.finished if r.startswith("loop"))
    return SwitchLoopResult(
        switches=switches,
        submitted=submitted,
        completed=completed,
        lost=submitted - completed,
        pause_to_resume_s=tuple(times),
        migrated=migrated,
        reprefilled=reprefilled,
    )
