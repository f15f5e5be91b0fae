"""Is the simulator right? The same trace slices, measured on a real vLLM engine and simulated, side by side.

The simulator grades every system with the fitted latency model step by step; this module checks that whole
request timelines, not just single steps, come out as a real engine produces them. For each slice of a slice
file (:mod:`nitsum_opt.sim.slices`) it simulates the requests on one colocated engine of TP ``tp`` with FCFS
scheduling (``vllm-static-tp<tp>`` on a cluster of that one engine, the scenario's engine settings and drain),
reads what :mod:`nitsum_runtime.bench_fidelity` measured for the same requests on a GPU, and reports per slice
and tier (and ``all``):

* requests completed, TTFT p50 / p90 / p99 and TPOT p50 / p90 / p99 in ms;
* SLO attainment against the scenario's tier targets (a request not completed is a miss), goodput in req/s;

for the measurement and the simulation, plus the ratio simulated / measured of each. ``benchmarks/sim/fidelity.py``
turns the comparison into a CSV, a table and a plot.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nitsum_opt.sim.calibration import predicted_steps_ms
from nitsum_opt.sim.controllers.base import ControlContext, Controller, StaticController
from nitsum_opt.sim.controllers.registry import make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.sim.slices import TraceSlice
from nitsum_opt.sim.timing import IterationTimeModel
from nitsum_opt.spec import ClusterSpec, Tier
from nitsum_opt.workloads.trace import RequestTrace

PERCENTILES = (50, 90, 99)
MEASURED_HEADER = ("slice", "index", "ttft_s", "tpot_s", "finish_s", "late_add_s")
STEP_COLUMNS = (
    "num_prefill_seqs",
    "prefill_tokens",
    "prefill_attention_pairs",
    "num_decode_seqs",
    "decode_context_tokens",
)


@dataclass(frozen=True)
class Timings:
    """Per-request outcome of one slice, from the GPU or the simulator (NaN: did not happen)."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    completed: np.ndarray


class FixedKvModel:
    """An iteration model with another KV-cache capacity: step times from ``model``, ``kv_tokens`` at every TP or
    per TP (engines measured with a smaller ``gpu_memory_utilization``; a TP left out keeps the model's)."""

    def __init__(self, model: IterationTimeModel, kv_tokens: int | Mapping[int, int]) -> None:
        values = [kv_tokens] if isinstance(kv_tokens, int) else list(kv_tokens.values())
        if min(values, default=1) < 1:
            raise ValueError(f"kv_tokens={kv_tokens} must be ≥ 1")
        self.model = model
        self.kv_tokens: int | dict[int, int] = int(kv_tokens) if isinstance(kv_tokens, int) else dict(kv_tokens)
        if hasattr(model, "tps"):
            self.tps = model.tps

    def predict_ms(self, tp: int, *composition: int) -> float:
        """The wrapped model's step time."""
        return self.model.predict_ms(tp, *composition)

    def __getattr__(self, name: str) -> object:
        """Everything else (batch predictions for capacity tables, ...) from the wrapped model."""
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def kv_cache_tokens(self, tp: int) -> int:
        """``kv_tokens`` (of ``tp``)."""
        if isinstance(self.kv_tokens, int):
            return self.kv_tokens
        return self.kv_tokens.get(tp) or self.model.kv_cache_tokens(tp)


def simulate_slice(
    scenario: Scenario, piece: TraceSlice, tp: int = 1, drain_s: float = 60.0, kv_cache_tokens: int | None = None
) -> Timings:
    """The slice on one simulated colocated TP-``tp`` engine (FCFS, the scenario's engine settings; KV capacity
    from the latency model, or ``kv_cache_tokens``)."""
    trace = piece.to_trace([t.name for t in scenario.tiers])
    model, cluster, settings = _slice_setup(scenario, tp, drain_s, kv_cache_tokens)
    ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, cluster, settings)
    return _timings(scenario, trace, model, cluster, settings, make_controller(f"vllm-static-tp{tp}", ev))


def simulate_deployment(
    scenario: Scenario,
    piece: TraceSlice,
    deployment: Deployment,
    num_gpus: int,
    drain_s: float = 60.0,
    kv_cache_tokens: int | None = None,
) -> Timings:
    """The slice served by ``deployment`` (its instances, scheduler and admission, unchanged for the whole slice)
    on ``num_gpus`` simulated GPUs of the scenario's type: the simulated twin of
    :class:`nitsum_runtime.serving.PlanServer` serving it."""
    trace = piece.to_trace([t.name for t in scenario.tiers])
    model, cluster, settings = _slice_setup(scenario, num_gpus, drain_s, kv_cache_tokens)
    controller = StaticController(deployment.label or "deployment", deployment)
    return _timings(scenario, trace, model, cluster, settings, controller)


