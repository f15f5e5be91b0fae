"""From one plan to the next: the ordered, typed actions that carry out the change (a pure function).

Instances are matched by their engine, i.e. ``(node, gpu_ids, tp)``. One present in both plans with the same tier
and role is untouched (no action, or only a :class:`Route` when its id changed); with another tier or role its
engine keeps running and only its routing changes. A shared instance (tier ``"*"``) is an instance whose route
covers every tier: turning a dedicated instance into a shared one (or back) is a re-route. Every other current
instance is *removed* and every other target instance *added*. The order makes the change safe to undo until the
commit point:

1. :class:`Pause` every removed instance (requests and KV kept);
2. :class:`Wake` and 3. :class:`FillWeights` every added instance (from the resident copy on its GPUs);
4. :class:`MoveRequests` of every removed instance to target instances (migrate or re-prefill, priced per
   request by :mod:`nitsum_runtime.switch_cost` when executed): sources keep their copies;
5. :class:`Route` every added or re-tagged instance: the commit point;
6. :class:`Sleep` every removed instance (its moved requests dropped there);
7. :class:`Resume` every added instance.

A failure in steps 1-4 is rolled back to the current plan with no request lost (the executor's job).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field

from nitsum_opt.models.spec import Frozen, Role
from nitsum_opt.plan import Instance, Plan
from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.spec import SHARED_TIER


class _ActionBase(Frozen):
    instance_id: str
    """Instance acted on."""
    node: int = Field(ge=0)
    """Node of its engine."""
    gpu_ids: tuple[int, ...]
    """Global GPU ids of its engine (TP rank order)."""


class Pause(_ActionBase):
    """Stop a source instance from stepping; its requests and KV stay."""

    kind: Literal["pause"] = "pause"


class Wake(_ActionBase):
    """Allocate an added instance's engine (it stays paused until :class:`Resume`)."""

    kind: Literal["wake"] = "wake"


class FillWeights(_ActionBase):
    """Copy each rank's shard from the resident weight copy on its GPU."""

    kind: Literal["fill_weights"] = "fill_weights"


class MoveRequests(_ActionBase):
    """Hand a removed instance's requests to target instances (KV migrated or re-prefilled per request)."""

    kind: Literal["move_requests"] = "move_requests"
    to_instances: tuple[str, ...]
    """Target instances by preference: same node first, then one that serves the source's tier (its own, or a
    shared instance, which serves every tier), then most GPUs in common."""
    spread: int = Field(ge=0)
    """The first ``spread`` targets (equally preferred) share the requests round-robin."""


class Route(_ActionBase):
    """Make an instance live for its tier (new requests go to it); the commit point of a transition."""

    kind: Literal["route"] = "route"
    tier: str
    """Tier it serves (``"*"``: every tier, a shared instance)."""
    role: Role
    """Role it serves."""
    replaces: tuple[str, ...] = ()
    """Ids that leave the routing table because this instance takes their engine (re-tag or rename)."""


class Sleep(_ActionBase):
    """Release a removed instance's engine (weights and KV) after its requests moved."""

    kind: Literal["sleep"] = "sleep"


class Resume(_ActionBase):
    """Let an added instance step."""

    kind: Literal["resume"] = "resume"


Action = Annotated[Pause | Wake | FillWeights | MoveRequests | Route | Sleep | Resume, Field(discriminator="kind")]
"""Any transition action (pydantic discriminated union on ``kind``)."""

#: Action kinds before the commit point: a failure there is rolled back.
PREPARE_KINDS = frozenset({"pause", "wake", "fill_weights", "move_requests"})


def _key(inst: Instance) -> tuple[int, tuple[int, ...], int]:
    return (inst.node, inst.gpu_ids, inst.tp)


Layout = Plan | Sequence[Instance]
"""What runs on a node: a plan, or just its instances (e.g. a simulator deployment's, :func:`layout_of`)."""


