"""CLI behaviour of ``mlvar analyze``: --allow-mixed, skipped-run warnings, metric listing,
training dynamics, bounded chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from mlvar.analysis import service
from mlvar.analysis.metrics import DYNAMICS_METRICS, METRICS
from mlvar.analysis.synthetic import synthetic_store
from mlvar.cli import app
from mlvar.store import ExperimentStore

runner = CliRunner()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("MLVAR_REPORTS_ROOT", str(tmp_path / "reports"))
    return tmp_path


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def test_allow_mixed_flag(root: Path) -> None:
    store = synthetic_store(root / "runs", name="exp", n_runs=3, n_samples=30)
    logits = store.runs()[0].load_logits("test", mmap=False)
    store.write_run("run-0099", {"test": logits}, {"seed": 9, "config": {"other": 1}})
    before = listing(root)
    for command in (["rank"], ["accuracy"], ["curve"]):
        out = invoke("analyze", *command, "exp")
        assert out.exit_code == 2, out.stdout
        (line,) = out.stderr.strip().splitlines()
        assert "2 different configurations" in line and "--allow-mixed" in line
        assert out.stdout == ""
    assert listing(root) == before
    out = invoke("analyze", "rank", "exp", "--allow-mixed", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["n_runs"] == 4
    out = invoke("analyze", "accuracy", "exp", "--allow-mixed", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["n_runs"] == 4


def test_run_failing_sha256_is_skipped_with_a_warning_line(root: Path) -> None:
    store = synthetic_store(root / "runs", name="exp", n_runs=3, n_samples=30)
    file = store.runs()[1].logits_path("test")
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    for command in (["rank", "exp"], ["accuracy", "exp"], ["rank", "exp", "--json"]):
        out = invoke("analyze", *command)
        assert out.exit_code == 0, out.stderr
        lines = out.stderr.strip().splitlines()
        assert lines == [
            "Warning: skipping run run-0001 of exp: sha256 mismatch in test.logits.npy"
        ], out.stderr
        assert "UserWarning" not in out.stdout + out.stderr
        assert "Warning" not in out.stdout
    info = json.loads(invoke("analyze", "rank", "exp", "--json").stdout)
    assert info["n_runs"] == 2 and "run-0001" in info["skipped"][0]


def test_all_runs_corrupt_warns_then_errors(root: Path) -> None:
    store = synthetic_store(root / "runs", name="exp", n_runs=1, n_samples=10)
    store.runs()[0].logits_path("test").write_bytes(b"garbage")
    out = invoke("analyze", "rank", "exp")
    assert out.exit_code == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("Warning: skipping run run-0000")
    assert lines[1].startswith("Error: experiment 'exp' has no finished runs")


def test_metrics_listing_includes_dynamics(root: Path) -> None:
    out = invoke("analyze", "metrics")
    assert out.exit_code == 0
    for name in DYNAMICS_METRICS:
        assert name in out.stdout
    plain = json.loads(invoke("analyze", "metrics", "--json").stdout)
    assert [m["name"] for m in plain] == list(METRICS)
    full = json.loads(invoke("analyze", "metrics", "--json", "--all").stdout)
    assert [m["name"] for m in full] == [*METRICS, *DYNAMICS_METRICS]
    assert {m["needs"] for m in full} == {"probs", "dynamics"}


def test_rank_by_dynamics_metric(root: Path) -> None:
    synthetic_store(
        root / "runs", name="exp", n_runs=2, n_samples=40, split="train", dynamics_epochs=4
    )
    out = invoke("analyze", "rank", "exp", "--split", "train", "--by", "dm_variability")
    assert out.exit_code == 0, out.stderr
    assert "top 20 by dm_variability" in out.stdout
    det = json.loads(invoke("analyze", "rank", "exp", "--split", "train", "--json").stdout)[
        "detection"
    ]
    assert {r["metric"] for r in det} == set(METRICS) | set(DYNAMICS_METRICS)
    info = json.loads((root / "runs" / "exp" / "analysis" / "rank-train.json").read_text())
    assert info["dynamics"] is True and info["n_runs"] == 2


def test_rank_by_dynamics_metric_without_dynamics(root: Path) -> None:
    synthetic_store(root / "runs", name="exp", n_runs=2, n_samples=40)
    before = listing(root)
    out = invoke("analyze", "rank", "exp", "--by", "never_learnt")
    assert out.exit_code == 2
    (line,) = out.stderr.strip().splitlines()
    assert "needs training dynamics" in line
    assert listing(root) == before


def test_chunks_are_bounded(root: Path) -> None:
    assert service.chunk_size(100, 100) * 100 * 100 * 8 <= service.CHUNK_BYTES
    assert service.chunk_size(1, 2) == service.MAX_CHUNK
    assert service.chunk_size(10**6, 10**6) == 1
    store = synthetic_store(root / "runs", name="exp", n_runs=4, n_samples=100)
    preds = service.load_predictions(ExperimentStore.open(root / "runs", "exp"), "test")
    blocks = [(a, b, p.shape) for a, b, p in preds.chunks(size=30)]
    assert [(a, b) for a, b, _ in blocks] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert blocks[0][2] == (4, 30, 3)
    rows = [(a, b) for a, b, _ in preds.chunks(size=30, runs=store.runs()[:2], start=10, stop=50)]
    assert rows == [(10, 40), (40, 50)]
    np.testing.assert_allclose(next(preds.chunks(size=5))[2].sum(axis=2), 1.0, rtol=0, atol=1e-12)
