"""diff_plans: ordered typed actions from two plans; untouched instances get none."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from nitsum_opt.models.spec import Role
from nitsum_opt.plan import Instance
from nitsum_opt.spec import SHARED_TIER
from nitsum_runtime.scenarios import pinned_plan
from nitsum_runtime.transitions import Action, MoveRequests, Route, diff_plans


def kinds(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.kind, a.instance_id) for a in actions]


def test_start_from_nothing_wakes_fills_routes_resumes() -> None:
    acts = diff_plans(None, pinned_plan([(0,)]))
    assert kinds(acts) == [(k, "chat/tp1-colocated/0") for k in ("wake", "fill_weights", "route", "resume")]


def test_tp_change_orders_pause_wake_fill_move_route_sleep_resume() -> None:
    acts = diff_plans(pinned_plan([(0,)]), pinned_plan([(0, 1)]))
    assert [a.kind for a in acts] == [
        "pause",
        "wake",
        "fill_weights",
        "move_requests",
        "route",
        "sleep",
        "resume",
    ]
    move = acts[3]
    assert isinstance(move, MoveRequests) and move.to_instances == ("chat/tp2-colocated/0",) and move.spread == 1
    assert acts[0].gpu_ids == (0,) and acts[1].gpu_ids == (0, 1)


def test_unchanged_instances_are_untouched() -> None:
    plan = pinned_plan([(0,), (1,), (2, 3)])
    assert diff_plans(plan, plan) == []
    acts = diff_plans(plan, pinned_plan([(0,), (1,), (2,), (3,)]))
    touched = {a.instance_id for a in acts}
    assert "chat/tp1-colocated/0" not in touched and "chat/tp1-colocated/1" not in touched
    move = next(a for a in acts if isinstance(a, MoveRequests))
    assert move.instance_id == "chat/tp2-colocated/2"
    assert move.to_instances[:2] == ("chat/tp1-colocated/2", "chat/tp1-colocated/3") and move.spread == 2


def test_retag_only_reroutes() -> None:
    cur = pinned_plan([(0, 1)], tier="chat")
    tgt = pinned_plan([(0, 1)], tier="batch")
    acts = diff_plans(cur, tgt)
    assert len(acts) == 1 and isinstance(acts[0], Route)
    assert acts[0].tier == "batch" and acts[0].replaces == ("chat/tp2-colocated/0",)


def test_move_prefers_same_tier_and_shared_gpus() -> None:
    cur = pinned_plan([(0, 1)])
    tgt = pinned_plan([(2, 3)]).model_copy(
        update={
            "instances": (
                Instance(instance_id="bg/tp1-decode/0", tier="bg", tp=1, role=Role.DECODE, node=0, gpu_ids=(0,)),
                Instance(
                    instance_id="chat/tp2-colocated/0",
                    tier="chat",
                    tp=2,
                    role=Role.COLOCATED,
                    node=0,
                    gpu_ids=(2, 3),
                ),
            )
        }
    )
    move = next(a for a in diff_plans(cur, tgt) if isinstance(a, MoveRequests))
    assert move.to_instances == ("chat/tp2-colocated/0", "bg/tp1-decode/0") and move.spread == 1


def test_actions_serialise_as_a_discriminated_union() -> None:
    acts = diff_plans(pinned_plan([(0,)]), pinned_plan([(0, 1)]))
    adapter = TypeAdapter(list[Action])
    assert adapter.validate_json(adapter.dump_json(acts)) == acts


def test_invalid_plans_are_refused() -> None:
    overlapping = pinned_plan([(0, 1)]).model_copy(
        update={
            "instances": (
                Instance(instance_id="a", tier="chat", tp=2, role=Role.COLOCATED, node=0, gpu_ids=(0, 1)),
                Instance(instance_id="b", tier="chat", tp=1, role=Role.COLOCATED, node=0, gpu_ids=(1,)),
            )
        }
    )
    with pytest.raises(ValueError, match="GPU 1 is used by both 'a' and 'b'"):
        diff_plans(None, overlapping)
    wrong_tp = pinned_plan([(0, 1)]).model_copy(
        update={"instances": (Instance(instance_id="a", tier="chat", tp=2, role=Role.COLOCATED, node=0, gpu_ids=(0,)),)}
    )
    with pytest.raises(ValueError, match="tp=2 but 1 GPUs"):
        diff_plans(None, wrong_tp)


def test_dedicated_to_shared_on_the_same_gpus_only_reroutes() -> None:
    acts = diff_plans(pinned_plan([(0, 1)], tier="chat"), pinned_plan([(0, 1)], tier=SHARED_TIER))
    assert len(acts) == 1 and isinstance(acts[0], Route)
    assert acts[0].tier == "*" and acts[0].replaces == ("chat/tp2-colocated/0",)


def test_move_counts_a_shared_target_as_serving_the_tier() -> None:
    cur = pinned_plan([(0, 1)], tier="chat")
    bg = pinned_plan([(2,)], tier="bg").instances
    tgt = pinned_plan([(3,)], tier=SHARED_TIER)
    tgt = tgt.model_copy(update={"instances": bg + tgt.instances})
    move = next(a for a in diff_plans(cur, tgt) if isinstance(a, MoveRequests))
    assert move.to_instances == ("*/tp1-colocated/0", "bg/tp1-colocated/0") and move.spread == 1
