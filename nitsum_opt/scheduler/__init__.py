"""The multi-tier request scheduler: a policy module shared by the simulator and the runtime.

Pure logic (no simulator or engine types): per-tier admission at the plan's admitted rate, feasible /
best-effort / background classes, SLO-safe capacity per instance, least-loaded routing within a tier,
best-effort spill-over and a central queue. See :mod:`nitsum_opt.scheduler.policy`.
"""

from nitsum_opt.scheduler.policy import MultiTierScheduler, TokenBucket
from nitsum_opt.scheduler.types import RequestClass, SchedulerConfig, SchedulerInstance, TierPolicy

__all__ = [
    "MultiTierScheduler",
    "RequestClass",
    "SchedulerConfig",
    "SchedulerInstance",
    "TierPolicy",
    "TokenBucket",
]
