"""Latency models, profiling-data schema and capacity tables (installed as ``nitsum_opt.models``).

This package never imports the planner (``nitsum_opt`` outside this folder) or ``nitsum_opt.solvers``.
"""

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
]
