"""Headline figures and a plot of the committed H200 profiles (reads only the CSVs and meta files).

Usage: python benchmarks/gpu/summarize_profiles.py [PROFILE_DIR] [PNG]
Prints markdown tables (median step time per configuration and TP; engine start, sleep/wake, KV capacity)
and writes a plot of decode step time vs batch size at context 1024 and of prefill time vs tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

MODELS = ("llama-3.1-8b", "qwen2.5-14b")
HEADLINES = {
    "decode B=1, ctx 1024": "decode-c1024-b1",
    "decode B=32, ctx 1024": "decode-c1024-b32",
    "decode B=256, ctx 1024": "decode-c1024-b256",
    "decode B=512, ctx 128": "decode-c128-b512",
    "decode B=32, ctx 7936": "decode-c7936-b32",
    "prefill 1x16 tokens": "prefill-n1-l16",
    "prefill 1x2048 tokens": "prefill-n1-l2048",
    "prefill 4096-token chunk (ctx 0)": "chunked-p7936-k4096-i0",
    "prefill 1x8191 tokens": "prefill-n1-l8191",
    "mixed: 32 decodes (ctx 1024) + 2048-token chunk": "mixed-c1024-b32-p2048-k2048-i0",
}


def summarize(profile_dir: Path, png: Path) -> str:
    out = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, model in enumerate(MODELS):
        df = pd.read_csv(profile_dir / f"{model}.csv.gz")
        meta = json.loads((profile_dir / f"{model}.meta.json").read_text())
        med = df.groupby(["config_id", "tp"]).step_time_ms.median().unstack()
        tps = list(med.columns)
        out.append(f"\n### {model} (median step time, ms; {len(df)} rows)\n")
        out.append("| configuration | " + " | ".join(f"TP{t}" for t in tps) + " |")
        out.append("|---|" + "---:|" * len(tps))
        for label, cid in HEADLINES.items():
            out.append(f"| {label} | " + " | ".join(f"{med.at[cid, t]:.2f}" for t in tps) + " |")
        out.append("\n| per TP | " + " | ".join(f"TP{t}" for t in tps) + " |")
        out.append("|---|" + "---:|" * len(tps))
        for key, fmt in [
            ("rows", "{:d}"),
            ("kv_cache_tokens", "{:,}"),
            ("engine_start_s", "{:.1f}"),
            ("sleep_s", "{:.3f}"),
            ("wake_weights_s", "{:.3f}"),
            ("wake_kv_s", "{:.3f}"),
        ]:
            vals = [fmt.format(meta["per_tp"][str(t)][key]) for t in tps]
            out.append(f"| {key} | " + " | ".join(vals) + " |")
        dec = df[df.config_id.str.match(r"decode-c1024-b\d+$")].copy()
        dec["batch"] = dec.config_id.str.extract(r"-b(\d+)$")[0].astype(int)
        ax = axes[row][0]
        for t in tps:
            s = dec[dec.tp == t].groupby("batch").step_time_ms.median()
            ax.plot(s.index, s.values, marker="o", label=f"TP{t}")
        ax.set(xscale="log", xlabel="decode batch size (context 1024)", ylabel="step time (ms)", title=model)
        ax.legend()
        pre = df[df.config_id.str.startswith("prefill-") & (df.num_decode_seqs == 0)]
        ax = axes[row][1]
        for t in tps:
            s = pre[pre.tp == t].groupby("prefill_tokens").step_time_ms.median()
            ax.plot(s.index, s.values, marker=".", linestyle="", label=f"TP{t}")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="prefill tokens in the step",
            ylabel="step time (ms)",
            title=f"{model}: prefill",
        )
        ax.legend()
    fig.suptitle("vLLM 0.26.0 on H200, synchronous engine steps (committed profiles)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return "\n".join(out)


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/data/profiles/h200-vllm0.26")
    p = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("benchmarks/gpu/h200_profiles.png")
    print(summarize(d, p))
