"""The Nitsum KV connector for vLLM 0.26: KV migrated from another engine enters this engine as external hits.

vLLM loads this module itself, inside the engine process (scheduler role) and every worker (worker role),
from ``kv_transfer_config`` (:data:`nitsum_runtime.kv_ticket.CONNECTOR_CONFIG`); it is the only runtime module besides
:mod:`nitsum_runtime.vllm_engine` that imports vLLM at module level, and nothing else imports it. All the
logic lives in :mod:`nitsum_runtime.kv_import` (tested on CPU); this class only adapts vLLM's
``KVConnectorBase_V1`` calls (``v1/core/sched/scheduler.py``, ``v1/worker/kv_connector_model_runner_mixin.py``):

* scheduler: ``get_num_new_matched_tokens(request, num_computed)`` -> ``(hits, False)`` (synchronous load);
  ``update_state_after_alloc(request, blocks, n)`` with ``blocks.get_block_ids()[0]`` (one KV group: a dense
  decoder); ``build_connector_meta`` -> :class:`NitsumImportMeta`; ``request_finished`` -> ``(False, None)``
  (no block outlives its request).
* worker: ``register_kv_caches`` (layer name -> cache); ``start_load_kv`` writes the step's imports before
  the forward pass, on the current stream; ``wait_for_layer_load`` / ``save_kv_layer`` / ``wait_for_save``
  have nothing to do (all layers are loaded up front, nothing is saved); ``get_block_ids_with_load_errors``
  reports stages that were missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.logger import init_logger

from nitsum_runtime.kv_import import ImportJob, ImportScheduler, ImportWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = init_logger(__name__)


@dataclass
class NitsumImportMeta(KVConnectorMetadata):
    """The imports of one scheduler step."""

    jobs: tuple[ImportJob, ...]


class NitsumKvConnector(KVConnectorBase_V1, SupportsHMA):
    """See the module docstring."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        block_size = vllm_config.cache_config.block_size
        self.scheduler_side = ImportScheduler(block_size) if role == KVConnectorRole.SCHEDULER else None
        self.worker_side = ImportWorker(block_size) if role == KVConnectorRole.WORKER else None

    # worker side ----------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self.worker_side is not None
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self.worker_side is not None
        meta = self._get_connector_metadata()
        if isinstance(meta, NitsumImportMeta) and meta.jobs:
            self.worker_side.load(meta.jobs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # every layer is written in start_load_kv, before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.worker_side is None:
            return set()
        failed = self.worker_side.take_failed_blocks()
        if failed:
            logger.warning("Nitsum KV connector: %d blocks had no staged KV; vLLM recomputes them", len(failed))
        return failed

    # scheduler side -------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler_side is not None
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self.scheduler_side is not None
        if num_external_tokens:
            self.scheduler_side.update_state_after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.scheduler_side is not None
        return NitsumImportMeta(jobs=self.scheduler_side.build_jobs())

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler_side is not None:
            self.scheduler_side.request_finished(request.request_id)
        return False, None

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])
