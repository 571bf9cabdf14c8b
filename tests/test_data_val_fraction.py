"""``--val-fraction 0``: scenarios of CIFAR-10 and digits without a validation split, whose
train split holds every training image (airbench94 trains on all 50,000); the default
scenarios keep their names and manifests; every command copes with the missing split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlvar.cli import app
from mlvar.config import Config, PathsConfig
from mlvar.data import registry
from mlvar.data.scenario import open_scenario
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("val0")
    for fraction in (None, 0):
        registry.prepare(root, "digits", "original", val_fraction=fraction)
        registry.prepare(
            root, "digits", "holdout-dup", cls=3, ratio=0.5, seed=2, val_fraction=fraction
        )
    return root


def test_no_val_split_and_every_training_image_in_train(digits_root: Path) -> None:
    default = open_scenario(digits_root, "digits-original")
    val0 = open_scenario(digits_root, "digits-original-val0")
    assert default.splits == ["train", "val", "test"] and val0.splits == ["train", "test"]
    ids = np.concatenate([default.load("train").id, default.load("val").id])
    assert np.array_equal(val0.load("train").id, np.sort(ids))  # source order
    assert np.array_equal(val0.load("test").id, default.load("test").id)
    # the manifest records it; the default scenario's manifest is as before the option
    assert val0.manifest["params"] == {"val_fraction": 0.0}
    assert val0.manifest["split"]["val_size"] == 0.0
    assert default.manifest["params"] == {} and default.manifest["split"]["val_size"] == 0.1
    assert "No validation split" in val0.manifest["description"]


def test_class_mode_counts_its_affected_rows_in_the_merged_train_split(digits_root: Path) -> None:
    val0 = open_scenario(digits_root, "digits-holdout-dup-cls3-r0.5-val0-s2")
    default = open_scenario(digits_root, "digits-holdout-dup-cls3-r0.5-s2")
    assert val0.manifest["params"] == {"cls": 3, "ratio": 0.5, "seed": 2, "val_fraction": 0.0}
    assert "val_fraction" not in default.manifest["params"]
    train = val0.load("train")
    n_class = int((train.y == 3).sum())  # duplicates keep the class size
    merged = len(default.load("train").y) + len(default.load("val").y)
    assert len(train.y) == merged
    assert int(train.affected.sum()) == math.floor(0.5 * n_class)
    # the affected rows are the first half of the class in source (id) order
    first = np.sort(train.id[train.y == 3])[: math.floor(0.5 * n_class)]
    assert np.array_equal(np.sort(train.id[train.affected]), first)


def test_cifar10_val0_train_split_is_every_training_image(tmp_path: Path, tiny_cifar10) -> None:
    registry.fetch(tmp_path, "cifar10", source=tiny_cifar10.archive, verify=False)
    scenario = registry.prepare(tmp_path, "cifar10", val_fraction=0)
    assert scenario.name == "cifar10-original-val0" and scenario.splits == ["train", "test"]
    train = scenario.load("train")
    n = len(tiny_cifar10.y_train)
    assert np.array_equal(train.id, np.arange(n))  # all of them, in file order
    assert np.array_equal(train.x, tiny_cifar10.x_train)


@pytest.mark.parametrize(
    ("dataset", "options", "message"),
    [
        ("digits", {"val_fraction": 0.2}, "--val-fraction must be 0 or 0.1"),
        ("digits", {"mode": "holdout", "subclass": 3, "val_fraction": 0}, "no --val-fraction"),
        ("compas", {"val_fraction": 0}, "takes no --val-fraction"),
        # refused before the (here missing) data is read
        ("cifar10", {"val_fraction": 0, "protocol": "study"}, "not the study protocol's split"),
    ],
)
def test_refused_in_one_line(tmp_path: Path, dataset: str, options: dict, message: str) -> None:
    with pytest.raises(MlvarError, match=message):
        registry.prepare_sweep(tmp_path, dataset, **options)
    assert not any(tmp_path.iterdir())


def test_analysis_of_the_missing_val_split_is_refused(digits_root: Path, tmp_path: Path) -> None:
    from mlvar.train.service import train

    paths = PathsConfig(digits_root, tmp_path / "runs", tmp_path / "reports")
    result = train(
        Config(paths=paths), "digits", "digits-original-val0", runs=2, overrides={"epochs": 1}
    )
    store = ExperimentStore.open(tmp_path / "runs", result.experiment)
    assert store.splits == ["train", "test"]
    env = {
        "MLVAR_DATA_ROOT": str(digits_root),
        "MLVAR_RUNS_ROOT": str(tmp_path / "runs"),
        "MLVAR_REPORTS_ROOT": str(tmp_path / "reports"),
    }
    out = CliRunner().invoke(app, ["analyze", "rank", result.experiment, "--split", "val"], env=env)
    assert out.exit_code == 2
    assert f"experiment '{result.experiment}' has no split 'val'" in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
