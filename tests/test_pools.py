"""Pools: the ``full_val`` split of holdout scenarios (derived again here from the ratio-0
scenarios), and ``mlvar analyze predict`` (its logits against an evaluation of the loaded
model done here, the sha256 it records, re-runs, new runs, bad input)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlvar.analysis.service import load_predictions
from mlvar.cli import app
from mlvar.config import Config, PathsConfig
from mlvar.data import registry
from mlvar.data.scenario import open_scenario, split_source
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore
from mlvar.train.predict import predict_split
from mlvar.train.service import train

runner = CliRunner()
SUB3 = "digits-holdout-sub3-r1.0"
RATIO0 = "digits-holdout-sub3-r0.0"


def _config(root: Path) -> Config:
    return Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with digit 3 held out (ratio 1 and 0); 2 MLP runs and 1 CNN run of ratio 1."""
    root = tmp_path_factory.mktemp("pools")
    registry.prepare(root / "data", "digits", mode="holdout", subclass=3, ratio=1.0)
    registry.prepare(root / "data", "digits", mode="holdout", subclass=3, ratio=0.0)
    cfg = _config(root)
    train(cfg, "digits", scenario=SUB3, runs=2, overrides={"epochs": 2})
    cnn = {"model": "cnn", "epochs": 1, "workers": 1}
    train(cfg, "digits", scenario=SUB3, runs=1, overrides=cnn)
    return root


@pytest.fixture
def root(work: Path, tmp_path: Path) -> Path:
    shutil.copytree(work, tmp_path / "w")
    return tmp_path / "w"


# ------------------------------------------------------------------------------ full_val


def test_digits_full_val_is_validation_at_ratio_0(work: Path) -> None:
    held, zero = open_scenario(work / "data", SUB3), open_scenario(work / "data", RATIO0)
    assert held.splits == ["train", "val", "test", "full_val"]
    full, val0, val = held.load("full_val"), zero.load("val"), held.load("val")
    np.testing.assert_array_equal(full.id, val0.id)
    np.testing.assert_array_equal(full.x, val0.x)
    np.testing.assert_array_equal(full.y, val0.y)
    from sklearn.datasets import load_digits

    digit = load_digits().target[full.id]
    np.testing.assert_array_equal(full.affected, digit == 3)
    np.testing.assert_array_equal(full.group, digit)
    assert full.affected.sum() > 0 and not (val.group == 3).any()
    assert set(val.id) < set(full.id)
    # Shared storage: nothing changed, so the same source arrays as the ratio-0 scenario.
    assert {a.sha256 for a in held.arrays} == {a.sha256 for a in zero.arrays}


@pytest.fixture(scope="module")
def compas_data(tmp_path_factory: pytest.TempPathFactory, compas_csv: Path) -> Path:
    root = tmp_path_factory.mktemp("pools-compas") / "data"
    (root / "raw").mkdir(parents=True)
    shutil.copyfile(compas_csv, root / "raw" / "compas-scores-two-years.csv")
    return root


@pytest.mark.parametrize("protocol", ["mlvar", "study"])
def test_compas_full_val_is_validation_without_removal(compas_data: Path, protocol: str) -> None:
    k = 2
    held = registry.prepare(compas_data, "compas", mode="holdout", cluster=k, protocol=protocol)
    original = registry.prepare(compas_data, "compas", mode="original", protocol=protocol)
    full, val = held.load("full_val"), held.load("val")
    np.testing.assert_array_equal(full.id, original.load("val").id)  # nothing removed
    np.testing.assert_array_equal(full.affected, full.group == k)
    assert full.affected.sum() > 0
    if protocol == "study":  # the cluster left train+val before validation was split off
        assert not (val.group == k).any()
    else:
        np.testing.assert_array_equal(full.id, val.id)
    # Scaled as the scenario's own splits: a row that train or val holds too is equal there.
    train = held.load("train")
    x_of = {int(i): x for split in (train, val) for i, x in zip(split.id, split.x, strict=True)}
    shared = [n for n, i in enumerate(full.id) if int(i) in x_of]
    # every row but the cluster's under the study protocol (train and val lack it)
    assert len(shared) == (~full.affected).sum() if protocol == "study" else len(full.id)
    np.testing.assert_array_equal(full.x[shared], np.stack([x_of[int(full.id[n])] for n in shared]))


def test_cifar10_study_full_val(tmp_path: Path, tiny_cifar10) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    for mode in ("holdout", "holdout-dup"):
        held = registry.prepare(root, "cifar10", mode=mode, cls=1, ratio=0.5, protocol="study")
        zero = registry.prepare(root, "cifar10", mode=mode, cls=1, ratio=0.0, protocol="study")
        full, val0 = held.load("full_val"), zero.load("val")
        np.testing.assert_array_equal(full.id, val0.id)
        np.testing.assert_array_equal(full.x, val0.x)  # the unchanged images
        np.testing.assert_array_equal(full.affected, full.y == 1)
    aug = registry.prepare(root, "cifar10", mode="augmentation", cls=1, ratio=0.5)
    assert "full_val" not in aug.splits  # nothing held out


