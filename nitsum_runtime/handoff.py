"""Prefill → decode hand-offs of the serving loop (:mod:`nitsum_runtime.serving`): taking requests off a prefill
engine and adding them to a decode engine, with their KV where a path exists.

On vLLM engines (:class:`~nitsum_runtime.vllm_pool_kv.KvPort`) a hand-off is split so that neither engine waits for
the other: :func:`leave` runs while the prefill engine is between steps — its workers gather the requests' KV
into their exchange buffers, then the requests are dropped there and the prefill engine steps on; :func:`arrive`
runs when the decode engine is between steps — its workers stage buffers, the controller copies the KV in and the
requests join with import tickets; the prefill engine's buffers are freed later, when it is next between steps
(:meth:`KvPort.release_exported`). Other engines (the reference engine) hand off in one go at arrival, so their
prefill engine must not step until then (the request would decode there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nitsum_runtime.engine import Engine, ImportResult
from nitsum_runtime.vllm_pool_kv import ExportedKv, KvPort


@dataclass
class Move:
    """Requests on their way from one prefill instance to one decode instance."""

    request_ids: list[str]
    """The requests, in order."""
    src: int
    """Prefill instance (index in the deployment)."""
    exported: ExportedKv | None
    """What :func:`leave` took off the prefill engine; ``None``: they are still there (moved at arrival)."""


def leave(src: Engine, dst: Engine, request_ids: Sequence[str]) -> ExportedKv | None:
    """Take ``request_ids`` off prefill engine ``src`` now, if it can export them on its own (vLLM engines: their
    KV gathered into its workers' buffers when ``dst`` can take it, else their tokens only); ``None`` when the
    requests must stay on ``src`` until :func:`arrive`."""
    if not isinstance(src, KvPort):
        return None
    snaps = src.export_requests(request_ids)
    exported = src.export_kv(snaps) if dst.can_migrate_from(src) else ExportedKv(None, tuple(snaps))
    src.drop_requests(request_ids)
    return exported


def arrive(src: Engine, dst: Engine, move: Move) -> ImportResult:
    """Add the moved requests to decode engine ``dst`` (``src`` must be between steps when ``move.exported`` is
    None; otherwise the caller frees ``move.exported`` on ``src`` later)."""
    if move.exported is not None:
        return dst.import_exported(move.exported)  # type: ignore[attr-defined]
    snaps = src.export_requests(move.request_ids)
    done = dst.import_requests(snaps, src if dst.can_migrate_from(src) else None)
    src.drop_requests(move.request_ids)
    return done


__all__ = ["Move", "arrive", "leave"]
