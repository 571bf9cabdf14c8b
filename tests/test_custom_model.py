"""Custom models (``--model package.module:factory``, tests/custom_models.py): an image
factory trains with the cnn's recipe, records its import path and source sha256, reloads
with weights_only=True to the stored logits and gets GradCAM maps; a tabular factory
trains in the plain loop, reproducibly; its initialisation follows the init seed and
leaves torch's generator alone; a changed source is another experiment; bad --model
inputs are one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import custom_models
from mlvar.analysis.saliency.compute import training_norm
from mlvar.cli import app
from mlvar.config import Config, PathsConfig
from mlvar.data.scenario import SplitData, open_scenario, write_scenario
from mlvar.errors import MlvarError
from mlvar.saliency import saliency
from mlvar.store import ExperimentStore
from mlvar.train.images import to_nchw
from mlvar.train.models import make_network
from mlvar.train.seeding import make_generator
from mlvar.train.service import check_same_experiment, experiment_meta, prepare_training, train
from mlvar.train.trained import build_trained, target_layer
from tiny_images import N_CLASSES, SIZE, tiny_config, tiny_manifest, tiny_split

runner = CliRunner()
Listing = Callable[[Path], list[tuple[str, int]]]
IMAGE_FACTORY = "custom_models:tiny_cnn"
TABLE_FACTORY = "custom_models:tiny_mlp"
SOURCE_SHA = hashlib.sha256(Path(custom_models.__file__).read_bytes()).hexdigest()


def _tabular(rng: np.random.Generator, n: int, offset: int) -> SplitData:
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return SplitData(x, y, np.arange(offset, offset + n), np.zeros(n, bool), np.full(n, -1))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scenario ``tiny`` (16x16 images, 3 classes) with 2 runs of the image factory, and
    ``table`` (6 features, 2 classes) with 2 runs of the tabular factory."""
    root = tmp_path_factory.mktemp("custom")
    rng = np.random.default_rng(0)
    splits = {"train": tiny_split(rng, 60, 0), "test": tiny_split(rng, 30, 1000)}
    write_scenario(root / "data", "tiny", tiny_manifest(), splits)
    table = {
        "dataset": "compas",
        "mode": "original",
        "params": {},
        "class_names": ["no", "yes"],
        "input": {"kind": "tabular", "n_features": 6},
    }
    write_scenario(
        root / "data",
        "table",
        table,
        {"train": _tabular(rng, 80, 0), "test": _tabular(rng, 40, 500)},
    )
    cfg = tiny_config(root)
    over = {"model": IMAGE_FACTORY, "epochs": 2, "batch_size": 16, "workers": 1}
    train(cfg, "digits", scenario="tiny", runs=2, overrides=over)
    over = {"model": TABLE_FACTORY, "epochs": 3, "batch_size": 16}
    train(cfg, "compas", scenario="table", runs=2, overrides=over)
    return root


def _store(root: Path, name: str) -> ExperimentStore:
    return ExperimentStore.open(root / "runs", name)


def test_runs_record_the_factory_and_the_hash_of_its_source(work: Path) -> None:
    store = _store(work, "tiny-custom_models.tiny_cnn")
    assert store.meta["model"] == IMAGE_FACTORY
    recorded = store.meta["train"]["custom_model"]
    assert recorded["factory"] == IMAGE_FACTORY and recorded["source_sha256"] == SOURCE_SHA
    assert store.meta["train"]["recipe"]["optimizer"] == "sgd"  # the cnn's recipe
    assert store.meta["train"]["lr"] == 0.1  # the cnn's defaults
    for run in store.runs():
        assert run.meta["config"]["custom_model"]["source_sha256"] == SOURCE_SHA
    table = _store(work, "table-custom_models.tiny_mlp")
    assert table.meta["train"]["recipe"] == {"optimizer": "adam", "loop": "plain"}
    assert table.meta["train"]["lr"] == 1e-3 and {r.meta["engine"] for r in table.runs()} == {
        "custom-loop"
    }


def test_reloaded_with_weights_only_gives_the_stored_logits(work: Path) -> None:
    store = _store(work, "tiny-custom_models.tiny_cnn")
    scenario = open_scenario(work / "data", "tiny")
    x = training_norm(scenario).normalise(to_nchw(scenario.load("test").x))
    for run in store.runs():
        model = build_trained(IMAGE_FACTORY, (1, SIZE, SIZE), N_CLASSES, run)
        assert isinstance(model, custom_models.TinyCNN) and not model.training
        with torch.no_grad():
            np.testing.assert_allclose(model(x).numpy(), run.load_logits("test"), atol=1e-5)
    table = _store(work, "table-custom_models.tiny_mlp")
    test_x = torch.from_numpy(open_scenario(work / "data", "table").load("test").x)
    for run in table.runs():
        model = build_trained(TABLE_FACTORY, (6,), 2, run)
        with torch.no_grad():
            np.testing.assert_allclose(model(test_x).numpy(), run.load_logits("test"), atol=1e-6)


