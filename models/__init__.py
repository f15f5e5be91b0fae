"""Latency models, profiling-data schema and capacity tables (installed as ``nitsum_opt.models``).

This package never imports the planner (``nitsum_opt`` outside this folder) or ``nitsum_opt.solvers``.
The value types of :mod:`.spec` are imported eagerly; the latency-model and capacity API (scikit-learn, scipy)
is imported on first attribute access, so ``import nitsum_opt`` stays light.
"""

from importlib import import_module
from typing import Any

from .spec import (
    MODEL_PRESETS,
    SUPPORTED_TP,
    CapacityTable,
    LengthBucket,
    LengthMix,
    ModelSpec,
    Role,
    ServingConfig,
    SloTarget,
    all_configs,
    model_preset,
)

#: Public names resolved lazily: name -> submodule.
_LAZY: dict[str, str] = {
    "PerformanceModel": "bundle",
    "PerformanceModelFileError": "bundle",
    "fit_performance_model": "bundle",
    "load_performance_model": "bundle",
    "IterationTimeModel": "latency",
    "OutOfProfileRangeWarning": "latency",
    "IterationTimeQuantileModel": "quantile",
    "ProfileError": "profile_schema",
    "load_profile": "profile_schema",
    "load_meta": "profile_schema",
    "CapacityOptions": "tiers",
    "CellResult": "tiers",
    "TierWorkload": "tiers",
    "load_tiers_file": "tiers",
    "build_capacity_table": "capacity",
    "build_capacity_cells": "capacity",
    "capacity_cell": "capacity",
    "simulate_instance": "reqsim",
    "StepRegimeLimits": "step_regime",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODEL_PRESETS",
    "SUPPORTED_TP",
    "CapacityTable",
    "LengthBucket",
    "LengthMix",
    "ModelSpec",
    "Role",
    "ServingConfig",
    "SloTarget",
    "all_configs",
    "model_preset",
    *_LAZY,
]
