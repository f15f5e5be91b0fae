"""The KV side of :class:`~nitsum_runtime.vllm_pool_engine.VllmEngine`: exporting requests with the location of
their KV, and importing them by KV migration (through the Nitsum KV connector) or re-prefill.

How a migration runs is described in :mod:`nitsum_runtime.vllm_pool_engine` (module docstring) and
``docs/runtime.md``; the copies themselves are :func:`nitsum_runtime.kv_mover.move_staged`. :class:`KvPort` is a
mixin: it uses the engine's state and commands (``_held``, ``_staged``, ``_call``, ``rpc``, ...), which
``VllmEngine`` defines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nitsum_runtime.engine import EngineError, ImportResult, KvDescriptor, RequestSnapshot
from nitsum_runtime.kv_ticket import IMPORT_PARAMS_KEY

if TYPE_CHECKING:
    from nitsum_runtime.kv_mover import MoveStats
    from nitsum_runtime.vllm_protocol import KvBlocks


def tickets_key(params: dict[str, Any]) -> str:
    """The staged-KV key of an import ticket (:func:`~nitsum_runtime.kv_import.ticket_params`)."""
    return str(params[IMPORT_PARAMS_KEY]["key"])


@dataclass(frozen=True)
class ExportedKv:
    """Requests exported from an engine, with their KV gathered into buffers of its workers
    (:meth:`KvPort.export_kv`); ``source=None``: no KV (they re-prefill wherever they are imported)."""

    source: KvPort | None
    """Engine whose workers hold the buffers."""
    snapshots: tuple[RequestSnapshot, ...]
    """The requests (tokens so far and where their KV was)."""
    keys: dict[str, str] = field(default_factory=dict)
    """Request id -> key of its gathered KV (requests with no KV are left out)."""
    answer: list[Any] = field(default_factory=list)
    """The workers' export answers (buffer handles per rank)."""


