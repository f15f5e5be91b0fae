"""The engine pool of one node: one pre-started engine per candidate TP group, idle ones asleep, a routing table from
plan instances to engines, and a ledger that proves no request is lost or duplicated.

Candidate groups are the aligned groups the planner may use: on 4 GPUs, TP1 on each GPU, TP2 on {0,1} and {2,3}, TP4
on all (:func:`candidate_groups`). Requests are submitted per tier and go to the least-loaded live instance of that
tier or of a shared instance (tier ``"*"``, which serves every tier); every generated token passes through
:meth:`EnginePool.step`, which checks that each request's tokens arrive exactly once and in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import Field

from nitsum_opt.models.spec import Frozen
from nitsum_opt.spec import SHARED_TIER
from nitsum_runtime.engine import Engine, EngineState, GenerationRequest, TokenEvent


def candidate_groups(num_gpus: int, tps: Iterable[int] = (1, 2, 4, 8)) -> tuple[tuple[int, ...], ...]:
    """Aligned TP groups of ``num_gpus`` node-local GPUs: ``tp`` consecutive ids starting at a multiple of
    ``tp``, for every ``tp`` that fits."""
    return tuple(tuple(range(s, s + tp)) for tp in tps if tp <= num_gpus for s in range(0, num_gpus - tp + 1, tp))


class LedgerError(AssertionError):
    """A token arrived twice, out of order, after its request finished, or for an unknown request."""


class RequestRecord(Frozen):
    """Outcome of one request, for reports."""

    request_id: str
    """Request id."""
    tier: str
    """Tier it was submitted to."""
    tokens: tuple[int, ...]
    """Generated tokens."""
    finished: bool
    """Whether its last token arrived."""
    engines: tuple[str, ...] = Field(default=())
    """Engines that produced its tokens, in order (a change = a migration or re-prefill)."""


class EnginePool:
    """Engines of one node keyed by their GPU group; GPU ids in plans are global
    (``node * gpus_per_node + local``)."""

    def __init__(self, engines: Sequence[Engine], node: int = 0, gpus_per_node: int | None = None) -> None:
        self.node = node
        self.gpus_per_node = gpus_per_node or max((max(e.gpu_ids) for e in engines), default=-1) + 1
        self.engines: dict[tuple[int, ...], Engine] = {}
        for e in engines:
            if e.gpu_ids in self.engines:
                raise ValueError(f"two engines on GPUs {e.gpu_ids}: {self.engines[e.gpu_ids].engine_id}, {e.engine_id}")
            self.engines[e.gpu_ids] = e
        self.routes: dict[str, Engine] = {}
        self.route_tiers: dict[str, str] = {}
        self.owner: dict[str, str] = {}
        self.requests: dict[str, GenerationRequest] = {}
        self.tier_of: dict[str, str] = {}
        self.outputs: dict[str, list[TokenEvent]] = {}
        self.finished: set[str] = set()

    def engine(self, gpu_ids: Sequence[int], node: int | None = None) -> Engine:
        """The engine on global GPUs ``gpu_ids``; the error lists the pool's groups."""
        if node is not None and node != self.node:
            raise KeyError(f"instance on node {node}, this pool drives node {self.node}")
        local = tuple(g - self.node * self.gpus_per_node for g in gpu_ids)
        try:
            return self.engines[local]
        except KeyError:
            raise KeyError(
                f"no engine on GPUs {tuple(gpu_ids)} of node {self.node}; the pool has "
                f"{sorted(self.engines, key=lambda g: (len(g), g))}"
            ) from None

    # routing ---------------------------------------------------------------------------------------------
    def route(self, instance_id: str, engine: Engine, tier: str) -> None:
        """Send ``tier`` traffic to ``engine`` under ``instance_id`` (``"*"``: every tier's traffic)."""
        self.routes[instance_id] = engine
        self.route_tiers[instance_id] = tier

    def unroute(self, instance_id: str) -> None:
        """Remove an instance from the routing table (its requests must have moved)."""
        self.routes.pop(instance_id, None)
        self.route_tiers.pop(instance_id, None)

    def requests_of(self, instance_id: str) -> tuple[str, ...]:
        """Unfinished requests owned by an instance."""
        return tuple(r for r, i in self.owner.items() if i == instance_id)

    def submit(self, tier: str, request: GenerationRequest) -> str:
        """Give ``request`` to the least-loaded live instance that serves ``tier`` (its own or a shared one; its
        own first when equally loaded); returns that instance's id."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} was already submitted")
        live = sorted(i for i, t in self.route_tiers.items() if t in (tier, SHARED_TIER))
        if not live:
            raise KeyError(f"no live instance serves tier {tier!r} (routes: {self.route_tiers})")
        inst = min(live, key=lambda i: (len(self.requests_of(i)), self.route_tiers[i] == SHARED_TIER, i))
        self.place(tier, request, inst)
        return inst

    def place(self, tier: str, request: GenerationRequest, instance_id: str) -> None:
        """Give ``request`` (of ``tier``) to the routed instance ``instance_id`` (a scheduler's choice) and open
        its ledger entry."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} was already submitted")
        engine = self.routes.get(instance_id)
        if engine is None:
            raise KeyError(f"instance {instance_id!r} is not routed; routed: {sorted(self.routes)}")
        engine.add_request(request)
        self.requests[request.request_id] = request
        self.tier_of[request.request_id] = tier
        self.owner[request.request_id] = instance_id
        self.outputs[request.request_id] = []

    def sleep_all(self) -> None:
        """Drop every request and put every engine to sleep (teardown); routes are cleared."""
        for engine in self.engines.values():
            engine.drop_requests(engine.request_ids())
            if engine.state is not EngineState.ASLEEP:
                engine.sleep()
        self.routes.clear()
        self.route_tiers.clear()
        self.owner.clear()

    # serving ---------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One iteration of every awake routed engine; every token is checked against the ledger."""
        events: list[TokenEvent] = []
        for engine in {id(e): e for e in self.routes.values()}.values():
            if engine.state is EngineState.AWAKE:
                events += engine.step()
        for ev in events:
            self.record(ev)
        return events

    def record(self, ev: TokenEvent) -> None:
        """Check ``ev`` against the ledger and keep it (a serving loop that steps engines itself calls this for
        every token; :class:`LedgerError` on a lost, duplicated or late token)."""
        out = self.outputs.get(ev.request_id)
        if out is None:
            raise LedgerError(f"token for unknown request {ev.request_id!r} from {ev.engine_id}")
        if ev.request_id in self.finished:
            raise LedgerError(f"token {ev.index} of {ev.request_id!r} after it finished (from {ev.engine_id})")
        if ev.index != len(out):
            raise LedgerError(
                f"request {ev.request_id!r}: token index {ev.index} from {ev.engine_id}, "
                f"expected {len(out)} (duplicated or lost token)"
            )
        out.append(ev)
        if ev.finished:
            if len(out) != self.requests[ev.request_id].max_tokens:
                raise LedgerError(
                    f"request {ev.request_id!r} finished after {len(out)} tokens, asked "
                    f"{self.requests[ev.request_id].max_tokens}"
                )
            self.finished.add(ev.request_id)
            self.owner.pop(ev.request_id, None)

    def unfinished(self) -> tuple[str, ...]:
        """Submitted requests not finished yet."""
        return tuple(r for r in self.requests if r not in self.finished)

    def records(self) -> list[RequestRecord]:
        """Per-request outcome."""
        out = []
        for rid, evs in self.outputs.items():
            engines: list[str] = []
            for e in evs:
                if not engines or engines[-1] != e.engine_id:
                    engines.append(e.engine_id)
            out.append(
                RequestRecord(
                    request_id=rid,
                    tier=self.tier_of[rid],
                    tokens=tuple(e.token_id for e in evs),
                    finished=rid in self.finished,
                    engines=tuple(engines),
                )
            )
        return out
