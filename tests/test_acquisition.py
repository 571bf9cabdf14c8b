"""Acquisition strategies (mlvar.analysis.acquisition): every strategy's order of a pool
equals the order computed here, independently, from the stored pool logits with the
formulas written out in numpy; ties go by pool position; ``random`` is reproducible per
seed and differs across runs; lists, budgets and k.

The pool is a synthetic run store (no training): 4 runs x 60 samples x 5 classes of random
logits, with some samples copied exactly (so every metric has ties) and one column of
labels left as is.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from mlvar.analysis.acquisition import (
    ALIASES,
    DEFAULT_BUDGETS,
    RANDOM_TAG,
    STRATEGIES,
    budget_k,
    parse_budgets,
    parse_strategies,
    pool_orders,
    set_name,
)
from mlvar.analysis.metrics import METRICS
from mlvar.analysis.service import load_predictions
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, run_id_for

R, N, C = 4, 60, 5
SEEDS = [7, 8, 9, 10]
TIE = 12  # decimals: scores equal to these are ties (the documented rule)


@pytest.fixture(scope="module")
def pool(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentStore, np.ndarray, np.ndarray]:
    """A store with a ``pool`` split; returns it, the logits [R, N, C] and labels."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(R, N, C)).astype(np.float32)
    # Exact copies: samples 30..39 repeat 0..9 (every metric ties), and in 40..44 every run
    # predicts class 1 confidently (the vote metrics tie among them).
    logits[:, 30:40] = logits[:, 0:10]
    logits[:, 40:45] = 0.0
    logits[:, 40:45, 1] = 6.0
    labels = rng.integers(0, C, size=N).astype(np.int64)
    samples = {
        "pool": {
            "sample_id": np.arange(100, 100 + N),
            "label": labels,
            "affected": np.zeros(N, bool),
            "group": np.full(N, -1),
        }
    }
    root = tmp_path_factory.mktemp("acq")
    store = ExperimentStore.create(
        root, "synthetic", {"class_names": [f"c{i}" for i in range(C)]}, samples
    )
    for r in range(R):
        store.write_run(run_id_for(r), {"pool": logits[r]}, {"seed": SEEDS[r], "config": {}})
    return store, logits, labels


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)


def expected_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, bool]]:
    """Every registry metric as (values [n], higher is suspicious), written out here."""
    p = _softmax(logits)  # [R, n, C]
    n_runs, n, n_classes = p.shape
    idx = np.arange(n)
    gconf = p[:, idx, labels]
    maxconf = p.max(axis=2)
    gap = maxconf - gconf
    grank = (p > gconf[:, :, None]).sum(axis=2).astype(float)
    preds = p.argmax(axis=2)
    votes = np.stack([(preds == c).sum(axis=0) for c in range(n_classes)], axis=1)  # [n, C]
    mean_p = p.mean(axis=0)
    pe = _entropy(mean_p)
    ee = _entropy(p).mean(axis=0)
    agree = (votes * (votes - 1) / 2).sum(axis=1)
    return {
        "n_correct": ((preds == labels).sum(axis=0).astype(float), False),
        "gconf_mean": (gconf.mean(axis=0), False),
        "gconf_std": (gconf.std(axis=0), True),
        "maxconf_mean": (maxconf.mean(axis=0), False),
        "maxconf_std": (maxconf.std(axis=0), True),
        "gap_mean": (gap.mean(axis=0), True),
        "gap_std": (gap.std(axis=0), True),
        "grank_mean": (grank.mean(axis=0), True),
        "grank_std": (grank.std(axis=0), True),
        "n_distinct_pred": ((votes > 0).sum(axis=1).astype(float), True),
        "vote_entropy": (_entropy(votes / n_runs), True),
        "disagreement": (1 - agree / (n_runs * (n_runs - 1) / 2), True),
        "variation_ratio": (1 - votes.max(axis=1) / n_runs, True),
        "predictive_entropy": (pe, True),
        "expected_entropy": (ee, True),
        "mutual_information": (np.maximum(pe - ee, 0), True),
        "std_pre_labels": (preds.astype(float).std(axis=0), True),
    }


def top_order(score: np.ndarray) -> np.ndarray:
    """Positions by score descending, ties (to TIE decimals) by position ascending."""
    return np.lexsort((np.arange(score.size), -np.round(score, TIE)))