class KvPort:
    """Export and import of requests for a vLLM engine (mixin of ``VllmEngine``; see the module docstring)."""

    # State that ``VllmEngine.__init__`` sets (declared here for readers; no values).
    spec: Any
    deadlines: Any
    started: Any
    failure: str | None
    kv_connector: bool
    kv_arena_bytes: int
    kv_arenas: list[str]
    kv_errors: list[str]
    kv_moves: list[MoveStats]
    timings: dict[str, float]
    _held: dict[str, Any]
    _staged: dict[str, str]

    def warm_kv_path(self) -> None:
        """Give every worker a KV exchange arena this process allocates on the worker's GPU
        (:mod:`nitsum_runtime.kv_arena`) and enable peer access between the engine's GPUs, so that no
        migration allocates, opens a CUDA IPC handle or sets up peer access on the switch path; nothing without
        the KV connector, an arena size or GPUs visible to this process."""
        from nitsum_runtime.kv_mover import ARENAS, controller_sees_gpus, warm_peers

        if not (self.kv_connector and self.kv_arena_bytes > 0 and controller_sees_gpus()):
            return
        t0 = time.perf_counter()
        offers = ARENAS.offer(self.gpu_ids, self.kv_arena_bytes)
        ids = [arena_id for arena_id, _ in offers.values()]
        try:
            answers = self.rpc("nitsum_kv_arena", self.kv_arena_bytes, offers)
        except BaseException:
            ARENAS.forget(ids)
            raise
        taken = {a["arena"]["id"] for a in answers if a["arena"] is not None}
        if taken != set(ids):
            ARENAS.forget(ids)
            raise EngineError(f"engine {self.engine_id}: workers took arenas {sorted(taken)}, offered {sorted(ids)}")
        ARENAS.forget(self.kv_arenas)  # the workers replaced them (they refuse to while a range is in use)
        self.kv_arenas = ids
        warm_peers(range(max(self.gpu_ids) + 1))
        self.timings["kv_arena_s"] = time.perf_counter() - t0

    def forget_kv_arenas(self) -> None:
        """Free the engine's arenas in this process (call once its workers are gone or hold none)."""
        from nitsum_runtime.kv_mover import ARENAS

        ARENAS.forget(self.kv_arenas)
        self.kv_arenas = []

    def export_requests(self, request_ids: Sequence[str]) -> list[RequestSnapshot]:
        missing = [r for r in request_ids if r not in self._held]
        if missing:
            raise EngineError(f"engine {self.engine_id} holds no request {missing}")
        where = self._kv_blocks(request_ids)
        out = []
        for rid in request_ids:
            held, kv = self._held[rid], where.get(rid)
            out.append(
                RequestSnapshot(
                    request=held.request,
                    output_token_ids=tuple(held.output),
                    num_computed_tokens=kv.num_computed_tokens if kv else 0,
                    kv=self._descriptor(kv) if kv else None,
                )
            )
        return out

    def _kv_blocks(self, request_ids: Sequence[str]) -> dict[str, KvBlocks]:
        """Where the requests' KV lives; nothing when the engine was lost (its KV is gone with it)."""
        if self.failure is not None or self.started is None or not self.started.kv_blocks_readable:
            return {}
        try:
            found = self._call("kv_blocks", self.deadlines.call_s, request_ids=list(request_ids))
        except EngineError:
            if self.failure is None:
                raise
            return {}  # lost just now: export from this side's copy
        return {b.request_id: b for b in found}

    def _descriptor(self, kv: KvBlocks) -> KvDescriptor:
        assert self.started is not None
        return KvDescriptor(
            engine_id=self.engine_id,
            gpu_ids=self.gpu_ids,
            block_ids=kv.block_ids,
            num_tokens=kv.num_computed_tokens,
            block_size=self.started.block_size,
        )

    def can_migrate_from(self, source: object) -> bool:
        """True when both engines run the Nitsum KV connector, both serve, and this process can open CUDA IPC
        handles (:mod:`nitsum_runtime.kv_mover`); otherwise requests from ``source`` are re-prefilled."""
        if not (isinstance(source, KvPort) and self.kv_connector and source.kv_connector):
            return False
        if self.failure is not None or source.failure is not None:
            return False
        from nitsum_runtime.kv_mover import controller_sees_gpus

        return controller_sees_gpus()

    def import_requests(self, snapshots: Sequence[RequestSnapshot], kv_source: object | None) -> ImportResult:
        if kv_source is not None and not self.can_migrate_from(kv_source):
            raise EngineError(
                f"engine {self.engine_id} cannot take KV from {kv_source!r}: both engines need the Nitsum KV connector "
                "(VllmPoolSettings.kv_connector=True) and this process must see their GPUs; import with "
                "kv_source=None to re-prefill"
            )
        if not isinstance(kv_source, KvPort):
            return self.import_exported(ExportedKv(None, tuple(snapshots)))
        try:
            exported = kv_source.export_kv(snapshots)
        except EngineError as exc:  # the export failed: these requests re-prefill
            self.kv_errors.append(str(exc))
            return self.import_exported(ExportedKv(None, tuple(snapshots)))
        try:
            return self.import_exported(exported)
        finally:
            kv_source.release_exported(exported)

    def export_kv(self, snapshots: Sequence[RequestSnapshot]) -> ExportedKv:
        """Gather the KV of ``snapshots`` (from :meth:`export_requests` of this engine) into buffers of this
        engine's workers; the requests may then be dropped here (the buffers keep the KV) and imported elsewhere
        with :meth:`import_exported`, later. Free the buffers with :meth:`release_exported` afterwards."""
        with_kv = [s for s in snapshots if s.kv is not None and s.kv.num_tokens > 0]
        stamp = time.monotonic_ns()
        keys = {s.request.request_id: f"{s.request.request_id}@{self.engine_id}#{stamp}" for s in with_kv}
        out = [[keys[s.request.request_id], list(s.kv.block_ids), s.kv.num_tokens] for s in with_kv if s.kv]
        answer = self.rpc("nitsum_kv_export", out) if out else []
        return ExportedKv(self, tuple(snapshots), keys, answer)

    def release_exported(self, exported: ExportedKv) -> None:
        """Free the buffers :meth:`export_kv` filled (once every import of them is done)."""
        if exported.keys and self.failure is None:
            self.rpc("nitsum_kv_release", list(exported.keys.values()))

    def import_exported(self, exported: ExportedKv) -> ImportResult:
        """Add the exported requests here, each with its KV copied from the source's buffers (re-prefilled if it
        has none there or the copy fails); the source's buffers are not released."""
        snapshots = exported.snapshots
        self._need_awake("import requests into")
        t0 = time.perf_counter()
        self._check_new([s.request.request_id for s in snapshots])
        for s in snapshots:
            self._check_fits(s.request)
        tickets: dict[str, dict[str, Any]] = {}
        moved = 0
        if exported.source is not None and exported.keys:
            try:
                stats = self._copy_exported(exported)
            except EngineError as exc:  # the copy failed: these requests re-prefill
                self.kv_errors.append(str(exc))
            else:
                self.kv_moves.append(stats)
                moved = stats.bytes_remote + stats.bytes_local
                from nitsum_runtime.kv_ticket import ticket_params

                for s in snapshots:
                    key = exported.keys.get(s.request.request_id)
                    if key is not None and s.kv is not None:
                        tickets[s.request.request_id] = ticket_params(key, s.kv.num_tokens)
        try:
            self._add([(s.request, s.output_token_ids) for s in snapshots], tickets)
        except BaseException:
            self._release_staged([tickets_key(t) for t in tickets.values()])
            raise
        for rid, t in tickets.items():
            self._staged[rid] = tickets_key(t)
        return ImportResult(
            migrated=len(tickets),
            reprefilled=len(snapshots) - len(tickets),
            bytes_moved=moved,
            seconds=time.perf_counter() - t0,
        )

    def _copy_exported(self, exported: ExportedKv) -> MoveStats:
        """Stage buffers here for the exported requests and copy their KV in (module docstring)."""
        from nitsum_runtime.kv_mover import move_staged

        source = exported.source
        assert source is not None
        order = [
            exported.keys[s.request.request_id] for s in exported.snapshots if s.request.request_id in exported.keys
        ]
        sizes = [
            [exported.keys[s.request.request_id], s.kv.num_tokens]
            for s in exported.snapshots
            if s.kv and s.request.request_id in exported.keys
        ]
        staged = self.rpc("nitsum_kv_stage", sizes)
        try:
            stats = move_staged(self.spec.num_kv_heads, order, exported.answer, staged, source.gpu_ids, self.gpu_ids)
        except Exception as exc:
            self._release_staged(order)
            raise EngineError(f"KV copy {source.engine_id} -> {self.engine_id} failed: {exc}") from exc
        self.timings["kv_copy_s"], self.timings["kv_open_s"] = stats.copy_s, stats.open_s
        return stats

    def _release_staged(self, keys: Sequence[str]) -> None:
        if keys and self.failure is None:
            self.rpc("nitsum_kv_release", list(keys))
