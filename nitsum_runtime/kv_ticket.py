"""The torch-free half of the Nitsum KV connector's interface: the engine configuration and the import ticket a
request carries in its ``kv_transfer_params`` (see :mod:`nitsum_runtime.kv_import`). The controller imports
this module; it needs neither torch nor vLLM."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: ``kv_transfer_config`` of an engine that takes migrated KV (``LLM(kv_transfer_config=...)``).
CONNECTOR_CONFIG: dict[str, Any] = {
    "kv_connector": "NitsumKvConnector",
    "kv_connector_module_path": "nitsum_runtime.kv_connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}

#: Key of the import ticket inside ``kv_transfer_params``.
IMPORT_PARAMS_KEY = "nitsum_kv_import"


@dataclass(frozen=True)
class ImportTicket:
    """What a request's ``kv_transfer_params`` announce."""

    key: str
    """Name of the staged KV in the target workers."""
    num_tokens: int
    """Tokens (prompt then output, from the first) whose KV is staged."""


def ticket_params(key: str, num_tokens: int) -> dict[str, Any]:
    """``kv_transfer_params`` announcing ``num_tokens`` staged tokens under ``key``."""
    if not key or num_tokens < 1:
        raise ValueError(f"an import needs a key and >= 1 staged token, got key={key!r} num_tokens={num_tokens}")
    return {IMPORT_PARAMS_KEY: {"key": key, "num_tokens": int(num_tokens)}}


def ticket_of(kv_transfer_params: Mapping[str, Any] | None) -> ImportTicket | None:
    """The ticket in a request's ``kv_transfer_params`` (None when it has none)."""
    raw = (kv_transfer_params or {}).get(IMPORT_PARAMS_KEY)
    if raw is None:
        return None
    try:
        key, n = str(raw["key"]), int(raw["num_tokens"])
    except (KeyError, TypeError, ValueError):
        want = "{'key': str, 'num_tokens': int}"
        raise ValueError(f"kv_transfer_params[{IMPORT_PARAMS_KEY!r}] = {raw!r}: want {want}") from None
    return ImportTicket(key, n)
