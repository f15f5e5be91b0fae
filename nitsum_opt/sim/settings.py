"""Settings of the simulated engines, of plan switches and of a simulation run."""

from __future__ import annotations

from pydantic import Field

from nitsum_opt.models.spec import Frozen


class EngineSettings(Frozen):
    """vLLM engine knobs (defaults: vLLM's own for its API server on a GPU with ≥ 70 GiB such as the H200,
    ``EngineArgs.get_batch_defaults`` in ``vllm/engine/arg_utils.py``). An instance may override the token budget
    (:attr:`~nitsum_opt.sim.deployment.DeployedInstance.max_num_batched_tokens`)."""

    max_num_batched_tokens: int = Field(default=8192, ge=16)
    """Token budget of one step of a colocated or decode engine: decode tokens first, then prefill chunks (chunked
    prefill)."""
    prefill_max_num_batched_tokens: int = Field(default=8192, ge=16)
    """Token budget of one step of a prefill-only engine."""
    max_num_seqs: int = Field(default=1024, ge=1)
    """Most requests an engine runs at once (decoding plus being prefilled)."""
    kv_watermark: float = Field(default=0.01, ge=0, lt=1)
    """Share of the KV cache kept free when a new prompt is admitted (vLLM's watermark), so running requests
    can grow before anyone is preempted."""


class SwitchCosts(Frozen):
    """What a plan change costs; every number configurable. Defaults: measured anchors from the design notes
    (vLLM wake of a standby engine ~0.5 s; a full engine restart 40–65 s; KV over NVLink ~370 GB/s)."""

    standby_wake_s: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    """Seconds a new instance is paused when its engine is pre-launched and asleep (TP switch with resident
    weights, the Nitsum runtime)."""
    restart_s: float = Field(default=52.5, ge=0, allow_inf_nan=False)
    """Seconds a new instance is paused when its engine must be started (weights loaded, CUDA graphs
    captured); the middle of the measured 40–65 s."""
    use_standby: bool = True
    """Whether new instances come from standby engines (``standby_wake_s``) or cold starts (``restart_s``)."""
    kv_migration_gb_s: float = Field(default=370.0, gt=0, allow_inf_nan=False)
    """KV-cache transfer bandwidth between GPUs of one node (NVLink), GB/s per GPU pair."""
    internode_gb_s: float = Field(default=50.0, gt=0, allow_inf_nan=False)
    """KV-cache transfer bandwidth between nodes (400 Gb/s InfiniBand), GB/s."""
    transfer_latency_ms: float = Field(default=0.2, ge=0, allow_inf_nan=False)
    """Fixed latency of one KV transfer (setup, first byte), ms."""

    @property
    def switch_s(self) -> float:
        """Pause of an instance that a plan change creates or re-shapes."""
        return self.standby_wake_s if self.use_standby else self.restart_s


class SimSettings(Frozen):
    """Knobs of one simulation run."""

    engine: EngineSettings = EngineSettings()
    """Engine knobs."""
    switch: SwitchCosts = SwitchCosts()
    """Plan-change costs."""
    drain_s: float = Field(default=120.0, ge=0, allow_inf_nan=False)
    """Seconds simulated after the last arrival; requests still running then are reported unfinished."""
    epoch_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """Seconds between two controller decisions (a controller that never changes its plan ignores it)."""
    capacity_percentile: float | None = Field(default=97.0, gt=0, lt=100)
    """SLO percentile the controllers build capacity tables for when it is above a tier's own (``None``: the tier's).
    ``R[t,c]`` is the rate at which exactly that share of requests meets the SLO; planning at a higher share
    leaves the headroom that keeps admitted traffic above the tier's percentile under real (bursty) arrivals."""
    max_jump_steps: int = Field(default=1_000_000, ge=1)
    """Most decode steps one fast-forward jump covers (bounds the secant approximation for models that are
    not affine in the decode context)."""
