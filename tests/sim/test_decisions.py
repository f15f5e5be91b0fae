"""Pairing the runtime's decisions with the simulator's (``nitsum_opt.sim.decisions``)."""

from __future__ import annotations

from nitsum_opt.sim.decisions import decision_mismatches
from nitsum_opt.sim.deployment import DeployedInstance, Deployment

TP2 = Deployment(
    instances=(DeployedInstance(tier=None, tp=2, role="colocated", gpu_ids=(0, 1)),), admitted_rps={"a": 3.0}
)
PD = Deployment(
    instances=(
        DeployedInstance(tier="a", tp=1, role="prefill", gpu_ids=(0,)),
        DeployedInstance(tier="a", tp=1, role="decode", gpu_ids=(1,)),
    ),
    admitted_rps={"a": 5.0},
)


def _epoch(at_s: float, dep: Deployment, action: str = "reschedule", **changes: object) -> dict[str, object]:
    epoch = {"at_s": at_s, "deployment": dep.describe(), "admitted_rps": dict(dep.admitted_rps or {}), "action": action}
    return epoch | changes


def test_the_same_decisions_match_also_when_a_prepared_transition_lands_later() -> None:
    epochs = [_epoch(0.0, TP2, "start"), _epoch(15.0, PD, "transition"), _epoch(30.0, PD)]
    assert decision_mismatches(epochs, [(0.0, TP2), (15.26, PD), (30.0, PD)], switch_s=0.26) == []
    assert decision_mismatches(epochs, [(0.0, TP2), (15.0, PD), (30.0, PD)], switch_s=0.26) == []


def test_every_kind_of_difference_is_named() -> None:
    epochs = [_epoch(0.0, TP2, "start"), _epoch(15.0, PD, admitted_rps={"a": 4.0}), _epoch(30.0, PD)]
    problems = decision_mismatches(epochs, [(0.0, PD), (15.26, PD)], switch_s=0.26)
    assert problems[0] == "3 runtime decisions, 2 simulated"
    assert any("decision 0" in p and "runtime '" in p for p in problems)
    assert any("decision 1" in p and "decided at t=15.26 s" in p for p in problems)  # only transitions may land late
    assert any("decision 1" in p and "admitted runtime {'a': 4.0}" in p for p in problems)
