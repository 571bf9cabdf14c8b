"""Detection scores against hand-computed values and sklearn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mlvar.analysis.detection import (
    SCORE_COLUMNS,
    average_ranks,
    detect,
    detect_baselines,
    detection_scores,
)
from mlvar.analysis.service import rank
from mlvar.analysis.synthetic import synthetic_store
from mlvar.errors import MlvarError


def test_average_ranks_ties() -> None:
    # Descending: the two 3s span positions 1-2 -> 1.5; 2 -> 3; the two 1s span 4-5 -> 4.5.
    np.testing.assert_array_equal(average_ranks(np.array([3, 1, 3, 2, 1])), [1.5, 4.5, 1.5, 3, 4.5])
    np.testing.assert_array_equal(average_ranks(np.array([0.1, 0.7, 0.4])), [3, 1, 2])
    np.testing.assert_array_equal(average_ranks(np.array([5.0, 5.0, 5.0])), [2, 2, 2])


def test_detection_scores_by_hand() -> None:
    score = np.array([0.9, 0.8, 0.8, 0.8, 0.3, 0.3])
    affected = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    d = detection_scores(score, affected)
    assert d["n"] == 6 and d["n_affected"] == 3
    # AUROC over 3 x 3 (pos, neg) pairs, ties 1/2: .9 beats all 3 -> 3; .8 ties two .8s and
    # beats .3 -> 2; .3 ties one .3 -> .5. (3 + 2 + .5) / 9
    assert d["auroc"] == pytest.approx(5.5 / 9)
    # AP, one threshold per distinct score: .9 -> (tp 1, fp 0) P=1; .8 -> (2, 2) P=1/2;
    # .3 -> (3, 3) P=1/2; each step adds recall 1/3: (1 + 1/2 + 1/2) / 3
    assert d["average_precision"] == pytest.approx(2 / 3)
    # k = 3, 3rd largest score .8: one sample above (affected); two slots left among the
    # three tied .8s, of which one is affected -> 2 * 1/3. (1 + 2/3) / 3
    assert d["precision_at_k"] == pytest.approx(5 / 9)
    # ranks [1, 3, 3, 3, 5.5, 5.5]; affected ranks [1, 3, 5.5]
    assert d["rank_first"] == 1.0
    assert d["rank_median"] == 3.0
    assert d["rank_top10_mean"] == pytest.approx(9.5 / 3)
    assert d["rank_mean"] == pytest.approx(9.5 / 3)
    assert d["rank_first_norm"] == pytest.approx(1 / 6)
    assert d["rank_median_norm"] == pytest.approx(0.5)
    assert d["rank_top10_mean_norm"] == pytest.approx(9.5 / 18)
    assert d["rank_mean_norm"] == pytest.approx(9.5 / 18)
    assert set(d) == {"n", "n_affected", *SCORE_COLUMNS}


def test_rank_top10_uses_ten_best() -> None:
    # 30 distinct scores, rank = index + 1; affected = indices 0, 2, ..., 22 (ranks 1..23 odd)
    score = -np.arange(30.0)
    affected = np.zeros(30, dtype=bool)
    affected[0:23:2] = True
    d = detection_scores(score, affected)
    assert d["n_affected"] == 12
    assert d["rank_top10_mean"] == pytest.approx(10.0)  # mean(1, 3, ..., 19)
    assert d["rank_mean"] == pytest.approx(12.0)  # mean(1, 3, ..., 23)
    assert d["rank_median"] == pytest.approx(12.0)  # (11 + 13) / 2
    assert d["rank_first"] == 1.0
    # top 12 = ranks 1..12, of which the 6 odd ones are affected
    assert d["precision_at_k"] == pytest.approx(0.5)


def test_perfect_and_inverted() -> None:
    affected = np.array([True, True, False, False, False])
    good = detection_scores(np.array([5.0, 4, 3, 2, 1]), affected)
    assert good["auroc"] == 1.0 and good["average_precision"] == 1.0
    assert good["precision_at_k"] == 1.0
    bad = detection_scores(np.array([1.0, 2, 3, 4, 5]), affected)
    assert bad["auroc"] == 0.0 and bad["precision_at_k"] == 0.0
    # affected at ranks 4 and 5: AP = (1/2)(1/4) + (1/2)(2/5)
    assert bad["average_precision"] == pytest.approx(0.125 + 0.2)
    # all tied: AUROC 1/2, AP = precision at the single threshold = 2/5, P@k = 2/5
    flat = detection_scores(np.zeros(5), affected)
    assert flat["auroc"] == 0.5
    assert flat["average_precision"] == pytest.approx(0.4)
    assert flat["precision_at_k"] == pytest.approx(0.4)


@pytest.mark.parametrize("n_affected", [0, 4])
def test_degenerate_ground_truth_is_nan(n_affected: int) -> None:
    affected = np.arange(4) < n_affected
    d = detection_scores(np.array([0.1, 0.2, 0.3, 0.4]), affected)
    assert d["n"] == 4 and d["n_affected"] == n_affected
    assert all(math.isnan(d[c]) for c in SCORE_COLUMNS)


@pytest.mark.parametrize("seed", range(40))
def test_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    # Few distinct values -> many ties.
    score = rng.integers(0, int(rng.integers(2, 8)), size=n).astype(float)
    affected = rng.random(n) < rng.uniform(0.05, 0.6)
    affected[0], affected[1] = True, False  # both classes present
    d = detection_scores(score, affected)
    assert d["auroc"] == pytest.approx(roc_auc_score(affected, score), abs=1e-12)
    assert d["average_precision"] == pytest.approx(
        average_precision_score(affected, score), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(10))
def test_precision_at_k_is_mean_over_all_tie_orders(seed: int) -> None:
    # Brute force: break ties by every possible order of the samples and average the
    # precision of the top k.
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 3, size=6).astype(float)
    affected = np.array([True, False, *(rng.random(4) < 0.5)])
    k = int(affected.sum())
    precisions = [
        affected[sorted(order, key=lambda i: -score[i])[:k]].mean()
        for order in itertools.permutations(range(6))
    ]
    assert detection_scores(score, affected)["precision_at_k"] == pytest.approx(
        np.mean(precisions), abs=1e-12
    )


def test_nan_score_rejected() -> None:
    with pytest.raises(MlvarError):
        detection_scores(np.array([0.1, np.nan]), np.array([True, False]))


# Class restriction: 8 samples, classes [0]*4 + [1]*4, the affected ones (0, 1) all class 0.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
AFFECTED = np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
METRIC_VALUES = pd.DataFrame(
    {
        # lower is suspicious. Within class 0: affected 0, 0 vs unaffected 3, 3 -> AUROC 1.
        # Over the split it would be: each affected beats 3, 3 and ties 0, 0, 0, 0 ->
        # (2 + 2) / 6 = 2/3.
        "n_correct": [0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0],
        # label-free, always over the split: affected 1, 1 vs 0, 0, 1, 1, 0, 0: each beats 4
        # and ties 2 -> (4 + 1) / 6 = 5/6.
        "vote_entropy": [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
    }
)


def test_detect_restricts_label_aware_metrics_to_the_class() -> None:
    out = detect(METRIC_VALUES, LABELS, AFFECTED).set_index("metric")
    assert list(out.index) == ["n_correct", "vote_entropy"]
    assert out.loc["n_correct", "scope"] == "class 0"
    assert out.loc["n_correct", "population"] == 4
    assert out.loc["n_correct", "auroc"] == pytest.approx(1.0)
    # class 0 ranks of -n_correct: affected tied at 1.5, unaffected at 3.5
    assert out.loc["n_correct", "rank_mean"] == pytest.approx(1.5)
    assert out.loc["n_correct", "rank_mean_norm"] == pytest.approx(1.5 / 4)
    assert out.loc["vote_entropy", "scope"] == "split"
    assert out.loc["vote_entropy", "population"] == 8
    assert out.loc["vote_entropy", "auroc"] == pytest.approx(5 / 6)


def test_detect_over_split_when_affected_span_classes() -> None:
    affected = AFFECTED.copy()
    affected[4] = True  # now classes 0 and 1 are affected
    out = detect(METRIC_VALUES, LABELS, affected, names=["n_correct"]).set_index("metric")
    assert out.loc["n_correct", "scope"] == "split"
    assert out.loc["n_correct", "population"] == 8
    # affected 0, 0, 0 vs unaffected 3, 3, 0, 0, 0: each beats 2, ties 3 -> 3.5 * 3 / 15
    assert out.loc["n_correct", "auroc"] == pytest.approx(10.5 / 15)


def test_detect_rejects_unknown_or_missing_metric() -> None:
    with pytest.raises(MlvarError):
        detect(METRIC_VALUES, LABELS, AFFECTED, names=["nope"])
    with pytest.raises(MlvarError):
        detect(METRIC_VALUES, LABELS, AFFECTED, names=["gconf_mean"])


def test_detect_baselines_min_median_max() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    affected = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    # neg_gconf is label-aware: ranked in class 0 only (first 4 samples). The class-1
    # values (9) would spoil run 0's AUROC if they were included.
    neg_gconf = np.array(
        [
            [0.9, 0.8, 0.1, 0.2, 9.0, 9.0],  # AUROC 1; affected ranks 1, 2
            [0.1, 0.2, 0.9, 0.8, 9.0, 9.0],  # AUROC 0; affected ranks 4, 3
            [0.9, 0.1, 0.8, 0.2, 9.0, 9.0],  # .9 beats 2, .1 beats 0 -> 2/4; ranks 1, 4
        ]
    )
    # neg_maxconf is label-free: ranked over all 6
    neg_maxconf = np.array(
        [
            [6.0, 5, 4, 3, 2, 1],  # AUROC 1; affected ranks 1, 2
            [1.0, 2, 3, 4, 5, 6],  # AUROC 0; ranks 6, 5
            [6.0, 1, 5, 4, 3, 2],  # 6 beats 4, 1 beats 0 -> 4/8; ranks 1, 6
        ]
    )
    out = detect_baselines({"neg_gconf": neg_gconf, "neg_maxconf": neg_maxconf}, labels, affected)
    assert list(out.columns[:2]) == ["baseline", "stat"]
    out = out.set_index(["baseline", "stat"])
    assert list(out.index) == [
        (b, s) for b in ["neg_gconf", "neg_maxconf"] for s in ["min", "median", "max"]
    ]
    assert (out.loc["neg_gconf", "scope"] == "class 0").all()
    assert (out.loc["neg_gconf", "population"] == 4).all()
    assert (out.loc["neg_maxconf", "scope"] == "split").all()
    np.testing.assert_allclose(out.loc["neg_gconf", "auroc"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(out.loc["neg_maxconf", "auroc"], [0.0, 0.5, 1.0])
    # rank_first per run: gconf 1, 3, 1; maxconf 1, 5, 1
    np.testing.assert_allclose(out.loc["neg_gconf", "rank_first"], [1, 1, 3])
    np.testing.assert_allclose(out.loc["neg_maxconf", "rank_first"], [1, 1, 5])
    # rank_mean per run: gconf 1.5, 3.5, 2.5; maxconf 1.5, 5.5, 3.5
    np.testing.assert_allclose(out.loc["neg_gconf", "rank_mean"], [1.5, 2.5, 3.5])
    norm = out.loc["neg_maxconf", "rank_mean_norm"]
    np.testing.assert_allclose(norm, np.array([1.5, 3.5, 5.5]) / 6)


def test_detect_baselines_no_affected_is_nan_without_warnings() -> None:
    scores = {"neg_maxconf": np.random.default_rng(0).random((3, 5))}
    with np.errstate(all="raise"):
        out = detect_baselines(scores, np.zeros(5, dtype=int), np.zeros(5, dtype=bool))
    assert len(out) == 3
    assert out[list(SCORE_COLUMNS)].isna().all().all()


def test_detect_over_split_when_the_whole_class_is_affected() -> None:
    # A held-out class: every class-0 sample is affected, so ranking within class 0 would
    # have no negatives; the split is the population instead.
    affected = LABELS == 0
    out = detect(METRIC_VALUES, LABELS, affected, names=["n_correct"]).set_index("metric")
    assert out.loc["n_correct", "scope"] == "split"
    assert out.loc["n_correct", "population"] == 8
    # -n_correct: affected 0, 0, -3, -3 vs unaffected 0, 0, 0, 0:
    # each 0 ties all 4 (2 wins), each -3 loses all (0) -> (2 + 2) / 16
    assert out.loc["n_correct", "auroc"] == pytest.approx(4 / 16)


def test_rank_result_counts_the_affected_samples(tmp_path) -> None:
    store = synthetic_store(tmp_path, n_runs=3, n_samples=90, affected_fraction=0.4)
    result = rank(store, "test", write=False)
    expected = int(np.count_nonzero(store.samples("test")["affected"].to_numpy()))
    assert 0 < expected < 90
    assert result.n_affected == expected
