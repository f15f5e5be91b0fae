"""Planners behind one interface: ``milp`` (exact), ``greedy`` (the paper's allocator), ``pinned`` (fixed),
and the stabilizer that wraps any of them."""

from __future__ import annotations

from typing import Any

from nitsum_opt.planners.base import Planner
from nitsum_opt.planners.greedy import GreedyPlanner
from nitsum_opt.planners.milp import MilpPlanner
from nitsum_opt.planners.pinned import PinnedPlanner
from nitsum_opt.planners.stabilizer import (
    StabilizedPlanner,
    StabilizerDecision,
    StabilizerSettings,
    StabilizerState,
    stabilize,
)

PLANNERS: dict[str, type[Planner]] = {"milp": MilpPlanner, "greedy": GreedyPlanner, "pinned": PinnedPlanner}


def make_planner(name: str, **kwargs: Any) -> Planner:
    """Planner by registry name; an unknown name raises with the list of valid ones."""
    cls = PLANNERS.get(name)
    if cls is None:
        raise ValueError(f"unknown planner {name!r}; valid planners: {sorted(PLANNERS)}")
    return cls(**kwargs)


__all__ = [
    "PLANNERS",
    "GreedyPlanner",
    "MilpPlanner",
    "PinnedPlanner",
    "Planner",
    "StabilizedPlanner",
    "StabilizerDecision",
    "StabilizerSettings",
    "StabilizerState",
    "make_planner",
    "stabilize",
]
