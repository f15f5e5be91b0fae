"""Per-host calibration of a latency model from the steps a real engine ran.

A fitted latency model describes the machine its profile came from. On another host (another driver, CPU, or a
model composed from public per-operator tables with no CPU launch cost) its step times can be off by a roughly
constant amount per step. One short open-loop replay on the target host (:mod:`nitsum_runtime.replay` with
``--log-steps``) records every step's wall time and composition; this module fits, per TP degree, the affine map

.. math::

    t_\\text{measured} \\approx a_{tp} + b_{tp} \\cdot t_\\text{model}(\\text{composition})
        + c_{tp} \\cdot n_\\text{seqs}

(``c``, a cost per scheduled sequence, only when asked for: ``per_seq=True``; on the runtime's serving path at TP 2
the gap to the model grows with the batch) by least squares (:func:`fit_step_calibration`) and wraps the model so
that every step time goes through it (:class:`CalibratedModel`). A scenario carries the result in
``latency_calibration`` (see :class:`~nitsum_opt.sim.scenario.Scenario`);
``python benchmarks/sim/fidelity.py compare --calibrate-on SLICE`` fits it on some slices and checks it on the
others (``benchmarks/RESULTS.md``, "Simulator vs vLLM on H100"); ``benchmarks/sim/adaptive_fidelity.py compare``
fits it on the runtime's own logged steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.sim.timing import IterationTimeModel, model_tps

MIN_STEPS = 50
"""Fewest logged steps a calibration is fitted on."""


class StepCalibration(Frozen):
    """``t = offset_ms + scale · t_model + per_seq_ms · sequences`` for one TP degree."""

    offset_ms: float = Field(allow_inf_nan=False)
    """``a``: fixed time the model misses per step, ms (e.g. CPU launch and scheduling cost on this host)."""
    scale: float = Field(gt=0, allow_inf_nan=False)
    """``b``: factor on the model's step time."""
    per_seq_ms: float = Field(default=0.0, allow_inf_nan=False)
    """``c``: time per sequence the step schedules (prefill and decode), ms (e.g. per-request work on the host
    that the profile's engine did not do)."""
    steps: int = Field(default=0, ge=0)
    """Steps it was fitted on (0: written by hand)."""
    source: str = ""
    """Where the steps came from (e.g. the replay's results folder)."""

    def describe(self) -> str:
        """``+a ms + b×`` (and ``+ c ms/seq`` when it has a cost per sequence)."""
        text = f"{self.offset_ms:+.2f} ms + {self.scale:.3f}×"
        return text + (f" + {self.per_seq_ms:.4f} ms/seq" if self.per_seq_ms else "")

    def apply_ms(self, model_ms: npt.ArrayLike, seqs: npt.ArrayLike = 0) -> npt.NDArray[np.float64]:
        """The calibrated step time(s) of steps of ``seqs`` sequences (never below 1 % of the model's)."""
        base = np.asarray(model_ms, dtype=float)
        extra = self.per_seq_ms * np.asarray(seqs, dtype=float)
        return np.maximum(0.01 * base, self.offset_ms + self.scale * base + extra)


def predicted_steps_ms(model: IterationTimeModel, tp: int, compositions: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The model's time of each logged step (rows as :func:`~nitsum_opt.sim.fidelity.read_steps` returns them)."""
    return np.array([model.predict_ms(tp, *(int(x) for x in row)) for row in np.asarray(compositions)], dtype=float)


def fit_step_calibration(
    model: IterationTimeModel,
    tp: int,
    times_s: npt.ArrayLike,
    compositions: npt.ArrayLike,
    source: str = "",
    per_seq: bool = False,
) -> StepCalibration:
    """Least-squares ``(a, b)`` (``(a, b, c)`` with ``per_seq``) of measured step times on the model's predictions
    for the same compositions (rows ``num_prefill_seqs, prefill_tokens, prefill_attention_pairs, num_decode_seqs,
    decode_context_tokens``, as :func:`~nitsum_opt.sim.fidelity.read_steps` returns them)."""
    times_ms = np.asarray(times_s, dtype=float) * 1000.0
    comps = np.asarray(compositions)
    if comps.ndim != 2 or comps.shape[1] != 5 or comps.shape[0] != times_ms.size:
        raise ValueError(
            f"need one composition row of 5 numbers per step time; got {times_ms.size} times and "
            f"compositions of shape {comps.shape}"
        )
    if times_ms.size < MIN_STEPS:
        raise ValueError(f"{times_ms.size} logged steps; a calibration needs at least {MIN_STEPS}")
    if tp not in model_tps(model):
        raise ValueError(f"tp={tp}: the latency model covers TP {list(model_tps(model))}")
    predicted_ms = predicted_steps_ms(model, tp, comps)
    columns = [np.ones_like(predicted_ms), predicted_ms]
    if per_seq:
        columns.append((comps[:, 0] + comps[:, 3]).astype(float))
    coef, *_ = np.linalg.lstsq(np.column_stack(columns), times_ms, rcond=None)
    offset_ms, scale = coef[0], coef[1]
    per_seq_ms = float(coef[2]) if per_seq else 0.0
    if not scale > 0:
        raise ValueError(
            f"the fitted scale is {scale:.3g} (≤ 0): the measured steps do not grow with the model's times; "
            "log steps over a wider range of batch sizes (a busier slice)"
        )
    return StepCalibration(
        offset_ms=float(offset_ms), scale=float(scale), per_seq_ms=per_seq_ms, steps=int(times_ms.size), source=source
    )


class CalibratedModel:
    """An iteration model whose step times at the calibrated TP degrees go through :class:`StepCalibration`
    (other TP degrees and the KV-cache capacity are the wrapped model's)."""

    def __init__(self, model: IterationTimeModel, calibration: Mapping[int, StepCalibration]) -> None:
        unknown = sorted(set(calibration) - set(model_tps(model)))
        if unknown:
            raise ValueError(
                f"latency_calibration gives TP {unknown}, which the latency model does not cover "
                f"(it covers TP {list(model_tps(model))})"
            )
        self.model = model
        self.calibration = dict(calibration)
        self.tps = model_tps(model)

    def predict_ms(self, tp: int, *composition: int) -> float:
        """The wrapped model's step time, calibrated at ``tp``."""
        base = self.model.predict_ms(tp, *composition)
        cal = self.calibration.get(tp)
        return base if cal is None else float(cal.apply_ms(base, composition[0] + composition[3]))

    def predict_batch_ms(self, composition: npt.ArrayLike, validate: bool = True) -> npt.NDArray[np.float64]:
        """:meth:`predict_ms` of every row of a composition matrix (columns ``tp, num_prefill_seqs,
        prefill_tokens, prefill_attention_pairs, num_decode_seqs, decode_context_tokens``)."""
        comp = np.asarray(composition, dtype=float)
        base = np.asarray(self.model.predict_batch_ms(comp, validate=validate), dtype=float)  # type: ignore[attr-defined]
        out = base.copy()
        for tp, cal in self.calibration.items():
            rows = comp[:, 0] == tp
            out[rows] = cal.apply_ms(base[rows], comp[rows, 1] + comp[rows, 4])
        return out

    def kv_cache_tokens(self, tp: int) -> int:
        """The wrapped model's KV-cache capacity."""
        return self.model.kv_cache_tokens(tp)


__all__ = ["MIN_STEPS", "CalibratedModel", "StepCalibration", "fit_step_calibration", "predicted_steps_ms"]
