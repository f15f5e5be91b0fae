"""Request traces and tiered workloads: loaders for public LLM traces, a columnar request container, the
workload builder, per-epoch demand and forecasters.

Quick start::

    from nitsum_opt.workloads import default_workload, epoch_demand, EwmaForecaster
    trace = default_workload()                 # RequestTrace, tiers interactive/standard/background
    demand = epoch_demand(trace, epoch_s=60)   # rates_rps[k, tier]
    next_rates = EwmaForecaster(alpha=0.5).forecast(demand.rates_rps[:10])
"""

from nitsum_opt.workloads.azure import load_azure_2023, load_azure_2024
from nitsum_opt.workloads.builder import (
    BuiltWorkload,
    SourceReport,
    build_workload,
    build_workload_detailed,
    build_workload_file,
    fit_lengths,
)
from nitsum_opt.workloads.burstgpt import load_burstgpt
from nitsum_opt.workloads.defaults import (
    DEFAULT_TIER_NAMES,
    default_tiers,
    default_workload,
    default_workload_spec,
)
from nitsum_opt.workloads.demand import EpochDemand, epoch_demand, length_mixes, observed_demand
from nitsum_opt.workloads.errors import LoadedTrace, LoadReport, TraceFormatError
from nitsum_opt.workloads.forecast import EwmaForecaster, Forecaster, LastWindowForecaster, forecast_error
from nitsum_opt.workloads.formats import FORMATS, detect_format, load_trace
from nitsum_opt.workloads.mooncake import load_mooncake
from nitsum_opt.workloads.servegen import load_servegen, sample_servegen
from nitsum_opt.workloads.spec import (
    ServeGenSource,
    Source,
    SyntheticSource,
    TraceSource,
    WorkloadSpec,
)
from nitsum_opt.workloads.summary import LengthStats, TierSummary, TraceSummary
from nitsum_opt.workloads.synthetic import (
    GammaArrivals,
    PiecewiseArrivals,
    PoissonArrivals,
    RateSegment,
    load_length_table,
)
from nitsum_opt.workloads.trace import RequestTrace

__all__ = [
    "DEFAULT_TIER_NAMES",
    "FORMATS",
    "BuiltWorkload",
    "EpochDemand",
    "EwmaForecaster",
    "Forecaster",
    "GammaArrivals",
    "LastWindowForecaster",
    "LengthStats",
    "LoadReport",
    "LoadedTrace",
    "PiecewiseArrivals",
    "PoissonArrivals",
    "RateSegment",
    "RequestTrace",
    "ServeGenSource",
    "Source",
    "SourceReport",
    "SyntheticSource",
    "TierSummary",
    "TraceFormatError",
    "TraceSource",
    "TraceSummary",
    "WorkloadSpec",
    "build_workload",
    "build_workload_detailed",
    "build_workload_file",
    "default_tiers",
    "default_workload",
    "default_workload_spec",
    "detect_format",
    "epoch_demand",
    "fit_lengths",
    "forecast_error",
    "length_mixes",
    "load_azure_2023",
    "load_azure_2024",
    "load_burstgpt",
    "load_length_table",
    "load_mooncake",
    "load_servegen",
    "load_trace",
    "observed_demand",
    "sample_servegen",
]
