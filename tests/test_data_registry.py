"""The dataset registry: every spec is consistent with the model table and the config, a new
dataset is one module's worth of code, its options' errors and hints come from its
parameter dataclasses, and registering and checking options loads no heavy library."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mlvar.config import Config, TrainConfig, load_config
from mlvar.data import params as p
from mlvar.data import registry
from mlvar.data.modes import Appearance, class_modes, inverter, original_mode, unchanged_splits
from mlvar.data.spec import (
    DATASETS,
    BaseData,
    DatasetSpec,
    ModeResult,
    ModeSpec,
    Source,
    TrainDefaults,
    register,
)
from mlvar.errors import MlvarError
from mlvar.recipes import MODELS

HEAVY = ("pandas", "sklearn", "torch", "matplotlib", "scipy")


def _loaded_after(code: str) -> list[str]:
    """Top-level packages of HEAVY imported by ``code`` in a fresh interpreter."""
    probe = f"""
import sys, json
{code}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_registry_config_and_option_checks_import_no_heavy_library(tmp_path: Path) -> None:
    assert _loaded_after("import mlvar.data.registry, mlvar.config") == []
    # The bad-input errors of `mlvar data prepare` need no data, so no heavy library.
    checks = f"""
from mlvar.data import registry
from mlvar.errors import MlvarError
for kw in ({{"dataset": "compas", "mode": "artificial", "ratio": 0.7}},
           {{"dataset": "digits", "subclass": 12}},
           {{"dataset": "cifar10", "mode": "holdout-dup", "ratio": 1.0}},
           {{"dataset": "cifar100", "subclass": "baby", "cls": 1}}):
    try:
        registry.prepare({str(tmp_path)!r}, **kw)
    except MlvarError:
        pass
    else:
        raise SystemExit("no error")
registry.option_help("ratio"), [s.usage() for s in registry.DATASETS.values()]
"""
    assert _loaded_after(checks) == []
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the built-in specs


def test_builtin_specs_in_order_and_consistent() -> None:
    assert list(registry.DATASETS) == ["compas", "digits", "cifar10", "cifar100"]
    # The order is the registry's, not the order the dataset modules were first imported.
    probe = "import mlvar.data.cifar100, mlvar.data.digits\nfrom mlvar.data import registry\n"
    probe += "print(list(registry.DATASETS))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "['compas', 'digits', 'cifar10', 'cifar100']"
    for name, spec in registry.DATASETS.items():
        assert spec.name == name and registry.get_dataset(name) is spec
        assert spec.modes[0] == "original" and len(set(spec.modes)) == len(spec.modes)
        model = MODELS[spec.train.model]
        assert spec.input_kind in model.inputs, name  # the default model reads the data
        assert set(spec.train.values) <= {f.name for f in dataclasses.fields(TrainConfig)}
        for m in spec.mode_specs:
            assert issubclass(m.params, p.Params) and m.summary
            for opt in m.params.options().values():
                assert opt.help and opt.metavar


def test_config_defaults_are_the_spec_on_top_of_the_model() -> None:
    """Config().train[d] equals the model's defaults overlaid by the dataset's values,
    rebuilt here field by field from the two tables."""
    cfg = Config()
    assert list(cfg.train) == list(registry.DATASETS)
    for name, spec in registry.DATASETS.items():
        expected = dataclasses.asdict(TrainConfig())
        expected["model"] = spec.train.model
        expected.update(MODELS[spec.train.model].defaults)
        expected.update(spec.train.values)
        assert dataclasses.asdict(cfg.train[name]) == expected, name
    # The COMPAS and CIFAR values of the original study.
    assert (cfg.train["compas"].epochs, cfg.train["compas"].lr) == (10, 1e-3)
    assert (cfg.train["digits"].epochs, cfg.train["digits"].lr) == (30, 3e-3)
    assert cfg.train["cifar10"].model == "airbench" and cfg.train["cifar10"].batch_size == 1024


def test_train_table_of_a_tabular_dataset_refuses_an_image_model(no_mlvar_env: Path) -> None:
    path = no_mlvar_env / "mlvar.toml"
    path.write_text('[train.compas]\nmodel = "cnn"\n')
    with pytest.raises(MlvarError) as err:
        load_config(path, env={})
    assert "train.compas.model 'cnn' needs image inputs, but the data is tabular" in str(err.value)
    assert "valid here: mlp" in err.value.hint


