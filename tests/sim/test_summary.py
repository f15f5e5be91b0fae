"""Known-answer checks of the sweep's target judgement (nitsum_opt.sim.summary), on hand-made levels."""

from __future__ import annotations

import pytest

from nitsum_opt.sim.metrics import RunMetrics
from nitsum_opt.sim.runner import LevelResult, SweepResult, SystemRun
from nitsum_opt.sim.summary import _targets


def _level(load: float, offered: float, systems: dict[str, tuple[float, float]]) -> LevelResult:
    runs = tuple(
        SystemRun.model_construct(metrics=RunMetrics.model_construct(system=s, goodput_rps=g, attainment=a))
        for s, (g, a) in systems.items()
    )
    return LevelResult.model_construct(load_scale=load, offered_rps=offered, runs=runs)


def test_targets_with_their_ceilings() -> None:
    """The oracle breaks at x12 with 84 req/s of 100 offered: no system can exceed 100 / 84 = 1.19x there, so
    the 1.3x target is unreachable and the note says so; at x24 the best vllm-static serves 10 of 200."""
    levels = (
        _level(10, 90.0, {"nitsum": (85.0, 0.94), "oracle-static": (86.0, 0.95), "vllm-static-tp1": (80.0, 0.9)}),
        _level(12, 100.0, {"nitsum": (90.0, 0.9), "oracle-static": (84.0, 0.84), "vllm-static-tp1": (60.0, 0.6)}),
        _level(24, 200.0, {"nitsum": (100.0, 0.5), "oracle-static": (110.0, 0.55), "vllm-static-tp1": (10.0, 0.05)}),
    )
    first, second = _targets(SweepResult.model_construct(levels=levels))
    assert first.load_scale == 12 and first.ratio == pytest.approx(90 / 84) and first.met is False
    assert first.ceiling == pytest.approx(100 / 84) and "no system can exceed 1.19x" in first.note
    assert second.load_scale == 24 and second.ratio == pytest.approx(10.0) and second.met is True
    assert second.ceiling == pytest.approx(20.0) and second.ceiling >= second.ratio


def test_no_break_load_gives_no_ratio_and_no_ceiling() -> None:
    levels = (_level(4, 40.0, {"nitsum": (40.0, 1.0), "oracle-static": (40.0, 1.0)}),)
    first, second = _targets(SweepResult.model_construct(levels=levels))
    assert (first.ratio, first.ceiling, first.met) == (None, None, None)
    assert (second.ratio, second.ceiling, second.met) == (None, None, None)
