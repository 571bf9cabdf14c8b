"""One scan for accuracy, ranking and the runs curve (:mod:`mlvar.analysis.scan`), the
one-pass curve and the plain-read chunk reader: each gives bit for bit what the
separate computations give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlvar.analysis import curve, service
from mlvar.analysis.detection import detect
from mlvar.analysis.scan import scan_experiment
from mlvar.analysis.service import _read_rows, _RowFile
from mlvar.analysis.synthetic import synthetic_store


def _curve_by_subset(store, split: str, subsets: int, seed: int) -> pd.DataFrame:
    """The curve's rows the slow way: every subset streamed over its own runs only."""
    preds = service.load_predictions(store, split)
    rows = []
    for size, index, subset in curve.curve_plan(len(preds.runs), subsets, seed):
        runs = [preds.runs[i] for i in subset]
        metrics = service.compute(preds, runs).metrics
        det = detect(metrics, preds.labels, preds.affected)
        for rec in det.to_dict(orient="records"):
            rows.append(
                {
                    "n_runs": size,
                    "subset": index,
                    "run_ids": " ".join(r.run_id for r in runs),
                    "metric": rec["metric"],
                    "scope": rec["scope"],
                    "auroc": rec["auroc"],
                    "average_precision": rec["average_precision"],
                    "precision_at_k": rec["precision_at_k"],
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("budget", [curve.CURVE_BYTES, 1])
def test_one_pass_curve_equals_each_subset_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    store = synthetic_store(tmp_path, n_runs=6, n_samples=150, n_classes=4)
    monkeypatch.setattr(curve, "CURVE_BYTES", budget)  # 1: one subset per scan
    result = curve.runs_curve(store, "test", subsets=3, seed=4, chunk=23, write=False)
    expected = _curve_by_subset(store, "test", 3, 4)
    pd.testing.assert_frame_equal(result.details, expected, check_exact=True)
    assert result.summary["n_subsets"].tolist()[:1] == [3]


def test_one_pass_curve_with_training_dynamics(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=4, n_samples=80, split="train", dynamics_epochs=3)
    result = curve.runs_curve(store, "train", subsets=2, seed=0, write=False)
    expected = _curve_by_subset(store, "train", 2, 0)
    assert "dm_confidence" in set(expected["metric"])
    pd.testing.assert_frame_equal(result.details, expected, check_exact=True)


def test_scan_equals_the_three_analyses(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=5, n_samples=200, n_classes=3)
    scan = scan_experiment(store, "test", "gconf_std", curve_subsets=3, curve_seed=1)
    analysis = tmp_path / store.name / "analysis"
    written = {p.name: p.read_bytes() for p in analysis.iterdir() if p.suffix != ".json"}
    assert {"rank-test.csv", "accuracy-test.csv", "detection-test.csv"} <= set(written)
    assert not any(name.startswith("auroc-vs-runs") for name in written)

    acc = service.accuracy(store, "test")
    ranked = service.rank(store, "test", by="gconf_std")
    again = {p.name: p.read_bytes() for p in analysis.iterdir() if p.suffix != ".json"}
    assert again == written  # the same files, byte for byte
    pd.testing.assert_frame_equal(scan.accuracy.per_run, acc.per_run, check_exact=True)
    assert scan.accuracy.summary == acc.summary
    assert scan.accuracy.expected_seed_std == acc.expected_seed_std
    pd.testing.assert_frame_equal(scan.ranked.ranking, ranked.ranking, check_exact=True)
    pd.testing.assert_frame_equal(scan.ranked.detection, ranked.detection, check_exact=True)
    pd.testing.assert_frame_equal(scan.ranked.baselines, ranked.baselines, check_exact=True)
    alone = curve.runs_curve(store, "test", subsets=3, seed=1, write=False)
    pd.testing.assert_frame_equal(scan.curve.summary, alone.summary, check_exact=True)
    pd.testing.assert_frame_equal(scan.curve.details, alone.details, check_exact=True)
    assert scan.curve_note == ""


def test_scan_without_affected_samples_has_no_curve(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=3, n_samples=40, affected_fraction=0.0)
    scan = scan_experiment(store, "test", write=False)
    assert scan.curve is None and scan.curve_note == "nothing to detect"
    assert scan.ranked.detection is None and scan.accuracy.n_runs == 3


def test_scan_with_training_dynamics_is_the_three_analyses(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=3, n_samples=60, split="train", dynamics_epochs=2)
    scan = scan_experiment(store, "train", curve_subsets=2, write=False)
    ranked = service.rank(store, "train", write=False)
    assert "forgetting_events" in scan.ranked.ranking.columns
    pd.testing.assert_frame_equal(scan.ranked.ranking, ranked.ranking, check_exact=True)
    alone = curve.runs_curve(store, "train", subsets=2, write=False)
    pd.testing.assert_frame_equal(scan.curve.details, alone.details, check_exact=True)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f4"])
def test_plain_reads_equal_memory_mapped_reads(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(37, 5)).astype(dtype)
    path = tmp_path / "x.npy"
    np.save(path, array)
    rows = _RowFile(path)
    assert rows.offset is not None
    for a, b in [(0, 37), (3, 4), (10, 30), (36, 37)]:
        got = np.empty((b - a, 5))
        rows.read(a, b, got)
        ref = np.empty((b - a, 5))
        _read_rows(path, a, b, ref)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(got, array[a:b].astype(np.float64))
    np.save(path, np.asfortranarray(array))  # a layout plain reads do not follow
    rows = _RowFile(path)
    assert rows.offset is None
    got = np.empty((4, 5))
    rows.read(2, 6, got)
    np.testing.assert_array_equal(got, array[2:6].astype(np.float64))
