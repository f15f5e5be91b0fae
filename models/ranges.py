"""Profiled-range guard of the latency models: predicting outside the range profiled at a TP degree warns once
per feature (:class:`OutOfProfileRangeWarning`), naming the feature, the value and the range."""

from __future__ import annotations

import warnings

import numpy as np

from .features import FloatArray

#: Composition quantities whose profiled range is guarded.
RANGE_FEATURES: tuple[str, ...] = (
    "tokens",
    "num_prefill_seqs",
    "prefill_attention_pairs",
    "num_decode_seqs",
    "decode_context_tokens",
)


class OutOfProfileRangeWarning(UserWarning):
    """A prediction was asked for outside the range the model was profiled on (it extrapolates)."""


def range_values(comp: FloatArray) -> FloatArray:
    """Columns of :data:`RANGE_FEATURES` for a composition matrix."""
    return np.column_stack([comp[:, 2] + comp[:, 4], comp[:, 1], comp[:, 3], comp[:, 4], comp[:, 5]])


def profiled_ranges(comp: FloatArray) -> list[list[float]]:
    """``[[min, max], ...]`` of every guarded feature over the rows of ``comp``."""
    values = range_values(comp)
    return np.column_stack([values.min(axis=0), values.max(axis=0)]).tolist()


class RangeGuard:
    """Warn once per feature when a prediction leaves the profiled range of its TP."""

    def __init__(self, model_name: str, ranges: dict[int, list[list[float]]]) -> None:
        self.model_name = model_name
        self.ranges = ranges
        self.warned: set[str] = set()

    def warn(self, feature: str, tp: int, value: float) -> None:
        """Warn that ``feature=value`` at ``tp`` is outside the profiled range (once per feature)."""
        if feature in self.warned:
            return
        self.warned.add(feature)
        lo, hi = self.ranges[tp][RANGE_FEATURES.index(feature)]
        warnings.warn(
            f"{self.model_name} latency model: {feature}={value:,.0f} at tp={tp} is outside the profiled "
            "range "
            f"[{lo:,.0f}, {hi:,.0f}]; the prediction extrapolates (profile larger batches to cover it). "
            "Warned once per feature.",
            OutOfProfileRangeWarning,
            stacklevel=4,
        )

    def check_matrix(self, comp: FloatArray) -> None:
        """Warn for every guarded feature some row of ``comp`` takes outside its TP's range."""
        values = range_values(comp)
        for tp in np.unique(comp[:, 0]).astype(int):
            rows = comp[:, 0] == tp
            bounds = np.asarray(self.ranges[int(tp)])
            v = values[rows]
            outside = (v < bounds[:, 0]) | (v > bounds[:, 1])
            for j in np.flatnonzero(outside.any(axis=0)):
                self.warn(RANGE_FEATURES[j], int(tp), float(v[outside[:, j], j][0]))

    def check_scalar(self, tp: int, values: tuple[float, ...]) -> None:
        """Warn for every guarded feature of one step (values in :data:`RANGE_FEATURES` order) out of range."""
        for j, (v, (lo, hi)) in enumerate(zip(values, self.ranges[tp], strict=True)):
            if v < lo or v > hi:
                self.warn(RANGE_FEATURES[j], tp, float(v))
