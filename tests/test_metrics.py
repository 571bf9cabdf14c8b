"""Per-sample metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlvar.analysis.metrics import (
    BASELINES,
    METRICS,
    baseline_scores,
    compute_metrics,
    entropy,
    softmax,
)
from mlvar.errors import MlvarError

# 3 runs x 4 samples x 3 classes; labels y = [0, 1, 2, 0].
# sample 0: every run agrees and is right (one class dominates every vote).
# sample 1: each run predicts a different class.
# sample 2: argmax ties: runs 0, 1 tie classes 0/1 (argmax -> 0); run 2 ties classes 1/2
#           (argmax -> 1, although the label 2 is tied for the top, so its grank is 0).
# sample 3: probabilities exactly 0 and 1.
PROBS = np.array(
    [
        [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]],
        [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]],
        [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.4, 0.4], [0.0, 1.0, 0.0]],
    ]
)
LABELS = np.array([0, 1, 2, 0])

LN2, LN3 = 0.6931471805599453, 1.0986122886681098
# H(.5,.3,.2) = .5 ln2 + .3 ln(10/3) + .2 ln5 = .3465736 + .3611918 + .3218876
H_532 = 1.0296530
# H(2/3, 1/3) = 2/3 ln(3/2) + 1/3 ln3 = .2703101 + .3662041
H_21 = 0.6365142

EXPECTED = {
    # preds per sample: s0 [0,0,0], s1 [1,0,2], s2 [0,0,1], s3 [0,0,1]
    "n_correct": [3, 1, 0, 2],
    # gconf: s0 [.5,.5,.5]; s1 [.6,.2,.1]; s2 [.2,.2,.4]; s3 [1,1,0]
    "gconf_mean": [0.5, 0.3, 0.8 / 3, 2 / 3],
    # s1: sqrt((.3^2+.1^2+.2^2)/3) = sqrt(.14/3); s2: sqrt((2*(1/15)^2+(2/15)^2)/3);
    # s3: sqrt((2*(1/3)^2+(2/3)^2)/3) = sqrt(2/9)
    "gconf_std": [0.0, 0.2160247, 0.0942809, 0.4714045],
    # maxconf: s0 [.5]*3; s1 [.6,.6,.8]; s2 [.4]*3; s3 [1]*3
    "maxconf_mean": [0.5, 2 / 3, 0.4, 1.0],
    # s1: sqrt((2*(1/15)^2+(2/15)^2)/3)
    "maxconf_std": [0.0, 0.0942809, 0.0, 0.0],
    # gap: s0 [0,0,0]; s1 [0,.4,.7]; s2 [.2,.2,0]; s3 [0,0,1]
    "gap_mean": [0.0, 1.1 / 3, 0.4 / 3, 1 / 3],
    # s1: sqrt(((11/30)^2+(1/30)^2+(10/30)^2)/3) = sqrt(.2466667/3)
    "gap_std": [0.0, 0.2867442, 0.0942809, 0.4714045],
    # grank (classes strictly above p[y]): s0 [0,0,0]; s1 [0,1,1]; s2 [2,2,0]; s3 [0,0,1]
    "grank_mean": [0.0, 2 / 3, 4 / 3, 1 / 3],
    # s1: sqrt(2/9); s2: sqrt((2*(2/3)^2+(4/3)^2)/3) = sqrt(8/9); s3: sqrt(2/9)
    "grank_std": [0.0, 0.4714045, 0.9428090, 0.4714045],
    # votes per class: s0 (3,0,0); s1 (1,1,1); s2 (2,1,0); s3 (2,1,0)
    "n_distinct_pred": [1, 3, 2, 2],
    "vote_entropy": [0.0, LN3, H_21, H_21],
    # 1 - sum C(n_c,2)/C(3,2): s0 1-3/3; s1 1-0/3; s2, s3 1-1/3
    "disagreement": [0.0, 1.0, 2 / 3, 2 / 3],
    # 1 - max n_c / 3
    "variation_ratio": [0.0, 2 / 3, 1 / 3, 1 / 3],
    # mean probs: s0 (.5,.3,.2); s1 (.3,.3,.4) -> .6 ln(10/3) + .4 ln2.5 = .7223838+.3665163;
    # s2 (1/3,.4,4/15) -> 1/3 ln3 + .4 ln2.5 + 4/15 ln(15/4) = .3662041+.3665163+.3524683;
    # s3 (2/3,1/3,0) -> H_21
    "predictive_entropy": [H_532, 1.0889001, 1.0851887, H_21],
    # s1: H(.2,.6,.2) = .4 ln5 + .6 ln(5/3) = .9502705 (twice), H(.1,.1,.8) = .2 ln10 +
    #     .8 ln1.25 = .6390319 -> mean 2.5395729/3; s2: H(.4,.4,.2) = .8 ln2.5 + .2 ln5
    #     = 1.0549202 for every run; s3: certain runs -> 0
    "expected_entropy": [H_532, 0.8465243, 1.0549202, 0.0],
    # predictive - expected
    "mutual_information": [0.0, 0.2423758, 0.0302685, H_21],
    # std (ddof 0) of the predicted class indices: s0 [0,0,0] -> 0; s1 [1,0,2] -> mean 1,
    # sqrt((0+1+1)/3) = sqrt(2/3); s2, s3 [0,0,1] -> mean 1/3, sqrt((1/9+1/9+4/9)/3)
    # = sqrt(2/9)
    "std_pre_labels": [0.0, 0.8164966, 0.4714045, 0.4714045],
}


def test_registry_order_and_flags() -> None:
    assert list(METRICS) == list(EXPECTED)
    label_aware = {m.name for m in METRICS.values() if m.uses_label}
    assert label_aware == {
        "n_correct",
        "gconf_mean",
        "gconf_std",
        "gap_mean",
        "gap_std",
        "grank_mean",
        "grank_std",
    }
    lower = {m.name for m in METRICS.values() if not m.higher_is_suspicious}
    assert lower == {"n_correct", "gconf_mean", "maxconf_mean"}
    for name, metric in METRICS.items():
        assert metric.name == name
        assert metric.formula and "\n" not in metric.formula


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_metric_by_hand(name: str) -> None:
    got = METRICS[name].compute(PROBS, LABELS)
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, EXPECTED[name], rtol=0, atol=2e-7)


def test_compute_metrics_matches_by_hand() -> None:
    df = compute_metrics(PROBS, LABELS)
    assert list(df.columns) == list(METRICS)
    assert len(df) == 4
    for name, expected in EXPECTED.items():
        np.testing.assert_allclose(df[name].to_numpy(), expected, rtol=0, atol=2e-7)


def test_single_run() -> None:
    # R = 1 (run 0 only): preds [0, 1, 0, 0]; every spread is 0 and MI is 0.
    df = compute_metrics(PROBS[:1], LABELS)
    np.testing.assert_array_equal(df["n_correct"], [1, 1, 0, 1])
    np.testing.assert_allclose(df["gconf_mean"], [0.5, 0.6, 0.2, 1.0])
    np.testing.assert_allclose(df["grank_mean"], [0, 0, 2, 0])
    for col in ["gconf_std", "maxconf_std", "gap_std", "grank_std", "vote_entropy"]:
        np.testing.assert_array_equal(df[col], 0.0)
    np.testing.assert_array_equal(df["disagreement"], 0.0)
    np.testing.assert_array_equal(df["variation_ratio"], 0.0)
    np.testing.assert_array_equal(df["n_distinct_pred"], 1.0)
    # H(.5,.3,.2), H(.2,.6,.2), H(.4,.4,.2), H(1,0,0)
    np.testing.assert_allclose(df["predictive_entropy"], [H_532, 0.9502705, 1.0549202, 0.0])
    np.testing.assert_allclose(df["expected_entropy"], df["predictive_entropy"])
    np.testing.assert_allclose(df["mutual_information"], 0.0, atol=1e-15)


def test_disagreement_two_classes_even_split() -> None:
    # R = 4 runs, votes (2, 2): 1 - (1 + 1) / 6 = 2/3; variation ratio 1 - 2/4; entropy ln2.
    p = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]], [[0.0, 1.0]]])
    df = compute_metrics(p, np.array([1]))
    assert df["disagreement"].iloc[0] == pytest.approx(2 / 3)
    assert df["variation_ratio"].iloc[0] == pytest.approx(0.5)
    assert df["vote_entropy"].iloc[0] == pytest.approx(LN2)
    assert df["n_correct"].iloc[0] == 2


def test_exact_zero_and_one_probabilities_are_finite() -> None:
    rng = np.random.default_rng(0)
    # One-hot runs on random classes: every entropy term is 0*log0 or 1*log1.
    preds = rng.integers(0, 5, size=(7, 30))
    probs = np.eye(5)[preds]
    df = compute_metrics(probs, rng.integers(0, 5, size=30))
    assert np.isfinite(df.to_numpy()).all()
    np.testing.assert_array_equal(df["expected_entropy"], 0.0)
    assert not np.signbit(df["expected_entropy"]).any()  # +0.0, not -0.0
    # Mixed with exact zeros in some classes: MI never negative.
    dense = rng.dirichlet(np.ones(5) * 0.3, size=(7, 30))
    dense[dense < 0.05] = 0.0
    dense /= dense.sum(axis=2, keepdims=True)
    df = compute_metrics(dense, rng.integers(0, 5, size=30))
    assert np.isfinite(df.to_numpy()).all()
    assert (df["mutual_information"] >= 0).all()


def test_identical_runs_give_zero_mutual_information() -> None:
    # Round-off could make H(mean) - mean H slightly negative; it must be clipped to 0.
    rng = np.random.default_rng(1)
    one = rng.dirichlet(np.ones(10), size=50)
    probs = np.broadcast_to(one, (9, 50, 10))
    mi = METRICS["mutual_information"].compute(probs, rng.integers(0, 10, size=50))
    assert (mi >= 0).all() and mi.max() < 1e-12


def test_chunk_invariance() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(6), size=(11, 40))
    labels = rng.integers(0, 6, size=40)
    whole = compute_metrics(probs, labels)
    halves = pd.concat(
        [compute_metrics(probs[:, :17], labels[:17]), compute_metrics(probs[:, 17:], labels[17:])],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(whole, halves, check_exact=False, rtol=1e-14, atol=1e-14)


def test_names_subset_in_registry_order_and_float32_input() -> None:
    df = compute_metrics(PROBS.astype(np.float32), LABELS, names=["vote_entropy", "n_correct"])
    assert list(df.columns) == ["n_correct", "vote_entropy"]
    assert (df.dtypes == np.float64).all()
    np.testing.assert_array_equal(df["n_correct"], EXPECTED["n_correct"])


def test_unknown_metric_names_choices() -> None:
    with pytest.raises(MlvarError) as err:
        compute_metrics(PROBS, LABELS, names=["n_corect"])
    assert "n_corect" in err.value.message
    assert "n_correct" in err.value.hint and "mutual_information" in err.value.hint


def test_bad_shapes_and_labels() -> None:
    with pytest.raises(MlvarError):
        compute_metrics(PROBS[0], LABELS)
    with pytest.raises(MlvarError):
        compute_metrics(PROBS, LABELS[:3])
    with pytest.raises(MlvarError):
        compute_metrics(PROBS, np.array([0, 1, 3, 0]))


def test_suspicion_orientation() -> None:
    v = np.array([1.0, 3.0])
    np.testing.assert_array_equal(METRICS["n_correct"].suspicion(v), [-1.0, -3.0])
    np.testing.assert_array_equal(METRICS["gconf_mean"].suspicion(v), [-1.0, -3.0])
    np.testing.assert_array_equal(METRICS["maxconf_mean"].suspicion(v), [-1.0, -3.0])
    np.testing.assert_array_equal(METRICS["gconf_std"].suspicion(v), [1.0, 3.0])


def test_softmax() -> None:
    # exp(0) : exp(ln 3) = 1 : 3
    np.testing.assert_allclose(softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75])
    # Large logits would overflow exp without the max shift.
    out = softmax(np.array([[1000.0, 1000.0], [-1000.0, 0.0]], dtype=np.float32))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[0], [0.5, 0.5])
    np.testing.assert_allclose(out[1], [0.0, 1.0])
    # axis argument: columns sum to 1
    np.testing.assert_allclose(softmax(np.zeros((4, 2)), axis=0), 0.25)


def test_entropy_helper() -> None:
    np.testing.assert_allclose(entropy(np.array([0.5, 0.5])), LN2)
    assert entropy(np.array([1.0, 0.0])) == 0.0


def test_baseline_scores() -> None:
    scores = baseline_scores(PROBS, LABELS)
    assert list(scores) == list(BASELINES)
    # -p_r[y]: run 0 [.5,.6,.2,1], run 1 [.5,.2,.2,1], run 2 [.5,.1,.4,0]
    np.testing.assert_allclose(
        scores["neg_gconf"], -np.array([[0.5, 0.6, 0.2, 1], [0.5, 0.2, 0.2, 1], [0.5, 0.1, 0.4, 0]])
    )
    # -max_c p_r: run 0 [.5,.6,.4,1], run 1 [.5,.6,.4,1], run 2 [.5,.8,.4,1]
    expected = [[0.5, 0.6, 0.4, 1], [0.5, 0.6, 0.4, 1], [0.5, 0.8, 0.4, 1]]
    np.testing.assert_allclose(scores["neg_maxconf"], -np.array(expected))


# ---------------------------------------------------------------- the registry's records


def _plain_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    logs = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -(p * logs).sum(axis=axis)


def _plain_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric written out directly with numpy, independently of the registry."""
    r, n, c = probs.shape
    gconf = probs[:, np.arange(n), labels]
    maxconf = probs.max(axis=2)
    gap = maxconf - gconf
    grank = (probs > gconf[:, :, None]).sum(axis=2)
    preds = probs.argmax(axis=2)
    votes = np.stack([(preds == k).sum(axis=0) for k in range(c)], axis=1)
    pairs = [(a, b) for a in range(r) for b in range(a + 1, r)]
    disagree = [np.mean([preds[a, i] != preds[b, i] for a, b in pairs]) for i in range(n) if pairs]
    predictive = _plain_entropy(probs.mean(axis=0), axis=1)
    expected = _plain_entropy(probs, axis=2).mean(axis=0)
    out = {"n_correct": (preds == labels[None, :]).sum(axis=0)}
    for name, x in [("gconf", gconf), ("maxconf", maxconf), ("gap", gap), ("grank", grank)]:
        out[f"{name}_mean"], out[f"{name}_std"] = x.mean(axis=0), x.std(axis=0)
    return out | {
        "n_distinct_pred": np.array([len(set(preds[:, i])) for i in range(n)]),
        "vote_entropy": _plain_entropy(votes / r, axis=1),
        "disagreement": np.array(disagree) if pairs else np.zeros(n),
        "variation_ratio": 1 - votes.max(axis=1) / r,
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": np.maximum(predictive - expected, 0.0),
        # the study's np.std of the stacked predicted labels over runs
        "std_pre_labels": preds.std(axis=0),
    }


