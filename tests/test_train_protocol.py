"""Training under ``--protocol study``: the study's recipes, run counts, scenario selection
and the records that keep study and mlvar experiments apart (docs/training.md, "The study
protocol")."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlvar.cli import app
from mlvar.config import Config, PathsConfig, TrainConfig, validate_train
from mlvar.data.registry import prepare
from mlvar.data.scenario import SplitData, list_scenarios, write_scenario
from mlvar.data.selection import select_scenarios
from mlvar.errors import MlvarError
from mlvar.recipes import STUDY_MEAN, STUDY_MODELS, STUDY_STD, default_runs
from mlvar.store import ExperimentStore
from mlvar.train import images
from mlvar.train.mlp import MLP, TrainData, train_batched, train_loop, two_class_logits
from mlvar.train.seeding import RunGenerators
from mlvar.train.service import experiment_meta, features, train_config
from mlvar.train.study import plan_study

runner = CliRunner()
_FILLED = ("storage", "name", "splits", "counts", "format_version", "mlvar_version")


def study_copy(data_root: Path, name: str) -> str:
    """Write the prepared scenario ``name`` again as a study-protocol scenario."""
    scen = next(s for s in list_scenarios(data_root) if s.name == name)
    manifest = {k: v for k, v in scen.manifest.items() if k not in _FILLED}
    manifest["protocol"] = "study"
    copy = write_scenario(
        data_root, f"{name}-study", manifest, {s: scen.load(s) for s in scen.splits}
    )
    return copy.name


@pytest.fixture(scope="module")
def compas_data(tmp_path_factory: pytest.TempPathFactory, compas_csv: Path) -> Path:
    """A data root with compas-holdout-cluster5 (mlvar) and its study copy."""
    root = tmp_path_factory.mktemp("protocol") / "data"
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "compas-scores-two-years.csv").write_bytes(compas_csv.read_bytes())
    prepare(root, "compas", mode="holdout", cluster=5)
    study_copy(root, "compas-holdout-cluster5")
    return root


def config_for(data_root: Path, runs_root: Path) -> Config:
    return Config(paths=PathsConfig(data_root, runs_root, runs_root.parent / "reports"))


# ---------------------------------------------------------------- recipes and defaults


def test_study_compas_recipe_is_the_studys_default_configuration(tmp_path: Path) -> None:
    cfg = train_config(Config(), "compas", 1, {"protocol": "study"})
    # models/simple_binary.py with main_holdout_compas.py's experiment(data, i, 10, 1e-4, 64)
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.batch_size, cfg.hidden) == ("mlp", 10, 1e-4, 64, 64)
    assert (cfg.dropout, cfg.weight_decay, cfg.protocol) == (0.1, 0.0, "study")
    assert cfg.identity()["recipe"] == {"head": "sigmoid"}
    # The other configurations are the usual overrides.
    other = train_config(Config(), "compas", 1, {"protocol": "study", "epochs": 1000, "lr": 1e-3})
    assert (other.epochs, other.lr, other.batch_size) == (1000, 1e-3, 64)


def test_study_resnet18_recipe_and_mlvar_recipes_unchanged() -> None:
    cfg = train_config(Config(), "cifar10", 1, {"protocol": "study"})
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay) == (
        "resnet18",
        150,
        0.1,
        128,
        5e-4,
    )
    recipe = cfg.identity()["recipe"]
    assert (recipe["momentum"], recipe["nesterov"], recipe["flip"], recipe["translate"]) == (
        0.9,
        False,
        True,
        4,
    )
    assert (recipe["schedule"], recipe["t_max"], recipe["pad"], recipe["precision"]) == (
        "cosine-epochs",
        200,
        "zero",
        "fp32",
    )
    assert recipe["normalise"] == {"mean": list(STUDY_MEAN), "std": list(STUDY_STD)}
    assert train_config(Config(), "cifar100", 1, {"protocol": "study"}).identity() == cfg.identity()
    # mlvar: no protocol in records or identities, exactly the fields of before.
    plain = train_config(Config(), "cifar10", 1, {"model": "resnet18"})
    assert "protocol" not in plain.record() and "protocol" not in plain.identity()
    assert plain.identity()["recipe"]["schedule"] == "cosine"
    # train_tta is recorded only when off (an option added later: records stay as before)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"train_tta"}
    assert set(plain.record()) == fields
    before = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "train_tta"}
    assert cfg.record() == before | {"protocol": "study"}


def test_study_run_counts_are_the_defaults(compas_data: Path, tmp_path: Path) -> None:
    assert [default_runs(d, "study") for d in ("compas", "cifar10", "cifar100", "digits")] == [
        100,
        25,
        25,
        10,
    ]
    assert default_runs("compas", "mlvar") == 10
    cfg = config_for(compas_data, tmp_path / "runs")
    plan = plan_study(cfg, "compas", "holdout", None, overrides={"protocol": "study"})
    assert plan.runs == 100 and [p.requested for p in plan.experiments] == [100]
    assert plan_study(cfg, "compas", "holdout", None).runs == 10
    cfg.protocol.name = "study"  # [protocol] name = "study" in mlvar.toml
    assert plan_study(cfg, "compas", "holdout", None).runs == 100


def test_models_the_study_did_not_train_are_refused(compas_data: Path, tmp_path: Path) -> None:
    with pytest.raises(MlvarError, match="no recipe under protocol 'study'"):
        train_config(Config(), "cifar10", 1, {"protocol": "study", "model": "airbench"})
    with pytest.raises(MlvarError, match="studdy"):
        train_config(Config(), "compas", 1, {"protocol": "studdy"})
    digits = prepare(tmp_path / "data", "digits", mode="holdout", subclass=3).name
    with pytest.raises(MlvarError, match="one output"):  # ten classes: not the study's MLP
        plan_study(
            config_for(tmp_path / "data", tmp_path / "runs"),
            "digits",
            digits,
            overrides={"protocol": "study", "model": "mlp"},
        )


# ---------------------------------------------------------------- the single-logit head


def test_two_class_logits_argmax_is_round_sigmoid_ties_included() -> None:
    z = torch.tensor([-3.0, -1e-8, -0.0, 0.0, 1e-9, 1e-8, 5e-8, 1e-7, 3e-7, 2.5]).unsqueeze(1)
    logits = two_class_logits(z)
    assert logits.shape == (10, 2) and torch.all(logits[:, 0] == 0)
    # The study: torch.sigmoid in float32, then np.round (half to even: 0.5 -> 0).
    study = np.round(torch.sigmoid(z[:, 0]).numpy().astype(np.float64))
    assert np.array_equal(logits.numpy().argmax(axis=1), study)
    assert study[3] == 0 and study[-1] == 1
    # softmax([0, z]) is sigmoid(z), in float64 as the analysis computes it.
    z64 = logits.numpy().astype(np.float64)
    p1 = np.exp(z64[:, 1]) / (np.exp(z64[:, 0]) + np.exp(z64[:, 1]))
    assert np.allclose(p1, 1 / (1 + np.exp(-z64[:, 1])), atol=1e-15)


def _binary(n: int = 203) -> TrainData:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=gen)
    y = ((x @ torch.randn(6, generator=gen)) + 0.3 * torch.randn(n, generator=gen) > 0).long()
    return TrainData(x, y, 2)


def _study_cfg(**kw) -> TrainConfig:
    cfg = TrainConfig(**({"epochs": 2, "batch_size": 32, "hidden": 16, "lr": 3e-3} | kw))
    cfg.protocol = "study"
    return validate_train(cfg)


def test_both_engines_train_the_sigmoid_head_alike() -> None:
    data, cfg = _binary(), _study_cfg()
    gens = [RunGenerators(7, r, cfg.vary) for r in range(3)]
    gens2 = [RunGenerators(7, r, cfg.vary) for r in range(3)]
    evals = {"train": data.x}
    loop = train_loop(data, cfg, gens, evals, weights=True)
    batched = train_batched(data, cfg, gens2, evals, weights=True)
    # Not bit for bit, unlike the softmax head: matmuls one output wide take another BLAS
    # path batched than alone (~2e-7 apart after two epochs); a semantic difference (a
    # batch, a mask, a wrong gradient) moves the logits by 1e-2 or more.
    for a, b in zip(loop, batched, strict=True):
        assert a["train"].shape == (203, 2) and torch.all(b["train"][:, 0] == 0)
        assert torch.allclose(a["train"], b["train"], atol=1e-5)
        assert a["state_dict"]["fc3.weight"].shape == (1, 16)
        for k, v in a["state_dict"].items():
            assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-5), k


def test_loop_engine_is_the_studys_training_step() -> None:
    """No dropout (its masks come from the run's generator): the same init and batches
    through nn.BCEWithLogitsLoss and torch.optim.Adam, the study's code, give the same
    model."""
    data, cfg = _binary(), _study_cfg(dropout=0.0, vary=["init", "order"])
    seen: dict[str, list] = {"init": [], "batch": []}

    def trace(kind: str, _pos: int, payload: object) -> None:
        seen[kind].append(payload)

    (out,) = train_loop(data, cfg, [RunGenerators(3, 0, cfg.vary)], {"x": data.x}, trace=trace)
    ref = MLP(6, 16, 2, outputs=1)
    ref.load_init(seen["init"][0])
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    ref.train()
    for _epoch, _step, idx in seen["batch"]:
        opt.zero_grad()
        loss_fn(ref(data.x[idx]), data.y[idx].float().unsqueeze(1)).backward()
        opt.step()
    ref.eval()
    with torch.no_grad():
        z = ref(data.x)
    assert torch.allclose(out["x"][:, 1], z[:, 0], atol=1e-6)


def test_cli_study_training_stores_round_sigmoid_predictions(
    compas_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(compas_data))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    args = ["train", "compas", "--protocol", "study", "--scenario", "holdout", "--runs", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    store = ExperimentStore.open(tmp_path / "runs", "compas-holdout-cluster5-study-mlp")
    assert store.meta["protocol"] == "study" and store.meta["scenario"]["protocol"] == "study"
    assert (store.meta["train"]["lr"], store.meta["train"]["epochs"]) == (1e-4, 10)
    scen = next(s for s in list_scenarios(compas_data) if s.name.endswith("-study"))
    x = torch.from_numpy(features(scen.load("test"), scen.manifest))
    runs = store.runs(verify=True)
    assert len(runs) == 3
    for run in runs:
        assert (run.meta["protocol"], run.meta["scenario_protocol"]) == ("study", "study")
        assert run.meta["config"]["protocol"] == "study"
        model = MLP(x.shape[1], 64, 2, outputs=1)
        model.load_state_dict(torch.load(run.path / "model.pt", weights_only=True))
        with torch.no_grad():
            z = model.eval()(x)[:, 0]
        stored = run.load_logits("test")
        assert np.all(stored[:, 0] == 0)
        study = np.round(torch.sigmoid(z).numpy().astype(np.float64))
        assert np.array_equal(stored.argmax(axis=1), study)
        assert np.allclose(stored[:, 1], z.numpy(), atol=1e-6)


# ---------------------------------------------------------------- selection and records


def test_selection_follows_the_protocol(compas_data: Path) -> None:
    names = [s.name for s in select_scenarios(compas_data, "compas", "holdout", "study")]
    assert names == ["compas-holdout-cluster5-study"]
    names = [s.name for s in select_scenarios(compas_data, "compas", None, "mlvar")]
    assert names == ["compas-holdout-cluster5"]
    names = [s.name for s in select_scenarios(compas_data, "compas", "compas-*", "study")]
    assert names == ["compas-holdout-cluster5-study"]
    # A full name is taken as given, whatever its protocol.
    names = [
        s.name for s in select_scenarios(compas_data, "compas", "compas-holdout-cluster5", "study")
    ]
    assert names == ["compas-holdout-cluster5"]
    with pytest.raises(MlvarError, match="of protocol 'study'"):
        select_scenarios(compas_data, "compas", "artificial", "study")


def test_a_recipe_of_another_protocol_is_allowed_named_and_recorded(
    compas_data: Path, tmp_path: Path
) -> None:
    cfg = config_for(compas_data, tmp_path / "runs")
    study_on_mlvar = plan_study(
        cfg, "compas", "compas-holdout-cluster5", 1, overrides={"protocol": "study"}
    )
    assert study_on_mlvar.experiments[0].experiment == "compas-holdout-cluster5-mlp-study"
    assert len(study_on_mlvar.notes) == 1 and "'mlvar'" in study_on_mlvar.notes[0]
    meta = experiment_meta("x", study_on_mlvar.scenarios[0], study_on_mlvar.cfg)
    assert (meta["protocol"], meta["scenario"]["protocol"]) == ("study", "mlvar")
    mlvar_on_study = plan_study(cfg, "compas", "compas-holdout-cluster5-study", 1)
    assert mlvar_on_study.experiments[0].experiment == "compas-holdout-cluster5-study-mlp-mlvar"
    meta = experiment_meta("x", mlvar_on_study.scenarios[0], mlvar_on_study.cfg)
    assert (meta["protocol"], meta["scenario"]["protocol"]) == ("mlvar", "study")
    # mlvar on mlvar: the name and the metadata keys of before.
    plain = plan_study(cfg, "compas", "compas-holdout-cluster5", 1)
    assert plain.experiments[0].experiment == "compas-holdout-cluster5-mlp" and not plain.notes
    meta = experiment_meta("x", plain.scenarios[0], plain.cfg)
    assert "protocol" not in meta and "protocol" not in meta["scenario"]


def test_unknown_protocol_is_one_line_exit_2(
    compas_data: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(compas_data))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    for command in (["train", "compas"], ["submit", "run", "compas"]):
        result = runner.invoke(app, [*command, "--protocol", "studdy", "--runs", "1"])
        assert result.exit_code == 2, (result.stdout, result.stderr)
        text = (result.stdout + result.stderr).strip()
        assert "studdy" in text and "Traceback" not in text
        assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- the study's ResNet-18


def test_resnet18_study_lr_is_torchs_cosine_annealing_per_epoch() -> None:
    recipe = STUDY_MODELS["resnet18"].recipe
    lrs = images.epoch_lrs(recipe, 0.1, 150)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    expected = []
    for _epoch in range(150):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == expected  # bit for bit
    assert math.isclose(lrs[-1], 0.05 * (1 + math.cos(math.pi * 149 / 200)), rel_tol=1e-12)


def _tiny_cifar(n: int = 12) -> tuple[dict[str, SplitData], dict]:
    rng = np.random.default_rng(0)

    def split(offset: int) -> SplitData:
        x = rng.integers(1, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.int64)
        return SplitData(x, y, np.arange(offset, offset + n), np.zeros(n, bool), y.copy())

    manifest = {
        "class_names": [str(i) for i in range(10)],
        "input": {"kind": "image", "max_value": 255},
    }
    return {"train": split(0), "test": split(n)}, manifest


def test_resnet18_study_crop_pads_with_zeros_then_normalises_with_the_constants() -> None:
    splits, manifest = _tiny_cifar()
    data = images.ImageData.build(
        splits, manifest, torch.device("cpu"), STUDY_MODELS["resnet18"].recipe["normalise"]
    )
    aug = images.Augmenter(data.train_x, 4, True, "zero")
    draws = torch.tensor([[0, 0, 0], [8, 8, 1], [4, 4, 0]])
    batch = aug.batch(torch.tensor([0, 1, 2]), draws)
    image = data.train_x
    # Shifted to the top-left corner: 4 padded rows and columns of 0 (the images have none).
    assert torch.all(batch[0, :, :4, :] == 0) and torch.all(batch[0, :, :, :4] == 0)
    assert torch.equal(batch[0, :, 4:, 4:], image[0, :, :28, :28])
    # Shifted to the bottom-right corner and mirrored: the zero columns come out on the left.
    assert torch.all(batch[1, :, 28:, :] == 0) and torch.all(batch[1, :, :, :4] == 0)
    assert torch.equal(batch[1, :, :28, 4:], image[1, :, 4:, 4:].flip(-1))
    assert torch.equal(batch[2], image[2])
    # Normalised, a padded pixel is (0 - mean) / std: torchvision's Normalize after ToTensor.
    normed = data.normalise(batch[:1])
    mean = torch.tensor(STUDY_MEAN).view(3, 1, 1)
    std = torch.tensor(STUDY_STD).view(3, 1, 1)
    assert torch.equal(normed[0, :, :4, :4], ((0 - mean) / std).expand(3, 4, 4))
    assert torch.equal(normed[0, :, 4:, 4:], (image[0, :, :28, :28].float() / 255 - mean) / std)


def test_resnet18_study_training_steps_with_the_epoch_lrs(monkeypatch: pytest.MonkeyPatch) -> None:
    splits, manifest = _tiny_cifar()
    cfg = train_config(Config(), "cifar10", 1, {"protocol": "study", "epochs": 3, "batch_size": 6})
    data = images._build_data(splits, manifest, torch.device("cpu"), cfg)
    assert torch.equal(data.mean.flatten(), torch.tensor(STUDY_MEAN))
    seen: list[float] = []
    monkeypatch.setattr(images.SGD, "step", lambda self, lr: seen.append(lr))
    images.train_run(data, cfg, RunGenerators(0, 0, cfg.vary))
    lrs = images.epoch_lrs(STUDY_MODELS["resnet18"].recipe, 0.1, 3)
    assert seen == [lrs[0]] * 2 + [lrs[1]] * 2 + [lrs[2]] * 2
    recorded = json.loads(json.dumps(cfg.record()))
    assert recorded["protocol"] == "study"


def test_saliency_normalises_images_as_the_runs_recipe(tmp_path: Path) -> None:
    """GradCAM feeds each model its inputs normalised as it was trained: the study
    ResNet-18's fixed constants, else the training split's statistics."""
    from types import SimpleNamespace

    from mlvar.analysis.saliency.compute import recipe_normalise, training_norm
    from mlvar.store import RunRecord

    study_run = RunRecord("run-0000", tmp_path, {"config": {"protocol": "study"}})
    mlvar_run = RunRecord("run-0000", tmp_path, {"config": {"model": "resnet18"}})
    fixed = recipe_normalise(study_run, "resnet18")
    assert fixed == {"mean": list(STUDY_MEAN), "std": list(STUDY_STD)}
    assert recipe_normalise(mlvar_run, "resnet18") is None
    assert recipe_normalise(study_run, "mlp") is None  # the study's MLP reads features
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    train = SplitData(x, np.zeros(20, np.int64), np.arange(20), np.zeros(20, bool), -np.ones(20))
    scenario = SimpleNamespace(
        load=lambda split: train,
        manifest={"class_names": ["a", "b"], "input": {"kind": "image", "max_value": 255}},
    )
    nchw = images.to_nchw(x)
    got = training_norm(scenario, fixed).normalise(nchw).numpy()
    mean = np.asarray(STUDY_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STUDY_STD, np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(got, (nchw.numpy() / 255 - mean) / std, rtol=1e-6, atol=1e-6)
    own = training_norm(scenario).normalise(nchw).numpy()  # the split's statistics
    scaled = nchw.numpy().astype(np.float64) / 255
    expected = (scaled - scaled.mean(axis=(0, 2, 3), keepdims=True)) / scaled.std(
        axis=(0, 2, 3), ddof=1, keepdims=True
    )
    np.testing.assert_allclose(own, expected, rtol=1e-5, atol=1e-5)
