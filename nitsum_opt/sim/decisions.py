"""Did a controller decide at runtime what it decides in the simulator?

The runtime's control loop (:class:`nitsum_runtime.adaptive.AdaptiveServer`) records one
:class:`~nitsum_runtime.adaptive.EpochRecord` per decision (as a dict in ``meta.json``: ``at_s``, ``deployment``,
``admitted_rps``, ``action``); the simulator records one ``(time, Deployment)`` per decision in
:attr:`~nitsum_opt.sim.results.SimResult.timeline`. They pair up in order. The times match exactly except for a
transition that adds engines and is prepared ahead (``SwitchCosts.prepare_ahead``): the simulator applies it when
the new engines are ready, ``switch_s`` after the decision, and records that time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from nitsum_opt.sim.deployment import Deployment


def decision_mismatches(
    epochs: Sequence[Mapping[str, object]],
    timeline: Sequence[tuple[float, Deployment]],
    switch_s: float,
    rel_tol: float = 1e-9,
) -> list[str]:
    """Every way the runtime's decisions ``epochs`` differ from the simulator's ``timeline`` (empty: the same
    decisions): a different count, or at some decision a different deployment, admitted rates, or time (the
    simulated time may be ``switch_s`` later for a runtime ``transition``)."""
    problems: list[str] = []
    if len(epochs) != len(timeline):
        problems.append(f"{len(epochs)} runtime decisions, {len(timeline)} simulated")
    for k, (e, (t_s, dep)) in enumerate(zip(epochs, timeline, strict=False)):
        at_s = float(e["at_s"])  # type: ignore[arg-type]
        where = f"decision {k} (t={at_s:g} s)"
        if e["deployment"] != dep.describe():
            problems.append(f"{where}: runtime {e['deployment']!r}, simulator {dep.describe()!r}")
        later = switch_s if e.get("action") == "transition" else 0.0
        if not any(math.isclose(t_s, at_s + d, rel_tol=rel_tol, abs_tol=1e-9) for d in {0.0, later}):
            problems.append(f"{where}: the simulator decided at t={t_s:g} s")
        if not _same_rates(e.get("admitted_rps"), dep.admitted_rps):
            problems.append(f"{where}: admitted runtime {e.get('admitted_rps')}, simulator {dep.admitted_rps}")
    return problems


def _same_rates(runtime: object, simulated: Mapping[str, float] | None) -> bool:
    if runtime is None or simulated is None:
        return runtime is None and simulated is None
    rates = dict(runtime)  # type: ignore[call-overload]
    return set(rates) == set(simulated) and all(
        math.isclose(float(rates[t]), simulated[t], rel_tol=1e-6, abs_tol=1e-9) for t in rates
    )


__all__ = ["decision_mismatches"]
