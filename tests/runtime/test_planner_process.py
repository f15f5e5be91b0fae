"""A controller in its own process decides exactly what it decides in this one; failures arrive as clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from nitsum_opt.sim.controllers.base import StaticController
from nitsum_opt.sim.fidelity import slice_control
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import read_slices
from nitsum_opt.workloads.trace import RequestTrace
from nitsum_runtime.planner_process import PlannerError, PlannerProcess

ROOT = Path(__file__).resolve().parents[2]


def _setup():  # type: ignore[no-untyped-def]
    warnings.simplefilter("ignore")
    scenario = Scenario.load(ROOT / "examples/scenarios/llama8b-tight.yaml")
    piece = read_slices(ROOT / "benchmarks/gpu/adaptive/slices.csv")[0]
    return slice_control(scenario, piece, "nitsum", 2, 15.0)


def test_decisions_in_a_planner_process_equal_the_in_process_ones() -> None:
    ctx, here, trace = _setup()
    _, there, _ = _setup()
    with PlannerProcess(there, ctx) as remote:
        assert remote.name == "nitsum" and not remote.is_static
        a, b = here.start(ctx, trace.window(0.0, 15.0)), remote.start(ctx, trace.window(0.0, 15.0))
        assert a == b
        for k in range(1, 6):  # the switch to prefill/decode comes at 60 s
            t = 15.0 * k
            a, b = here.on_epoch(ctx, t, trace.window(t - 15.0, t)), remote.on_epoch(ctx, t, trace.window(t - 15.0, t))
            assert a == b, (t, a, b)
        assert a is not None and "prefill" in a.describe()


def test_a_failing_decision_raises_with_the_childs_traceback() -> None:
    ctx, controller, trace = _setup()
    with PlannerProcess(controller, ctx) as remote:
        remote.start(ctx, trace.window(0.0, 15.0))
        wrong = RequestTrace.from_arrays([1.0], [10], [5], tier_names=("vip",), start_s=0.0, end_s=15.0)
        with pytest.raises(PlannerError, match=r"failed in on_epoch:\n.*Traceback"):
            remote.on_epoch(ctx, 15.0, wrong)
        with pytest.raises(PlannerError, match="failed in on_epoch"):  # the child still answers (its controller
            remote.on_epoch(ctx, 30.0, trace.window(15.0, 30.0))  # kept the bad window: a controller error is final)


def test_a_controller_that_cannot_be_pickled_is_refused() -> None:
    ctx, controller, _ = _setup()
    static = StaticController(
        "pinned", controller.start(ctx, RequestTrace.empty(tier_names=[t.name for t in ctx.tiers]))
    )
    static.hook = lambda: None  # type: ignore[attr-defined]
    with pytest.raises(PlannerError, match="cannot move to a planner process"):
        PlannerProcess(static, ctx)
