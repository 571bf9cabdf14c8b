"""End to end: COMPAS accuracy in the published range, analysis over a store, the report."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mlvar.analysis import service as analysis
from mlvar.analysis.detection import detect
from mlvar.analysis.metrics import compute_metrics, softmax
from mlvar.config import Config, PathsConfig
from mlvar.data.registry import prepare
from mlvar.demo import DemoResult, run_demo
from mlvar.report.html import build_report
from mlvar.store import ExperimentStore
from mlvar.train.service import train


def test_compas_original_accuracy_over_20_seeds(compas_root: Path, tmp_path: Path) -> None:
    cfg = Config(paths=PathsConfig(compas_root, tmp_path / "runs", tmp_path / "reports"))
    prepare(compas_root, "compas", mode="original")
    res = train(cfg, "compas", runs=20)
    store = ExperimentStore.open(cfg.paths.runs_root, res.experiment)
    acc = analysis.accuracy(store, "test")
    mean, std = acc.summary["accuracy"]["mean"], acc.summary["accuracy"]["std"]
    # Published logistic-regression baselines on this split reach 0.66-0.71.
    assert 0.64 <= mean <= 0.74, mean
    assert 0 < std < 0.03, std
    assert acc.n_runs == 20
    per_run = acc.per_run["accuracy"].to_numpy()
    assert per_run.mean() == pytest.approx(mean)
    assert per_run.std(ddof=1) == pytest.approx(std)


def _synthetic_store(root: Path, class_names: list[str], n: int = 40, runs: int = 5):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(class_names), n)
    affected = np.zeros(n, dtype=bool)
    affected[labels == 0] = rng.random((labels == 0).sum()) < 0.5
    meta = {
        "dataset": "synthetic",
        "class_names": class_names,
        "scenario": {"name": "<b>scenario</b>", "description": "<script>alert('x')</script>"},
        "model": "none",
        "train": {},
    }
    samples = {
        "test": {
            "sample_id": np.arange(1000, 1000 + n),
            "label": labels,
            "affected": affected,
            "group": np.full(n, -1),
        }
    }
    store = ExperimentStore.create(root, "synthetic", meta, samples)
    logits = rng.normal(size=(runs, n, len(class_names))).astype(np.float32)
    logits[:, affected, 0] -= 2.0  # affected samples are less confident in their label
    for r in range(runs):
        store.write_run(f"run-{r:04d}", {"test": logits[r]}, {"seed": r, "config": {"x": 1}})
    return store, logits, labels, affected


def test_rank_streams_chunks_exactly_like_in_memory(tmp_path: Path) -> None:
    store, logits, labels, affected = _synthetic_store(tmp_path, ["a", "b", "c"])
    probs = softmax(logits.astype(np.float64))
    expected = compute_metrics(probs, labels)
    result = analysis.rank(store, "test", by="gconf_mean", chunk=7, write=False)
    got = result.ranking.sort_values("sample_id").reset_index(drop=True)
    for col in expected.columns:
        np.testing.assert_allclose(
            got[col].to_numpy(), expected[col].to_numpy(), rtol=0, atol=1e-12
        )
    # the ranking is by suspicion of gconf_mean: ascending gconf_mean
    assert np.all(np.diff(result.ranking["gconf_mean"].to_numpy()) >= 0)
    assert list(result.ranking["rank"]) == list(range(1, len(labels) + 1))
    det = detect(expected, labels, affected).set_index("metric")
    assert result.detection.set_index("metric")["auroc"].to_dict() == pytest.approx(
        det["auroc"].to_dict(), nan_ok=True
    )
    # majority vote and votes per class agree with the argmax of each run
    votes = np.stack([(probs.argmax(axis=2) == c).sum(axis=0) for c in range(3)], axis=1)
    by_id = result.ranking.set_index("sample_id")
    assert by_id.loc[1000, "votes"] == " ".join(map(str, votes[0]))
    assert by_id.loc[1000, "majority_pred"] == votes[0].argmax()


def test_mixed_configs_are_refused_unless_allowed(tmp_path: Path) -> None:
    store, logits, *_ = _synthetic_store(tmp_path, ["a", "b"])
    store.write_run("run-0099", {"test": logits[0]}, {"seed": 99, "config": {"x": 2}})
    from mlvar.errors import MlvarError

    with pytest.raises(MlvarError, match="2 different configurations"):
        analysis.rank(store, "test", write=False)
    assert analysis.rank(store, "test", write=False, allow_mixed=True).n_runs == 6


def test_report_escapes_text_from_data(tmp_path: Path) -> None:
    store, *_ = _synthetic_store(tmp_path / "runs", ["<script>alert(1)</script>", "b&c"])
    report = build_report(store, tmp_path / "report", top=10)
    html = report.path.read_text()
    # the report's own two script blocks only: no data-made script or tag
    assert "<script>alert" not in html and len(re.findall(r"<script[ >]", html)) == 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    data_js = (tmp_path / "report" / "ranking-data.js").read_text()  # the ranking's data
    data_json = json.loads(data_js[data_js.index("(") + 1 : data_js.rindex(")")])
    assert "\\u003cscript\\u003ealert(1)" in data_json  # in the ranking data, escaped
    assert "b&amp;c" in html
    assert "&lt;b&gt;scenario&lt;/b&gt;" in html
    assert (tmp_path / "report" / "accuracy_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    static = html.split("Top 10 samples")[1].split("</table>")[0]
    assert len(re.findall(r"<tr[ >]", static)) == 11  # header + 10
    assert len(list((tmp_path / "report" / "samples").glob("*.html"))) == report.n_pages


def test_demo_end_to_end(tmp_path: Path) -> None:
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "reports"))
    steps: list[str] = []
    result = run_demo(cfg, runs=4, step=steps.append)
    assert steps[0].startswith("preparing") and steps[-1] == "writing the report"
    html = result.report.read_text()
    assert "digits-holdout-sub3-r1.0" in html and "AUROC" in html
    # sample pages show the digit itself: the demo hands the report its data root
    pages = list((result.report.parent / "samples").glob("*.html"))
    assert pages and all(".png" in p.read_text() for p in pages)
    # The held-out 3s are the hardest samples of class 2-3: gconf_mean finds them well.
    det = result.ranking.detection.set_index("metric")
    assert det.loc["gconf_mean", "auroc"] > 0.9
    assert det.loc["gconf_mean", "scope"] == "class 1"
    acc = result.accuracy.summary
    assert acc["acc_affected"]["mean"] < acc["acc_unaffected"]["mean"] - 0.3
    best = result.best_detection(5)
    aurocs = sorted(result.ranking.detection["auroc"], reverse=True)
    assert [r["auroc"] for r in best] == aurocs[:5]
    assert all(det.loc[r["metric"], "auroc"] == r["auroc"] for r in best)
    # running it again reuses everything
    again = run_demo(cfg, runs=4)
    assert (
        again.accuracy.per_run["accuracy"].tolist() == result.accuracy.per_run["accuracy"].tolist()
    )


def test_demo_best_detection_sorts_by_auroc() -> None:
    import pandas as pd

    det = pd.DataFrame({"metric": ["a", "b", "c"], "auroc": [0.6, 0.9, 0.7], "scope": "all"})
    result = DemoResult("s", "e", Path("r"), None, SimpleNamespace(detection=det))
    assert [r["metric"] for r in result.best_detection(2)] == ["b", "c"]
    assert [r["metric"] for r in result.best_detection()] == ["b", "c", "a"]
    nothing = DemoResult("s", "e", Path("r"), None, SimpleNamespace(detection=None))
    assert nothing.best_detection() == []
