"""Compose an iteration-level profile of Llama-3.1-8B on H100 from public per-operator tables.

Writes ``models/data/profiles/h100-public-composed/llama-3.1-8b.csv.gz`` (+ ``.meta.json``) in the profile
schema, so the latency models, plots and capacity tables run on real (public) measurements before our H200
profiles exist.

What one step's time is composed of (all per-operator latencies are measured values from the tables, in ms):

* per layer (× 32 layers), tokens ``T`` = prefill tokens + decode sequences:
  - 4 GEMMs, AIConfigurator H100 vLLM 0.24 ``gemm_perf`` (bf16, ``torch.nn.functional.linear``):
    QKV ``(T, 6144/tp, 4096)``, output ``(T, 4096, 4096/tp)``, gate+up ``(T, 28672/tp, 4096)``,
    down ``(T, 4096, 14336/tp)``; shapes off the (m, n, k) grid are linearly interpolated on it;
  - attention, AIConfigurator FlashAttention-3 tables (bf16 KV, full attention, ``32/tp`` q heads, ``8/tp`` KV
  heads,
    head_dim 128): prefill part = ``context_attention_perf(batch, isl)``, decode part =
    ``generation_attention_perf(batch, step=ctx-1)`` (batch sizes between the table's powers of two are
    linearly
    interpolated); a mixed step is the sum of the two kernels (vLLM runs one fused varlen kernel: slight
    over-estimate);
  - 2 all-reduces of ``T·4096`` bf16 elements at tp > 1, ``custom_allreduce_perf`` (``vllm_graph`` backend for
    ``T <= 512``, the CUDA-graph capture range, ``vllm_eager`` above), log-log interpolated in message size;
  - element-wise ops from Vidur's H100 Llama-2-7B profile (same hidden size 4096, sarathi kernels): both
  RMSNorms,
    residual add, RoPE × 40/64 (Llama-3 rotates 32 q + 8 k heads, Llama-2-7B 32 + 32) and SiLU·mul ×
    14336/11008
    (intermediate size ratio); linear in tokens between Vidur's points, proportional above its 4096-token
    maximum;
* once per step: the embedding lookup (Vidur) and the LM head GEMM ``(num_seqs, 128256/tp, 4096)`` (the table
stops
  at n = 65536, so at TP 1 it is two GEMMs of 64128 columns).

Not included (no public table): CPU scheduling/sampling overhead, the logits gather, kernel-launch gaps. The
composed times are therefore a lower bound of a real vLLM step; the latency models absorb such constant
overheads in their intercept. Each configuration has one row (``repeat`` 0): the tables give one latency per
shape. KV capacity per TP comes from :func:`nitsum_opt.models.memory.estimate_kv_cache_tokens` (80 GB H100,
utilisation 0.9).

Usage: ``python benchmarks/compose_public_profile.py [--data /work/shared/data/profiling] [--out DIR]``
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.interpolate import RegularGridInterpolator

from nitsum_opt.models.features import attention_pairs
from nitsum_opt.models.memory import estimate_kv_cache_tokens, gpu_memory_gib
from nitsum_opt.models.spec import MODEL_PRESETS

SPEC = MODEL_PRESETS["llama-3.1-8b"]
GPU = "NVIDIA H100 80GB HBM3"
TPS = (1, 2, 4, 8)
AIC = "aiconfigurator/h100_sxm"
VIDUR = "vidur/compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv.gz"
CUDA_GRAPH_MAX_TOKENS = 512
ROPE_SCALE = (32 + 8) / (32 + 32)
ACT_SCALE = 14336 / 11008


class Tables:
    """The public per-operator tables, with interpolation helpers."""

    def __init__(self, root: Path) -> None:
        gemm = pd.read_csv(root / AIC / "gemm_perf__vllm-0.24.0.csv.gz")
        gemm = gemm[(gemm.gemm_dtype == "bfloat16") & (gemm.k <= 16384)]
        axes = [np.sort(gemm[c].unique()).astype(float) for c in ("m", "n", "k")]
        grid = gemm.pivot_table(index=["m", "n", "k"], values="latency").reindex(
            pd.MultiIndex.from_product(axes, names=["m", "n", "k"])
        )
        if grid["latency"].isna().any():
            raise RuntimeError("GEMM grid has holes for k <= 16384")
        self._gemm = RegularGridInterpolator(axes, grid["latency"].to_numpy().reshape([len(a) for a in axes]))
        self._gemm_max_n = axes[1][-1]

        def attention(name: str) -> pd.DataFrame:
            t = pd.read_csv(root / AIC / f"{name}__vllm-0.24.0.csv.gz")
            keep = (t.kv_cache_dtype == "bfloat16") & (t.attn_dtype == "bfloat16") & (t.window_size == 0)
            return t[keep & (t.head_dim == SPEC.head_dim)]

        self._ctx = (
            attention("context_attention_perf")
            .set_index(["num_heads", "num_key_value_heads", "batch_size", "isl"])["latency"]
            .sort_index()
        )
        self._gen = (
            attention("generation_attention_perf")
            .groupby(["num_heads", "num_key_value_heads", "step", "batch_size"])["latency"]
            .mean()
        )
        ar = pd.read_csv(root / AIC / "custom_allreduce_perf__vllm-0.24.0.csv.gz")
        self._ar = {
            (b, g): grp.sort_values("message_size")[["message_size", "latency"]].to_numpy(dtype=float)
            for (b, g), grp in ar.groupby(["backend", "num_gpus"])
        }
        vidur = pd.read_csv(root / VIDUR)
        ops = ["emb", "input_layernorm", "post_attention_layernorm", "add", "attn_rope", "mlp_act"]
        cols = {f"time_stats.{op}.mean": op for op in ops}
        self._elem = {
            int(tp): grp.groupby("num_tokens")[list(cols)].mean().rename(columns=cols)
            for tp, grp in vidur.groupby("num_tensor_parallel_workers")
        }

    def gemm(self, m: float, n: float, k: float) -> float:
        if m <= 0:
            return 0.0
        if n > self._gemm_max_n:  # split into equal column blocks that the table covers
            parts = int(np.ceil(n / self._gemm_max_n))
            return parts * self.gemm(m, n / parts, k)
        return float(self._gemm([[m, n, k]])[0])

    def context_attention(self, heads: int, kv: int, batch: int, isl: int) -> float:
        return float(self._ctx.loc[(heads, kv, batch, isl)])

    def generation_attention(self, heads: int, kv: int, batch: float, ctx: int) -> float:
        row = self._gen.loc[(heads, kv, ctx - 1)]
        batches = row.index.to_numpy(dtype=float)
        if not batches[0] <= batch <= batches[-1]:
            raise KeyError(f"decode attention batch {batch} at ctx {ctx} is outside the table")
        return float(np.interp(batch, batches, row.to_numpy()))

    def allreduce(self, tp: int, elements: float) -> float:
        if tp == 1 or elements <= 0:
            return 0.0
        backend = "vllm_graph" if elements / SPEC.hidden_size <= CUDA_GRAPH_MAX_TOKENS else "vllm_eager"
        table = self._ar[(backend, tp)]
        return float(np.exp(np.interp(np.log(elements), np.log(table[:, 0]), np.log(table[:, 1]))))

    def elementwise(self, tp: int, tokens: float) -> dict[str, float]:
        t = self._elem[tp]
        idx = t.index.to_numpy(dtype=float)
        scale = max(1.0, tokens / idx[-1])
        at = min(tokens, idx[-1])
        return {op: float(np.interp(at, idx, t[op].to_numpy())) * scale for op in t.columns}


def step_time_ms(tab: Tables, tp: int, prefill: tuple[int, int], decode: tuple[int, int]) -> float:
    """Composed time of one step with ``prefill = (seqs, isl each)`` and ``decode = (seqs, ctx each)``."""
    n_pre, isl = prefill
    n_dec, ctx = decode
    tokens = n_pre * isl + n_dec
    h, inter = SPEC.hidden_size, SPEC.intermediate_size
    heads, kv = SPEC.num_attention_heads // tp, max(1, SPEC.num_kv_heads // tp)
    qkv_n = (SPEC.num_attention_heads + 2 * SPEC.num_kv_heads) * SPEC.head_dim // tp
    gemms = (
        tab.gemm(tokens, qkv_n, h)
        + tab.gemm(tokens, h, h // tp)
        + tab.gemm(tokens, 2 * inter // tp, h)
        + tab.gemm(tokens, h, inter // tp)
    )
    attention = 0.0
    if n_pre:
        attention += tab.context_attention(heads, kv, n_pre, isl)
    if n_dec:
        attention += tab.generation_attention(heads, kv, n_dec, ctx)
    elem = tab.elementwise(tp, tokens)
    elementwise = (
        elem["input_layernorm"]
        + elem["post_attention_layernorm"]
        + elem["add"]
        + elem["attn_rope"] * ROPE_SCALE
        + elem["mlp_act"] * ACT_SCALE
    )
    layer = gemms + attention + 2 * tab.allreduce(tp, tokens * h) + elementwise
    lm_head = tab.gemm(n_pre + n_dec, SPEC.vocab_size / tp, h)
    return SPEC.num_layers * layer + lm_head + elem["emb"]


def configurations(tp: int, kv_tokens: int) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(experiment, (prefill seqs, isl), (decode seqs, ctx)) of every composed configuration at ``tp``."""
    out: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
    for b in (1, 2, 4, 8, 16, 32):
        for s in (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192):
            if b * s <= 16384:
                out.append(("prefill", (b, s), (0, 0)))
    for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512):
        for c in (128, 256, 512, 1024, 2048, 4096, 8192):
            if b * c <= min(kv_tokens, 262144):
                out.append(("decode", (0, 0), (b, c)))
    for chunk in (64, 256, 512, 1024, 2048):
        for b in (1, 4, 16, 64, 256):
            for c in (512, 2048):
                if b * c <= min(kv_tokens, 262144):
                    out.append(("mixed", (1, chunk), (b, c)))
    return out


