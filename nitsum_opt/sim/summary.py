"""What a sweep shows: max load at ≥ 90 % attainment per system, Nitsum vs the strongest other system per load,
and the issue's targets (≥ 1.3× ``oracle-static`` where it falls below 90 % attainment, ≥ 3× the best
``vllm-static-tpN`` at twice that load)."""

from __future__ import annotations

from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.sim.metrics import max_load_at, ratio
from nitsum_opt.sim.runner import LevelResult, SweepResult

ATTAINMENT_TARGET = 0.9
"""Attainment that defines 'serving the load' (share of all requests meeting their tier's SLO)."""
ORACLE_TARGET = 1.3
"""Required Nitsum / oracle-static goodput where oracle-static falls below the attainment target."""
VLLM_TARGET = 3.0
"""Required Nitsum / best vllm-static goodput at twice that load."""
VLLM_STATIC = ("vllm-static-tp1", "vllm-static-tp2", "vllm-static-tp4", "vllm-static-tp8")


class SystemSummary(Frozen):
    """One system over the sweep."""

    system: str
    """System name."""
    max_load_scale: float | None
    """Highest load scale with attainment ≥ the target (interpolated between sweep points; ``None``: not even the
    lowest)."""
    max_offered_rps: float | None
    """The same as offered requests/s."""
    peak_goodput_rps: float = Field(ge=0)
    """Highest goodput over the sweep."""


class LevelComparison(Frozen):
    """Nitsum against the strongest other system at one load level."""

    load_scale: float
    """Load scale."""
    offered_rps: float
    """Offered requests/s."""
    nitsum_goodput_rps: float | None
    """Nitsum's goodput (``None`` when it was not run)."""
    strongest_other: str | None
    """The other system with the highest goodput."""
    strongest_other_goodput_rps: float | None
    """Its goodput."""
    ratio: float | None
    """Nitsum / strongest other."""


class TargetCheck(Frozen):
    """One of the issue's targets."""

    name: str
    """What is compared."""
    load_scale: float | None
    """Load scale it is judged at (``None`` when the sweep never reaches it)."""
    ratio: float | None
    """Measured goodput ratio."""
    target: float
    """Required ratio."""
    met: bool | None
    """Whether the ratio reaches the target (``None``: not measurable on this sweep)."""
    ceiling: float | None = None
    """The largest ratio any system could reach there: offered req/s over the reference system's goodput (a
    system serving every request within its SLO). A target above it cannot be met on this sweep."""
    note: str = ""
    """How it was judged, or why it could not be."""


class SweepSummary(Frozen):
    """The headline numbers of a sweep."""

    systems: tuple[SystemSummary, ...]
    """Per system."""
    levels: tuple[LevelComparison, ...]
    """Per load level."""
    targets: tuple[TargetCheck, ...]
    """The issue's targets."""


def _goodput(level: LevelResult, system: str) -> float | None:
    run = level.run(system)
    return None if run is None else run.metrics.goodput_rps


def _attainment(level: LevelResult, system: str) -> float | None:
    run = level.run(system)
    return None if run is None else run.metrics.attainment


def break_load(sweep: SweepResult, system: str) -> float | None:
    """First sweep load where ``system``'s attainment is below the target (``None``: never, or not run)."""
    for level in sweep.levels:
        att = _attainment(level, system)
        if att is not None and att < ATTAINMENT_TARGET:
            return level.load_scale
    return None


def _level_at(sweep: SweepResult, load: float) -> LevelResult | None:
    return next((lvl for lvl in sweep.levels if abs(lvl.load_scale - load) <= 1e-9 * max(1.0, load)), None)


def _targets(sweep: SweepResult) -> tuple[TargetCheck, ...]:
    out = []
    brk = break_load(sweep, "oracle-static")
    level = None if brk is None else _level_at(sweep, brk)
    if level is None or _goodput(level, "nitsum") is None:
        out.append(
            TargetCheck(
                name="nitsum / oracle-static where oracle-static < 90 % attainment",
                load_scale=brk,
                ratio=None,
                target=ORACLE_TARGET,
                met=None,
                note="oracle-static never fell below 90 % attainment on this sweep (or a system was not run); "
                "extend load_scales",
            )
        )
    else:
        r = ratio(_goodput(level, "nitsum") or 0.0, _goodput(level, "oracle-static") or 0.0)
        ceiling = ratio(level.offered_rps, _goodput(level, "oracle-static") or 0.0)
        out.append(
            TargetCheck(
                name="nitsum / oracle-static where oracle-static < 90 % attainment",
                load_scale=brk,
                ratio=r,
                target=ORACLE_TARGET,
                met=r >= ORACLE_TARGET,
                ceiling=ceiling,
                note=f"first sweep load with oracle-static attainment {_attainment(level, 'oracle-static'):.1%}"
                + (f"; no system can exceed {ceiling:.2f}x there" if ceiling < ORACLE_TARGET else ""),
            )
        )
    double = None if brk is None else _level_at(sweep, 2 * brk)
    present = [] if double is None else [s for s in VLLM_STATIC if double.run(s) is not None]
    if double is None or not present or double.run("nitsum") is None:
        out.append(
            TargetCheck(
                name="nitsum / best vllm-static-tpN at twice that load",
                load_scale=None if brk is None else 2 * brk,
                ratio=None,
                target=VLLM_TARGET,
                met=None,
                note="twice the oracle's break load is not in the sweep (nitsum bench goodput adds it)",
            )
        )
    else:
        best = max(present, key=lambda s: _goodput(double, s) or 0.0)
        r = ratio(_goodput(double, "nitsum") or 0.0, _goodput(double, best) or 0.0)
        out.append(
            TargetCheck(
                name="nitsum / best vllm-static-tpN at twice that load",
                load_scale=2 * brk,  # type: ignore[operator]
                ratio=r,
                target=VLLM_TARGET,
                met=r >= VLLM_TARGET,
                ceiling=ratio(double.offered_rps, _goodput(double, best) or 0.0),
                note=f"best vllm-static there: {best}",
            )
        )
    return tuple(out)


def summarize(sweep: SweepResult) -> SweepSummary:
    """Headline numbers of ``sweep``."""
    systems = []
    for name in sweep.scenario.systems:
        points = [(lvl.load_scale, a) for lvl in sweep.levels if (a := _attainment(lvl, name)) is not None]
        if not points:
            continue
        scale = max_load_at(points, ATTAINMENT_TARGET)
        base_rps = sweep.levels[0].offered_rps / sweep.levels[0].load_scale
        systems.append(
            SystemSummary(
                system=name,
                max_load_scale=scale,
                max_offered_rps=None if scale is None else scale * base_rps,
                peak_goodput_rps=max((_goodput(lvl, name) or 0.0) for lvl in sweep.levels),
            )
        )
    levels = []
    for lvl in sweep.levels:
        others = [(r.metrics.system, r.metrics.goodput_rps) for r in lvl.runs if r.metrics.system != "nitsum"]
        best = max(others, key=lambda x: x[1]) if others else None
        mine = _goodput(lvl, "nitsum")
        levels.append(
            LevelComparison(
                load_scale=lvl.load_scale,
                offered_rps=lvl.offered_rps,
                nitsum_goodput_rps=mine,
                strongest_other=None if best is None else best[0],
                strongest_other_goodput_rps=None if best is None else best[1],
                ratio=None if best is None or mine is None else ratio(mine, best[1]),
            )
        )
    return SweepSummary(systems=tuple(systems), levels=tuple(levels), targets=_targets(sweep))