def test_usage_and_hints_come_from_the_parameters() -> None:
    compas = registry.get_dataset("compas")
    assert compas.usage() == (
        "--mode original | --mode artificial --ratio A [--seed S] | --mode holdout --cluster K"
    )
    with pytest.raises(MlvarError) as err:
        registry.prepare("/nonexistent", "compas", subclass=3)
    assert err.value.message == "compas mode 'original' takes no --subclass"
    assert err.value.hint == "valid options for compas: " + compas.usage()
    with pytest.raises(MlvarError) as err:
        registry.prepare("/nonexistent", "compas", ratio=0.3)
    assert err.value.hint == "only --mode artificial does"
    digits = registry.get_dataset("digits")
    assert "--mode holdout --subclass D [--ratio A] | --mode holdout --cls C --ratio A" in (
        digits.usage()
    )
    with pytest.raises(MlvarError) as err:
        registry.prepare("/nonexistent", "digits", mode="holdout")
    assert err.value.message == "digits mode 'holdout' needs --subclass D or --cls C"
    assert err.value.hint.startswith("e.g. --subclass 3")
    help_text = registry.option_help("seed")
    # user kinds share built-in modes, so their help names them too
    assert "compas/table artificial: seed of the label flips." in help_text
    assert "digits/cifar10/imagefolder holdout-dup: seed of the copies' draw." in help_text


# ---------------------------------------------------------------- a new dataset


N_ROWS = 60


class ToySource(Source):
    """A synthetic dataset: 60 rows, 3 classes, 2x2 one-channel "images" 0..9."""

    def load(self) -> BaseData:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 10, size=(N_ROWS, 2, 2, 1), dtype=np.uint8)
        y = np.arange(N_ROWS, dtype=np.int64) % 3
        positions = np.arange(N_ROWS)
        return BaseData(
            x=x,
            y=y,
            ids=100 + positions.astype(np.int64),
            groups=np.full(N_ROWS, -1, dtype=np.int64),
            index={"train": positions[:40], "val": positions[40:50], "test": positions[50:]},
            class_names=["a", "b", "c"],
            manifest={
                "class_names": ["a", "b", "c"],
                "input": {"kind": "image", "shape": [2, 2, 1], "max_value": 9},
            },
        )


@dataclass(frozen=True)
class DropParams(p.Params):
    ratio: float = p.ratio(0.0, 0.5, help="fraction of training rows dropped")
    seed: int = p.seed(help="seed of the rows dropped")


def _drop(source: ToySource, params: DropParams) -> ModeResult:
    splits = unchanged_splits(source.base)
    train = splits["train"]
    rng = np.random.default_rng(params.seed)
    keep = rng.random(len(train)) >= params.ratio
    for name in ("x", "y", "id", "affected", "group"):
        setattr(train, name, getattr(train, name)[keep])
    return ModeResult(
        splits, f"Dropped {int((~keep).sum())} training rows.", {"kept": int(keep.sum())}
    )


def _fetch(data_root: Path, source: Path | None = None, **_: object) -> dict[str, object]:
    return {"dataset": "toy", "path": None, "action": "nothing to fetch"}


TOY = DatasetSpec(
    name="toy",
    description="a synthetic test dataset",
    input_kind="image",
    mode_specs=(
        original_mode("Unchanged toy data."),
        ModeSpec("drop", DropParams, _drop, summary="drops a random fraction of training rows"),
        *class_modes(Appearance(inverter(9), "inversion 9 - x", "inverted", "test inverted")),
    ),
    open=ToySource,
    fetch=_fetch,
    needs_fetch=False,
    train=TrainDefaults("cnn", {"epochs": 3}),
    n_classes=3,
)


@pytest.fixture
def toy() -> Iterator[DatasetSpec]:
    """TOY registered for one test (the registry is as it was afterwards)."""
    register(TOY)
    try:
        yield TOY
    finally:
        del DATASETS["toy"]


