"""What one simulation returns: every request's outcome as numpy columns, plus the deployment timeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from nitsum_opt.sim.deployment import Deployment
from nitsum_opt.spec import Tier

if TYPE_CHECKING:
    from nitsum_opt.sim.core import Simulator


class Outcome(IntEnum):
    """How a request ended (exactly one per request)."""

    UNFINISHED = 0
    """Still waiting or running at the horizon (last arrival + drain)."""
    COMPLETED = 1
    """All its output tokens were generated."""
    REJECTED = 2
    """It could not be served; :class:`RejectReason` says why."""


class RejectReason(IntEnum):
    """Why a request was rejected."""

    NONE = 0
    """Not rejected."""
    OVER_MAX_MODEL_LEN = 1
    """Prompt + output exceed the model's ``max_model_len``."""
    EXCEEDS_KV_CACHE = 2
    """Its prompt does not fit an empty engine's KV cache."""


@dataclass(frozen=True)
class StepRecord:
    """One step or fast-forward jump of one engine (kept when the simulator records steps)."""

    engine_key: str
    """The engine (``g<first gpu>-tp<N>-<role>``)."""
    gpu_ids: tuple[int, ...]
    """Its GPUs."""
    start_s: float
    """When the step (or the jump's first step) started."""
    end_s: float
    """When it (or the jump's last step) ended."""


@dataclass(frozen=True, eq=False)
class SimResult:
    """Per-request outcomes (arrays indexed like the trace) and what the controller did."""

    tier_names: tuple[str, ...]
    """Tier names; ``tier`` indexes them."""
    arrival_s: np.ndarray
    """Arrival times."""
    input_tokens: np.ndarray
    """Prompt lengths."""
    output_tokens: np.ndarray
    """Output lengths."""
    tier: np.ndarray
    """Tier index of each request."""
    request_class: np.ndarray
    """:class:`~nitsum_opt.scheduler.RequestClass` the scheduler gave it at arrival (0 feasible/admitted,
    1 best-effort, 2 background; -1 never classified: rejected at arrival)."""
    outcome: np.ndarray
    """:class:`Outcome` code."""
    reject_reason: np.ndarray
    """:class:`RejectReason` code."""
    ttft_s: np.ndarray
    """Time to first token (NaN when no token was produced)."""
    tpot_s: np.ndarray
    """Mean time per output token after the first (NaN unless completed with ≥ 2 output tokens)."""
    finish_s: np.ndarray
    """Time of the last token (or of the rejection); NaN when unfinished."""
    preemptions: np.ndarray
    """Times each request was preempted (recomputed)."""
    migrations: np.ndarray
    """Times its KV was moved to another engine by a plan change."""
    start_s: float
    """Start of the trace interval."""
    end_s: float
    """End of the trace interval (goodput is per second of it)."""
    horizon_s: float
    """When the simulation stopped."""
    timeline: tuple[tuple[float, Deployment], ...]
    """Every deployment the controller applied, with its start time."""
    switch_windows: tuple[tuple[str, tuple[int, ...], float, float], ...]
    """Engines paused by a plan change: (engine key, GPUs, pause start, pause end)."""
    steps_simulated: int
    """Engine steps simulated (a jump counts its steps)."""
    events: int
    """Events processed (step/jump ends, transfers, resumes, epochs)."""
    step_log: tuple[StepRecord, ...] = field(default=())
    """Every step/jump, when recorded."""
    stopped_early: bool = False
    """The run was ended before the horizon by its ``stop`` callback (its outcomes are incomplete)."""

    @classmethod
    def from_simulator(cls, sim: Simulator, horizon_s: float) -> SimResult:
        """Collect the simulator's lists into columns."""
        req = sim.req
        first = np.array(req.first, dtype=np.float64)
        finish = np.array(req.finish, dtype=np.float64)
        arrival = np.array(req.arrival, dtype=np.float64)
        out = np.array(req.out, dtype=np.int64)
        outcome = np.array(req.outcome, dtype=np.int8)
        completed = outcome == Outcome.COMPLETED
        tpot = np.full(arrival.shape, np.nan)
        multi = completed & (out > 1)
        tpot[multi] = (finish[multi] - first[multi]) / (out[multi] - 1)
        return cls(
            tier_names=sim.trace.tier_names,
            arrival_s=arrival,
            input_tokens=np.array(req.inp, dtype=np.int64),
            output_tokens=out,
            tier=np.array(req.tier, dtype=np.int16),
            request_class=np.array(req.klass0, dtype=np.int8),
            outcome=outcome,
            reject_reason=np.array(req.reason, dtype=np.int8),
            ttft_s=first - arrival,
            tpot_s=tpot,
            finish_s=np.where(outcome == Outcome.UNFINISHED, np.nan, finish),
            preemptions=np.array(req.preemptions, dtype=np.int32),
            migrations=np.array(req.migrations, dtype=np.int32),
            start_s=sim.trace.start_s,
            end_s=sim.trace.end_s,
            horizon_s=horizon_s,
            timeline=tuple(sim.timeline),  # type: ignore[arg-type]
            switch_windows=tuple(sim.switch_windows),
            steps_simulated=sim.steps_simulated,
            events=sim.events,
            step_log=tuple(sim.step_log or ()),
            stopped_early=sim.stopped_early,
        )

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def slo_met(self, tiers: tuple[Tier, ...] | list[Tier]) -> np.ndarray:
        """Whether each request completed within its tier's TTFT and TPOT targets (a single-token output has no
        TPOT to miss)."""
        ttft_slo = np.array([t.ttft_slo_ms / 1000.0 for t in tiers])[self.tier]
        tpot_slo = np.array([t.tpot_slo_ms / 1000.0 for t in tiers])[self.tier]
        completed = self.outcome == Outcome.COMPLETED
        ttft_ok = self.ttft_s <= ttft_slo
        tpot_ok = np.isnan(self.tpot_s) | (self.tpot_s <= tpot_slo)
        return completed & ttft_ok & tpot_ok
