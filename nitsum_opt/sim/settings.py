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
    """What a plan change costs; every number configurable. Defaults: measured on 4 × H200 with vLLM 0.26 and
    Llama-3.1-8B (``benchmarks/RESULTS.md``, section *Runtime on 4 × H200*; raw outputs in
    ``benchmarks/gpu/results/runtime-h200-2026-11-22/``)."""

    standby_wake_s: float = Field(default=0.26, ge=0, allow_inf_nan=False)
    """Seconds a new instance is paused when its engine is pre-launched and asleep (TP switch with resident
    weights, the Nitsum runtime). Default: the mean pause→resume of the three measured vLLM engine switches
    TP1→TP2 225.6 ms, TP2→TP4 282.0 ms, TP4→TP1 279.5 ms (sleep of the old engine, wake, weight refill from the
    resident copy and KV wake included; the re-prefill of moved requests is simulated on its own)."""
    restart_s: float = Field(default=50.4, ge=0, allow_inf_nan=False)
    """Seconds a new instance is paused when its engine must be started (weights loaded, CUDA graphs
    captured). Default: the mean of the measured vLLM engine starts in the same run, 56.8 s (TP1), 47.7 s (TP2),
    46.7 s (TP4)."""
    use_standby: bool = True
    """Whether new instances come from standby engines (``standby_wake_s``) or cold starts (``restart_s``)."""
    kv_migration_gb_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    """KV-cache transfer bandwidth between GPUs of one node (NVLink), GB/s per GPU pair. Default: the measured
    large migrations, 302.7 GB/s for 32k tokens TP1→TP1 (256 MiB chunks; 0.83 × the 366.2 GB/s NCCL
    point-to-point of the same run) and 303–336 GB/s TP4→TP1, rounded down. Migrations between vLLM engines
    (the KV connector path, runs 7–8) copy at 263–279 GB/s over one GPU pair; their whole ``move_requests`` step
    (export, stage, copy, re-add) took 16–24 ms for 0.95 GB and 6–11 ms for a few MB."""
    internode_gb_s: float = Field(default=50.0, gt=0, allow_inf_nan=False)
    """KV-cache transfer bandwidth between nodes (400 Gb/s InfiniBand), GB/s. Not measured: the line rate."""
    transfer_latency_ms: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """Fixed latency of one KV transfer (setup, first byte), ms. Default: the measured small migrations (1k
    tokens, 67–134 MB) took 1.0–2.2 ms; with 300 GB/s for the bytes, 1.0 ms fixed gives 1.45 ms for 1k tokens
    TP1→TP1 (measured 1.03 ms) and 15.3 ms for 32k tokens (measured 14.2 ms)."""

    handoff_leave_ms: float = Field(default=3.5, ge=0, allow_inf_nan=False)
    """Pause of a prefill engine after a step that hands requests off (the runtime gathers their KV and drops
    them before the engine's next step), ms per such step. Default: the runtime's measured p50, 3.3 and 3.8 ms at
    8.98 and 13.75 req/s on 2×H200 (``benchmarks/RESULTS.md``, "The runtime serving deployments on 2×H200");
    0: not simulated."""
    handoff_arrive_ms: float = Field(default=3.5, ge=0, allow_inf_nan=False)
    """Pause of an engine before a step that admits requests whose KV arrived (staged, copied and added between
    its steps), ms per such step. Default: the measured p50, 3.2 and 3.8 ms (same run); 0: not simulated."""

    prepare_ahead: bool = False
    """How a change that adds engines is carried out. ``False``: at once; the old engines stop and the new ones
    serve after a pause of :attr:`switch_s`. ``True``, as the runtime's ``AdaptiveServer`` does by default: the new
    engines are woken and filled while the old deployment keeps serving, and the change takes effect
    :attr:`switch_s` after the decision with no pause."""

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
    seat_safety: float = Field(default=0.85, gt=0, le=1, allow_inf_nan=False)
    """Share of a tier's TPOT target an instance's mean step may take when the controllers set its SLO-safe
    capacity (seats) and its SLO-aware step budget, and share of the TTFT target a prefill instance's queue may
    take (:func:`nitsum_opt.sim.capacity.slo_safe_seqs`); the rest absorbs the variance the mean step does not
    show. With a TPOT target close to the decode step (``examples/scenarios/llama8b-tight.yaml`` calibrated on
    the runtime) 0.85 leaves a TP 1 engine 3–4 seats and queues requests that would have met their SLO
    (``benchmarks/RESULTS.md``, "Seat safety at a tight TPOT")."""
    max_jump_steps: int = Field(default=1_000_000, ge=1)
    """Most decode steps one fast-forward jump covers (bounds the secant approximation for models that are
    not affine in the decode context)."""
