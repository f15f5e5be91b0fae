"""Nitsum planner: joint TP degree, prefill/decode split and per-tier admission for multi-SLO LLM serving."""

from nitsum_opt.models.spec import (
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
from nitsum_opt.plan import Instance, Plan, PlanStatus, Provenance, TierAllocation
from nitsum_opt.spec import (
    ClusterSpec,
    CurrentPlan,
    InstanceCount,
    ObjectiveSettings,
    PlanningInput,
    Tier,
    TierDemand,
)

__version__ = "0.1.0"

__all__ = [
    "CapacityTable",
    "ClusterSpec",
    "CurrentPlan",
    "Instance",
    "InstanceCount",
    "LengthBucket",
    "LengthMix",
    "ModelSpec",
    "ObjectiveSettings",
    "Plan",
    "PlanStatus",
    "PlanningInput",
    "Provenance",
    "Role",
    "ServingConfig",
    "SloTarget",
    "Tier",
    "TierAllocation",
    "TierDemand",
    "__version__",
    "all_configs",
    "model_preset",
]
