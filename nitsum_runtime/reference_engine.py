"""The reference engine: a real Llama decoder in plain torch behind the :class:`~nitsum_runtime.engine.Engine`
protocol, with paged KV, TP over torch.distributed, continuous batching, greedy decoding and top-k
log-probabilities, sleep/wake and weight refill from the resident store.

This object is the engine's scheduler (it lives in the controller process, like vLLM's engine core): it keeps
the requests, allocates KV blocks and builds each iteration's batch; the rank processes of a
:class:`~nitsum_runtime.ref_cluster.RankCluster` hold the weights and caches and run the forward pass. All the
engines of a node share that cluster (one process per GPU), so KV migrates between them rank to rank.

Scheduling: every unfinished request runs each iteration (decode: one token; a request without cached KV:
its whole prompt, plus the tokens generated so far after a re-prefill) while the iteration's token budget and
the free blocks last; the others wait. No preemption: a request that cannot get blocks waits.

KV placement is canonical: an engine that holds no request (just woken, or idle again) hands out blocks
0, 1, 2, ... in order, so the same requests submitted to an idle engine get the same blocks whatever the
engine served before. Results do not depend on placement, but checks that compare runs bit for bit (the TP1
probes before and after a round trip) then compare runs that differ in nothing at all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from nitsum_runtime.engine import (
    EngineCapacityError,
    EngineError,
    EngineState,
    FillSummary,
    GenerationRequest,
    ImportResult,
    KvDescriptor,
    RequestSnapshot,
    TokenEvent,
)
from nitsum_runtime.kv_migration import token_slots
from nitsum_runtime.ref_cluster import RankCluster
from nitsum_runtime.ref_model import BatchInput, SeqInput, TopK


@dataclass
class _Req:
    request: GenerationRequest
    output: list[int]
    num_computed: int
    blocks: list[int]
    wants_prompt_top: bool

    @property
    def tokens(self) -> list[int]:
        return [*self.request.prompt_token_ids, *self.output]


class ReferenceEngine:
    """One TP group of a :class:`RankCluster`; starts asleep."""

    def __init__(
        self,
        cluster: RankCluster,
        gpu_ids: Sequence[int],
        num_blocks: int,
        max_batch_tokens: int = 4096,
        chunk_bytes: int = 64 << 20,
        engine_id: str | None = None,
    ) -> None:
        self.cluster = cluster
        self._gpu_ids = tuple(gpu_ids)
        self._engine_id = engine_id or f"tp{len(self._gpu_ids)}-g{'-'.join(map(str, self._gpu_ids))}"
        self.num_blocks = num_blocks
        self.block_size = cluster.cfg.block_size
        self.max_batch_tokens = max_batch_tokens
        self.chunk_bytes = chunk_bytes
        self._state = EngineState.ASLEEP
        self._reqs: dict[str, _Req] = {}
        self._free: list[int] = self._all_blocks()

    def _all_blocks(self) -> list[int]:
        """The free list of an idle engine: ``pop()`` hands out block 0 first."""
        return list(range(self.num_blocks - 1, -1, -1))

    @property
    def engine_id(self) -> str:
        return self._engine_id

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def tp(self) -> int:
        return len(self._gpu_ids)

    @property
    def state(self) -> EngineState:
        return self._state

    def __repr__(self) -> str:
        return f"ReferenceEngine({self._engine_id}, {self._state.value}, {len(self._reqs)} requests)"

    # lifecycle ---------------------------------------------------------------------------------------------
    def wake(self) -> None:
        if self._state is EngineState.ASLEEP:
            self.cluster.call(
                self._gpu_ids,
                "wake",
                engine_id=self._engine_id,
                ranks=self._gpu_ids,
                num_blocks=self.num_blocks,
            )
            self._state = EngineState.AWAKE

    def fill_weights(self) -> FillSummary:
        self._need_awake("fill weights")
        t0 = time.perf_counter()
        reports = self.cluster.call(self._gpu_ids, "fill", engine_id=self._engine_id)
        return FillSummary(bytes_copied=sum(r.bytes_copied for r in reports), seconds=time.perf_counter() - t0)

    def sleep(self) -> None:
        if self._reqs:
            raise EngineError(
                f"engine {self._engine_id} still holds requests {sorted(self._reqs)}; "
                "move or drop them before it sleeps"
            )
        self.cluster.call(self._gpu_ids, "sleep", engine_id=self._engine_id)
        self._state = EngineState.ASLEEP

    def pause(self) -> None:
        self._need_awake("pause")
        self._state = EngineState.PAUSED

    def resume(self) -> None:
        self._need_awake("resume")
        self._state = EngineState.AWAKE

    def _need_awake(self, what: str) -> None:
        if self._state is EngineState.ASLEEP:
            raise EngineError(f"cannot {what} engine {self._engine_id}: it is asleep; wake it first")

    # requests ----------------------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        self._need_awake("add a request to")
        if request.request_id in self._reqs:
            raise EngineError(f"request {request.request_id!r} is already on engine {self._engine_id}")
        total = len(request.prompt_token_ids) + request.max_tokens
        if -(-total // self.block_size) > self.num_blocks:
            raise EngineCapacityError(
                f"request {request.request_id!r} needs {total} tokens of KV; engine "
                f"{self._engine_id} has {self.num_blocks * self.block_size}"
            )
        self._reqs[request.request_id] = _Req(request, [], 0, [], request.prompt_logprobs)

    def request_ids(self) -> tuple[str, ...]:
        return tuple(self._reqs)

    def has_unfinished(self) -> bool:
        return bool(self._reqs)

    def _grow(self, req: _Req, tokens: int) -> bool:
        need = -(-tokens // self.block_size) - len(req.blocks)
        if need > len(self._free):
            return False
        req.blocks += [self._free.pop() for _ in range(max(0, need))]
        return True

    def _release(self, req: _Req) -> None:
        self._free += reversed(req.blocks)
        req.blocks = []
        if len(self._free) == self.num_blocks:  # idle again: canonical placement for what comes next
            self._free = self._all_blocks()

    def free_blocks(self) -> tuple[int, ...]:
        """Free KV blocks in the order they will be handed out."""
        return tuple(reversed(self._free))

    def blocks_of(self, request_id: str) -> tuple[int, ...]:
        """KV blocks a request holds now."""
        req = self._reqs.get(request_id)
        if req is None:
            raise EngineError(f"engine {self._engine_id} holds no request {request_id!r}")
        return tuple(req.blocks)

    def check_weights(self) -> dict[int, list[str]]:
        """Compare the engine's parameters with its shard of each rank's resident store, bit for bit; returns
        the mismatched parameter names per rank (empty lists: the refill is exact)."""
        self._need_awake("check the weights of")
        found = self.cluster.call(self._gpu_ids, "check_fill", engine_id=self._engine_id)
        return dict(zip(self._gpu_ids, found, strict=True))

    def step(self) -> list[TokenEvent]:
        if self._state is not EngineState.AWAKE or not self._reqs:
            return []
        seqs, ids, positions, picked = [], [], [], []
        for req in self._reqs.values():
            tokens = req.tokens
            new = tokens[req.num_computed :]
            if (ids and len(ids) + len(new) > self.max_batch_tokens) or not self._grow(req, len(tokens)):
                continue
            first = 0 if req.wants_prompt_top else len(new) - 1
            seqs.append(
                SeqInput(
                    query_start=len(ids),
                    query_len=len(new),
                    context_len=len(tokens),
                    block_ids=tuple(req.blocks),
                    logits_from=first,
                )
            )
            ids += new
            positions += range(req.num_computed, len(tokens))
            picked.append(req)
        if not picked:
            raise EngineCapacityError(f"engine {self._engine_id}: no request fits in the free KV blocks")
        top_k = max([1, *(r.request.top_k for r in picked)])
        batch = BatchInput(token_ids=tuple(ids), positions=tuple(positions), seqs=tuple(seqs), top_k=top_k)
        rows = self.cluster.call(self._gpu_ids, "forward", engine_id=self._engine_id, batch=batch)[0]
        return self._advance(picked, seqs, rows)

    def _advance(self, picked: list[_Req], seqs: list[SeqInput], rows: list[TopK]) -> list[TokenEvent]:
        events, at = [], 0
        for req, seq in zip(picked, seqs, strict=True):
            mine = rows[at : at + seq.query_len - seq.logits_from]
            at += len(mine)
            k = req.request.top_k
            top = TopK(token_ids=mine[-1].token_ids[:k], logprobs=mine[-1].logprobs[:k])
            prompt_top = tuple(TopK(token_ids=r.token_ids[:k], logprobs=r.logprobs[:k]) for r in mine[:-1])
            req.num_computed = len(req.tokens)
            req.output.append(mine[-1].token_ids[0])  # the greedy token, also with top_k=0
            req.wants_prompt_top = False
            done = len(req.output) >= req.request.max_tokens
            events.append(
                TokenEvent(
                    request_id=req.request.request_id,
                    index=len(req.output) - 1,
                    token_id=req.output[-1],
                    top=top,
                    finished=done,
                    engine_id=self._engine_id,
                    prompt_top=prompt_top,
                )
            )
            if done:
                self._release(req)
                del self._reqs[req.request.request_id]
        return events

    # moving requests ---------------------------------------------------------------------------------------
    def export_requests(self, request_ids: Sequence[str]) -> list[RequestSnapshot]:
        out = []
        for rid in request_ids:
            req = self._reqs.get(rid)
            if req is None:
                raise EngineError(f"engine {self._engine_id} holds no request {rid!r}")
            kv = None
            if req.num_computed:
                kv = KvDescriptor(
                    engine_id=self._engine_id,
                    gpu_ids=self._gpu_ids,
                    block_ids=tuple(req.blocks),
                    num_tokens=req.num_computed,
                    block_size=self.block_size,
                )
            out.append(
                RequestSnapshot(
                    request=req.request,
                    output_token_ids=tuple(req.output),
                    num_computed_tokens=req.num_computed,
                    kv=kv,
                )
            )
        return out

    def can_migrate_from(self, source: object) -> bool:
        """KV moves between reference engines of the same rank cluster."""
        return isinstance(source, ReferenceEngine) and source.cluster is self.cluster

    def import_requests(self, snapshots: Sequence[RequestSnapshot], kv_source: object | None) -> ImportResult:
        self._need_awake("import requests into")
        t0 = time.perf_counter()
        if kv_source is not None and not self.can_migrate_from(kv_source):
            raise EngineError(
                f"engine {self._engine_id} cannot pull KV from {kv_source!r} (no shared rank "
                "cluster); import with kv_source=None to re-prefill"
            )
        for s in snapshots:
            if s.request.request_id in self._reqs:
                raise EngineError(f"request {s.request.request_id!r} is already on engine {self._engine_id}")
        added: list[_Req] = []
        src_slots: list[int] = []
        dst_slots: list[int] = []
        try:
            for s in snapshots:
                migrate = kv_source is not None and s.kv is not None
                req = _Req(s.request, list(s.output_token_ids), s.num_computed_tokens if migrate else 0, [], False)
                added.append(req)
                if migrate and s.kv is not None:
                    if s.kv.engine_id != kv_source.engine_id:  # type: ignore[union-attr]
                        raise EngineError(
                            f"snapshot of {s.request.request_id!r} is from {s.kv.engine_id}, not {kv_source.engine_id}"
                        )  # type: ignore[union-attr]
                    if not self._grow(req, s.num_computed_tokens):
                        raise EngineCapacityError(
                            f"engine {self._engine_id} has no free blocks for the KV of "
                            f"{s.request.request_id!r} ({s.num_computed_tokens} tokens)"
                        )
                    src_slots += token_slots(s.kv.block_ids, s.kv.num_tokens, s.kv.block_size)
                    dst_slots += token_slots(req.blocks, s.num_computed_tokens, self.block_size)
            moved = 0
            if src_slots:
                src = kv_source  # a ReferenceEngine (checked above)
                ranks = sorted(set(src.gpu_ids) | set(self._gpu_ids))  # type: ignore[union-attr]
                stats = self.cluster.call(
                    ranks,
                    "migrate",
                    src_engine=src.engine_id,  # type: ignore[union-attr]
                    src_ranks=src.gpu_ids,  # type: ignore[union-attr]
                    dst_engine=self._engine_id,
                    dst_ranks=self._gpu_ids,
                    src_slots=src_slots,
                    dst_slots=dst_slots,
                    chunk_bytes=self.chunk_bytes,
                )
                moved = sum(st.bytes_received + st.bytes_local for st in stats)
        except BaseException:
            for req in added:
                self._release(req)
            raise
        for req in added:
            self._reqs[req.request.request_id] = req
        migrated = sum(1 for r in added if r.num_computed)
        return ImportResult(
            migrated=migrated,
            reprefilled=len(added) - migrated,
            bytes_moved=moved,
            seconds=time.perf_counter() - t0,
        )

    def drop_requests(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            req = self._reqs.pop(rid, None)
            if req is not None:
                self._release(req)

    def read_kv(self, request_id: str) -> list[object]:
        """Each rank's KV of a request (``[layers, tokens, heads_local, 2*head_dim]`` on CPU), for checks."""
        req = self._reqs[request_id]
        slots = token_slots(req.blocks, req.num_computed, self.block_size)
        return self.cluster.call(self._gpu_ids, "read_kv", engine_id=self._engine_id, slots=slots)