def slice_control(
    scenario: Scenario,
    piece: TraceSlice,
    system: str,
    num_gpus: int,
    epoch_s: float,
    drain_s: float = 60.0,
    kv_cache_tokens: int | Mapping[int, int] | None = None,
) -> tuple[ControlContext, Controller, RequestTrace]:
    """System ``system``'s controller for the slice on ``num_gpus`` GPUs re-planning every ``epoch_s``, what it
    knows, and the slice as a trace: built alike by the runtime's adaptive benchmark
    (:mod:`nitsum_runtime.bench_adaptive`) and :func:`simulate_system`, so both decide from the same inputs."""
    trace = piece.to_trace([t.name for t in scenario.tiers])
    model, cluster, settings = _slice_setup(scenario, num_gpus, drain_s, kv_cache_tokens)
    settings = settings.model_copy(update={"epoch_s": epoch_s})
    ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, cluster, settings)
    ctx = ControlContext(
        cluster=cluster, tiers=scenario.tiers, model_spec=scenario.model_spec, model=model, settings=settings
    )
    return ctx, make_controller(system, ev, scenario.controller_options()), trace


class PlansWith(Controller):
    """``controller`` deciding from ``ctx`` (e.g. an uncalibrated latency model) whatever the simulator runs: the
    decisions a real run made, simulated with another model."""

    def __init__(self, controller: Controller, ctx: ControlContext) -> None:
        self.controller, self.ctx = controller, ctx
        self.name, self.is_static = controller.name, controller.is_static

    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        return self.controller.start(self.ctx, warmup)

    def on_epoch(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment | None:
        return self.controller.on_epoch(self.ctx, now_s, window)


def simulate_system(
    scenario: Scenario,
    piece: TraceSlice,
    system: str,
    num_gpus: int,
    epoch_s: float,
    drain_s: float = 60.0,
    kv_cache_tokens: int | Mapping[int, int] | None = None,
    plan_with: Scenario | None = None,
) -> tuple[Timings, tuple[tuple[float, Deployment], ...]]:
    """The slice served by system ``system`` (re-planning every ``epoch_s`` if it adapts): per-request timings and
    every deployment it applied, with its time. ``plan_with``: the controller is built and decides with that
    scenario's latency model (e.g. the uncalibrated one a real run planned with) while ``scenario``'s is simulated."""
    ctx, controller, trace = slice_control(scenario, piece, system, num_gpus, epoch_s, drain_s, kv_cache_tokens)
    if plan_with is not None:
        plan_ctx, planner, _ = slice_control(plan_with, piece, system, num_gpus, epoch_s, drain_s, kv_cache_tokens)
        controller = PlansWith(planner, plan_ctx)
    return _simulate(scenario, trace, ctx.model, ctx.cluster, ctx.settings, controller)


def with_prepare_ahead(scenario: Scenario, on: bool) -> Scenario:
    """``scenario`` whose simulated plan changes are prepared ahead (``SwitchCosts.prepare_ahead``) or not, as a
    measured run's were (``meta.json``'s ``prepare_ahead``)."""
    switch = scenario.settings.switch.model_copy(update={"prepare_ahead": on})
    return scenario.model_copy(update={"settings": scenario.settings.model_copy(update={"switch": switch})})


def _slice_setup(
    scenario: Scenario, num_gpus: int, drain_s: float, kv_cache_tokens: int | Mapping[int, int] | None
) -> tuple[IterationTimeModel, ClusterSpec, SimSettings]:
    model, _ = scenario.iteration_model()
    if kv_cache_tokens is not None:
        model = FixedKvModel(model, kv_cache_tokens)
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=num_gpus, gpu_type=scenario.cluster.gpu_type)
    return model, cluster, scenario.settings.model_copy(update={"drain_s": drain_s})


def _simulate(
    scenario: Scenario,
    trace: RequestTrace,
    model: IterationTimeModel,
    cluster: ClusterSpec,
    settings: SimSettings,
    controller: Controller,
) -> tuple[Timings, tuple[tuple[float, Deployment], ...]]:
    """Per-request timings and the deployments applied, with their times."""
    result = Simulator(trace, scenario.tiers, model, scenario.model_spec, cluster, controller, settings).run()
    completed = ~np.isnan(result.finish_s) & ~np.isnan(result.ttft_s)
    timings = Timings(np.asarray(result.ttft_s, float), np.asarray(result.tpot_s, float), completed)
    return timings, result.timeline


