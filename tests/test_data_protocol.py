"""``--protocol study`` scenarios: each derived again here from the raw data and the study's
rules (``hvpham/mlvariance``'s ``prepare_data/`` scripts, as ``docs/datasets.md`` states
them), without mlvar's code; and the protocol's names, manifests, families and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.model_selection import train_test_split
from sklearn.tree import DecisionTreeClassifier
from typer.testing import CliRunner

from conftest import TinyCifar
from mlvar.cli import app
from mlvar.data import registry
from mlvar.data.families import scenario_families
from mlvar.errors import MlvarError
from test_data_cifar import KEPT
from test_data_compas import Reference


def _load(scenario) -> dict:
    return {s: scenario.load(s) for s in scenario.splits}


def _gray(img: np.ndarray) -> np.ndarray:
    """The study's grayscale: PIL ``ImageOps.grayscale``, stacked to 3 channels."""
    luma = np.asarray(ImageOps.grayscale(Image.fromarray(img)))
    return np.stack([luma] * 3, axis=2)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- COMPAS


@pytest.fixture(scope="module")
def ref(compas_csv: Path) -> Reference:
    return Reference(compas_csv)


@pytest.fixture(scope="module")
def croot(tmp_path_factory: pytest.TempPathFactory, compas_csv: Path) -> Path:
    root = tmp_path_factory.mktemp("compas-study") / "data"
    registry.fetch(root, "compas", source=compas_csv)
    return root


class StudyClusters:
    """The study's clusters: the tree on all rows, leaves of train+val ordered by their
    train+val rows (a stable sort of the sorted leaf ids)."""

    def __init__(self, ref: Reference) -> None:
        tree = DecisionTreeClassifier(random_state=0, min_samples_leaf=300).fit(ref.x, ref.y)
        self.leaf = tree.apply(ref.x)
        self.rest, self.test = train_test_split(
            np.arange(len(ref.y)), test_size=0.165, random_state=69
        )
        in_rest = sorted(set(self.leaf[self.rest].tolist()))
        self.order = sorted(in_rest, key=lambda lf: int((self.leaf[self.rest] == lf).sum()))


@pytest.mark.parametrize("k", [2, 3, 5, 6, 10, 11])
def test_compas_study_holdout(croot: Path, ref: Reference, k: int) -> None:
    clusters = StudyClusters(ref)
    leaf = clusters.order[k]
    scenario = registry.prepare(croot, "compas", mode="holdout", cluster=k, protocol="study")
    assert scenario.name == f"compas-holdout-cluster{k}-study"
    assert scenario.manifest["protocol"] == "study"
    splits = _load(scenario)
    in_leaf = set(ref.ids[clusters.leaf == leaf].tolist())
    # Not one train or validation row of the cluster remains.
    assert not in_leaf & set(splits["train"].id.tolist())
    assert not in_leaf & set(splits["val"].id.tolist())
    # Validation is split off after the removal: 12.5% of what remains, in the split's order.
    remaining = clusters.rest[clusters.leaf[clusters.rest] != leaf]
    train, val = train_test_split(remaining, test_size=0.125, random_state=69)
    assert splits["train"].id.tolist() == ref.ids[train].tolist()
    assert splits["val"].id.tolist() == ref.ids[val].tolist()
    assert len(splits["val"]) == int(np.ceil(0.125 * len(remaining)))
    # Affected: the cluster's test rows, and nothing in train or validation.
    assert splits["test"].id.tolist() == ref.ids[clusters.test].tolist()
    affected = set(splits["test"].id[splits["test"].affected].tolist())
    assert affected == in_leaf & set(ref.ids[clusters.test].tolist())
    assert not splits["train"].affected.any() and not splits["val"].affected.any()
    # Every feature standardised with the scenario's training statistics.
    mean, std = ref.x[train].mean(axis=0), ref.x[train].std(axis=0)
    std[std == 0] = 1.0
    for s, pos in (("train", train), ("val", val), ("test", clusters.test)):
        np.testing.assert_allclose(splits[s].x, (ref.x[pos] - mean) / std, rtol=1e-5, atol=1e-5)


