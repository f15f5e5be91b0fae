"""The bundled default workload: three SLO tiers from real public data.

The workload spans the first 57 minutes (3,420 s) of each source, the part both Azure files cover:

* ``interactive``: Azure LLM inference trace 2023, conversation (file: 19,366 requests over 58.4 min,
  5.5 req/s, mean 1,155 prompt / 211 output tokens), replayed with its real arrival times.
* ``standard``: the same release's code trace (file: 8,819 requests over 57.3 min, 2.6 req/s, mean 2,048
  prompt / 28 output tokens), replayed with its real arrival times. Both Azure files were collected over the
  same hour and start within 77 s of each other; each is replayed from its own first request.
* ``background``: long-document summarization, prompt/output pairs drawn from Vidur's arXiv-summarization
  length table (mean 2,588 prompt / 291 output tokens, outputs up to 4,056) with Poisson arrivals whose rate
  follows a batch schedule: 0.5 req/s, a 2 req/s burst from minute 19 to 38, then 0.5 req/s (mean
  1 req/s). No public timed trace of a background class exists; the burst makes the tier mix shift over the
  hour, which is what an adaptive plan has to follow.

Every request is limited to 8,192 tokens (prompt + output, the ``max_model_len`` of the bundled model
presets); the single longer Azure request gets a shorter prompt. The data files and their licences are in
``nitsum_opt/data/traces/README.md``.
"""

from __future__ import annotations

from nitsum_opt.spec import Tier
from nitsum_opt.workloads.builder import build_workload
from nitsum_opt.workloads.spec import SyntheticSource, TraceSource, WorkloadSpec
from nitsum_opt.workloads.synthetic import PiecewiseArrivals, RateSegment
from nitsum_opt.workloads.trace import RequestTrace

DEFAULT_TIER_NAMES: tuple[str, ...] = ("interactive", "standard", "background")
"""Tier names of the default workload, in index order."""
AZURE_CONV = "bundled:azure_2023/AzureLLMInferenceTrace_conv.csv.gz"
"""The bundled Azure 2023 conversation trace."""
AZURE_CODE = "bundled:azure_2023/AzureLLMInferenceTrace_code.csv.gz"
"""The bundled Azure 2023 code trace."""
VIDUR_ARXIV = "bundled:vidur_arxiv/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv.gz"
"""The bundled Vidur arXiv-summarization length table."""
DEFAULT_MAX_TOTAL_TOKENS = 8192
"""Prompt + output limit of the default workload (``max_model_len`` of the bundled model presets)."""
DEFAULT_SPAN_S = 3420.0
"""Seconds of the default workload: the first 57 minutes, which both Azure traces cover (code: 57.3 min,
conv: 58.4 min), so no tier has an empty tail."""
BACKGROUND_SCHEDULE = (
    RateSegment(duration_s=1140, rate_rps=0.5),
    RateSegment(duration_s=1140, rate_rps=2.0),
    RateSegment(duration_s=1140, rate_rps=0.5),
)
"""Arrival schedule of the default background tier (mean 1 req/s over the 57 minutes)."""


def default_workload_spec(load_scale: float = 1.0, duration_s: float | None = None, seed: int = 0) -> WorkloadSpec:
    """The default 3-tier :class:`WorkloadSpec` (see the module docstring); ``load_scale`` multiplies every
    rate (compressing the hour), ``duration_s`` keeps only the first seconds of the scaled workload."""
    limit = {"max_total_tokens": DEFAULT_MAX_TOTAL_TOKENS, "overlong": "clip"}
    return WorkloadSpec(
        name="azure2023-3tier",
        tiers=DEFAULT_TIER_NAMES,
        sources=(
            TraceSource(
                name="azure-conv",
                tier="interactive",
                path=AZURE_CONV,
                format="azure2023",
                window_duration_s=DEFAULT_SPAN_S,
                **limit,
            ),
            TraceSource(
                name="azure-code",
                tier="standard",
                path=AZURE_CODE,
                format="azure2023",
                window_duration_s=DEFAULT_SPAN_S,
                **limit,
            ),
            SyntheticSource(
                name="arxiv-summarization",
                tier="background",
                lengths_path=VIDUR_ARXIV,
                lengths_format="vidur",
                arrivals=PiecewiseArrivals(segments=BACKGROUND_SCHEDULE),
                duration_s=DEFAULT_SPAN_S,
                **limit,
            ),
        ),
        seed=seed,
        load_scale=load_scale,
        duration_s=duration_s,
    )


def default_workload(load_scale: float = 1.0, duration_s: float | None = None, seed: int = 0) -> RequestTrace:
    """The bundled default workload's requests (tiers ``interactive``, ``standard``, ``background``)."""
    return build_workload(default_workload_spec(load_scale=load_scale, duration_s=duration_s, seed=seed))


def default_tiers() -> tuple[Tier, ...]:
    """Suggested SLOs for the default tiers (Llama-3.1-8B class model on H200; p90 of TTFT and mean TPOT).

    interactive: chat, a person waits for the first token and reads along; standard: code assistance,
    tolerant of a second more; background: batch summarization, only throughput-bound, lowest weight.
    """
    return (
        Tier(name="interactive", ttft_slo_ms=500.0, tpot_slo_ms=40.0, weight=4.0),
        Tier(name="standard", ttft_slo_ms=1500.0, tpot_slo_ms=80.0, weight=2.0),
        Tier(name="background", ttft_slo_ms=10_000.0, tpot_slo_ms=200.0, weight=1.0),
    )
