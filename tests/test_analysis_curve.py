"""AUROC against the number of runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mlvar.analysis import service
from mlvar.analysis.curve import curve_sizes, draw_subsets, runs_curve
from mlvar.analysis.detection import detect
from mlvar.analysis.metrics import METRICS, compute_metrics, softmax
from mlvar.analysis.synthetic import synthetic_store
from mlvar.cli import app
from mlvar.errors import MlvarError


def test_sizes() -> None:
    assert curve_sizes(1) == [1]
    assert curve_sizes(2) == [1, 2]
    assert curve_sizes(5) == [1, 2, 4, 5]
    assert curve_sizes(8) == [1, 2, 4, 8]
    assert curve_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_subsets_all_when_few_else_seeded_distinct() -> None:
    assert draw_subsets(4, 4, 5, 0) == [(0, 1, 2, 3)]
    assert draw_subsets(4, 3, 5, 0) == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    many = draw_subsets(10, 3, 5, 7)
    assert len(many) == 5 == len(set(many))
    assert all(len(s) == 3 and list(s) == sorted(s) for s in many)
    assert draw_subsets(10, 3, 5, 7) == many  # seeded
    assert draw_subsets(10, 3, 5, 8) != many


def test_curve_matches_direct_computation(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=5, n_samples=120, n_classes=3)
    result = runs_curve(store, "test", subsets=3, seed=1, chunk=17)
    assert result.n_runs == 5
    assert sorted(result.summary["n_runs"].unique()) == [1, 2, 4, 5]
    counts = result.summary.groupby("n_runs")["n_subsets"].first().to_dict()
    assert counts == {1: 3, 2: 3, 4: 3, 5: 1}
    samples = store.samples("test")
    labels, affected = samples["label"].to_numpy(), samples["affected"].to_numpy()
    logits = np.stack([r.load_logits("test", mmap=False) for r in store.runs()])
    for size in (2, 5):
        expected = []
        for subset in draw_subsets(5, size, 3, 1):
            probs = softmax(logits[list(subset)])
            expected.append(detect(compute_metrics(probs, labels), labels, affected))
        auroc = pd.concat(expected).groupby("metric", sort=False)["auroc"]
        got = result.summary[result.summary["n_runs"] == size].set_index("metric")
        for metric in METRICS:
            assert got.loc[metric, "auroc_mean"] == pytest.approx(auroc.mean()[metric])
            std = auroc.std(ddof=1)[metric]
            if size == 5:
                assert np.isnan(got.loc[metric, "auroc_std"])
            else:
                assert got.loc[metric, "auroc_std"] == pytest.approx(std)
    # the full set equals a plain rank
    full = service.rank(store, "test", write=False).detection.set_index("metric")["auroc"]
    last = result.summary[result.summary["n_runs"] == 5].set_index("metric")["auroc_mean"]
    assert last.to_dict() == pytest.approx(full.to_dict())
    for f in result.files:
        assert Path(f).is_file()
    assert (store.root / "analysis" / "auroc-vs-runs-test.csv").is_file()
    assert (store.root / "analysis" / "auroc-vs-runs-test.parquet").is_file()
    details = pd.read_csv(store.root / "analysis" / "auroc-vs-runs-test-subsets.csv")
    assert len(details) == (3 + 3 + 3 + 1) * len(METRICS)


def test_curve_sizes_and_auroc_by_metric_read_the_summary(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=5, n_samples=120, n_classes=3)
    result = runs_curve(store, "test", subsets=3, seed=1)
    assert result.sizes == [1, 2, 4, 5]
    table = result.auroc_by_metric()
    assert list(table) == list(METRICS)
    summary = result.summary
    for metric, cells in table.items():
        assert len(cells) == 4
        for size, (mean, std) in zip(result.sizes, cells, strict=True):
            row = summary[(summary["metric"] == metric) & (summary["n_runs"] == size)]
            assert len(row) == 1
            assert mean == row["auroc_mean"].item()
            assert std == row["auroc_std"].item() or (np.isnan(std) and size == 5)


def test_curve_needs_affected_samples(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=2, n_samples=30, affected_fraction=0.0)
    with pytest.raises(MlvarError, match="no affected samples"):
        runs_curve(store, "test")
    assert not (store.root / "analysis").exists()


def test_cli_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synthetic_store(tmp_path / "runs", name="exp", n_runs=3, n_samples=60)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    runner = CliRunner()
    out = runner.invoke(app, ["analyze", "curve", "exp", "--subsets", "2"])
    assert out.exit_code == 0, out.stderr
    assert "AUROC" in out.stdout and "3 runs" in out.stdout and "gconf_mean" in out.stdout
    out = runner.invoke(app, ["analyze", "curve", "exp", "--json"])
    info = json.loads(out.stdout)
    assert {r["n_runs"] for r in info["summary"]} == {1, 2, 3}
    out = runner.invoke(app, ["analyze", "curve", "exp", "--subsets", "0"])
    assert out.exit_code == 2