def instances_of(layout: Layout) -> tuple[Instance, ...]:
    """The instances of ``layout``."""
    return tuple(layout.instances) if isinstance(layout, Plan) else tuple(layout)


def layout_of(deployment: Deployment, gpus_per_node: int) -> tuple[Instance, ...]:
    """A deployment's instances as plan instances, identified by their engine key
    (:attr:`~nitsum_opt.sim.deployment.DeployedInstance.key`; a role change renames the instance, its engine
    stays); untiered instances become shared ones (tier ``"*"``)."""
    return tuple(
        Instance(
            instance_id=i.key,
            tier=i.tier or SHARED_TIER,
            tp=i.tp,
            role=i.role,
            node=i.gpu_ids[0] // gpus_per_node,
            gpu_ids=i.gpu_ids,
        )
        for i in deployment.instances
    )


def _check(layout: Layout, name: str) -> None:
    seen: dict[int, str] = {}
    for inst in instances_of(layout):
        if len(inst.gpu_ids) != inst.tp:
            raise ValueError(
                f"{name} plan: instance {inst.instance_id!r} has tp={inst.tp} but "
                f"{len(inst.gpu_ids)} GPUs {inst.gpu_ids}"
            )
        for g in inst.gpu_ids:
            if g in seen:
                raise ValueError(f"{name} plan: GPU {g} is used by both {seen[g]!r} and {inst.instance_id!r}")
            seen[g] = inst.instance_id


def _preference(src: Instance, targets: Sequence[Instance]) -> tuple[tuple[str, ...], int]:
    def rank(t: Instance) -> tuple[int, int, int, tuple[int, ...]]:
        shared = len(set(t.gpu_ids) & set(src.gpu_ids))
        return (t.node != src.node, t.tier not in (src.tier, SHARED_TIER), -shared, t.gpu_ids)

    ordered = sorted(targets, key=rank)
    if not ordered:
        return (), 0
    best = rank(ordered[0])[:3]
    return tuple(t.instance_id for t in ordered), sum(1 for t in ordered if rank(t)[:3] == best)


def diff_plans(current: Layout | None, target: Layout) -> list[Action]:
    """Ordered actions that turn ``current`` (None: nothing running) into ``target``."""
    _check(target, "target")
    cur_insts = instances_of(current) if current is not None else ()
    if current is not None:
        _check(current, "current")
    cur = {_key(i): i for i in cur_insts}
    target_insts = instances_of(target)
    tgt = {_key(i): i for i in target_insts}
    removed = [i for k, i in cur.items() if k not in tgt]
    added = [i for k, i in tgt.items() if k not in cur]
    routes: list[Action] = []
    for k, t in tgt.items():
        c = cur.get(k)
        if c is None:
            routes.append(_route(t, ()))
        elif (c.tier, c.role, c.instance_id) != (t.tier, t.role, t.instance_id):
            routes.append(_route(t, (c.instance_id,) if c.instance_id != t.instance_id else ()))
    actions: list[Action] = []
    actions += [Pause(**_base(i)) for i in removed]
    actions += [Wake(**_base(i)) for i in added]
    actions += [FillWeights(**_base(i)) for i in added]
    for i in removed:
        to, spread = _preference(i, target_insts)
        actions.append(MoveRequests(**_base(i), to_instances=to, spread=spread))
    actions += sorted(routes, key=lambda r: not r.replaces)  # renames first: a new instance may reuse an old id
    actions += [Sleep(**_base(i)) for i in removed]
    actions += [Resume(**_base(i)) for i in added]
    return actions


def _base(inst: Instance) -> dict[str, object]:
    return {"instance_id": inst.instance_id, "node": inst.node, "gpu_ids": inst.gpu_ids}


def _route(inst: Instance, replaces: tuple[str, ...]) -> Route:
    return Route(**_base(inst), tier=inst.tier, role=inst.role, replaces=replaces)  # type: ignore[arg-type]
