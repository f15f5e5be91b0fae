"""The interface every planner implements, and the registry that builds planners by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from nitsum_opt.plan import Plan
from nitsum_opt.spec import PlanningInput


class Planner(ABC):
    """Turns one epoch's :class:`PlanningInput` into a :class:`Plan`. Planners are stateless between calls
    (the running plan travels in the input), so one instance can serve many epochs and threads."""

    name: ClassVar[str]
    """Registry name (``milp``, ``greedy``, ``pinned``)."""

    @abstractmethod
    def plan(self, inp: PlanningInput) -> Plan:
        """The plan for ``inp``. Never raises for an infeasible or slow solve: that is the plan's ``status``."""

    @property
    def label(self) -> str:
        """Name plus settings, recorded in the plan's provenance."""
        return self.name
