"""Switch cost: migration priced from the bytes of the head re-split plan, re-prefill from a prefill model."""

from __future__ import annotations

import pytest

from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_runtime.switch_cost import (
    RooflinePrefillModel,
    instance_switch_cost,
    kv_switch_cost,
    migration_cost,
)

LLAMA = MODEL_PRESETS["llama-3.1-8b"]


def test_migration_bytes_known_answer() -> None:
    # TP1 on GPU 0 -> TP2 on {0, 1}: 4 of 8 KV heads leave GPU 0, 4 are copied locally.
    per_head = 1000 * 32 * 2 * 128 * 2
    seconds, link, local = migration_cost(LLAMA, 1000, 1, 2, link_gb_per_s=400.0, overhead_s=0.0)
    assert (link, local) == (4 * per_head, 4 * per_head)
    assert seconds == pytest.approx(max(4 * per_head / 400e9, 2 * 4 * per_head / 1500e9))
    # TP4 -> TP1 on GPU 0: GPU 0 receives 6 heads from three peers.
    _, link, local = migration_cost(LLAMA, 1000, 4, 1, link_gb_per_s=400.0)
    assert (link, local) == (6 * per_head, 2 * per_head)
    assert migration_cost(LLAMA, 0, 1, 2, 400.0)[0] == 0.0


def test_choice_follows_the_cheaper_price() -> None:
    prefill = RooflinePrefillModel(spec=LLAMA)
    long = kv_switch_cost(LLAMA, 8000, 1, 2, 370.0, prefill)
    assert long.choice == "migrate" and long.migrate_s < long.reprefill_s
    assert long.kv_bytes == 8000 * LLAMA.kv_bytes_per_token
    slow_link = kv_switch_cost(LLAMA, 8000, 1, 2, 0.05, prefill)
    assert slow_link.choice == "reprefill" and slow_link.cost_s == slow_link.reprefill_s
    assert kv_switch_cost(LLAMA, 8000, 1, 2, 370.0, prefill, can_migrate=False).choice == "reprefill"


def test_roofline_prefill_scales_with_tp_and_tokens() -> None:
    m = RooflinePrefillModel(spec=LLAMA, fixed_s=0.0)
    assert m.prefill_s(2000, 2) == pytest.approx(m.prefill_s(2000, 1) / 2)
    assert m.prefill_s(4000, 1) > 2 * m.prefill_s(2000, 1)  # attention is quadratic


def test_bad_bandwidth_is_rejected() -> None:
    with pytest.raises(ValueError, match="bandwidths must be > 0"):
        migration_cost(LLAMA, 10, 1, 2, link_gb_per_s=0.0)


def test_instance_switch_cost_adds_refill_and_batched_migration() -> None:
    prefill = RooflinePrefillModel(spec=LLAMA)
    cost = instance_switch_cost(LLAMA, 1, 2, [4000, 2000], 370.0, prefill, fill_gb_per_s=1000.0, fixed_s=0.01)
    assert cost.fill_s == pytest.approx(LLAMA.weight_bytes / 2 / 1e12)
    assert cost.migrate_s == pytest.approx(migration_cost(LLAMA, 6000, 1, 2, 370.0)[0])
    assert cost.pause_s == pytest.approx(0.01 + cost.fill_s + cost.migrate_s)
    assert [c.choice for c in cost.requests] == ["migrate", "migrate"] and cost.reprefill_s == 0
    idle = instance_switch_cost(LLAMA, 1, 2, [], 370.0, prefill)
    assert idle.migrate_s == 0 and idle.pause_s == pytest.approx(0.02 + idle.fill_s)
