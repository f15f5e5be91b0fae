"""A latency calibration fitted on the runtime's own engine steps.

The runtime's serving loop can log every engine step (``nitsum_runtime.bench_adaptive --log-steps``:
``OUT/<system>/steps.csv.gz``, one row per step with its instance key, round trip, seconds inside vLLM and
composition). :func:`fit_runtime_calibration` fits, per TP degree, the
:class:`~nitsum_opt.sim.calibration.StepCalibration` that maps the latency model's step times to those round
trips; a scenario carrying it in ``latency_calibration`` plans and simulates the runtime on that host.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nitsum_opt.sim.calibration import StepCalibration, fit_step_calibration
from nitsum_opt.sim.fidelity import STEP_COLUMNS
from nitsum_opt.sim.timing import IterationTimeModel

SERVING_STEP_HEADER = ("instance", "round_trip_s", "step_time_s", *STEP_COLUMNS)
"""Columns of a serving step log (``OUT/<system>/steps.csv.gz``)."""


def tp_of(instance: str) -> int:
    """The TP degree in a serving instance key (``g0-tp2-colocated`` → 2)."""
    try:
        return int(instance.split("-tp")[1].split("-")[0])
    except (IndexError, ValueError):
        raise ValueError(f"instance {instance!r}: expected a key like 'g0-tp2-colocated'") from None


def read_serving_steps(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per instance of a serving step log: (seconds inside vLLM, round-trip seconds, compositions as rows of
    :data:`~nitsum_opt.sim.fidelity.STEP_COLUMNS`); a malformed row raises naming the file and line."""
    rows: dict[str, list[list[float]]] = {}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                tp_of(row["instance"])
                values = [float(row["step_time_s"]), float(row["round_trip_s"]), *(int(row[c]) for c in STEP_COLUMNS)]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{path}:{line}: not a serving step row ({exc}); expected the columns {SERVING_STEP_HEADER}"
                ) from None
            rows.setdefault(row["instance"], []).append(values)
    out = {}
    for instance, values in rows.items():
        arr = np.asarray(values, dtype=float)
        out[instance] = (arr[:, 0], arr[:, 1], arr[:, 2:].astype(np.int64))
    return out


def fit_runtime_calibration(
    step_logs: Iterable[str | Path], model: IterationTimeModel, per_seq: bool = True, source: str = "serving loop"
) -> dict[int, StepCalibration]:
    """Per TP degree, ``offset + scale · model (+ per_seq · sequences)`` fitted on the round trips of every step in
    ``step_logs`` (pooled over instances and runs of that TP). Fit on runs that cover a wide range of batch sizes:
    a run whose steps of one TP sit in a narrow range determines the per-sequence cost badly."""
    times: dict[int, list[np.ndarray]] = {}
    comps: dict[int, list[np.ndarray]] = {}
    paths = [Path(p) for p in step_logs]
    if not paths:
        raise ValueError("no step logs to fit a calibration on (OUT/<system>/steps.csv.gz of bench_adaptive)")
    for path in paths:
        for instance, (_, trip_s, comp) in read_serving_steps(path).items():
            tp = tp_of(instance)
            times.setdefault(tp, []).append(trip_s)
            comps.setdefault(tp, []).append(comp)
    return {
        tp: fit_step_calibration(
            model, tp, np.concatenate(times[tp]), np.concatenate(comps[tp]), source=source, per_seq=per_seq
        )
        for tp in sorted(times)
    }


__all__ = ["SERVING_STEP_HEADER", "fit_runtime_calibration", "read_serving_steps", "tp_of"]
