"""Small factories for simulator tests: Poisson traces, tiers, static deployments, a one-call runner."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nitsum_opt.models.spec import ModelSpec, Role, model_preset
from nitsum_opt.sim.controllers.base import Controller, StaticController
from nitsum_opt.sim.core import Simulator
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.sim.results import SimResult
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.sim.timing import IterationTimeModel, RooflineIterationModel
from nitsum_opt.spec import ClusterSpec, Tier
from nitsum_opt.workloads.trace import RequestTrace

LLAMA: ModelSpec = model_preset("llama-3.1-8b")
ROOFLINE = RooflineIterationModel(LLAMA)


class SmallCache(RooflineIterationModel):
    """The roofline on a GPU with room for only ``tokens`` of KV cache (forces preemption)."""

    def __init__(self, tokens: int) -> None:
        super().__init__(LLAMA)
        self.tokens = tokens

    def kv_cache_tokens(self, tp: int) -> int:
        return self.tokens


TIERS: tuple[Tier, ...] = (
    Tier(name="chat", ttft_slo_ms=500, tpot_slo_ms=40, weight=2),
    Tier(name="batch", ttft_slo_ms=5000, tpot_slo_ms=150, weight=1),
)


def poisson_trace(
    rate_rps: float,
    duration_s: float,
    seed: int = 0,
    tiers: Sequence[str] = ("chat", "batch"),
    input_range: tuple[int, int] = (100, 2000),
    output_range: tuple[int, int] = (2, 300),
) -> RequestTrace:
    """Poisson arrivals, uniform lengths, tiers drawn uniformly."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate_rps * duration_s)
    arrival = np.sort(rng.uniform(0.0, duration_s, n))
    return RequestTrace.from_arrays(
        arrival,
        rng.integers(*input_range, n),
        rng.integers(*output_range, n),
        tier=rng.integers(0, len(tiers), n),
        tier_names=tuple(tiers),
        start_s=0.0,
        end_s=duration_s,
    )


def colocated(gpus: int, tp: int = 1, tier: str | None = None, **kwargs: object) -> tuple[DeployedInstance, ...]:
    """``gpus // tp`` colocated engines on GPUs 0..gpus-1."""
    return tuple(
        DeployedInstance(tier=tier, tp=tp, role=Role.COLOCATED, gpu_ids=tuple(range(g, g + tp)), **kwargs)  # type: ignore[arg-type]
        for g in range(0, gpus, tp)
    )


def run(
    trace: RequestTrace,
    controller: Controller | Deployment,
    gpus: int = 8,
    model: IterationTimeModel = ROOFLINE,
    settings: SimSettings | None = None,
    tiers: tuple[Tier, ...] = TIERS,
    record_steps: bool = False,
    spec: ModelSpec = LLAMA,
) -> SimResult:
    """Simulate ``trace`` under a controller (or a static deployment)."""
    if isinstance(controller, Deployment):
        controller = StaticController("static", controller)
    cluster = ClusterSpec.with_gpus(gpus)
    sim = Simulator(trace, tiers, model, spec, cluster, controller, settings or SimSettings(), record_steps)
    return sim.run()
