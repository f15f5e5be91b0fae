"""A simulation scenario: cluster, model, tiers, workload, systems, load levels, epochs, switch costs, seed.

``Scenario()`` is the bundled default (8×H200, Llama-3.1-8B, the default 3-tier Azure workload, a load sweep);
``Scenario.load(path)`` reads any scenario from YAML (``examples/scenarios/``). The workload is the default
workload, a :class:`~nitsum_opt.workloads.WorkloadSpec` inline, or the path of a workload YAML (relative to the
scenario file). Load level ``s`` compresses the workload's time by ``s`` (``WorkloadSpec.load_scale``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from nitsum_opt.io import load as load_document
from nitsum_opt.models.spec import Frozen, ModelSpec, model_preset
from nitsum_opt.planners import StabilizerSettings
from nitsum_opt.sim.calibration import CalibratedModel, StepCalibration
from nitsum_opt.sim.controllers.registry import DEFAULT_SYSTEMS, SYSTEMS, ControllerOptions
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.sim.timing import H200, GpuSpec, IterationTimeModel, RooflineIterationModel
from nitsum_opt.spec import ClusterSpec, Tier
from nitsum_opt.workloads.builder import build_workload
from nitsum_opt.workloads.defaults import default_tiers, default_workload_spec
from nitsum_opt.workloads.forecast import EwmaForecaster, Forecaster
from nitsum_opt.workloads.spec import WorkloadSpec
from nitsum_opt.workloads.trace import RequestTrace

DEFAULT_LOAD_SCALES: tuple[float, ...] = (4.0, 6.0, 8.0, 10.0, 12.0, 14.0)
"""Load levels of the default sweep (multiples of the default workload's 9.1 req/s)."""


class Scenario(Frozen):
    """Everything one ``nitsum simulate`` run needs (defaults: the bundled main job)."""

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Label for reports."""
    cluster: ClusterSpec = ClusterSpec(num_nodes=1, gpus_per_node=8)
    """GPUs (``num_nodes × gpus_per_node``)."""
    model: str | ModelSpec = "llama-3.1-8b"
    """A bundled model preset name or an inline :class:`ModelSpec`."""
    latency_model: str = "auto"
    """``auto`` (the bundled fitted latency model of the model × GPU when one exists, else the roofline),
    ``roofline`` (:class:`RooflineIterationModel` on ``gpu``), or the path of a fitted performance-model JSON."""
    latency_calibration: dict[int, StepCalibration] = Field(default_factory=dict)
    """Per TP degree, ``offset_ms``, ``scale`` and ``per_seq_ms`` applied to every step time of ``latency_model``
    (fitted on the steps a real engine ran on this host: :mod:`nitsum_opt.sim.calibration`, or on the runtime's own
    logged steps: :mod:`nitsum_opt.sim.runtime_calibration`); empty: the model as it is."""
    gpu: GpuSpec = H200
    """Datasheet numbers for the roofline fallback."""
    tiers: tuple[Tier, ...] = Field(default_factory=default_tiers, min_length=1)
    """SLO tiers; their names must be the workload's tiers."""
    workload: Literal["default"] | WorkloadSpec | str = "default"
    """``default``, an inline workload spec, or a workload YAML path."""
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    """Systems to compare (names from :data:`nitsum_opt.sim.controllers.registry.SYSTEMS`)."""
    load_scales: tuple[float, ...] = Field(default=DEFAULT_LOAD_SCALES, min_length=1)
    """Load levels: time-compression factors of the workload."""
    settings: SimSettings = SimSettings()
    """Engine knobs, switch costs, epoch length, drain time."""
    forecaster: Forecaster = EwmaForecaster(alpha=0.5, headroom=0.1)
    """Demand forecaster of the adaptive controllers."""
    stabilizer: StabilizerSettings = StabilizerSettings()
    """Stabilizer guardrails of the adaptive controllers."""
    milp_time_limit_s: float = Field(default=1.0, gt=0)
    """MILP time limit per epoch."""
    seed: int = Field(default=0, ge=0)
    """Seed of the workload's random draws."""

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | ModelSpec) -> str | ModelSpec:
        if isinstance(value, str):
            try:
                model_preset(value)
            except KeyError as exc:
                raise ValueError(str(exc).strip('"')) from None
        return value

    @field_validator("systems")
    @classmethod
    def _known_systems(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in value if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; valid systems: {', '.join(SYSTEMS)}")
        if not value:
            raise ValueError("name at least one system")
        return value

    @field_validator("load_scales")
    @classmethod
    def _positive_loads(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (v > 0) for v in value):
            raise ValueError(f"load_scales must be > 0, got {list(value)}")
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if isinstance(self.workload, WorkloadSpec) and tuple(self.workload.tiers) != tuple(names):
            raise ValueError(f"workload tiers {list(self.workload.tiers)} must equal the scenario's tiers {names}")
        return self

    # ------------------------------------------------------------------ derived objects
    @property
    def model_spec(self) -> ModelSpec:
        """The served model."""
        return model_preset(self.model) if isinstance(self.model, str) else self.model

    def workload_spec(self, base_dir: Path | None = None) -> WorkloadSpec:
        """The workload at load scale 1."""
        if self.workload == "default":
            return default_workload_spec(seed=self.seed)
        if isinstance(self.workload, WorkloadSpec):
            return self.workload
        path = Path(self.workload)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return WorkloadSpec.load(path)

    def trace(self, load_scale: float, base_dir: Path | None = None) -> RequestTrace:
        """The requests at ``load_scale``."""
        spec = self.workload_spec(base_dir)
        trace = build_workload(spec.scaled(spec.load_scale * load_scale), base_dir=base_dir)
        if trace.tier_names != tuple(t.name for t in self.tiers):
            raise ValueError(
                f"the workload's tiers {list(trace.tier_names)} differ from the scenario's tiers "
                f"{[t.name for t in self.tiers]}; use the same names in the same order"
            )
        return trace

    def iteration_model(self) -> tuple[IterationTimeModel, str]:
        """The iteration-time model and a one-line description of where it comes from (with
        ``latency_calibration`` applied)."""
        model, source = self._base_iteration_model()
        if not self.latency_calibration:
            return model, source
        cal = ", ".join(f"TP{tp}: {c.describe()}" for tp, c in sorted(self.latency_calibration.items()))
        try:
            return CalibratedModel(model, self.latency_calibration), f"{source}, calibrated ({cal})"
        except ValueError as exc:
            raise ValueError(f"scenario {self.name!r}: {exc}") from None

    def _base_iteration_model(self) -> tuple[IterationTimeModel, str]:
        spec = self.model_spec
        if self.latency_model == "roofline":
            return RooflineIterationModel(spec, self.gpu), f"roofline ({self.gpu.name} datasheet)"
        fitted = _fitted_model(self.latency_model, spec.name, self.gpu.name)
        if fitted is not None:
            return fitted
        if self.latency_model != "auto":
            raise ValueError(
                f"latency_model={self.latency_model!r}: no fitted performance model could be loaded from it; "
                "use 'auto', 'roofline' or the path of a performance-model JSON"
            )
        return RooflineIterationModel(spec, self.gpu), f"roofline ({self.gpu.name} datasheet; no fitted model bundled)"

    def controller_options(self) -> ControllerOptions:
        """Knobs of the adaptive controllers."""
        return ControllerOptions(
            forecaster=self.forecaster, stabilizer=self.stabilizer, milp_time_limit_s=self.milp_time_limit_s
        )

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        """Read a scenario YAML/JSON (errors name the file and the field)."""
        return load_document(cls, path)


def _fitted_model(name_or_path: str, model_name: str, gpu_name: str) -> tuple[IterationTimeModel, str] | None:
    """A fitted ``PerformanceModel`` from ``nitsum_opt.models`` when that module is installed (it lands with the
    latency-model work); ``None`` when it is not there or bundles nothing for the pair."""
    try:
        from nitsum_opt.models import bundle  # type: ignore[attr-defined]
    except ImportError:
        return None
    if name_or_path == "auto":
        for key, path in bundle.bundled_models().items():
            if model_name in str(key) and gpu_name.lower() in str(path).lower():
                model = bundle.load_performance_model(path)
                return model, f"fitted {model.spec.name} on {model.gpu} ({path.name})"
        return None
    model = bundle.load_performance_model(name_or_path)
    return model, f"fitted {model.spec.name} on {model.gpu} ({name_or_path})"
