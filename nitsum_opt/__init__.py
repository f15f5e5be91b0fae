"""Nitsum planner: joint TP degree, prefill/decode split and per-tier admission for multi-SLO LLM serving."""

from nitsum_opt._version import __version__
from nitsum_opt.evaluate import InfeasiblePlanError, PlanEvaluation, check_plan, evaluate_plan
from nitsum_opt.formulation import build_formulation
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
from nitsum_opt.planners import (
    GreedyPlanner,
    MilpPlanner,
    PinnedPlanner,
    Planner,
    StabilizedPlanner,
    StabilizerSettings,
    make_planner,
)
from nitsum_opt.spec import (
    SHARED_TIER,
    ClusterSpec,
    CurrentPlan,
    InstanceCount,
    ObjectiveSettings,
    PlanningInput,
    Tier,
    TierDemand,
)

__all__ = [
    "SHARED_TIER",
    "CapacityTable",
    "ClusterSpec",
    "CurrentPlan",
    "GreedyPlanner",
    "InfeasiblePlanError",
    "Instance",
    "InstanceCount",
    "LengthBucket",
    "LengthMix",
    "MilpPlanner",
    "ModelSpec",
    "ObjectiveSettings",
    "PinnedPlanner",
    "Plan",
    "PlanEvaluation",
    "PlanStatus",
    "Planner",
    "PlanningInput",
    "Provenance",
    "Role",
    "ServingConfig",
    "SloTarget",
    "StabilizedPlanner",
    "StabilizerSettings",
    "Tier",
    "TierAllocation",
    "TierDemand",
    "__version__",
    "all_configs",
    "build_formulation",
    "check_plan",
    "evaluate_plan",
    "make_planner",
    "model_preset",
]