@pytest.mark.parametrize("runs", [1, 2, 9])
def test_registry_matches_plain_numpy(runs: int) -> None:
    rng = np.random.default_rng(runs)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=(runs, 60))
    probs[:, :5] = np.eye(4)[rng.integers(0, 4, size=(runs, 5))]  # exact 0s and 1s
    labels = rng.integers(0, 4, size=60)
    expected = _plain_metrics(probs, labels)
    got = compute_metrics(probs, labels)
    assert list(expected) == list(got.columns)
    for name in METRICS:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-12, err_msg=name)
    scores = baseline_scores(probs, labels)
    np.testing.assert_array_equal(scores["neg_gconf"], -probs[:, np.arange(60), labels])
    np.testing.assert_array_equal(scores["neg_maxconf"], -probs.max(axis=2))


def test_each_metric_reads_only_the_statistics_it_declares() -> None:
    from mlvar.analysis.metrics import (
        ALL_METRICS,
        STATISTICS,
        RunValues,
        Sufficient,
        dynamics_sums,
        reduce_runs,
    )

    rng = np.random.default_rng(4)
    dyn = rng.dirichlet(np.ones(3), size=(3, 4, 25))  # [R, E, n, C]
    labels = rng.integers(0, 3, size=25)
    full = reduce_runs(RunValues(dyn[:, -1], labels)) | dynamics_sums(iter(dyn), labels)
    assert list(full) == list(STATISTICS)
    for metric in ALL_METRICS.values():
        assert metric.statistics and set(metric.statistics) <= set(STATISTICS)
        only = Sufficient({k: full[k] for k in metric.statistics}, 3, labels)
        whole = Sufficient(full, 3, labels)
        np.testing.assert_array_equal(metric.finish(only), metric.finish(whole))
    for b in BASELINES.values():
        assert STATISTICS[b.statistic].reduce == "runs"


