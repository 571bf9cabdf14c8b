"""Training service and run store: resume after a kill, skip finished runs, refuse mixing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlvar.config import Config, PathsConfig
from mlvar.data.registry import prepare
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore
from mlvar.train.service import TrainResult, train


def make_config(root: Path) -> Config:
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    return cfg


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    prepare(root / "data", "digits", mode="holdout", subclass=3)
    return root


def _run_logits(store: ExperimentStore) -> dict[str, dict[str, np.ndarray]]:
    return {r.run_id: {s: np.load(r.logits_path(s)) for s in store.splits} for r in store.runs()}


def test_rerun_skips_finished_runs_and_adds_new_ones(digits_root: Path, tmp_path: Path) -> None:
    cfg = make_config(digits_root)
    cfg.paths.runs_root = tmp_path / "runs"
    over = {"epochs": 2}
    first = train(cfg, "digits", runs=3, overrides=over)
    assert first.trained == ["run-0000", "run-0001", "run-0002"]
    second = train(cfg, "digits", runs=5, overrides=over)
    assert second.skipped == ["run-0000", "run-0001", "run-0002"]
    assert second.trained == ["run-0003", "run-0004"]
    store = ExperimentStore.open(cfg.paths.runs_root, first.experiment)
    runs = store.runs(verify=True)
    assert [r.run_id for r in runs] == [f"run-{i:04d}" for i in range(5)]
    assert [r.seed for r in runs] == [0, 1, 2, 3, 4]
    third = train(cfg, "digits", runs=5, overrides=over)
    assert third.trained == [] and len(third.skipped) == 5


def test_accuracy_summary_matches_the_stored_logits(digits_root: Path, tmp_path: Path) -> None:
    cfg = make_config(digits_root)
    cfg.paths.runs_root = tmp_path / "runs"
    result = train(cfg, "digits", runs=3, overrides={"epochs": 2})
    store = ExperimentStore.open(cfg.paths.runs_root, result.experiment)
    summary = result.accuracy_summary()
    assert [row["split"] for row in summary] == list(store.splits)
    for row in summary:
        labels = store.samples(row["split"])["label"].to_numpy()
        accs = np.array(
            [(r.load_logits(row["split"]).argmax(axis=1) == labels).mean() for r in store.runs()]
        )
        assert row["runs"] == 3
        assert row["mean"] == pytest.approx(accs.mean(), abs=1e-12)
        assert row["std"] == pytest.approx(accs.std(ddof=1), abs=1e-12)
        assert (row["min"], row["max"]) == (pytest.approx(accs.min()), pytest.approx(accs.max()))


def test_accuracy_summary_of_one_run_and_of_none() -> None:
    one = TrainResult("e", Path("e"), trained=["run-0000"], accuracy={"run-0000": {"test": 0.75}})
    assert one.accuracy_summary() == [
        {"split": "test", "runs": 1, "mean": 0.75, "std": None, "min": 0.75, "max": 0.75}
    ]
    two = TrainResult(
        "e",
        Path("e"),
        accuracy={"a": {"train": 1.0, "test": 0.5}, "b": {"train": 0.5, "test": 0.5}},
    )
    assert [(r["split"], r["mean"], r["std"]) for r in two.accuracy_summary()] == [
        ("train", 0.75, pytest.approx((2 * 0.25**2) ** 0.5)),
        ("test", 0.5, 0.0),
    ]
    assert TrainResult("e", Path("e")).accuracy_summary() == []


def test_changed_config_is_refused_unless_forced(digits_root: Path, tmp_path: Path) -> None:
    cfg = make_config(digits_root)
    cfg.paths.runs_root = tmp_path / "runs"
    train(cfg, "digits", runs=1, overrides={"epochs": 1})
    before = sorted(p.name for p in (tmp_path / "runs").rglob("*"))
    with pytest.raises(MlvarError, match=r"train.epochs: 1 -> 2"):
        train(cfg, "digits", runs=2, overrides={"epochs": 2})
    assert sorted(p.name for p in (tmp_path / "runs").rglob("*")) == before
    again = train(cfg, "digits", runs=1, overrides={"epochs": 2}, force=True)
    assert again.trained == ["run-0000"]


def test_same_seed_and_config_reproduce_bit_for_bit(digits_root: Path, tmp_path: Path) -> None:
    logits = []
    for sub in ("a", "b"):
        cfg = make_config(digits_root)
        cfg.paths.runs_root = tmp_path / sub
        res = train(cfg, "digits", runs=2, overrides={"epochs": 2})
        logits.append(_run_logits(ExperimentStore.open(cfg.paths.runs_root, res.experiment)))
    for run_id, splits in logits[0].items():
        for split, arr in splits.items():
            assert np.array_equal(arr, logits[1][run_id][split]), (run_id, split)
    # and different seeds differ
    assert not np.array_equal(logits[0]["run-0000"]["test"], logits[0]["run-0001"]["test"])


def test_unfinished_run_folders_are_redone(digits_root: Path, tmp_path: Path) -> None:
    cfg = make_config(digits_root)
    cfg.paths.runs_root = tmp_path / "runs"
    res = train(cfg, "digits", runs=3, overrides={"epochs": 1})
    store = ExperimentStore.open(cfg.paths.runs_root, res.experiment)
    reference = _run_logits(store)
    # run-0001: killed before run.json; run-0002: run.json torn mid-write.
    (store.run_dir("run-0001") / "run.json").unlink()
    torn = store.run_dir("run-0002") / "run.json"
    torn.write_text(torn.read_text()[:40])
    assert [r.run_id for r in store.runs()] == ["run-0000"]
    again = train(cfg, "digits", runs=3, overrides={"epochs": 1})
    assert sorted(again.cleaned) == ["run-0001", "run-0002"]
    assert again.trained == ["run-0001", "run-0002"]
    redone = _run_logits(store)
    for run_id in reference:
        assert np.array_equal(reference[run_id]["test"], redone[run_id]["test"])


def test_corrupt_array_is_skipped_with_a_warning(digits_root: Path, tmp_path: Path) -> None:
    cfg = make_config(digits_root)
    cfg.paths.runs_root = tmp_path / "runs"
    res = train(cfg, "digits", runs=2, overrides={"epochs": 1})
    store = ExperimentStore.open(cfg.paths.runs_root, res.experiment)
    bad = store.run_dir("run-0001") / "test.logits.npy"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"run-0001.*test\.logits\.npy"):
        runs = store.runs(verify=True)
    assert [r.run_id for r in runs] == ["run-0000"]


def _mlvar(args: list[str], root: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        MLVAR_DATA_ROOT=str(root / "data"),
        MLVAR_RUNS_ROOT=str(root / "runs"),
        MLVAR_REPORTS_ROOT=str(root / "reports"),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "mlvar", *args],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_sigkill_mid_training_then_rerun_matches_uninterrupted(
    digits_root: Path, tmp_path: Path
) -> None:
    args = ["train", "digits", "--runs", "6", "--epochs", "5", "--pack-size", "1"]
    killed_root = tmp_path / "killed"
    killed_root.mkdir()
    (killed_root / "data").symlink_to(digits_root / "data")
    proc = _mlvar(args, killed_root)
    runs_dir = killed_root / "runs" / "digits-holdout-sub3-r1.0-mlp" / "runs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(runs_dir.glob("*/run.json")) if runs_dir.is_dir() else []
        if len(done) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    completed_at_kill = len(list(runs_dir.glob("*/run.json")))
    assert 2 <= completed_at_kill < 6

    rerun = _mlvar(args, killed_root)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()
    clean_root = tmp_path / "clean"
    clean_root.mkdir()
    (clean_root / "data").symlink_to(digits_root / "data")
    clean = _mlvar(args, clean_root)
    assert clean.wait(timeout=300) == 0, clean.stderr.read().decode()

    killed = ExperimentStore.open(killed_root / "runs", "digits-holdout-sub3-r1.0-mlp")
    reference = ExperimentStore.open(clean_root / "runs", "digits-holdout-sub3-r1.0-mlp")
    ids = [r.run_id for r in killed.runs(verify=True)]
    assert (
        ids == [r.run_id for r in reference.runs(verify=True)] == [f"run-{i:04d}" for i in range(6)]
    )
    assert not killed.unfinished_run_dirs()
    leftovers = [p for p in killed.root.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    a, b = _run_logits(killed), _run_logits(reference)
    for run_id in ids:
        for split in killed.splits:
            assert np.array_equal(a[run_id][split], b[run_id][split]), (run_id, split)
        meta = json.loads((killed.run_dir(run_id) / "run.json").read_text())
        assert meta["status"] == "complete" and meta["seed"] == int(run_id[-4:])


def test_record_dynamics_stores_per_epoch_train_logits(digits_root: Path, tmp_path: Path) -> None:
    cfg = make_config(digits_root)
    cfg.paths.runs_root = tmp_path / "runs"
    res = train(cfg, "digits", runs=2, overrides={"epochs": 3, "record_dynamics": True})
    store = ExperimentStore.open(cfg.paths.runs_root, res.experiment)
    for run in store.runs(verify=True):
        assert run.has_dynamics and run.meta["dynamics_epochs"] == 3
        dyn = run.load_dynamics()
        train_logits = run.load_logits("train")
        assert dyn.dtype == np.float16 and dyn.shape == (3, *train_logits.shape)
        np.testing.assert_allclose(dyn[-1], train_logits, rtol=2e-3, atol=2e-3)
    # recording is not part of the experiment's identity: more runs without it may join
    more = train(cfg, "digits", runs=3, overrides={"epochs": 3})
    assert more.trained == ["run-0002"]
