"""The iteration-time estimators: scikit-learn contract, fast path, extrapolation warnings, calibration."""

from __future__ import annotations

import pickle
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as ec

from nitsum_opt.models.features import COMPOSITION_COLUMNS
from nitsum_opt.models.heldout import evaluate_heldout
from nitsum_opt.models.latency import (
    IterationTimeModel,
    OutOfProfileRangeWarning,
)
from nitsum_opt.models.quantile import IterationTimeQuantileModel
from nitsum_opt.models.spec import MODEL_PRESETS

SPEC = MODEL_PRESETS["llama-3.1-8b"]


def xy(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return df[list(COMPOSITION_COLUMNS)].to_numpy(float), df["step_time_ms"].to_numpy(float)


# --- scikit-learn contract
# ---------------------------------------------------------------------------------------
# sklearn's data-driven checks feed random feature matrices, which are not batch compositions (tp must be a TP
# degree, counts non-negative); those checks are re-done below on valid compositions. The API checks run as
# is.
@pytest.mark.parametrize("estimator", [IterationTimeModel(spec=SPEC), IterationTimeQuantileModel(spec=SPEC)])
@pytest.mark.parametrize(
    "check",
    [
        ec.check_no_attributes_set_in_init,
        ec.check_get_params_invariance,
        ec.check_set_params,
        ec.check_estimator_repr,
        ec.check_estimator_cloneable,
        ec.check_do_not_raise_errors_in_init_or_set_params,
        ec.check_valid_tag_types,
        ec.check_estimator_tags_renamed,
    ],
)
def test_sklearn_api_checks(estimator, check) -> None:
    check(type(estimator).__name__, estimator)


@pytest.mark.parametrize("cls", [IterationTimeModel, IterationTimeQuantileModel])
def test_default_constructible(cls) -> None:
    ec.check_parameters_default_constructible(cls.__name__, cls())


def test_fit_contract_on_valid_compositions(synthetic: pd.DataFrame) -> None:
    x, y = xy(synthetic)
    model = IterationTimeModel(spec=SPEC)
    with pytest.raises(NotFittedError):
        model.predict(x[:3])
    params = model.get_params()
    assert model.fit(x, y) is model
    assert model.get_params() == params  # fit never touches parameters
    assert not [
        a
        for a in vars(model)
        if a.endswith("_") and a not in ("coef_", "ranges_", "tps_", "feature_names_", "n_features_in_")
    ]
    first = model.predict(x)
    again = clone(model).fit(x, y).predict(x)
    np.testing.assert_allclose(first, again)  # idempotent, clone-able
    order = np.random.default_rng(0).permutation(len(y))
    np.testing.assert_allclose(clone(model).fit(x[order], y[order]).predict(x), first, rtol=1e-9)
    np.testing.assert_allclose(model.predict(x[10:20]), first[10:20])  # subset invariance
    np.testing.assert_allclose(pickle.loads(pickle.dumps(model)).predict(x), first)
    assert model.n_features_in_ == 6
    assert all((c >= 0).all() for c in model.coef_.values())  # every physical term keeps its sign
    with pytest.raises(ValueError, match="finite"):
        IterationTimeModel(spec=SPEC).fit(x, np.where(np.arange(len(y)) == 3, np.nan, y))
    with pytest.raises(ValueError, match="needs a ModelSpec"):
        IterationTimeModel().fit(x, y)


def test_fast_path_matches_vectorised_and_is_cheap(synthetic: pd.DataFrame) -> None:
    x, y = xy(synthetic)
    model = IterationTimeModel(spec=SPEC).fit(x, y)
    vec = model.predict(x)
    scalar = [model.predict_ms(int(r[0]), *(int(v) for v in r[1:])) for r in x]
    np.testing.assert_allclose(scalar, vec, rtol=1e-9)
    args = (2, 1, 512, 131328, 32, 32 * 1024)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        model.predict_ms(*args)
    per_call_us = (time.perf_counter() - start) / n * 1e6
    assert per_call_us < 25, f"predict_ms costs {per_call_us:.1f} µs"  # ~1 µs on an idle core


def test_unknown_tp_is_a_clear_error(synthetic: pd.DataFrame) -> None:
    model = IterationTimeModel(spec=SPEC).fit(*xy(synthetic))
    with pytest.raises(ValueError, match=r"no latency model for tp=8.*covers tp \[1, 2, 4\]"):
        model.predict([[8, 0, 0, 0, 1, 100]])


def test_extrapolation_warns_once_per_feature(synthetic: pd.DataFrame) -> None:
    model = IterationTimeModel(spec=SPEC).fit(*xy(synthetic))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.predict_ms(1, 0, 0, 0, 4096, 4096 * 1024)
        model.predict([[1, 0, 0, 0, 4096, 4096 * 1024]])
        model.predict_ms(1, 0, 0, 0, 8, 8 * 10_000_000)
    messages = [str(w.message) for w in caught if issubclass(w.category, OutOfProfileRangeWarning)]
    # num_decode_seqs and decode_context_tokens left the range (4,096 tokens did not: prefill rows reach 16k);
    # each
    # warns exactly once although it was exceeded four times.
    assert len(messages) == 2, messages
    assert any("num_decode_seqs=4,096 at tp=1 is outside the profiled range [0, 256]" in m for m in messages)
    assert any("decode_context_tokens" in m for m in messages)


def test_quantile_model_shape_order_and_fast_path(synthetic: pd.DataFrame) -> None:
    x, y = xy(synthetic)
    qm = IterationTimeQuantileModel(spec=SPEC).fit(x, y, groups=synthetic["config_id"].to_numpy())
    q = qm.predict(x[:50])
    assert q.shape == (50, 3) and (np.diff(q, axis=1) >= 0).all()
    r = x[7]
    assert qm.predict_quantile_ms(0.9, int(r[0]), *(int(v) for v in r[1:])) == pytest.approx(q[7, 1])
    with pytest.raises(ValueError, match="was not fitted"):
        qm.predict_quantile_ms(0.95, 1, 0, 0, 0, 1, 10)


def test_heldout_error_and_coverage_on_known_noise(synthetic: pd.DataFrame) -> None:
    """3 % log-normal repeat noise around a roofline law: the held-out mean error is small and p90 covers 90
    %."""
    report = evaluate_heldout(synthetic, SPEC)
    for e in report.per_tp:
        assert e.mean_mape_pct < 5.0, e
        assert 86.0 <= e.coverage_pct["0.9"] <= 94.0, e
        assert e.coverage_pct["0.5"] < e.coverage_pct["0.9"] < e.coverage_pct["0.99"]
