"""The controller interface: what decides the deployment at the start and at every epoch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from nitsum_opt.models.spec import ModelSpec
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.sim.timing import IterationTimeModel, model_tps
from nitsum_opt.spec import ClusterSpec, Tier
from nitsum_opt.workloads.trace import RequestTrace


@dataclass(frozen=True)
class ControlContext:
    """What a controller may know about the system it controls (never the future requests)."""

    cluster: ClusterSpec
    """The GPUs."""
    tiers: tuple[Tier, ...]
    """SLO tiers, in the trace's tier order."""
    model_spec: ModelSpec
    """The served model."""
    model: IterationTimeModel
    """Its iteration-time model (controllers may use it for capacity estimates)."""
    settings: SimSettings
    """Engine and switch-cost settings."""

    @property
    def tps(self) -> tuple[int, ...]:
        """TP degrees an instance may use: those the iteration model covers that fit a node."""
        return tuple(tp for tp in model_tps(self.model) if tp <= self.cluster.gpus_per_node)


class Controller(ABC):
    """Decides deployments. Controllers see only requests that have already arrived."""

    name: str = "controller"
    """Registry name of the system."""
    is_static: bool = False
    """A static controller never changes its deployment (the simulator schedules no epochs for it)."""

    @abstractmethod
    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        """The first deployment. ``warmup`` holds the requests of the first epoch: the operator's prior about
        the demand (a controller that adapts uses it as its first observation)."""

    def on_epoch(self, ctx: ControlContext, now_s: float, window: RequestTrace) -> Deployment | None:
        """A new deployment at ``now_s`` given the requests that arrived in the last epoch (``window``), or
        ``None`` to keep the current one."""
        return None


class StaticController(Controller):
    """Always the same deployment."""

    is_static = True

    def __init__(self, name: str, deployment: Deployment) -> None:
        self.name = name
        self.deployment = deployment

    def start(self, ctx: ControlContext, warmup: RequestTrace) -> Deployment:
        return self.deployment