@pytest.mark.parametrize("protocol", ["mlvar", "study"])
def test_cifar100_full_val(tmp_path: Path, tiny_cifar100, protocol: str) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "cifar100", source=tiny_cifar100.archive, verify=False)
    held = registry.prepare(root, "cifar100", subclass="baby", ratio=1.0, protocol=protocol)
    zero = registry.prepare(root, "cifar100", subclass="baby", ratio=0.0, protocol=protocol)
    full, val0 = held.load("full_val"), zero.load("val")
    np.testing.assert_array_equal(full.id, val0.id)  # in the protocol's order too
    np.testing.assert_array_equal(full.x, val0.x)
    fine = np.asarray(tiny_cifar100.y_train)[full.id]  # the archive's fine labels, by id
    names = list(held.manifest["fine_class_names"])
    np.testing.assert_array_equal(full.affected, fine == names.index("baby"))
    assert full.affected.any() and not held.load("val").affected.any()


# ------------------------------------------------------------------------------ predict


def _mlp_logits(store: ExperimentStore, run, x: np.ndarray) -> np.ndarray:
    """The run's model.pt loaded as docs/run-store.md says (``MLP(n_features, hidden,
    n_classes)``), evaluated in eval mode on the inputs ``x`` made here."""
    from mlvar.train.mlp import MLP

    model = MLP(x.shape[1], int(store.meta["train"]["hidden"]), len(store.class_names))
    model.load_state_dict(torch.load(run.path / "model.pt", weights_only=True))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_predict_mlp_on_another_scenario(root: Path) -> None:
    store = ExperimentStore.open(root / "runs", f"{SUB3}-mlp")
    result = predict_split(store, root / "data", RATIO0)
    name = f"val@{RATIO0}"
    assert result.split == name and result.added == ["run-0000", "run-0001"]
    val0 = open_scenario(root / "data", RATIO0).load("val")
    x = (val0.x.reshape(len(val0.x), -1) / 16).astype(np.float32)
    store = ExperimentStore.open(root / "runs", store.name)
    assert store.splits[-1] == name
    assert store.meta["external_splits"][name] == {
        "scenario": RATIO0,
        "split": "val",
        "manifest_sha256": open_scenario(root / "data", RATIO0).manifest_sha256,
    }
    table = store.samples(name)
    np.testing.assert_array_equal(table["sample_id"], val0.id)
    np.testing.assert_array_equal(table["affected"], val0.affected)
    for run in store.runs(verify=True):
        stored = np.load(run.logits_path(name))
        np.testing.assert_allclose(stored, _mlp_logits(store, run, x), rtol=1e-5, atol=1e-5)
        info = run.meta["arrays"][f"{name}.logits.npy"]
        assert info["sha256"] == hashlib.sha256(run.logits_path(name).read_bytes()).hexdigest()
        assert info["shape"] == list(stored.shape) and info["dtype"] == "float32"
        acc = float((stored.argmax(1) == val0.y).mean())
        assert run.meta["metrics"][f"{name}_accuracy"] == pytest.approx(acc)
    scenario, split = split_source(root / "data", store.name, store.meta, name)
    assert (scenario.name, split) == (RATIO0, "val")
    assert split_source(root / "data", store.name, store.meta, "full_val")[0].name == SUB3
    # Analysis reads it; a re-run does nothing.
    assert len(load_predictions(store, name).runs) == 2
    again = predict_split(store, root / "data", f"{RATIO0}:val")
    assert again.added == [] and again.skipped == ["run-0000", "run-0001"]


def test_own_split_predicted_again_equals_training(root: Path) -> None:
    """The CNN evaluated by analyze predict on its own full_val gives training's logits,
    and so does a by-hand evaluation (training-split normalisation, no TTA)."""
    store = ExperimentStore.open(root / "runs", f"{SUB3}-cnn")
    predict_split(store, root / "data", f"{SUB3}:full_val", as_name="pool")
    run = ExperimentStore.open(root / "runs", store.name).runs(verify=True)[0]
    np.testing.assert_array_equal(np.load(run.logits_path("pool")), run.load_logits("full_val"))
    scenario = open_scenario(root / "data", SUB3)
    train_x = torch.from_numpy(scenario.load("train").x.transpose(0, 3, 1, 2).copy()) / 16.0
    mean = train_x.double().mean(dim=(0, 2, 3), keepdim=True).float()
    std = train_x.double().std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3).float()
    x = torch.from_numpy(scenario.load("full_val").x.transpose(0, 3, 1, 2).copy()).float() / 16
    from mlvar.train.models import build_model

    model = build_model("cnn", 1, 5)
    model.load_state_dict(torch.load(run.path / "model.pt", weights_only=True))
    with torch.no_grad():
        mine = model.eval()((x - mean) / std).numpy()
    np.testing.assert_allclose(np.load(run.logits_path("pool")), mine, rtol=1e-4, atol=1e-4)
    # The MLP's own val predicted again equals its training logits too.
    mlp = ExperimentStore.open(root / "runs", f"{SUB3}-mlp")
    predict_split(mlp, root / "data", SUB3, as_name="val_again")
    for r in ExperimentStore.open(root / "runs", mlp.name).runs():
        np.testing.assert_allclose(
            np.load(r.logits_path("val_again")), r.load_logits("val"), rtol=1e-6, atol=1e-6
        )