def test_compas_study_and_mlvar_orders_differ(croot: Path, ref: Reference) -> None:
    """On the real file the two orders disagree for clusters 2/3: the same index names
    different leaves, so the study protocol is not the mlvar one renamed."""
    clusters = StudyClusters(ref)
    study = registry.prepare(
        croot, "compas", mode="holdout", cluster=2, protocol="study", force=True
    )
    mine = registry.prepare(croot, "compas", mode="holdout", cluster=2)
    assert "protocol" not in mine.manifest
    mlvar_leaf = mine.manifest["clusters"]["leaf_ids"][2]
    assert study.manifest["clusters"]["leaf_ids"][2] == clusters.order[2] != mlvar_leaf
    assert study.manifest["clusters"]["leaf_ids"][3] == mlvar_leaf


def test_compas_study_artificial_sweep(croot: Path, ref: Reference) -> None:
    result = registry.prepare_sweep(croot, "compas", mode="artificial", protocol="study")
    ratios = ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5"]
    assert result.names == [f"compas-artificial-r{r}-study" for r in ratios]
    assert result.protocol == "study"
    # The feature is mlvar's draw (the same design: independent flips); only the scaling is
    # the study's, every column with training statistics.
    study = _load(result.scenarios[3])
    mine = _load(registry.prepare(croot, "compas", mode="artificial", ratio=0.3))
    std = result.scenarios[3].manifest["standardisation"]
    for s in ("train", "val", "test"):
        assert study[s].id.tolist() == mine[s].id.tolist()
        feature = study[s].x[:, -1] * std["std"][-1] + std["mean"][-1]
        np.testing.assert_allclose(feature, mine[s].x[:, -1], atol=1e-5)
        assert study[s].affected.tolist() == mine[s].affected.tolist()
    train_raw = np.concatenate([ref.x[ref.index["train"]], mine["train"].x[:, -1:]], axis=1)
    np.testing.assert_allclose(std["mean"], train_raw.mean(axis=0), rtol=1e-9)


# ---------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def c10_root(tmp_path_factory: pytest.TempPathFactory, tiny_cifar10: TinyCifar) -> Path:
    root = tmp_path_factory.mktemp("c10-study") / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    return root


