"""Speed of the trace loaders and the request container, and the default workload's demand plot.

Run from the repository root: ``python benchmarks/workloads_bench.py``. Writes
``benchmarks/workloads_bench.json`` and ``benchmarks/workloads_default_demand.png``.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from nitsum_opt.workloads import (
    build_workload_detailed,
    default_workload,
    default_workload_spec,
    epoch_demand,
    load_azure_2024,
    load_burstgpt,
    load_mooncake,
)
from nitsum_opt.workloads.trace import RequestTrace

T = TypeVar("T")

HERE = Path(__file__).parent


def _best_of(repeats: int, func: Callable[[], T]) -> tuple[float, T]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    return best, result


def _synthetic_files(folder: Path, rows: int) -> dict[str, Path]:
    """Files in each public format with ``rows`` rows (arrival every 10 ms; lengths from a fixed RNG)."""
    rng = np.random.default_rng(0)
    inputs, outputs = rng.integers(1, 8000, rows), rng.integers(1, 1000, rows)
    t0 = np.datetime64("2024-05-10T00:00:00")
    stamps = t0 + (np.arange(rows) * 10_123_457).astype("timedelta64[ns]")
    text = np.datetime_as_string(stamps, unit="ns")
    azure = folder / "azure2024.csv"
    with azure.open("w") as handle:
        handle.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        handle.writelines(
            f"{s.replace('T', ' ')[:27].rstrip('0').rstrip('.')}+00:00,{i},{o}\n"
            for s, i, o in zip(text, inputs.tolist(), outputs.tolist(), strict=True)
        )
    burst = folder / "burstgpt.csv"
    with burst.open("w") as handle:
        handle.write("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n")
        handle.writelines(
            f"{k * 0.01:.2f},ChatGPT,{i},{o},{i + o},Conversation log\n"
            for k, (i, o) in enumerate(zip(inputs.tolist(), outputs.tolist(), strict=True))
        )
    moon = folder / "mooncake.jsonl"
    with moon.open("w") as handle:
        handle.writelines(
            f'{{"timestamp": {k * 10}, "input_length": {i}, "output_length": {o}, "hash_ids": [1, 2, 3]}}\n'
            for k, (i, o) in enumerate(zip(inputs.tolist(), outputs.tolist(), strict=True))
        )
    return {"azure2024": azure, "burstgpt": burst, "mooncake": moon}


def main() -> None:
    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    results: dict[str, object] = {"machine": machine}
    build_s, built = _best_of(3, lambda: build_workload_detailed(default_workload_spec()))
    trace = built.trace
    results["default_workload_build_s"] = build_s
    iterate_s, _ = _best_of(3, lambda: sum(1 for _ in trace.rows()))
    results["rows_iteration_ns_per_request"] = iterate_s / len(trace) * 1e9
    loaders = {"azure2024": load_azure_2024, "burstgpt": load_burstgpt, "mooncake": load_mooncake}
    rows = 200_000
    with tempfile.TemporaryDirectory() as tmp:
        files = _synthetic_files(Path(tmp), rows)
        for name, path in files.items():
            seconds, (loaded, _) = _best_of(2, lambda p=path, f=loaders[name]: f(p))
            assert len(loaded) == rows
            results[f"{name}_rows_per_s"] = rows / seconds
    summary = trace.summary()
    results["default_workload"] = {
        "requests": summary.requests,
        "duration_s": summary.duration_s,
        "mean_rate_rps": summary.mean_rate_rps,
        "tiers": {
            name: {
                "requests": tier.requests,
                "mean_rate_rps": tier.mean_rate_rps,
                "mean_input_tokens": tier.input_tokens.mean,
                "mean_output_tokens": tier.output_tokens.mean,
            }
            for name, tier in summary.tiers.items()
        },
    }
    (HERE / "workloads_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(default_workload())
    print(json.dumps(results, indent=2))


def _plot(trace: RequestTrace) -> None:
    demand = epoch_demand(trace, 60.0)
    minutes = demand.epoch_starts_s / 60
    figure, (rate_axis, token_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for i, name in enumerate(demand.tier_names):
        rate_axis.step(minutes, demand.rates_rps[:, i], where="post", label=name)
        tier = trace.select_tier(name)
        index = np.minimum((tier.arrival_s // 60).astype(int), demand.num_epochs - 1)
        tokens = np.bincount(index, weights=tier.output_tokens, minlength=demand.num_epochs) / 60
        token_axis.step(minutes, tokens, where="post", label=name)
    rate_axis.set_ylabel("arrivals (req/s)")
    token_axis.set_ylabel("output tokens requested (tok/s)")
    token_axis.set_xlabel("minute")
    rate_axis.set_title("Default workload: Azure 2023 conv / code + arXiv background (60 s epochs)")
    rate_axis.legend()
    figure.tight_layout()
    figure.savefig(HERE / "workloads_default_demand.png", dpi=120)


if __name__ == "__main__":
    main()
