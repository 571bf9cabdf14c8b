"""Importing predictions from other tools into a run store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlvar.analysis import service
from mlvar.analysis.importer import import_predictions, seed_from_name
from mlvar.analysis.metrics import compute_metrics, softmax
from mlvar.cli import app
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore

N, C = 40, 4


def _write(folder: Path, probs: bool = False, runs: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, C, N)
    affected = np.zeros(N, dtype=bool)
    affected[:7] = True
    ids = rng.permutation(1000)[:N]
    np.save(folder / "labels.npy", labels)
    np.save(folder / "affected.npy", affected)
    np.save(folder / "ids.npy", ids)
    arrays = {}
    for r in range(runs):
        logits = rng.normal(size=(N, C)).astype(np.float32)
        arrays[f"seed{r + 10}"] = softmax(logits).astype(np.float32) if probs else logits
        np.save(folder / f"seed{r + 10}.npy", arrays[f"seed{r + 10}"])
    return {"labels": labels, "affected": affected, "ids": ids, "arrays": arrays}


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_seed_from_name() -> None:
    assert seed_from_name("seed7") == 7
    assert seed_from_name("run-0012") == 12
    assert seed_from_name("resnet") is None


def test_logits_round_trip_exactly(tmp_path: Path) -> None:
    data = _write(tmp_path / "in")
    result = import_predictions(tmp_path / "in", tmp_path / "runs", "ext")
    assert result.runs == ["seed10", "seed11", "seed12"]
    assert (result.n_samples, result.n_classes, result.n_affected) == (N, C, 7)
    store = ExperimentStore.open(tmp_path / "runs", "ext")
    assert store.meta["dataset"] == "imported" and store.splits == ["test"]
    assert store.class_names == [f"class_{i}" for i in range(C)]
    samples = store.samples("test")
    np.testing.assert_array_equal(samples["sample_id"], data["ids"])
    np.testing.assert_array_equal(samples["label"], data["labels"])
    np.testing.assert_array_equal(samples["affected"], data["affected"])
    runs = store.runs(verify=True)
    assert [r.seed for r in runs] == [10, 11, 12]
    assert all(r.meta["config"] == {"source": "import"} for r in runs)
    for r in runs:
        stored = r.load_logits("test", mmap=False)
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored, data["arrays"][r.run_id])
    # every analysis works on it
    result = service.rank(store, "test", write=False)
    probs = softmax(np.stack([data["arrays"][k] for k in sorted(data["arrays"])]))
    expected = compute_metrics(probs, data["labels"])
    got = result.ranking.set_index("sample_id").loc[data["ids"]].reset_index()
    for col in expected:
        np.testing.assert_allclose(got[col], expected[col], rtol=0, atol=1e-12)
    assert result.detection is not None
    assert service.accuracy(store, "test", write=False).n_runs == 3


def test_probabilities_round_trip(tmp_path: Path) -> None:
    data = _write(tmp_path / "in", probs=True)
    import_predictions(
        tmp_path / "in",
        tmp_path / "runs",
        "ext",
        split="val",
        probs=True,
        class_names=["a", "b", "c", "d"],
    )
    store = ExperimentStore.open(tmp_path / "runs", "ext")
    assert store.splits == ["val"] and store.class_names == ["a", "b", "c", "d"]
    for r in store.runs():
        back = softmax(r.load_logits("val", mmap=False))
        np.testing.assert_allclose(back, data["arrays"][r.run_id], rtol=1e-6, atol=1e-7)


def test_probabilities_with_exact_zeros(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "labels.npy", np.array([0, 1]))
    np.save(folder / "m.npy", np.array([[1.0, 0.0], [0.25, 0.75]]))
    import_predictions(folder, tmp_path / "runs", "ext", probs=True)
    run = ExperimentStore.open(tmp_path / "runs", "ext").runs()[0]
    logp = run.load_logits("test", mmap=False)
    assert logp.dtype == np.float64 and np.isfinite(logp).all()
    np.testing.assert_allclose(softmax(logp), [[1.0, 0.0], [0.25, 0.75]], atol=1e-300)


def _setup_bad(folder: Path, case: str) -> tuple[str, ...]:
    """Break the folder written by ``_write`` in one way; return words of the error."""
    if case == "no labels":
        (folder / "labels.npy").unlink()
        return ("labels.npy",)
    if case == "no runs":
        for p in folder.glob("seed*.npy"):
            p.unlink()
        return ("no run files",)
    if case == "rows":
        np.save(folder / "seed11.npy", np.zeros((N - 1, C), dtype=np.float32))
        return ("seed11.npy", f"({N - 1}, {C})", f"({N},)")
    if case == "classes":
        np.save(folder / "seed12.npy", np.zeros((N, C + 1), dtype=np.float32))
        return ("seed12.npy", f"({N}, {C + 1})", "seed10.npy", f"({N}, {C})")
    if case == "nan":
        bad = np.zeros((N, C), dtype=np.float32)
        bad[5, 1] = np.nan
        np.save(folder / "seed11.npy", bad)
        return ("seed11.npy", "NaN", "row 5")
    if case == "inf":
        bad = np.zeros((N, C))
        bad[3, 0] = np.inf
        np.save(folder / "seed10.npy", bad)
        return ("seed10.npy", "infinite", "row 3")
    if case == "labels out of range":
        np.save(folder / "labels.npy", np.full(N, C))
        return ("labels", "[0, 3]")
    if case == "affected shape":
        np.save(folder / "affected.npy", np.zeros(N + 1, dtype=bool))
        return ("affected.npy", f"({N + 1},)")
    if case == "duplicate ids":
        np.save(folder / "ids.npy", np.zeros(N, dtype=np.int64))
        return ("ids.npy", "unique")
    if case == "bad name":
        np.save(folder / "-x.npy", np.zeros((N, C), dtype=np.float32))
        return ("-x.npy",)
    raise AssertionError(case)


CASES = [
    "no labels",
    "no runs",
    "rows",
    "classes",
    "nan",
    "inf",
    "labels out of range",
    "affected shape",
    "duplicate ids",
    "bad name",
]


@pytest.mark.parametrize("case", CASES)
def test_refused_and_nothing_written(tmp_path: Path, case: str) -> None:
    _write(tmp_path / "in")
    words = _setup_bad(tmp_path / "in", case)
    (tmp_path / "runs").mkdir()
    with pytest.raises(MlvarError) as err:
        import_predictions(tmp_path / "in", tmp_path / "runs", "ext")
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert _listing(tmp_path / "runs") == []


def test_probs_not_summing_to_one(tmp_path: Path) -> None:
    _write(tmp_path / "in", probs=True)
    np.save(tmp_path / "in" / "seed11.npy", np.full((N, C), 0.3, dtype=np.float32))
    with pytest.raises(MlvarError, match=r"seed11.npy: probabilities of row 0 sum to 1.2, not"):
        import_predictions(tmp_path / "in", tmp_path / "runs", "ext", probs=True)
    assert _listing(tmp_path / "runs") == []


def test_class_names_must_match(tmp_path: Path) -> None:
    _write(tmp_path / "in")
    with pytest.raises(MlvarError, match="2 names, but the runs have 4 classes"):
        import_predictions(tmp_path / "in", tmp_path / "runs", "ext", class_names=["a", "b"])


def test_existing_experiment_needs_force(tmp_path: Path) -> None:
    _write(tmp_path / "in")
    import_predictions(tmp_path / "in", tmp_path / "runs", "ext")
    before = _listing(tmp_path / "runs")
    with pytest.raises(MlvarError, match="already exists"):
        import_predictions(tmp_path / "in", tmp_path / "runs", "ext")
    assert _listing(tmp_path / "runs") == before
    (tmp_path / "in" / "seed12.npy").unlink()
    result = import_predictions(tmp_path / "in", tmp_path / "runs", "ext", force=True)
    assert result.replaced and result.runs == ["seed10", "seed11"]
    store = ExperimentStore.open(tmp_path / "runs", "ext")
    assert [r.run_id for r in store.runs()] == ["seed10", "seed11"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ext"]  # no temp left


def _env(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(root / "runs"))


def test_cli_import_then_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(tmp_path, monkeypatch)
    _write(tmp_path / "in", probs=True)
    runner = CliRunner()
    out = runner.invoke(
        app, ["analyze", "import", "in", "--name", "ext", "--probs", "--class-names", "a,b,c,d"]
    )
    assert out.exit_code == 0, out.stderr
    assert "Imported 3 runs of 40 test samples x 4 classes (7 affected)" in out.stdout
    out = runner.invoke(app, ["analyze", "rank", "ext", "--json"])
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["n_runs"] == 3
    out = runner.invoke(app, ["analyze", "import", "in", "--name", "ext", "--probs"])
    assert out.exit_code == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("Error: experiment 'ext' already exists") and "--force" in line


def test_cli_import_shape_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(tmp_path, monkeypatch)
    _write(tmp_path / "in")
    _setup_bad(tmp_path / "in", "classes")
    out = CliRunner().invoke(app, ["analyze", "import", "in", "--name", "ext"])
    assert out.exit_code == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert "seed12.npy has shape (40, 5), but seed10.npy has shape (40, 4)" in line
    assert not (tmp_path / "runs" / "ext").exists()