@pytest.mark.parametrize("mode", ["holdout", "holdout-dup", "augmentation", "augmentation-all"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_cifar10_study_modes(c10_root: Path, tiny_cifar10: TinyCifar, mode: str, ratio: float):
    t = tiny_cifar10
    n = len(t.y_train)
    cls = None if mode == "augmentation-all" else 0
    targets = np.arange(n) if cls is None else np.flatnonzero(t.y_train == cls)
    first = targets[: int(round(ratio * 10)) * len(targets) // 10]
    kwargs = {"ratio": ratio} if cls is None else {"ratio": ratio, "cls": cls}
    scenario = registry.prepare(c10_root, "cifar10", mode=mode, protocol="study", **kwargs)
    suffix = f"cls0-r{ratio}" if cls is not None else f"r{ratio}"
    assert scenario.name == f"cifar10-{mode}-{suffix}-study"
    splits = _load(scenario)
    # Validation is split off the changed set, each split in the order the split gives.
    kept = np.setdiff1d(np.arange(n), first) if mode == "holdout" else np.arange(n)
    train, val = train_test_split(kept, test_size=0.1, random_state=69)
    assert splits["train"].id.tolist() == train.tolist()
    assert splits["val"].id.tolist() == val.tolist()
    first_set = set(first.tolist())
    for s in ("train", "val"):
        data = splits[s]
        changed = np.isin(data.id, first)
        if mode == "holdout":
            assert not changed.any()
            continue
        # Validation holds its share of the changed images: the first fraction's images
        # that the split put there.
        assert set(data.id[changed].tolist()) == first_set & set(data.id.tolist())
        for row in np.flatnonzero(changed):
            original = t.x_train[data.id[row]]
            if mode == "holdout-dup":
                # A copy of a remaining image of the class.
                copies = [j for j in targets if j not in first_set]
                assert any(np.array_equal(data.x[row], t.x_train[j]) for j in copies)
            else:
                assert np.array_equal(data.x[row], _gray(original))
        for row in np.flatnonzero(~changed):
            assert np.array_equal(data.x[row], t.x_train[data.id[row]])
        flags = changed if s == "train" or cls is None else changed | (data.y == cls)
        assert data.affected.tolist() == flags.tolist()
    if mode == "augmentation-all":
        # Exactly the first fraction of the whole training set is changed.
        assert sum(scenario.manifest["change"]["changed_in"].values()) == len(first)
        assert len(first) == int(round(ratio * 10)) * n // 10
    test = splits["test"]
    assert np.array_equal(test.x, t.x_test)
    assert (
        test.affected.tolist()
        == ((t.y_test == 0) if cls is not None else 0 * t.y_test).astype(bool).tolist()
    )
    if mode.startswith("augmentation"):
        # test_gray is kept as an mlvar addition (the study wrote none), labelled so.
        assert "mlvar addition" in scenario.manifest["test_gray"]
        assert np.array_equal(splits["test_gray"].x[0], _gray(t.x_test[0]))
    else:
        assert "test_gray" not in splits


def test_cifar10_study_sweep_and_coexistence(tmp_path: Path, tiny_cifar10: TinyCifar) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    study = registry.prepare_sweep(root, "cifar10", mode="holdout", protocol="study")
    assert study.names == [f"cifar10-holdout-cls0-r0.{a}-study" for a in range(10)]
    mine = registry.prepare(root, "cifar10", mode="holdout", ratio=0.5)
    assert "protocol" not in mine.manifest and mine.name == "cifar10-holdout-cls0-r0.5"
    families = scenario_families(root)
    assert [(f.name, len(f.scenarios), f.protocol) for f in families] == [
        ("cifar10 holdout", 1, "mlvar"),
        ("cifar10 holdout (study)", 10, "study"),
    ]
    # Preparing a study scenario again gives the same bytes.
    again = registry.prepare(
        root, "cifar10", mode="holdout-dup", ratio=0.5, protocol="study", seed=3
    )
    files = _bytes(again.path)
    rebuilt = registry.prepare(
        root, "cifar10", mode="holdout-dup", ratio=0.5, protocol="study", seed=3, force=True
    )
    assert _bytes(rebuilt.path) == files


# ---------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize(
    ("subclass", "ratio"), [("boy+man", 0.5), ("baby", 0.5), ("girl+woman", 1.0)]
)
def test_cifar100_study_holdout(
    tmp_path: Path, tiny_cifar100: TinyCifar, subclass: str, ratio: float
) -> None:
    t = tiny_cifar100
    root = tmp_path / "data"
    registry.fetch(root, "cifar100", source=t.archive, verify=False)
    scenario = registry.prepare(root, "cifar100", subclass=subclass, ratio=ratio, protocol="study")
    assert scenario.name == f"cifar100-holdout-{subclass}-r{ratio}-study"
    from conftest import CIFAR100_HIERARCHY

    coarse_names = sorted(CIFAR100_HIERARCHY)
    fine_names = sorted(f for fines in CIFAR100_HIERARCHY.values() for f in fines)
    subs = [fine_names.index(s) for s in subclass.split("+")]
    kept = np.flatnonzero(np.isin(t.coarse_train, [coarse_names.index(c) for c in KEPT]))
    train, val = train_test_split(kept, test_size=0.1, random_state=69)
    splits = _load(scenario)
    for s, pos in (("train", train), ("val", val)):
        # The pooled first fraction of the subclasses' samples, in the split's order.
        members = [p for p in pos if t.y_train[p] in subs]
        dropped = set(members[: int(ratio * 10) * len(members) // 10])
        expected = [p for p in pos if p not in dropped]
        assert splits[s].id.tolist() == expected
        # The subclasses' samples left are affected.
        assert splits[s].affected.tolist() == [bool(t.y_train[p] in subs) for p in expected]
    test = splits["test"]
    assert test.affected.tolist() == np.isin(test.group, subs).tolist()
    if ratio == 1.0:
        assert not splits["train"].affected.any() and not splits["val"].affected.any()


# ---------------------------------------------------------------- errors and the CLI


def test_bad_protocol_writes_nothing(croot: Path, tree_listing) -> None:
    before = tree_listing(croot)
    with pytest.raises(MlvarError, match="unknown protocol 'stduy'"):
        registry.prepare(croot, "compas", mode="holdout", cluster=1, protocol="stduy")
    with pytest.raises(MlvarError, match="unknown protocol"):
        registry.prepare_sweep(croot, "compas", mode="artificial", protocol="stduy")
    with pytest.raises(MlvarError, match="digits has no study protocol"):
        registry.prepare_sweep(croot, "digits", mode="holdout", protocol="study")
    assert tree_listing(croot) == before


def _cli(cwd: Path, monkeypatch: pytest.MonkeyPatch, *args: object):
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(cwd / "data"))
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_protocol(
    tmp_path: Path, compas_csv: Path, monkeypatch: pytest.MonkeyPatch, tree_listing
) -> None:
    fetched = _cli(tmp_path, monkeypatch, "data", "fetch", "compas", "--source", compas_csv)
    assert fetched.exit_code == 0, fetched.stderr
    for args, words in (
        (["--protocol", "stduy"], "unknown protocol 'stduy'"),
        (["--protocol", "study", "--mode", "nope"], "unknown compas mode"),
    ):
        before = tree_listing(tmp_path)
        result = _cli(tmp_path, monkeypatch, "data", "prepare", "compas", *args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert line.startswith("Error: ") and "\n" not in line and words in line
        assert tree_listing(tmp_path) == before
    digits = _cli(tmp_path, monkeypatch, "data", "prepare", "digits", "--protocol", "study")
    assert digits.exit_code == 2 and "digits has no study protocol" in digits.stderr
    assert "\n" not in digits.stderr.strip()
    swept = _cli(
        tmp_path, monkeypatch, "data", "prepare", "compas", "--mode", "artificial",
        "--protocol", "study", "--json",
    )  # fmt: skip
    assert swept.exit_code == 0, swept.stderr
    out = json.loads(swept.stdout)
    assert out["protocol"] == "study" and len(out["prepared"]) == 6
    assert all(name.endswith("-study") for name in out["prepared"])
    # The config's [protocol] name is the default; --protocol overrides it.
    (tmp_path / "mlvar.toml").write_text('[protocol]\nname = "study"\n')
    by_config = _cli(
        tmp_path, monkeypatch, "data", "prepare", "compas", "--mode", "holdout", "--cluster", "1"
    )
    assert by_config.exit_code == 0, by_config.stderr
    assert (tmp_path / "data" / "compas-holdout-cluster1-study").is_dir()
    mine = _cli(
        tmp_path, monkeypatch, "data", "prepare", "compas", "--mode", "holdout",
        "--cluster", "1", "--protocol", "mlvar",
    )  # fmt: skip
    assert mine.exit_code == 0, mine.stderr
    listed = json.loads(_cli(tmp_path, monkeypatch, "data", "list", "--json").stdout)
    assert {s["name"]: (s["family"], s["protocol"]) for s in listed} == {
        **{
            f"compas-artificial-r0.{a}-study": ("compas artificial (study)", "study")
            for a in range(6)
        },
        "compas-holdout-cluster1": ("compas holdout", "mlvar"),
        "compas-holdout-cluster1-study": ("compas holdout (study)", "study"),
    }
    table = _cli(tmp_path, monkeypatch, "data", "list")
    assert "compas holdout (study)" in table.stdout