def test_new_runs_lack_the_external_split_until_predicted_again(root: Path) -> None:
    cfg = _config(root)
    store = ExperimentStore.open(root / "runs", f"{SUB3}-mlp")
    predict_split(store, root / "data", RATIO0, as_name="pool")
    train(cfg, "digits", scenario=SUB3, runs=3, overrides={"epochs": 2})
    store = ExperimentStore.open(root / "runs", store.name)
    assert "pool.logits.npy" not in store.runs()[2].meta["arrays"]
    with pytest.raises(MlvarError, match="run-0002 .* no pool logits") as caught:
        load_predictions(store, "pool")
    assert f"analyze predict {store.name} --on {RATIO0}:val --as pool" in caught.value.hint
    again = predict_split(store, root / "data", RATIO0, as_name="pool")
    assert again.added == ["run-0002"] and len(load_predictions(store, "pool").runs) == 3


def _invoke(root: Path, *args: str):
    env = {
        "MLVAR_DATA_ROOT": str(root / "data"),
        "MLVAR_RUNS_ROOT": str(root / "runs"),
        "MLVAR_REPORTS_ROOT": str(root / "reports"),
    }
    return runner.invoke(app, list(args), env=env)


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["nope", "--on", RATIO0], "unknown experiment 'nope'"),
        ([f"{SUB3}-mlp", "--on", "digits-holdout-sub3-r0.1"], "did you mean"),
        ([f"{SUB3}-mlp", "--on", f"{RATIO0}:tset"], "its splits: train, val, test, full_val"),
        ([f"{SUB3}-mlp", "--on", "digits-original"], "does not fit"),
        ([f"{SUB3}-mlp", "--on", RATIO0, "--as", "test"], "has a split 'test' already"),
        ([f"{SUB3}-mlp", "--on", RATIO0, "--as", "../x"], "invalid split name"),
        ([f"{SUB3}-mlp", "--on", RATIO0], "have no model.pt"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    root: Path, args: list[str], pattern: str
) -> None:
    registry.prepare(root / "data", "digits")  # 10 classes: does not fit the 5-class models
    if pattern == "have no model.pt":  # a run of an earlier build, without its weights
        run = root / "runs" / f"{SUB3}-mlp" / "runs" / "run-0001"
        meta = json.loads((run / "run.json").read_text())
        del meta["arrays"]["model.pt"]
        (run / "run.json").write_text(json.dumps(meta))
        (run / "model.pt").unlink()
    before = _listing(root)
    out = _invoke(root, "analyze", "predict", *args)
    assert out.exit_code == 2, out.output
    assert pattern in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) <= 2  # the error and its hint
    assert _listing(root) == before


def test_scenario_prepared_again_with_the_same_training_split(root: Path) -> None:
    """An experiment whose scenario was prepared again since (its manifest changed, as a
    newer mlvar adding full_val changes it) predicts, when the training split is the
    runs' one; another training split is refused."""
    file = root / "data" / SUB3 / "manifest.json"
    manifest = json.loads(file.read_text())
    file.write_text(json.dumps({**manifest, "note": "prepared again"}))
    store = ExperimentStore.open(root / "runs", f"{SUB3}-cnn")
    assert predict_split(store, root / "data", RATIO0).added == ["run-0000"]
    # Its own split under a new name is that scenario's data now: recorded as external.
    predict_split(store, root / "data", f"{SUB3}:full_val", as_name="pool")
    store = ExperimentStore.open(root / "runs", store.name)
    assert (
        store.meta["external_splits"]["pool"]["manifest_sha256"]
        != (store.meta["scenario"]["manifest_sha256"])
    )
    assert split_source(root / "data", store.name, store.meta, "pool")[0].name == SUB3
    with pytest.raises(MlvarError, match="has a split 'full_val' already"):
        predict_split(store, root / "data", f"{SUB3}:full_val")
    shutil.rmtree(root / "data" / SUB3)
    registry.prepare(root / "data", "digits", mode="holdout", subclass=3, ratio=0.5)
    (root / "data" / "digits-holdout-sub3-r0.5").rename(root / "data" / SUB3)
    with pytest.raises(MlvarError, match="manifest changed"):
        predict_split(store, root / "data", RATIO0, as_name="other")
