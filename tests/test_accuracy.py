"""Accuracy spread against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlvar.analysis.accuracy import (
    accuracy_summary,
    expected_seed_std,
    run_accuracies,
    summarize,
)
from mlvar.errors import MlvarError

# 3 runs, 4 samples, 4 classes (class 3 has no sample); samples 0 and 3 affected.
LABELS = np.array([0, 1, 1, 2])
AFFECTED = np.array([True, False, False, True])
PREDS = np.array(
    [
        [0, 1, 1, 2],  # correct [1, 1, 1, 1]
        [0, 0, 1, 2],  # correct [1, 0, 1, 1]
        [1, 0, 1, 0],  # correct [0, 0, 1, 0]
    ]
)


def test_run_accuracies_by_hand() -> None:
    df = run_accuracies(PREDS, LABELS, AFFECTED, n_classes=4)
    assert list(df.columns) == [
        "accuracy",
        "acc_class_0",
        "acc_class_1",
        "acc_class_2",
        "acc_class_3",
        "acc_affected",
        "acc_unaffected",
    ]
    np.testing.assert_allclose(df["accuracy"], [1.0, 0.75, 0.25])
    np.testing.assert_allclose(df["acc_class_0"], [1.0, 1.0, 0.0])  # sample 0
    np.testing.assert_allclose(df["acc_class_1"], [1.0, 0.5, 0.5])  # samples 1, 2
    np.testing.assert_allclose(df["acc_class_2"], [1.0, 1.0, 0.0])  # sample 3
    assert df["acc_class_3"].isna().all()
    np.testing.assert_allclose(df["acc_affected"], [1.0, 1.0, 0.0])  # samples 0, 3
    np.testing.assert_allclose(df["acc_unaffected"], [1.0, 0.5, 0.5])  # samples 1, 2


def test_empty_affected_group_is_nan() -> None:
    df = run_accuracies(PREDS, LABELS, np.zeros(4, dtype=bool), n_classes=3)
    assert df["acc_affected"].isna().all()
    np.testing.assert_allclose(df["acc_unaffected"], df["accuracy"])


def test_expected_seed_std_by_hand() -> None:
    # p_i = fraction of runs correct: [2/3, 1/3, 1, 2/3]; p(1-p) = [2/9, 2/9, 0, 2/9]
    # sum = 2/3; sqrt(2/3 / 4^2) = sqrt(1/24) = 0.2041241
    assert expected_seed_std(PREDS, LABELS) == pytest.approx(0.2041241, abs=1e-7)
    # All runs identical: no expected seed variance at all.
    assert expected_seed_std(np.tile(PREDS[1], (5, 1)), LABELS) == 0.0


def test_summarize_by_hand() -> None:
    s = summarize(np.array([1.0, 0.75, 0.25]))
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(2 / 3)
    # deviations 1/3, 1/12, -5/12 -> squares 16/144 + 1/144 + 25/144 = 42/144; / 2 -> 7/48
    assert s["std"] == pytest.approx(math.sqrt(7 / 48))
    assert s["min"] == 0.25 and s["max"] == 1.0
    assert 0.25 <= s["ci_low"] < s["mean"] < s["ci_high"] <= 1.0
    assert summarize(np.array([1.0, 0.75, 0.25])) == s  # deterministic for a seed


def test_summarize_bootstrap_interval_two_values() -> None:
    # Resampling [0, 1] twice gives means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4.
    # The 2.5% and 97.5% quantiles are 0 and 1; the 30% and 70% quantiles are both 1/2.
    s = summarize(np.array([0.0, 1.0]))
    assert (s["ci_low"], s["ci_high"]) == (0.0, 1.0)
    s = summarize(np.array([0.0, 1.0]), level=0.4)
    assert (s["ci_low"], s["ci_high"]) == (0.5, 0.5)


def test_summarize_one_value_and_all_nan() -> None:
    s = summarize(np.array([0.8]))
    assert s["n"] == 1 and s["mean"] == 0.8 and math.isnan(s["std"])
    assert s["ci_low"] == s["ci_high"] == 0.8
    s = summarize(np.array([np.nan, np.nan]))
    assert s["n"] == 0 and math.isnan(s["mean"]) and math.isnan(s["ci_low"])
    # NaN entries are dropped
    assert summarize(np.array([0.2, np.nan, 0.4]))["mean"] == pytest.approx(0.3)
    with pytest.raises(MlvarError):
        summarize(np.array([0.2, 0.4]), level=1.5)


def test_accuracy_summary() -> None:
    out = accuracy_summary(PREDS, LABELS, AFFECTED, n_classes=4)
    assert list(out["summary"]) == list(out["per_run"].columns)
    assert out["summary"]["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert out["summary"]["acc_unaffected"]["mean"] == pytest.approx(2 / 3)  # (1 + .5 + .5)/3
    assert out["summary"]["acc_class_3"]["n"] == 0
    assert out["observed_seed_std"] == pytest.approx(math.sqrt(7 / 48))  # 0.3818813
    assert out["expected_seed_std"] == pytest.approx(math.sqrt(1 / 24))


def test_single_run_summary() -> None:
    out = accuracy_summary(PREDS[:1], LABELS, AFFECTED, n_classes=3)
    assert math.isnan(out["observed_seed_std"])
    assert out["expected_seed_std"] == 0.0  # p_i in {0, 1}
    assert out["summary"]["accuracy"]["ci_low"] == 1.0


def test_bad_shapes() -> None:
    with pytest.raises(MlvarError):
        run_accuracies(PREDS, LABELS[:3], AFFECTED, n_classes=3)
    with pytest.raises(MlvarError):
        expected_seed_std(PREDS[0], LABELS)
