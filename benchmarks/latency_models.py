"""Latency-model benchmark: held-out error per TP of candidate model families, fit time and per-call cost.

Usage: ``python benchmarks/latency_models.py [PROFILE] [--out benchmarks/results/latency_models.json]``
(default PROFILE: the committed public H100 composition).

Families, all evaluated with the same GroupKFold(5) on ``config_id`` (MAPE against held-out configuration means):

* ``roofline-nnls`` (ours): per TP, non-negative mix of physical roofline terms (:mod:`nitsum_opt.models.latency`),
  with the engine's step regimes (CUDA graph vs eager, custom all-reduce vs NCCL) taken from the profile's engine
  arguments;
* ``roofline-nnls-v1``: the same without the step-regime terms (the model before they were added: no eager
  floor, no NCCL bytes, no graph padding);
* ``hist-gbdt``: per TP, scikit-learn ``HistGradientBoostingRegressor`` on the six composition columns plus
  total tokens, log target;
* ``random-forest``: per TP, ``RandomForestRegressor`` (Vidur's choice) on the same inputs;
* ``linear-ols``: per TP, ordinary least squares on the composition columns (a baseline without physics).

Per-call cost: one step predicted from Python scalars (the simulator's inner loop), median of 5 × 20,000 calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import LinearRegression

from nitsum_opt.models.bundle import fit_performance_model
from nitsum_opt.models.features import COMPOSITION_COLUMNS
from nitsum_opt.models.heldout import heldout_splits
from nitsum_opt.models.latency import IterationTimeModel
from nitsum_opt.models.profile_schema import load_meta, load_profile, meta_path_for
from nitsum_opt.models.step_regime import StepRegimeLimits

DEFAULT_PROFILE = Path("models/data/profiles/h100-public-composed/llama-3.1-8b.csv.gz")


class PerTp:
    """Fit one scikit-learn regressor per TP on (composition, total tokens), optionally on log time."""

    def __init__(self, factory: Callable[[], object], log_target: bool) -> None:
        self.factory, self.log_target = factory, log_target

    @staticmethod
    def _x(comp: np.ndarray) -> np.ndarray:
        return np.column_stack([comp[:, 1:], comp[:, 2] + comp[:, 4]])

    def fit(self, comp: np.ndarray, y: np.ndarray) -> PerTp:
        self.models = {}
        for tp in np.unique(comp[:, 0]):
            rows = comp[:, 0] == tp
            target = np.log(y[rows]) if self.log_target else y[rows]
            self.models[tp] = self.factory().fit(self._x(comp[rows]), target)
        return self

    def predict(self, comp: np.ndarray) -> np.ndarray:
        out = np.empty(len(comp))
        for tp, model in self.models.items():
            rows = comp[:, 0] == tp
            if not rows.any():
                continue
            pred = model.predict(self._x(comp[rows]))
            out[rows] = np.exp(pred) if self.log_target else pred
        return out

    def predict_one(self, *row: float) -> float:
        return float(self.predict(np.array([row], dtype=float))[0])


def families(spec, limits: StepRegimeLimits) -> dict[str, Callable[[], object]]:
    return {
        "roofline-nnls": lambda: IterationTimeModel(
            spec=spec,
            cuda_graph_max_tokens=limits.cuda_graph_max_tokens,
            custom_allreduce_max_bytes=limits.custom_allreduce_max_bytes,
        ),
        # every step "eager" (a constant column, collinear with the intercept), no reverse hinges, no padding,
        # no NCCL switch: exactly the basis of the first version
        "roofline-nnls-v1": lambda: IterationTimeModel(
            spec=spec, eager_knots_tokens=(), cuda_graph_max_tokens=0, custom_allreduce_max_bytes=2**62
        ),
        "hist-gbdt": lambda: PerTp(lambda: HistGradientBoostingRegressor(max_iter=300, random_state=0), True),
        "random-forest": lambda: PerTp(lambda: RandomForestRegressor(n_estimators=100, random_state=0), True),
        "linear-ols": lambda: PerTp(LinearRegression, False),
    }


def per_call_us(fn: Callable[..., float], args: tuple, n: int = 20_000) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn(*args)
        times.append((time.perf_counter() - start) / n * 1e6)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", nargs="?", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_models.json"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    meta = load_meta(meta_path_for(args.profile))
    spec = meta.model
    limits = StepRegimeLimits.from_engine_args(meta.engine_args)
    df = load_profile(args.profile, spec)
    comp = df[list(COMPOSITION_COLUMNS)].to_numpy(float)
    y = df["step_time_ms"].to_numpy(float)
    splits = heldout_splits(df["config_id"].to_numpy(), n_splits=5, random_state=0)
    result: dict[str, object] = {
        "profile": str(args.profile),
        "rows": len(df),
        "configs": int(df["config_id"].nunique()),
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
        "families": {},
    }
    one = (2, 1, 512, 131328, 32, 32 * 1024)
    for name, make in families(spec, limits).items():
        pred = np.empty(len(y))
        fit_s = 0.0
        for train, test in splits:
            start = time.perf_counter()
            model = make().fit(comp[train], y[train])
            fit_s += time.perf_counter() - start
            pred[test] = model.predict(comp[test])
        frame = df.assign(pred=pred).groupby(["tp", "config_id"])[["step_time_ms", "pred"]].mean()
        ape = ((frame["pred"] - frame["step_time_ms"]).abs() / frame["step_time_ms"] * 100).groupby("tp")
        full = make().fit(comp, y)
        scalar = full.predict_ms if isinstance(full, IterationTimeModel) else full.predict_one
        result["families"][name] = {
            "mape_pct_per_tp": {str(int(k)): float(v) for k, v in ape.mean().items()},
            "max_ape_pct_per_tp": {str(int(k)): float(v) for k, v in ape.max().items()},
            "fit_s_per_fold": fit_s / len(splits),
            "predict_one_us": per_call_us(scalar, one, n=20_000 if name.startswith("roofline") else 200),
        }
    pm = fit_performance_model(args.profile)
    result["performance_model_calls_us"] = {
        "PerformanceModel.predict_ms": per_call_us(pm.predict_ms, one),
        "PerformanceModel.predict_quantile_ms(0.9)": per_call_us(pm.predict_quantile_ms, (0.9, *one)),
        "IterationTimeModel.predict (10k rows), per row": float(np.median([_vector_cost(pm, comp) for _ in range(5)])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    rows = []
    for name, r in result["families"].items():
        rows.append(
            {
                "family": name,
                **{f"MAPE tp{k} %": round(v, 2) for k, v in r["mape_pct_per_tp"].items()},
                "fit s/fold": round(r["fit_s_per_fold"], 3),
                "predict µs": round(r["predict_one_us"], 2),
            }
        )
    print(pd.DataFrame(rows).to_string(index=False))
    print(json.dumps(result["performance_model_calls_us"], indent=1))
    return 0


def _vector_cost(pm, comp: np.ndarray) -> float:
    big = np.tile(comp, (int(np.ceil(10_000 / len(comp))), 1))[:10_000]
    start = time.perf_counter()
    pm.predict_batch_ms(big)
    return (time.perf_counter() - start) / len(big) * 1e6


if __name__ == "__main__":
    raise SystemExit(main())
