"""Canonical instances with hand-derived optima; also the inputs of the golden LP files."""

from __future__ import annotations

from planning_factories import make_input


def single_tier_tp_choice():
    """4 GPUs, λ=10: 2×tp2 (cap 10) beats tp4 (9) and 4×tp1 (8). Optimum 10 − 0.01·4 = 9.96."""
    return make_input(
        {"chat": {"tp1-colocated": 2, "tp2-colocated": 5, "tp4-colocated": 9}},
        {"chat": 10},
        gpus_per_node=4,
        gpu_cost=0.01,
    )


def prefill_decode_split():
    """8 GPUs, λ=100: y = min(6p, 4d) + 3k with 2p + 2d + 4k <= 8; best p=2, d=2 -> 8. Optimum 8 − 0.001·8."""
    return make_input(
        {"chat": {"tp2-prefill": 6, "tp2-decode": 4, "tp4-colocated": 3}},
        {"chat": 100},
        gpu_cost=0.001,
    )


def churn(switch_cost_s: float):
    """single_tier_tp_choice with tp4 running. β = 2.5 (best per-GPU rate) · σ/60 per GPU changed.
    σ=6: keep tp4 (8.96); σ=0.6: switch to 2×tp2 (10 − 0.04 − 8 GPUs · 0.025 = 9.76)."""
    return make_input(
        {"chat": {"tp1-colocated": 2, "tp2-colocated": 5, "tp4-colocated": 9}},
        {"chat": 10},
        gpus_per_node=4,
        gpu_cost=0.01,
        switch_cost_s=switch_cost_s,
        plan_horizon_s=60.0,
        current={("chat", "tp4-colocated"): 1},
    )


def weighted_tiers(min_admission_b: float = 0.0):
    """4 GPUs of tp1 (R_A=1, R_B=2), w_A=3, w_B=1, λ_A=4, λ_B=10: all to A -> 12; with m_B=0.2 -> 3·3 + 2 = 11."""
    return make_input(
        {"a": {"tp1-colocated": 1}, "b": {"tp1-colocated": 2}},
        {"a": 4, "b": 10},
        gpus_per_node=4,
        weights={"a": 3, "b": 1},
        min_admission={"b": min_admission_b},
    )


def odd_nodes():
    """2 nodes × 6 GPUs: at most one tp4 per node, so 2×tp4 + 4×tp1 = 28 (not 3×tp4 = 30)."""
    return make_input(
        {"chat": {"tp1-colocated": 2, "tp4-colocated": 10}},
        {"chat": 100},
        nodes=2,
        gpus_per_node=6,
    )


def pooled_fractions(demand_rps: float = 15.0, shared_rate: float | None = None):
    """4 GPUs of tp1 (R=10 for both tiers), λ_a = λ_b = 15, ε = 0.5: each tier needs 1.5 instances.
    Dedicated: 2 + 2 instances serve 30 for 4 GPUs (28). Shared: one instance each + one shared instance split
    5/5 serve 30 for 3 GPUs (28.5; all-shared ties, and the planner keeps what it can dedicated). With
    ``shared_rate`` = 5 (sharing halves each tier's rate) the shared instance serves only 5: dedicated wins
    again. ``demand_rps=10``: whole instances, nothing to pool."""
    rates = {"a": {"tp1-colocated": 10}, "b": {"tp1-colocated": 10}}
    return make_input(
        rates,
        {"a": demand_rps, "b": demand_rps},
        gpus_per_node=4,
        gpu_cost=0.5,
        shared_rates=None if shared_rate is None else {t: dict.fromkeys(row, shared_rate) for t, row in rates.items()},
    )


GOLDEN = {
    "pooled_fractions": pooled_fractions,
    "prefill_decode_split": prefill_decode_split,
    "churn_keep": lambda: churn(6.0),
    "odd_nodes": odd_nodes,
}