def test_in_memory_and_streaming_are_the_same_records_exactly() -> None:
    from mlvar.analysis.partial import concat_samples, finalize, from_probs

    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(7) * 0.3, size=(13, 90))
    labels = rng.integers(0, 7, size=90)
    blocks = [from_probs(probs[:, a : a + 8], labels[a : a + 8]) for a in range(0, 90, 8)]
    streamed = finalize(concat_samples(blocks), labels)
    pd.testing.assert_frame_equal(compute_metrics(probs, labels), streamed, check_exact=True)
    part = concat_samples(blocks)
    scores = baseline_scores(probs, labels)
    for b in BASELINES.values():
        np.testing.assert_array_equal(scores[b.name], -part[b.statistic])


def _doc_table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = lines.index(header) + 2  # skip the "| --- |" line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def test_docs_tables_agree_with_the_registry() -> None:
    from pathlib import Path

    from mlvar.analysis.metrics import DYNAMICS_METRICS

    text = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    header = "| metric | formula | uses label | suspicious when |"
    assert text.count(header) == 2
    first, second = text.split(header)[1:]
    for registry, part in ((METRICS, first), (DYNAMICS_METRICS, second)):
        expected = [
            [
                m.name,
                m.formula,
                "yes" if m.uses_label else "no",
                "high" if m.higher_is_suspicious else "low",
            ]
            for m in registry.values()
        ]
        assert _doc_table(header + part, header) == expected
    baselines = [[b.name, b.formula, "yes" if b.uses_label else "no"] for b in BASELINES.values()]
    assert _doc_table(text, "| baseline | formula | uses label |") == baselines