def expected_orders(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every non-random strategy's [R, n] order, computed independently."""
    n_runs, n = logits.shape[:2]
    metrics = expected_metrics(logits, labels)
    out = {}
    for name, (values, higher) in metrics.items():
        order = top_order(values if higher else -values)
        out[name] = np.repeat(order[None], n_runs, axis=0)
    p = _softmax(logits)
    maxconf = p.max(axis=2)
    gconf = p[:, np.arange(n), labels]
    out["neg_maxconf"] = np.stack([top_order(-m) for m in maxconf])
    out["neg_gconf"] = np.stack([top_order(-g) for g in gconf])
    std = np.round(maxconf.std(axis=0), TIE)
    mean = np.round(maxconf.mean(axis=0), TIE)
    geo = np.sqrt(rankdata(-std, method="average") * rankdata(mean, method="average"))
    out["std_avg_conf"] = np.repeat(top_order(-geo)[None], n_runs, axis=0)
    return out


def test_every_metric_is_a_strategy() -> None:
    assert set(METRICS) <= set(STRATEGIES)
    assert {"random", "neg_maxconf", "neg_gconf", "std_avg_conf"} <= set(STRATEGIES)
    oracle = {name for name, s in STRATEGIES.items() if s.oracle}
    assert oracle == {m.name for m in METRICS.values() if m.uses_label} | {"neg_gconf"}


def test_orders_match_independent_computation(pool) -> None:
    store, logits, labels = pool
    preds = load_predictions(store, "pool")
    strategies = [s for name, s in STRATEGIES.items() if name != "random"]
    got = pool_orders(preds, strategies)
    want = expected_orders(logits, labels)
    assert set(got) == set(want)
    for name in want:
        for budget in DEFAULT_BUDGETS:
            k = budget_k(budget, N)
            np.testing.assert_array_equal(got[name][:, :k], want[name][:, :k], err_msg=name)


def test_ties_go_by_pool_position(pool) -> None:
    store, logits, labels = pool
    got = pool_orders(load_predictions(store, "pool"), [STRATEGIES["maxconf_std"]])
    order = list(got["maxconf_std"][0])
    # sample i and its exact copy 30 + i tie: the lower position comes first, right before
    for i in range(10):
        assert order.index(i) + 1 == order.index(30 + i)
    # the confident copies 40..44 have std 0 (tied with nothing above them) and come in order
    tail = [q for q in order if 40 <= q < 45]
    assert tail == sorted(tail)


def test_random_reproducible_per_seed_and_differs_across_runs(pool) -> None:
    store, _, _ = pool
    preds = load_predictions(store, "pool")
    a = pool_orders(preds, [STRATEGIES["random"]])["random"]
    b = pool_orders(preds, [STRATEGIES["random"]])["random"]
    np.testing.assert_array_equal(a, b)
    for r, seed in enumerate(SEEDS):
        want = np.random.default_rng(np.random.SeedSequence([RANDOM_TAG, seed])).permutation(N)
        np.testing.assert_array_equal(a[r], want)
        assert sorted(a[r]) == list(range(N))
    k = budget_k(0.2, N)
    firsts = {tuple(sorted(row[:k])) for row in a}
    assert len(firsts) == R  # every run picks another set


def test_aliases_and_lists() -> None:
    got = parse_strategies("std_conf,avg_conf, single_conf,maxconf_std,std_avg_conf")
    assert [s.name for s in got] == ["maxconf_std", "maxconf_mean", "neg_maxconf", "std_avg_conf"]
    assert ALIASES == {
        "std_conf": "maxconf_std",
        "avg_conf": "maxconf_mean",
        "single_conf": "neg_maxconf",
    }
    with pytest.raises(MlvarError, match="unknown strategy 'maxconf_sdt'") as err:
        parse_strategies("random,maxconf_sdt")
    assert "did you mean 'maxconf_std'" in err.value.hint
    for bad in ("", "random,,maxconf_std"):
        with pytest.raises(MlvarError):
            parse_strategies(bad)


def test_budgets_and_k() -> None:
    assert parse_budgets("0.5,0.1") == [0.0, 0.1, 0.5]  # budget 0 always added
    assert parse_budgets("0:0.3:0.1") == [0.0, 0.1, 0.2, 0.3]
    assert parse_budgets([1.0, 0.2]) == [0.0, 0.2, 1.0]
    for bad, words in (("1.5", "outside [0, 1]"), ("-0.1", "outside"), ("x", "not a number")):
        with pytest.raises(MlvarError, match=words.replace("[", r"\[")):
            parse_budgets(bad)
    # k = budget x n rounded half up, in decimal
    assert [budget_k(b, 25) for b in (0, 0.1, 0.2, 0.5, 1.0)] == [0, 3, 5, 13, 25]
    assert budget_k(0.1, 130) == 13 and budget_k(0.3, 10) == 3
    assert set_name("maxconf_std", 0.1) == "maxconf_std-b0.1"
    assert set_name("random", 1.0) == "random-b1.0"
    assert set_name(None, 0.0) == "b0"
