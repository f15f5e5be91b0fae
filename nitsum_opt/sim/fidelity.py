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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nitsum_opt.sim.controllers.registry import make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice
from nitsum_opt.spec import ClusterSpec, Tier

PERCENTILES = (50, 90, 99)
MEASURED_HEADER = ("slice", "index", "ttft_s", "tpot_s", "finish_s", "late_add_s")


@dataclass(frozen=True)
class Timings:
    """Per-request outcome of one slice, from the GPU or the simulator (NaN: did not happen)."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    completed: np.ndarray


def simulate_slice(scenario: Scenario, piece: TraceSlice, tp: int = 1, drain_s: float = 60.0) -> Timings:
    """The slice on one simulated colocated TP-``tp`` engine (FCFS, the scenario's engine settings)."""
    trace = piece.to_trace([t.name for t in scenario.tiers])
    model, _ = scenario.iteration_model()
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=tp, gpu_type=scenario.cluster.gpu_type)
    settings = scenario.settings.model_copy(update={"drain_s": drain_s})
    ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, cluster, settings)
    controller = make_controller(f"vllm-static-tp{tp}", ev)
    result = Simulator(trace, scenario.tiers, model, scenario.model_spec, cluster, controller, settings).run()
    completed = ~np.isnan(result.finish_s) & ~np.isnan(result.ttft_s)
    return Timings(np.asarray(result.ttft_s, float), np.asarray(result.tpot_s, float), completed)


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


__all__ = ["MEASURED_HEADER", "Timings", "compare", "read_measured", "simulate_slice", "slo_met", "summarize"]
