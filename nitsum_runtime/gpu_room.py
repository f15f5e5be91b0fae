"""Room on the GPUs to wake an engine: measured at its start, checked before each wake.

A vLLM wake that runs out of memory halfway leaves the engine with its weights awake and its KV cache asleep, which
no later sleep or wake repairs (seen on 2×H200 when a transition woke a TP 1 engine next to an awake TP 2 one). So
:class:`~nitsum_runtime.vllm_pool_engine.VllmEngine` measures at start what a wake allocates again (free memory per
rank before and after its first sleep, :attr:`WakeRoom.wake_bytes`) and refuses a wake the GPUs have no room for,
before touching anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nitsum_runtime.engine import EngineCapacityError, EngineError


def wake_shortfall(
    engine_id: str, gpu_ids: Sequence[int], wake_bytes: Sequence[int], free_bytes: Sequence[int] | None
) -> str:
    """Why waking an engine would run out of memory (``""``: it fits, or a figure is unknown): a rank whose GPU has
    less free than the wake allocates again (measured at start). Checked before a wake, because one that runs out
    of memory halfway leaves vLLM with its weights awake and its KV cache asleep, which no later sleep or wake
    repairs (seen on 2×H200)."""
    if not wake_bytes or free_bytes is None:
        return ""
    for g, need, have in zip(gpu_ids, wake_bytes, free_bytes, strict=True):
        if have < need:
            return (
                f"engine {engine_id} needs {need / 2**30:.1f} GiB free on GPU {g} to wake and {have / 2**30:.1f} GiB "
                "are free (other engines are awake there); put them to sleep first, or start the engines with a "
                "lower gpu_memory_utilization"
            )
    return ""


class WakeRoom:
    """The wake check of an engine whose workers answer ``nitsum_mem_info`` (mixed into ``VllmEngine``)."""

    wake_bytes: tuple[int, ...] = ()
    """Per rank, what a wake allocates (measured at start; empty: unknown, wakes unchecked)."""
    engine_id: str
    gpu_ids: tuple[int, ...]

    def rpc(self, method: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    def _free_bytes(self) -> tuple[int, ...] | None:
        """Free bytes on each rank's GPU, or ``None`` when the workers cannot say (then wakes are not checked)."""
        try:
            return tuple(int(r["free_bytes"]) for r in self.rpc("nitsum_mem_info"))
        except EngineError:
            return None

    def _check_room_to_wake(self) -> None:
        """Refuse a wake that cannot fit, before touching the engine (:func:`wake_shortfall`)."""
        why = wake_shortfall(
            self.engine_id, self.gpu_ids, self.wake_bytes, self._free_bytes() if self.wake_bytes else None
        )
        if why:
            raise EngineCapacityError(why)

    def measure_wake(self, awake_free: tuple[int, ...] | None, asleep_free: tuple[int, ...] | None) -> None:
        """Record what a wake allocates from the free bytes per rank before and after the first sleep."""
        if awake_free is not None and asleep_free is not None:
            self.wake_bytes = tuple(max(0, a - b) for a, b in zip(asleep_free, awake_free, strict=True))