def test_gradcam_finds_the_last_conv_layer_or_the_one_named(work: Path) -> None:
    store = _store(work, "tiny-custom_models.tiny_cnn")
    result = saliency(store, work / "data", top=2, seeds=2)
    assert result.layer == "body.2" and result.n_seeds == 2  # the last Conv2d
    maps = np.load(result.path / "maps.npy")
    assert maps.shape == (4, 2, 2, SIZE, SIZE) and np.isfinite(maps.astype(float)).all()
    assert np.abs(maps[:, 0].astype(float) - maps[:, 1]).max() > 0.01  # two seeds differ
    # --layer NAME (what `analyze saliency --layer` passes): checked on the factory's network.
    model = build_trained(IMAGE_FACTORY, (1, SIZE, SIZE), N_CLASSES, store.runs()[0])
    assert target_layer(model, "body.0")[0] == "body.0"
    with pytest.raises(MlvarError, match="has no layer 'body.9'"):
        target_layer(model, "body.9")


def test_a_tabular_run_is_reproducible(work: Path, tmp_path: Path) -> None:
    shutil.copytree(work / "data", tmp_path / "data")
    over = {"model": TABLE_FACTORY, "epochs": 3, "batch_size": 16}
    train(tiny_config(tmp_path), "compas", scenario="table", runs=1, overrides=over)
    again = _store(tmp_path, "table-custom_models.tiny_mlp").runs()[0]
    first = next(
        r for r in _store(work, "table-custom_models.tiny_mlp").runs() if r.run_id == again.run_id
    )
    np.testing.assert_array_equal(again.load_logits("test"), first.load_logits("test"))
    (other,) = [
        r for r in _store(work, "table-custom_models.tiny_mlp").runs() if r.run_id != first.run_id
    ]
    assert not np.array_equal(other.load_logits("test"), first.load_logits("test"))


def test_init_follows_the_init_seed_and_leaves_torch_alone() -> None:
    before = torch.random.get_rng_state()

    def weights(seed: int) -> dict[str, torch.Tensor]:
        gen = make_generator(seed, "init")
        return make_network(IMAGE_FACTORY, (1, 8, 8), 3, gen).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.0.weight"], c["body.0.weight"])
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_changed_source_is_another_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "mymodels.py"
    module.write_text(Path(custom_models.__file__).read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "w"
    rng = np.random.default_rng(0)
    write_scenario(root / "data", "tiny", tiny_manifest(), {"train": tiny_split(rng, 9, 0)})
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    over = {"model": "mymodels:tiny_cnn"}
    found, first, name = prepare_training(cfg, "digits", "tiny", 1, overrides=over)
    old = experiment_meta(name, found, first)
    module.write_text(module.read_text() + "\n# changed\n")
    found, second, _ = prepare_training(cfg, "digits", "tiny", 1, overrides=over)
    with pytest.raises(MlvarError, match="train.custom_model"):
        check_same_experiment(old, experiment_meta(name, found, second), name)
    # The job spec's record (with custom_model) is taken as overrides, as backends do.
    again = prepare_training(cfg, "digits", "tiny", 1, overrides=second.record())[1]
    assert again.identity() == second.identity()


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("custom_models:not_a_module", ("returned a dict, not a torch.nn.Module",)),
        ("custom_models:wrong_input", ("fails on a batch of shape (2, 1, 16, 16)", "RuntimeError")),
        ("custom_models:missing", ("has no attribute 'missing'",)),
        ("no_such_module_here:f", ("no module named 'no_such_module_here'", "PYTHONPATH")),
        ("custom_models:NOT_CALLABLE", ("not a callable",)),
        ("custom_models:", ("is not package.module:factory",)),
    ],
)
def test_bad_model_is_one_line(
    work: Path, tree_listing: Listing, model: str, words: tuple[str, ...]
) -> None:
    before = tree_listing(work)
    env = {"MLVAR_DATA_ROOT": str(work / "data"), "MLVAR_RUNS_ROOT": str(work / "runs")}
    args = ["train", "digits", "--scenario", "tiny", "--model", model, "--runs", "1"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert "Traceback" not in result.output
    assert tree_listing(work) == before
