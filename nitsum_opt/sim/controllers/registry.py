"""The systems compared over the simulator, by name.

=====================  ============================================================================================
name                   what it is
=====================  ============================================================================================
``nitsum``             MILP every epoch on forecast demand and length mixes + stabilizer + multi-tier scheduler
``nitsum-greedy``      the same controller with the paper's greedy allocator instead of the MILP
``nitsum-dedicated``   ``nitsum`` without shared instances (every instance dedicated to one tier; an ablation)
``nitsum-shared-pd``   ``nitsum`` whose shared instances may also be prefill or decode instances (opt-in: it wins
                       on 2×H200 at a 9 ms TPOT and loses on the 8-GPU scenarios, ``benchmarks/RESULTS.md``)
``vllm-static-tpN``    ``N`` ∈ {1,2,4,8}: every GPU in colocated TP-``N`` engines, FCFS, no tiers, no admission
``vllm-priority``      the best static TP and step budget (searched) with vLLM's tier-priority scheduling
``distserve``          the best static prefill/decode placement (searched over the whole trace), FCFS, no tiers
``split``              one static FCFS cluster per tier, sized to the tier's mean demand
``oracle-static``      the best static configuration in hindsight (searched over every static family, see
                       :mod:`nitsum_opt.sim.controllers.search`, then refined by local search with the
                       simulator, :mod:`nitsum_opt.sim.controllers.refine`)
=====================  ============================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nitsum_opt.planners import GreedyPlanner, MilpPlanner, StabilizerSettings
from nitsum_opt.sim.controllers.base import Controller, StaticController
from nitsum_opt.sim.controllers.nitsum import NitsumController
from nitsum_opt.sim.controllers.planning import SHARED_PD_ROLES
from nitsum_opt.sim.controllers.refine import refine
from nitsum_opt.sim.controllers.search import (
    StaticEvaluator,
    TieredOrigin,
    distserve_deployments,
    oracle_candidates,
    split_deployment,
    vllm_candidates,
)
from nitsum_opt.sim.controllers.static import vllm_static
from nitsum_opt.sim.timing import model_tps
from nitsum_opt.workloads.forecast import EwmaForecaster, LastWindowForecaster


@dataclass(frozen=True)
class ControllerOptions:
    """Knobs of the adaptive controllers."""

    forecaster: EwmaForecaster | LastWindowForecaster | None = None
    """Demand forecaster (default: EWMA α=0.5 with 10 % headroom)."""
    stabilizer: StabilizerSettings | None = None
    """Stabilizer guardrails (default: the planner library's)."""
    milp_time_limit_s: float = 1.0
    """MILP time limit per epoch."""


@dataclass(frozen=True)
class SystemInfo:
    """One registered system."""

    description: str
    """One line for help texts and reports."""
    make: Callable[[StaticEvaluator, ControllerOptions], Controller]
    """Builds its controller for one trace (static searches run here, with the shared evaluator)."""
    adaptive: bool = False
    """Whether it changes its deployment over time."""


def _nitsum(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    planner = MilpPlanner(time_limit_s=opts.milp_time_limit_s)
    return NitsumController("nitsum", planner, opts.forecaster, opts.stabilizer)


def _nitsum_shared_pd(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    planner = MilpPlanner(time_limit_s=opts.milp_time_limit_s)
    return NitsumController("nitsum-shared-pd", planner, opts.forecaster, opts.stabilizer, shared_roles=SHARED_PD_ROLES)


def _nitsum_dedicated(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    planner = MilpPlanner(time_limit_s=opts.milp_time_limit_s, shared=False)
    return NitsumController("nitsum-dedicated", planner, opts.forecaster, opts.stabilizer)


def _nitsum_greedy(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    return NitsumController("nitsum-greedy", GreedyPlanner(), opts.forecaster, opts.stabilizer)


def _vllm_tp(tp: int) -> Callable[[StaticEvaluator, ControllerOptions], Controller]:
    def make(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
        if tp not in model_tps(ev.model):
            raise ValueError(f"tp={tp} is not covered by the iteration model (it covers tp {model_tps(ev.model)})")
        return StaticController(
            f"vllm-static-tp{tp}", vllm_static(ev.cluster, tp, False, ev.settings.engine.max_num_seqs)
        )

    return make


def _vllm_priority(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    best, _ = ev.best(vllm_candidates(ev, priority=True, tuned=True))
    return StaticController("vllm-priority", best)


def _distserve(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    best, _ = ev.best(distserve_deployments(ev))
    return StaticController("distserve", best)


def _split(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    return StaticController("split", split_deployment(ev))


def _oracle(ev: StaticEvaluator, opts: ControllerOptions) -> Controller:
    origins: dict[str, TieredOrigin] = {}
    best, _ = ev.best(oracle_candidates(ev, origins))
    return StaticController("oracle-static", refine(ev, best, origins))


SYSTEMS: dict[str, SystemInfo] = {
    "nitsum": SystemInfo("MILP every epoch + stabilizer + multi-tier scheduler", _nitsum, adaptive=True),
    "nitsum-greedy": SystemInfo("the paper's greedy allocator every epoch + stabilizer", _nitsum_greedy, adaptive=True),
    "nitsum-dedicated": SystemInfo(
        "nitsum with dedicated instances only (no shared pool; ablation)", _nitsum_dedicated, adaptive=True
    ),
    "nitsum-shared-pd": SystemInfo(
        "nitsum whose shared instances may also be prefill/decode (opt-in)", _nitsum_shared_pd, adaptive=True
    ),
    **{
        f"vllm-static-tp{tp}": SystemInfo(f"colocated TP-{tp} engines on every GPU, FCFS, no tiers", _vllm_tp(tp))
        for tp in (1, 2, 4, 8)
    },
    "vllm-priority": SystemInfo("best static TP with tier-priority scheduling", _vllm_priority),
    "distserve": SystemInfo("best static prefill/decode placement (hindsight search)", _distserve),
    "split": SystemInfo("one static FCFS cluster per tier sized to its mean demand", _split),
    "oracle-static": SystemInfo("best static configuration in hindsight (search over every family)", _oracle),
}
"""Every system by name."""

OPT_IN_SYSTEMS = ("nitsum-dedicated", "nitsum-shared-pd")
"""Registered systems a scenario runs only when it names them (an ablation and an opt-in variant)."""

DEFAULT_SYSTEMS: tuple[str, ...] = tuple(name for name in SYSTEMS if name not in OPT_IN_SYSTEMS)
"""The systems a scenario runs when it names none."""


def system_info(name: str) -> SystemInfo:
    """The registered system ``name``; the error lists every valid name."""
    try:
        return SYSTEMS[name]
    except KeyError:
        raise KeyError(f"unknown system {name!r}; valid systems: {', '.join(SYSTEMS)}") from None


def make_controller(name: str, ev: StaticEvaluator, opts: ControllerOptions | None = None) -> Controller:
    """The controller of system ``name`` for the evaluator's trace and cluster."""
    return system_info(name).make(ev, opts or ControllerOptions())