def _timings(
    scenario: Scenario,
    trace: RequestTrace,
    model: IterationTimeModel,
    cluster: ClusterSpec,
    settings: SimSettings,
    controller: Controller,
) -> Timings:
    return _simulate(scenario, trace, model, cluster, settings, controller)[0]


def read_measured(path: str | Path, slices: list[TraceSlice]) -> dict[str, Timings]:
    """``measured.csv`` of :mod:`nitsum_runtime.bench_fidelity`, per slice (only slices it holds); every row is
    checked against the slice file (names, indices, one row per request)."""
    path = Path(path)
    sizes = {s.name: len(s) for s in slices}
    cols: dict[str, dict[str, np.ndarray]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != MEASURED_HEADER:
            raise ValueError(f"{path}:1: expected the header {','.join(MEASURED_HEADER)}, got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) != len(MEASURED_HEADER):
                raise ValueError(f"{path}:{line}: expected {len(MEASURED_HEADER)} columns, got {row}")
            name = row[0]
            if name not in sizes:
                raise ValueError(f"{path}:{line}: slice {name!r} is not in the slice file ({sorted(sizes)})")
            try:
                i = int(row[1])
                ttft, tpot, finish = (float(x) if x else math.nan for x in row[2:5])
            except ValueError:
                raise ValueError(f"{path}:{line}: index and times must be numbers, got {row[1:5]}") from None
            if not 0 <= i < sizes[name]:
                raise ValueError(f"{path}:{line}: index {i} outside slice {name!r} of {sizes[name]} requests")
            c = cols.setdefault(name, {k: np.full(sizes[name], np.nan) for k in ("ttft", "tpot", "finish")})
            c["ttft"][i], c["tpot"][i], c["finish"][i] = ttft, tpot, finish
    return {
        name: Timings(c["ttft"], c["tpot"], ~np.isnan(c["finish"]) & ~np.isnan(c["ttft"])) for name, c in cols.items()
    }


def slo_met(piece: TraceSlice, timings: Timings, tiers: tuple[Tier, ...]) -> np.ndarray:
    """Completed within the tier's TTFT and TPOT targets (a one-token output has no TPOT to miss)."""
    by_name = {t.name: t for t in tiers}
    ttft_slo = np.array([by_name[t].ttft_slo_ms / 1000.0 for t in piece.tier])
    tpot_slo = np.array([by_name[t].tpot_slo_ms / 1000.0 for t in piece.tier])
    with np.errstate(invalid="ignore"):
        ttft_ok = timings.ttft_s <= ttft_slo
        tpot_ok = np.isnan(timings.tpot_s) | (timings.tpot_s <= tpot_slo)
    return timings.completed & ttft_ok & tpot_ok


def _pct_ms(values: np.ndarray, q: float) -> float:
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, q) * 1000.0) if finite.size else math.nan


def summarize(piece: TraceSlice, timings: Timings, tiers: tuple[Tier, ...], mask: np.ndarray) -> dict[str, float]:
    """Completed, percentiles, attainment and goodput of the requests in ``mask``."""
    met = slo_met(piece, timings, tiers)
    n = int(mask.sum())
    row: dict[str, float] = {"requests": n, "completed": int(timings.completed[mask].sum())}
    for q in PERCENTILES:
        row[f"ttft_p{q}_ms"] = _pct_ms(timings.ttft_s[mask], q)
    for q in PERCENTILES:
        row[f"tpot_p{q}_ms"] = _pct_ms(timings.tpot_s[mask], q)
    row["attainment"] = float(met[mask].mean()) if n else math.nan
    row["goodput_rps"] = float(met[mask].sum()) / piece.duration_s
    return row


METRICS = ("completed", *(f"ttft_p{q}_ms" for q in PERCENTILES), *(f"tpot_p{q}_ms" for q in PERCENTILES))
METRICS += ("attainment", "goodput_rps")


