"""Training-dynamics metrics (Data Maps, forgetting events) by hand and through a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlvar.analysis import service
from mlvar.analysis.metrics import (
    ALL_METRICS,
    DYNAMICS_METRICS,
    METRICS,
    compute_dynamics_metrics,
    compute_metrics,
    softmax,
)
from mlvar.analysis.synthetic import synthetic_store
from mlvar.errors import MlvarError

# 2 runs x 3 epochs x 2 samples x 2 classes; labels y = [0, 1].
DYN = np.array(
    [
        [  # run 0
            [[0.8, 0.2], [0.6, 0.4]],
            [[0.4, 0.6], [0.3, 0.7]],
            [[0.9, 0.1], [0.7, 0.3]],
        ],
        [  # run 1
            [[0.3, 0.7], [0.1, 0.9]],
            [[0.2, 0.8], [0.2, 0.8]],
            [[0.4, 0.6], [0.6, 0.4]],
        ],
    ]
)
Y = np.array([0, 1])
# p_e[y]: run 0: s0 [.8,.4,.9], s1 [.4,.7,.3]; run 1: s0 [.3,.2,.4], s1 [.9,.8,.4]
# correct: run 0: s0 [1,0,1], s1 [0,1,0]; run 1: s0 [0,0,0], s1 [1,1,0]
STD_R0S0 = np.sqrt((0.1**2 + 0.3**2 + 0.2**2) / 3)  # mean .7
STD_R0S1 = np.sqrt(((1 / 15) ** 2 + (7 / 30) ** 2 + (1 / 6) ** 2) / 3)  # mean 1.4/3
STD_R1S0 = np.sqrt((0.0 + 0.1**2 + 0.1**2) / 3)  # mean .3
STD_R1S1 = np.sqrt((0.2**2 + 0.1**2 + 0.3**2) / 3)  # mean .7
EXPECTED = {
    "dm_confidence": [(0.7 + 0.3) / 2, (1.4 / 3 + 0.7) / 2],
    "dm_variability": [(STD_R0S0 + STD_R1S0) / 2, (STD_R0S1 + STD_R1S1) / 2],
    "dm_correctness": [(2 / 3 + 0) / 2, (1 / 3 + 2 / 3) / 2],
    # run 0: s0 forgotten e0->e1, s1 forgotten e1->e2; run 1: s0 never right, s1 e1->e2
    "forgetting_events": [0.5, 1.0],
    # s0 is never learnt by run 1
    "never_learnt": [0.5, 0.0],
}


def test_registry_apart_from_metrics() -> None:
    assert list(DYNAMICS_METRICS) == list(EXPECTED)
    assert not set(DYNAMICS_METRICS) & set(METRICS)
    assert list(ALL_METRICS) == [*METRICS, *DYNAMICS_METRICS]
    for m in DYNAMICS_METRICS.values():
        assert m.needs == "dynamics" and m.uses_label
    for m in METRICS.values():
        assert m.needs == "probs"
    low = {m.name for m in DYNAMICS_METRICS.values() if not m.higher_is_suspicious}
    assert low == {"dm_confidence", "dm_correctness"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_dynamics_metric_by_hand(name: str) -> None:
    got = DYNAMICS_METRICS[name].compute(DYN, Y)
    assert got.dtype == np.float64 and got.shape == (2,)
    np.testing.assert_allclose(got, EXPECTED[name], rtol=0, atol=1e-12)


def test_single_epoch_has_no_forgetting_and_no_variability() -> None:
    df = compute_dynamics_metrics(DYN[:, :1], Y)
    np.testing.assert_array_equal(df["forgetting_events"], 0.0)
    np.testing.assert_array_equal(df["dm_variability"], 0.0)
    # epoch 0: run 0 right on s0 only, run 1 right on s1 only
    np.testing.assert_array_equal(df["never_learnt"], [0.5, 0.5])


def test_compute_metrics_unchanged_by_dynamics_registry() -> None:
    df = compute_metrics(DYN[:, -1], Y)
    assert list(df.columns) == list(METRICS)


def test_bad_dynamics_shapes() -> None:
    with pytest.raises(MlvarError):
        compute_dynamics_metrics(DYN[0], Y)
    with pytest.raises(MlvarError):
        compute_dynamics_metrics(DYN, Y[:1])
    with pytest.raises(MlvarError, match="unknown training-dynamics metric"):
        compute_dynamics_metrics(DYN, Y, names=["dm_confidance"])


def _dyn_logits(store) -> np.ndarray:
    return np.stack([r.load_dynamics(mmap=False) for r in store.runs()])


def test_rank_on_train_includes_dynamics(tmp_path: Path) -> None:
    store = synthetic_store(
        tmp_path,
        n_runs=3,
        n_samples=57,
        n_classes=4,
        split="train",
        dynamics_epochs=5,
        dtype="float16",
    )
    run = store.runs()[0]
    assert run.meta["dynamics_epochs"] == 5
    assert run.meta["arrays"]["train.dynamics.npy"]["shape"] == [5, 57, 4]
    labels = store.samples("train")["label"].to_numpy()
    expected = compute_dynamics_metrics(softmax(_dyn_logits(store)), labels)
    result = service.rank(store, "train", by="forgetting_events", chunk=10, write=False)
    assert result.dynamics
    got = result.ranking.sort_values("sample_id").reset_index(drop=True)
    for name in DYNAMICS_METRICS:
        # the same operations in the same order whatever the chunking: exactly equal
        np.testing.assert_array_equal(got[name].to_numpy(), expected[name].to_numpy())
    assert set(DYNAMICS_METRICS) <= set(result.detection["metric"])
    assert np.all(np.diff(result.ranking["forgetting_events"].to_numpy()) <= 0)
    # label-aware: ranked within class 0 (the affected samples' class)
    row = result.detection.set_index("metric").loc["dm_confidence"]
    assert row["scope"] == "class 0"


def test_dynamics_only_when_every_run_has_them(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=2, n_samples=20, split="train", dynamics_epochs=3)
    logits = store.runs()[0].load_logits("train", mmap=False)
    store.write_run("run-0099", {"train": logits}, {"seed": 99, "config": {"synthetic": True}})
    result = service.rank(store, "train", write=False)
    assert not result.dynamics
    assert not set(DYNAMICS_METRICS) & set(result.ranking.columns)
    with pytest.raises(MlvarError, match="needs training dynamics"):
        service.rank(store, "train", by="dm_confidence", write=False)


def test_dynamics_not_on_other_splits(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=2, n_samples=20)
    with pytest.raises(MlvarError, match="needs training dynamics"):
        service.rank(store, "test", by="dm_variability", write=False)
    assert not (store.root / "analysis").exists()
