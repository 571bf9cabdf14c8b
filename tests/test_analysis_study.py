"""The study table over many experiments (``mlvar analyze rank --merge``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mlvar.analysis import service
from mlvar.analysis.metrics import METRICS
from mlvar.analysis.study import study
from mlvar.analysis.synthetic import synthetic_store
from mlvar.cli import app
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore


def _experiments(root: Path) -> None:
    for name, frac, runs in [("e-r0.3", 0.3, 3), ("e-r0.8", 0.8, 4)]:
        store = synthetic_store(root, name=name, n_runs=runs, n_samples=90, affected_fraction=frac)
        store.meta["scenario"]["params"] = {"ratio": frac, "subclass": 3}
    synthetic_store(root, name="clean", n_runs=2, n_samples=30, affected_fraction=0.0)


def test_study_requires_results_unless_compute_missing(tmp_path: Path) -> None:
    _experiments(tmp_path)
    with pytest.raises(MlvarError, match="no experiment .* has detection results"):
        study(tmp_path)
    assert not (tmp_path / "study.csv").exists()
    result = study(tmp_path, compute_missing=True)
    assert result.computed == ["e-r0.3", "e-r0.8"]
    assert result.skipped == {"clean": "no affected samples"}
    table = result.table
    assert set(table["experiment"]) == {"e-r0.3", "e-r0.8"}
    metric_rows = table[table["kind"] == "metric"]
    assert len(metric_rows) == 2 * len(METRICS)
    assert len(table[table["kind"] == "baseline"]) == 2 * 2 * 3
    assert "neg_gconf[median]" in set(table["metric"])
    # the numbers are those of each experiment's detection table
    store = ExperimentStore.open(tmp_path, "e-r0.8")
    det = service.rank(store, "test", write=False).detection.set_index("metric")
    rows = metric_rows[metric_rows["experiment"] == "e-r0.8"].set_index("metric")
    assert rows["auroc"].to_dict() == pytest.approx(det["auroc"].to_dict())
    assert set(rows["n_runs"]) == {4} and not rows["stale"].any()
    assert {"dataset", "scenario", "mode", "model", "params", "affected_fraction"} <= set(
        table.columns
    )
    on_disk = pd.read_csv(tmp_path / "study.csv")
    assert len(on_disk) == len(table)
    assert (tmp_path / "study.parquet").is_file()
    per = result.per_experiment("gconf_mean")
    assert list(per["experiment"]) == ["e-r0.3", "e-r0.8"]
    assert per["best_metric"].isin(list(METRICS)).all()


def test_study_marks_stale_results(tmp_path: Path) -> None:
    _experiments(tmp_path)
    study(tmp_path, compute_missing=True)
    store = ExperimentStore.open(tmp_path, "e-r0.3")
    logits = store.runs()[0].load_logits("test", mmap=False)
    store.write_run("run-0050", {"test": logits}, {"seed": 1, "config": {"synthetic": True}})
    table = study(tmp_path).table
    stale = table.groupby("experiment")["stale"].first().to_dict()
    assert stale == {"e-r0.3": True, "e-r0.8": False}


def test_cli_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _experiments(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    runner = CliRunner()
    out = runner.invoke(app, ["analyze", "rank", "--merge"])
    assert out.exit_code == 2
    (line,) = out.stderr.strip().splitlines()
    assert "no experiment" in line and "--compute-missing" in line
    assert runner.invoke(app, ["analyze", "rank", "e-r0.3"]).exit_code == 0
    out = runner.invoke(app, ["analyze", "rank", "--merge"])
    assert out.exit_code == 0, out.stderr
    assert "e-r0.3" in out.stdout and "skipped e-r0.8" in out.stdout
    out = runner.invoke(app, ["analyze", "rank", "--merge", "--compute-missing", "--json"])
    info = json.loads(out.stdout)
    assert {r["experiment"] for r in info["rows"]} == {"e-r0.3", "e-r0.8"}
    assert info["computed"] == ["e-r0.8"]
    assert Path(info["files"][0]).name == "study.parquet"
    out = runner.invoke(app, ["analyze", "rank", "--by", "gconf_std"])
    assert out.exit_code == 2 and "missing argument EXPERIMENT" in out.stderr


def test_study_columns_match_independent_computations(tmp_path: Path) -> None:
    """Rank summaries, the matched single-model baselines' worst and median AUROC and the
    accuracy across seeds, each recomputed from the logits with numpy, scipy, sklearn."""
    import numpy as np
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    _experiments(tmp_path)
    table = study(tmp_path, compute_missing=True).table
    store = ExperimentStore.open(tmp_path, "e-r0.8")
    samples = store.samples("test")
    labels = samples["label"].to_numpy()
    affected = samples["affected"].to_numpy()
    logits = np.stack([r.load_logits("test", mmap=False) for r in store.runs()]).astype(float)
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    gconf = probs[:, np.arange(len(labels)), labels]  # [R, n]
    maxconf = probs.max(axis=2)
    in_class = labels == 0  # every affected sample is of class 0, not all of class 0 are
    assert affected[in_class].any() and not affected[in_class].all()
    rows = table[table["experiment"] == "e-r0.8"].set_index("metric")

    def worst_median(score: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
        aurocs = [roc_auc_score(affected[mask], run[mask]) for run in score]
        return min(aurocs), float(np.median(aurocs))

    gconf_worst, gconf_median = worst_median(-gconf, in_class)
    maxconf_worst, maxconf_median = worst_median(-maxconf, np.ones(len(labels), bool))
    for metric, row in rows.iterrows():
        if row["kind"] != "metric":
            continue
        if METRICS[metric].uses_label:
            assert row["baseline"] == "neg_gconf" and row["scope"] == "class 0"
            expected = (gconf_worst, gconf_median)
        else:
            assert row["baseline"] == "neg_maxconf" and row["scope"] == "split"
            expected = (maxconf_worst, maxconf_median)
        got = (row["baseline_worst_auroc"], row["baseline_median_auroc"])
        assert got == pytest.approx(expected, abs=1e-12), metric
    assert rows.loc["neg_gconf[min]", "baseline_worst_auroc"] == pytest.approx(gconf_worst)

    # rank summaries of gconf_mean (lower is more suspicious) within class 0
    score = -gconf.mean(axis=0)[in_class]
    ranks = np.sort(rankdata(-score, method="average")[affected[in_class]])
    n = int(in_class.sum())
    row = rows.loc["gconf_mean"]
    assert row["rank_first_norm"] == pytest.approx(ranks[0] / n)
    assert row["rank_median_norm"] == pytest.approx(np.median(ranks) / n)
    assert row["rank_top10_mean_norm"] == pytest.approx(ranks[:10].mean() / n)
    assert row["rank_mean_norm"] == pytest.approx(ranks.mean() / n)

    # accuracy across seeds: all, affected and unaffected samples
    correct = probs.argmax(axis=2) == labels[None, :]
    for prefix, mask in [
        ("acc", np.ones(len(labels), bool)),
        ("acc_affected", affected),
        ("acc_unaffected", ~affected),
    ]:
        per_run = correct[:, mask].mean(axis=1)
        assert rows[f"{prefix}_mean"].iloc[0] == pytest.approx(per_run.mean())
        assert rows[f"{prefix}_std"].iloc[0] == pytest.approx(per_run.std(ddof=1))
        assert rows[f"{prefix}_mean"].nunique() == 1  # one value per experiment
    assert (tmp_path / "e-r0.8" / "analysis" / "accuracy-test.parquet").is_file()


def test_study_accuracy_is_missing_until_computed(tmp_path: Path) -> None:
    _experiments(tmp_path)
    service.rank(ExperimentStore.open(tmp_path, "e-r0.3"), "test")
    table = study(tmp_path).table
    assert table["acc_mean"].isna().all() and not table["stale"].any()
    service.accuracy(ExperimentStore.open(tmp_path, "e-r0.3"), "test")
    table = study(tmp_path).table
    assert table["acc_mean"].notna().all()
    # accuracy over other runs than the current ones marks the experiment stale
    store = ExperimentStore.open(tmp_path, "e-r0.3")
    logits = store.runs()[0].load_logits("test", mmap=False)
    store.write_run("run-0099", {"test": logits}, {"seed": 9, "config": {"synthetic": True}})
    service.rank(store, "test")  # detection current again, accuracy not
    assert study(tmp_path).table["stale"].all()


def _set_protocols(store: ExperimentStore, recipe: str | None, data: str | None) -> None:
    """Record in ``experiment.json`` what training under a protocol records."""
    file = store.root / "experiment.json"
    meta = json.loads(file.read_text())
    if recipe is not None:
        meta["protocol"] = recipe
    if data is not None:
        meta["scenario"]["protocol"] = data
    file.write_text(json.dumps(meta))


def test_study_refuses_mixed_protocols_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlvar.analysis.study import experiment_protocol

    assert experiment_protocol({"scenario": {}}) == "mlvar"
    assert experiment_protocol({"protocol": "study", "scenario": {"protocol": "study"}}) == "study"
    assert (
        experiment_protocol({"protocol": "mlvar", "scenario": {"protocol": "study"}})
        == "study data, mlvar recipe"
    )
    _experiments(tmp_path / "runs")
    runs = tmp_path / "runs"
    _set_protocols(ExperimentStore.open(runs, "e-r0.8"), "study", "study")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(runs))
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    runner = CliRunner()
    out = runner.invoke(app, ["analyze", "rank", "--merge", "--compute-missing"])
    assert out.exit_code == 2, out.stdout
    (line,) = out.stderr.strip().splitlines()
    assert "different protocols" in line and "--allow-mixed" in line and "--protocol" in line
    assert "mlvar (2: clean, e-r0.3)" in line and "study (1: e-r0.8)" in line
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before  # nothing computed
    out = runner.invoke(
        app, ["analyze", "rank", "--merge", "--compute-missing", "--allow-mixed", "--json"]
    )
    assert out.exit_code == 0, out.stderr
    table = pd.read_csv(runs / "study.csv")
    assert table.groupby("experiment")["protocol"].first().to_dict() == {
        "e-r0.3": "mlvar",
        "e-r0.8": "study",
    }
    # --protocol: one protocol's table, the others skipped and named
    out = runner.invoke(app, ["analyze", "rank", "--merge", "--protocol", "study", "--json"])
    assert out.exit_code == 0, out.stderr
    info = json.loads(out.stdout)
    assert {r["experiment"] for r in info["rows"]} == {"e-r0.8"}
    assert info["skipped"]["e-r0.3"] == "protocol 'mlvar'"
    assert {r["protocol"] for r in info["rows"]} == {"study"}
    out = runner.invoke(app, ["analyze", "rank", "--merge", "--protocol", "mlvar", "--json"])
    assert out.exit_code == 0, out.stderr
    assert {r["experiment"] for r in json.loads(out.stdout)["rows"]} == {"e-r0.3"}
    for args, words in [
        (["--merge", "--protocol", "stduy"], ["unknown protocol 'stduy'", "did you mean"]),
        (["e-r0.3", "--protocol", "study"], ["--protocol applies only to --merge"]),
    ]:
        out = runner.invoke(app, ["analyze", "rank", *args])
        assert out.exit_code == 2, (args, out.stdout)
        (line,) = out.stderr.strip().splitlines()
        assert all(w in line for w in words), line
    # one protocol (whichever): no refusal, and an mlvar-only table keeps its columns
    _set_protocols(ExperimentStore.open(runs, "e-r0.8"), "mlvar", "mlvar")
    assert "protocol" not in study(runs).table.columns
    for name in ("e-r0.3", "e-r0.8", "clean"):
        _set_protocols(ExperimentStore.open(runs, name), "study", "study")
    assert set(study(runs).table["protocol"]) == {"study"}
    with pytest.raises(MlvarError, match="no experiment .* follows protocol 'mlvar'"):
        study(runs, protocol="mlvar")
