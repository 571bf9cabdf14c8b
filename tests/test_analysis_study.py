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