def test_a_new_dataset_is_one_spec(toy: DatasetSpec, tmp_path: Path, tree_listing) -> None:
    assert registry.get_dataset("toy") is toy
    assert toy.modes == (
        "original",
        "drop",
        "holdout",
        "holdout-dup",
        "augmentation",
        "augmentation-all",
    )
    # Its own mode: name, params, description and manifest from the spec.
    scenario = registry.prepare(tmp_path, "toy", mode="drop", ratio=0.25, seed=3)
    assert scenario.name == "toy-drop-r0.25-s3"
    manifest = scenario.manifest
    assert manifest["dataset"] == "toy" and manifest["mode"] == "drop"
    assert manifest["params"] == {"ratio": 0.25, "seed": 3}
    train = scenario.load("train")
    keep = np.random.default_rng(3).random(40) >= 0.25
    np.testing.assert_array_equal(train.id, 100 + np.flatnonzero(keep))
    assert manifest["kept"] == int(keep.sum()) and manifest["description"].startswith("Dropped")
    np.testing.assert_array_equal(scenario.load("test").id, 100 + np.arange(50, 60))
    # The shared class modes work on it as on CIFAR-10: the first half of class 1 inverted.
    aug = registry.prepare(tmp_path, "toy", mode="augmentation", cls=1, ratio=0.5)
    assert aug.name == "toy-augmentation-cls1-r0.5"
    base = ToySource(tmp_path).load()
    data = aug.load("train")
    members = np.flatnonzero(base.y[:40] == 1)
    chosen = members[: len(members) // 2]
    np.testing.assert_array_equal(np.flatnonzero(data.affected), chosen)
    np.testing.assert_array_equal(data.x[chosen], 9 - base.x[chosen])
    assert aug.splits == ["train", "val", "test", "test_gray"]
    # Errors from its parameters, nothing written.
    before = tree_listing(tmp_path)
    for kwargs, message, hint in (
        ({"mode": "drop"}, "toy mode 'drop' needs --ratio", "use a value in [0, 0.5]"),
        ({"mode": "drop", "ratio": 0.6}, "drop ratio 0.6 is out of range", "[0.0, 0.5]"),
        ({"mode": "drop", "ratio": 0.1, "cls": 1}, "toy mode 'drop' takes no --cls", "only"),
        ({"cluster": 2}, "toy mode 'original' takes no --cluster", "valid options for toy"),
        ({"mode": "holdout", "ratio": 0.5, "cls": 3}, "toy class 3 is not a class index 0-2", ""),
        ({"mode": "drop", "ratio": 0.25, "seed": 3}, "scenario 'toy-drop-r0.25-s3' already", ""),
    ):
        with pytest.raises(MlvarError) as err:
            registry.prepare(tmp_path, "toy", **kwargs)
        assert err.value.message.startswith(message), err.value
        assert hint in err.value.hint
    assert tree_listing(tmp_path) == before
    # The CLI's help and the training defaults pick it up.
    assert "toy drop: fraction of training rows dropped." in registry.option_help("ratio")
    assert Config().train["toy"].epochs == 3 and Config().train["toy"].model == "cnn"
    with pytest.raises(ValueError, match="registered twice"):
        register(TOY)


def test_variants_need_a_key_option() -> None:
    bad = dataclasses.replace(
        TOY,
        name="toy2",
        mode_specs=(
            ModeSpec("drop", DropParams, _drop, summary="one"),
            ModeSpec("drop", DropParams, _drop, summary="two"),
        ),
    )
    with pytest.raises(ValueError, match="key option"):
        register(bad)
    assert "toy2" not in DATASETS


# ---------------------------------------------------------------- parameters


def test_params_parse_check_and_name() -> None:
    where = p.Where("toy", "drop", 3)
    params = DropParams.parse({"ratio": 0, "seed": "4"}, where)
    assert params == DropParams(ratio=0.0, seed=4) and isinstance(params.ratio, float)
    assert params.name_parts() == "-r0.0-s4"
    assert DropParams(ratio=0.5, seed=0).name_parts() == "-r0.5"  # seed 0 is left out
    assert DropParams.usage() == "--ratio A [--seed S]"
    assert params.manifest() == {"ratio": 0.0, "seed": 4}
    # A given value is checked before a missing one is reported.
    with pytest.raises(MlvarError, match="seed must be a non-negative integer, got -1"):
        DropParams.parse({"seed": -1}, where)
    for bad in ("x", True, float("nan"), float("inf"), None):
        with pytest.raises(MlvarError, match="drop ratio"):
            DropParams.parse({"ratio": bad}, where)
    assert p.given_options({"ratio": None, "seed": 0, "cls": "2"}) == {"cls": "2"}
    assert p.as_int(np.int64(3)) == 3 and p.as_int(" 7 ") == 7
    assert p.as_int(2.0) is None and p.as_int(False) is None