def compare(
    piece: TraceSlice, measured: Timings, simulated: Timings, tiers: tuple[Tier, ...]
) -> list[dict[str, object]]:
    """One row per tier present and ``all``: ``real_<metric>``, ``sim_<metric>`` and ``ratio_<metric>``
    (simulated / measured; NaN where the measured value is 0 or missing)."""
    tier_arr = np.array(piece.tier)
    groups = [("all", np.ones(len(piece), bool))] + [
        (t.name, tier_arr == t.name) for t in tiers if bool((tier_arr == t.name).any())
    ]
    rows: list[dict[str, object]] = []
    for label, mask in groups:
        real = summarize(piece, measured, tiers, mask)
        sim = summarize(piece, simulated, tiers, mask)
        row: dict[str, object] = {"slice": piece.name, "offered_rps": round(piece.offered_rps, 3), "tier": label}
        row["requests"] = real["requests"]
        for m in METRICS:
            row[f"real_{m}"] = real[m]
            row[f"sim_{m}"] = sim[m]
            ok = math.isfinite(real[m]) and real[m] != 0 and math.isfinite(sim[m])
            row[f"ratio_{m}"] = sim[m] / real[m] if ok else math.nan
        rows.append(row)
    return rows


def format_cell(x: object) -> str:
    """A comparison value as text: floats to 4 significant digits, NaN empty."""
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def format_rows(rows: list[dict[str, object]], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[str]:
    """A header and one ``|``-separated line per comparison row: the ``keys`` columns, then ``real / sim`` of each
    metric."""
    lines = [" | ".join((*keys, *(f"{c} real/sim" for c in metrics)))]
    for row in rows:
        cells = [format_cell(row[c]) for c in keys]
        cells += [f"{format_cell(row[f'real_{c}'])} / {format_cell(row[f'sim_{c}'])}" for c in metrics]
        lines.append(" | ".join(cells))
    return lines


def write_comparison_csv(path: str | Path, rows: list[dict[str, object]]) -> None:
    """Comparison rows (:func:`compare`, possibly with more columns) as CSV, cells by :func:`format_cell`."""
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: format_cell(v) for k, v in row.items()} for row in rows)


def read_steps(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A step log ``steps-<slice>.csv.gz``: measured step times (s) and compositions (rows of
    :data:`STEP_COLUMNS`); a malformed row raises naming the file and line."""
    path = Path(path)
    times, comps = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != ("step_time_s", *STEP_COLUMNS):
            raise ValueError(f"{path}:1: expected the header step_time_s,{','.join(STEP_COLUMNS)}, got {header}")
        for line, row in enumerate(reader, start=2):
            try:
                t, values = float(row[0]), [int(x) for x in row[1:]]
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{line}: expected a time and {len(STEP_COLUMNS)} counts, got {row}") from None
            if len(values) != len(STEP_COLUMNS) or t <= 0 or min(values) < 0:
                raise ValueError(f"{path}:{line}: need a time > 0 and {len(STEP_COLUMNS)} counts ≥ 0, got {row}")
            times.append(t)
            comps.append(values)
    return np.array(times), np.array(comps, dtype=float).reshape(-1, len(STEP_COLUMNS))


def step_errors(model: IterationTimeModel, tp: int, times_s: np.ndarray, comps: np.ndarray) -> dict[str, float]:
    """The latency model on the steps the engine ran: steps, measured and predicted total seconds, their ratio
    (predicted / measured), the median per-step ratio and the mean absolute percentage error; also the same for
    decode-only steps (where TPOT comes from)."""
    predicted = predicted_steps_ms(model, tp, comps) / 1000.0
    out: dict[str, float] = {}
    decode_only = comps[:, 0] == 0
    for label, mask in (("all", np.ones(len(times_s), bool)), ("decode", decode_only)):
        t, p = times_s[mask], predicted[mask]
        n = int(mask.sum())
        out[f"{label}_steps"] = n
        out[f"{label}_measured_s"] = float(t.sum())
        out[f"{label}_predicted_s"] = float(p.sum())
        out[f"{label}_ratio"] = float(p.sum() / t.sum()) if n else math.nan
        out[f"{label}_median_ratio"] = float(np.median(p / t)) if n else math.nan
        out[f"{label}_mape_pct"] = float(100.0 * np.mean(np.abs(p - t) / t)) if n else math.nan
    return out


__all__ = [
    "MEASURED_HEADER",
    "STEP_COLUMNS",
    "FixedKvModel",
    "Timings",
    "compare",
    "format_cell",
    "read_measured",
    "read_steps",
    "simulate_deployment",
    "simulate_slice",
    "slo_met",
    "step_errors",
    "summarize",
    "with_prepare_ahead",
    "write_comparison_csv",
]