def compose(root: Path) -> tuple[pd.DataFrame, dict[int, int]]:
    tab = Tables(root)
    rows = []
    kv_tokens = {tp: estimate_kv_cache_tokens(SPEC, tp, gpu_memory_gib(GPU)) for tp in TPS}
    for tp in TPS:
        for experiment, (n_pre, isl), (n_dec, ctx) in configurations(tp, kv_tokens[tp]):
            config_id = f"tp{tp}-{experiment}-p{n_pre}x{isl}-d{n_dec}x{ctx}"
            rows.append(
                {
                    "model": SPEC.name,
                    "gpu": GPU,
                    "tp": tp,
                    "experiment": experiment,
                    "config_id": config_id,
                    "repeat": 0,
                    "num_prefill_seqs": n_pre,
                    "prefill_tokens": n_pre * isl,
                    "prefill_context_tokens": 0,
                    "prefill_attention_pairs": int(n_pre * attention_pairs(isl)),
                    "num_decode_seqs": n_dec,
                    "decode_context_tokens": n_dec * ctx,
                    "step_time_ms": round(step_time_ms(tab, tp, (n_pre, isl), (n_dec, ctx)), 6),
                }
            )
    return pd.DataFrame(rows), kv_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/profiling"))
    parser.add_argument("--out", type=Path, default=Path("models/data/profiles/h100-public-composed"))
    args = parser.parse_args(argv)
    df, kv_tokens = compose(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(df.to_csv(index=False).encode())
    (args.out / f"{SPEC.name}.csv.gz").write_bytes(buf.getvalue())
    meta = {
        "model": SPEC.model_dump(),
        "gpu": GPU,
        "command": "python benchmarks/compose_public_profile.py --data /work/shared/data/profiling",
        "date": None,
        "vllm_version": "0.24.0 (AIConfigurator tables)",
        "engine_args": {"composed_from": [f"{AIC}/*__vllm-0.24.0.csv.gz", VIDUR]},
        "per_tp": {str(tp): {"kv_cache_tokens": kv, "rows": int((df.tp == tp).sum())} for tp, kv in kv_tokens.items()},
    }
    (args.out / f"{SPEC.name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(df)} rows for tp {sorted(df.tp.unique())} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
