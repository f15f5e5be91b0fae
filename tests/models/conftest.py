"""Fixtures for the latency-model tests: the committed public-data profile and a synthetic profile whose true
step-time law and noise are known (for calibration checks)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from nitsum_opt.models.features import attention_pairs
from nitsum_opt.models.spec import MODEL_PRESETS, ModelSpec

REPO = Path(__file__).resolve().parents[2]
PUBLIC_PROFILE = REPO / "models" / "data" / "profiles" / "h100-public-composed" / "llama-3.1-8b.csv.gz"
EXAMPLE_TIERS = REPO / "examples" / "capacity" / "tiers.yaml"
SPEC: ModelSpec = MODEL_PRESETS["llama-3.1-8b"]


def true_step_ms(
    tp: np.ndarray, tokens: np.ndarray, pairs: np.ndarray, n_dec: np.ndarray, ctx: np.ndarray
) -> np.ndarray:
    """A roofline-shaped ground truth (ms): weight streaming floor vs compute, attention, KV reads,
    all-reduce."""
    weights_ms = 16e9 / tp / 4.0e12 * 1e3
    compute_ms = 2 * 7.5e9 * tokens / tp / 7.0e14 * 1e3
    allreduce_ms = np.where(tp > 1, 0.3 + tokens * 4e-5, 0.0)
    return (
        1.5 + np.maximum(weights_ms, compute_ms) + pairs * 4e-8 / tp + ctx * 1.3e-6 / tp + allreduce_ms + 0.004 * n_dec
    )


def synthetic_profile(
    seed: int = 0, repeats: int = 5, noise: float = 0.03, tps: tuple[int, ...] = (1, 2, 4)
) -> pd.DataFrame:
    """Profile rows (schema columns) from :func:`true_step_ms` with log-normal repeat noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for tp in tps:
        for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            for c in (256, 1024, 4096):
                rows.append(("decode", tp, 0, 0, b, b * c))
        for n in (1, 2, 4):
            for s in (64, 128, 256, 512, 1024, 2048, 4096):
                rows.append(("prefill", tp, n, s, 0, 0))
        for s in (128, 512, 2048):
            for b in (4, 32, 128):
                rows.append(("mixed", tp, 1, s, b, b * 1024))
    out = []
    for exp, tp, n, s, b, ctx in rows:
        cid = f"tp{tp}-{exp}-p{n}x{s}-d{b}x{ctx}"
        pairs = int(n * attention_pairs(s)) if n else 0
        mean = float(true_step_ms(np.array(tp), np.array(n * s + b), np.array(pairs), np.array(b), np.array(ctx)))
        for r in range(repeats):
            out.append(
                {
                    "model": SPEC.name,
                    "gpu": "NVIDIA H200",
                    "tp": tp,
                    "experiment": exp,
                    "config_id": cid,
                    "repeat": r,
                    "num_prefill_seqs": n,
                    "prefill_tokens": n * s,
                    "prefill_context_tokens": 0,
                    "prefill_attention_pairs": pairs,
                    "num_decode_seqs": b,
                    "decode_context_tokens": ctx,
                    "step_time_ms": mean * float(np.exp(rng.normal(0.0, noise))),
                }
            )
    return pd.DataFrame(out)


def write_profile(df: pd.DataFrame, path: Path, meta: dict | None = None, gz: bool = True) -> Path:
    """Write rows (and optionally a meta file) in the profile layout."""
    text = df.to_csv(index=False).encode()
    path.write_bytes(gzip.compress(text, mtime=0) if gz else text)
    if meta is not None:
        stem = path.name.removesuffix(".gz").removesuffix(".csv")
        path.with_name(f"{stem}.meta.json").write_text(json.dumps(meta))
    return path


def meta_for(df: pd.DataFrame, kv: int = 500_000) -> dict:
    """A valid meta document for ``df``."""
    return {
        "model": SPEC.model_dump(),
        "gpu": str(df["gpu"].iloc[0]),
        "command": "pytest fixture",
        "per_tp": {str(tp): {"kv_cache_tokens": int(kv * tp)} for tp in sorted(df["tp"].unique())},
    }


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    """Helpers and paths (test modules cannot import conftest under --import-mode=importlib)."""
    return SimpleNamespace(
        REPO=REPO,
        PUBLIC_PROFILE=PUBLIC_PROFILE,
        EXAMPLE_TIERS=EXAMPLE_TIERS,
        SPEC=SPEC,
        true_step_ms=true_step_ms,
        synthetic_profile=synthetic_profile,
        write_profile=write_profile,
        meta_for=meta_for,
    )


@pytest.fixture(scope="session")
def synthetic() -> pd.DataFrame:
    return synthetic_profile()


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory: pytest.TempPathFactory, synthetic: pd.DataFrame) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "llama-3.1-8b.csv.gz"
    return write_profile(synthetic, path, meta_for(synthetic))


@pytest.fixture(scope="session")
def fitted(synthetic_file: Path):
    from nitsum_opt.models.bundle import fit_performance_model

    return fit_performance_model(synthetic_file)


@pytest.fixture(scope="session")
def public_model():
    from nitsum_opt.models.bundle import load_performance_model

    return load_performance_model("h100-public-composed/llama-3.1-8b")
