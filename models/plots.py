"""The TP effect, shown: PNG plots of a profile (measured points) with the fitted mean model (lines).

* ``tp_effect_decode.png``: decode step time vs batch size, one series per TP (at the profile's most common
  per-sequence context length);
* ``tp_effect_throughput.png``: decode throughput per GPU (tokens/s/GPU = batch / step / tp) vs batch size;
* ``tp_effect_prefill.png``: prefill time vs prompt tokens (one prompt per step), per TP.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure  # pyplot-free: no global backend or state is touched

from .features import COMPOSITION_COLUMNS, attention_pairs
from .latency import IterationTimeModel


def _config_means(profile: pd.DataFrame, experiment: str) -> pd.DataFrame:
    rows = profile[profile["experiment"] == experiment]
    return rows.groupby(["tp", "config_id"], as_index=False)[
        ["num_prefill_seqs", "prefill_tokens", "num_decode_seqs", "decode_context_tokens", "step_time_ms"]
    ].mean()


def decode_points(profile: pd.DataFrame, context: float | None = None) -> tuple[pd.DataFrame, float]:
    """Decode configurations at ``context`` tokens per sequence (default: the most common), ±20 % (the context
    grows by the generated tokens while a batch is halved down to 1)."""
    dec = _config_means(profile, "decode")
    if dec.empty:
        raise ValueError("the profile has no decode rows; nothing to plot for decode")
    dec["ctx_per_seq"] = dec["decode_context_tokens"] / dec["num_decode_seqs"]
    rounded = 2.0 ** np.round(np.log2(dec["ctx_per_seq"]))
    ctx = float(rounded.value_counts().idxmax()) if context is None else float(context)
    keep = (dec["ctx_per_seq"] - ctx).abs() <= 0.20 * ctx
    if not keep.any():
        raise ValueError(f"no decode configurations at ~{ctx:,.0f} tokens per sequence; pick another context")
    return dec[keep].sort_values(["tp", "num_decode_seqs"]), ctx


def prefill_points(profile: pd.DataFrame) -> pd.DataFrame:
    """Prefill configurations with one prompt per step."""
    pre = _config_means(profile, "prefill")
    pre = pre[pre["num_prefill_seqs"] == 1]
    if pre.empty:
        raise ValueError("the profile has no single-prompt prefill rows; nothing to plot for prefill")
    return pre.sort_values(["tp", "prefill_tokens"])


def _curve(model: IterationTimeModel, tp: int, xs: np.ndarray, kind: str, ctx: float) -> np.ndarray:
    zeros = np.zeros_like(xs)
    if kind == "decode":
        comp = np.column_stack([np.full_like(xs, tp), zeros, zeros, zeros, xs, xs * ctx])
    else:
        comp = np.column_stack([np.full_like(xs, tp), np.ones_like(xs), xs, attention_pairs(xs), zeros, zeros])
    assert comp.shape[1] == len(COMPOSITION_COLUMNS)
    return model.predict_trusted(comp)


def plot_tp_effect(
    profile: pd.DataFrame,
    model: IterationTimeModel,
    out_dir: str | Path,
    title: str,
    context: float | None = None,
) -> list[Path]:
    """Write the three PNGs to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dec, ctx = decode_points(profile, context)
    pre = prefill_points(profile)
    tps = sorted(int(t) for t in profile["tp"].unique())
    colors = {tp: colormaps["viridis"](0.85 * i / max(len(tps) - 1, 1)) for i, tp in enumerate(tps)}
    paths = []

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for tp in tps:
        pts = dec[dec["tp"] == tp]
        if pts.empty:
            continue
        xs = np.geomspace(1, pts["num_decode_seqs"].max(), 60)
        ax.plot(pts["num_decode_seqs"], pts["step_time_ms"], "o", color=colors[tp], label=f"TP{tp} measured")
        ax.plot(xs, _curve(model, tp, xs, "decode", ctx), "-", color=colors[tp], alpha=0.7, label=f"TP{tp} model")
    ax.set(
        xscale="log",
        xlabel="decode batch size (sequences)",
        ylabel="step time (ms)",
        title=f"{title}\ndecode step time, context {ctx:,.0f} tokens/sequence",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    paths.append(out / "tp_effect_decode.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=130)

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for tp in tps:
        pts = dec[dec["tp"] == tp]
        if pts.empty:
            continue
        thr = pts["num_decode_seqs"] / (pts["step_time_ms"] / 1000.0) / tp
        ax.plot(pts["num_decode_seqs"], thr, "o-", color=colors[tp], label=f"TP{tp}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="decode batch size (sequences)",
        ylabel="decode throughput per GPU (tokens/s/GPU)",
        title=f"{title}\nper-GPU decode throughput, context {ctx:,.0f} tokens/sequence",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(out / "tp_effect_throughput.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=130)

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for tp in tps:
        pts = pre[pre["tp"] == tp]
        if pts.empty:
            continue
        xs = np.geomspace(pts["prefill_tokens"].min(), pts["prefill_tokens"].max(), 60)
        ax.plot(pts["prefill_tokens"], pts["step_time_ms"], "o", color=colors[tp], label=f"TP{tp} measured")
        ax.plot(xs, _curve(model, tp, xs, "prefill", 0.0), "-", color=colors[tp], alpha=0.7, label=f"TP{tp} model")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="prompt tokens (one prompt per step)",
        ylabel="prefill step time (ms)",
        title=f"{title}\nprefill time vs prompt length",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    paths.append(out / "tp_effect_prefill.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=130)
    return paths
