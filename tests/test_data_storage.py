"""How scenarios are stored: scenarios of one source share its data (format 2: rows of
content-addressed arrays in ``<data_root>/shared/``), load to the same arrays as full
copies (format 1, which still loads), and a missing or changed shared array or split file
is a one-line error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import TinyCifar, build_cifar10
from mlvar.data import registry, spec
from mlvar.data.scenario import (
    SplitData,
    experiment_scenario,
    list_scenarios,
    open_scenario,
    write_scenario,
)
from mlvar.errors import MlvarError

SPLIT_FIELDS = ("x", "y", "id", "affected", "group")

DIGITS = [
    {},
    {"subclass": 3, "ratio": 0.5},
    {"mode": "holdout", "cls": 2, "ratio": 0.7},
    {"mode": "holdout-dup", "cls": 5, "ratio": 0.6, "seed": 4},
    {"mode": "augmentation", "cls": 1, "ratio": 0.5},
    {"mode": "augmentation-all", "ratio": 0.3},
]
CIFAR10 = [
    {},
    {"mode": "holdout", "ratio": 0.5},
    {"mode": "holdout-dup", "cls": 3, "ratio": 0.8},
    {"mode": "augmentation", "ratio": 1.0},
    {"mode": "augmentation-all", "ratio": 0.5},
]
COMPAS = [{}, {"mode": "artificial", "ratio": 0.3}, {"mode": "holdout", "cluster": 4}]


def _full_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepare as before the shared storage: no source to share, every array written into
    the scenario's folder (format 1)."""
    monkeypatch.setattr(spec.Source, "rows", property(lambda self: None))


def _assert_same_splits(a, b) -> None:
    assert a.splits == b.splits
    for split in a.splits:
        da, db = a.load(split), b.load(split)
        for name in SPLIT_FIELDS:
            x, y = getattr(da, name), getattr(db, name)
            assert x.dtype == y.dtype and x.shape == y.shape, (a.name, split, name)
            np.testing.assert_array_equal(x, y, err_msg=f"{a.name} {split} {name}")


def _prepare_both(
    monkeypatch: pytest.MonkeyPatch, shared: Path, full: Path, dataset: str, kwargs: dict
):
    a = registry.prepare(shared, dataset, **kwargs)
    with monkeypatch.context() as m:
        _full_copies(m)
        b = registry.prepare(full, dataset, **kwargs)
    assert a.name == b.name and a.format_version == 2 and b.format_version == 1
    assert set(a.manifest) - set(b.manifest) == {"storage"}
    for key in set(b.manifest) - {"format_version"}:
        assert a.manifest[key] == b.manifest[key], key
    return a, b


def test_digits_shared_loads_as_full_copies(tmp_path: Path, monkeypatch) -> None:
    for kwargs in DIGITS:
        _assert_same_splits(
            *_prepare_both(monkeypatch, tmp_path / "s", tmp_path / "f", "digits", kwargs)
        )
    # The digits images are stored once for all six scenarios.
    scenarios = list_scenarios(tmp_path / "s")
    sources = {a.sha256 for s in scenarios for a in s.arrays if "source" in a.what}
    assert len(scenarios) == 6 and len(sources) == 1


def test_compas_shared_loads_as_full_copies(compas_root: Path, tmp_path: Path, monkeypatch) -> None:
    full = tmp_path / "full"
    (full / "raw").mkdir(parents=True)
    os.link(next((compas_root / "raw").iterdir()), full / "raw" / "compas-scores-two-years.csv")
    for kwargs in COMPAS:
        _assert_same_splits(*_prepare_both(monkeypatch, compas_root, full, "compas", kwargs))


def test_cifar_shared_loads_as_full_copies(
    tmp_path: Path, tiny_cifar10: TinyCifar, tiny_cifar100: TinyCifar, monkeypatch
) -> None:
    roots = {k: tmp_path / k for k in ("shared", "full")}
    for root in roots.values():
        registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
        registry.fetch(root, "cifar100", source=tiny_cifar100.archive, verify=False)
    for dataset, kwargs in [("cifar10", k) for k in CIFAR10] + [
        ("cifar100", {}),
        ("cifar100", {"subclass": "boy+man", "ratio": 0.5}),
    ]:
        _assert_same_splits(
            *_prepare_both(monkeypatch, roots["shared"], roots["full"], dataset, kwargs)
        )


def test_fetched_arrays_are_linked_not_copied(tmp_path: Path, tiny_cifar10: TinyCifar) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    scenario = registry.prepare(root, "cifar10", mode="holdout-dup", ratio=0.5)
    raw = {(os.stat(root / "raw" / "cifar10" / f).st_ino) for f in ("x_train.npy", "x_test.npy")}
    stored = {os.stat(a.path(root)).st_ino for a in scenario.arrays}
    assert stored == raw  # the source costs no disk of its own
    assert sorted(scenario.files()) == sorted(
        [
            f"{scenario.name}/{f}"
            for f in ("manifest.json", "train.npz", "val.npz", "test.npz", "full_val.npz")
        ]
        + [f"shared/{a.sha256}.npy" for a in scenario.arrays]
    )
    # The folder itself holds indices, not images.
    folder = sum(p.stat().st_size for p in scenario.path.iterdir())
    assert folder < sum(a.size for a in scenario.arrays) / 4


def test_preparing_in_two_data_roots_gives_identical_bytes(
    tmp_path: Path, tiny_cifar10: TinyCifar
) -> None:
    listings = []
    for name in ("a", "b"):
        root = tmp_path / name
        registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
        registry.prepare_sweep(root, "cifar10", mode="augmentation", ratio="0.3,0.6")
        listings.append(
            {
                str(p.relative_to(root)): p.read_bytes()
                for p in sorted(root.rglob("*"))
                if p.is_file() and p.parts[len(root.parts)] != "raw"
            }
        )
    assert listings[0] == listings[1] and any(k.startswith("shared/") for k in listings[0])


def test_the_manifest_names_the_source(tmp_path: Path, tiny_cifar10: TinyCifar) -> None:
    """The same scenario of another copy of the source has another manifest sha256 (the
    experiment identity), with its own source checksum and arrays."""
    other = build_cifar10(tmp_path / "other.tar.gz", seed=5)
    made = {}
    for name, archive in (("a", tiny_cifar10.archive), ("b", other.archive)):
        registry.fetch(tmp_path / name, "cifar10", source=archive, verify=False)
        made[name] = registry.prepare(tmp_path / name, "cifar10", mode="holdout", ratio=0.5)
    a, b = made["a"], made["b"]
    assert a.name == b.name and a.manifest_sha256 != b.manifest_sha256
    assert a.manifest["source"]["sha256"] != b.manifest["source"]["sha256"]
    assert {x.sha256 for x in a.arrays}.isdisjoint({x.sha256 for x in b.arrays})
    again = registry.prepare(tmp_path / "a", "cifar10", mode="holdout", ratio=0.5, force=True)
    assert again.manifest_sha256 == a.manifest_sha256


def test_a_scenario_keeps_its_source_when_the_source_is_fetched_again(
    tmp_path: Path, tiny_cifar10: TinyCifar
) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    scenario = registry.prepare(root, "cifar10", mode="holdout", ratio=0.5)
    before, identity = scenario.load("train"), scenario.manifest_sha256
    other = build_cifar10(tmp_path / "other.tar.gz", seed=5)
    registry.fetch(root, "cifar10", source=other.archive, verify=False)  # replaces raw/
    after = open_scenario(root, scenario.name).load("train")
    np.testing.assert_array_equal(after.x, before.x)  # its data, not the new copy's
    rebuilt = registry.prepare(root, "cifar10", mode="holdout", ratio=0.5, force=True)
    assert rebuilt.manifest_sha256 != identity


def _experiment_meta(scenario) -> dict:
    return {"scenario": {"name": scenario.name, "manifest_sha256": scenario.manifest_sha256}}


def test_missing_shared_array_is_one_line(tmp_path: Path) -> None:
    scenario = registry.prepare(tmp_path, "digits", mode="augmentation", ratio=0.5)
    changed = next(a for a in scenario.arrays if "train" in a.what)
    changed.path(tmp_path).unlink()
    with pytest.raises(MlvarError) as err:
        scenario.load("train")
    assert f"reads the shared array {changed.path(tmp_path)}" in err.value.message
    assert "which is missing" in err.value.message and "--force" in err.value.hint
    assert "\n" not in str(err.value)
    scenario.load("val")  # the splits that do not read it still load
    with pytest.raises(MlvarError, match="lacks .*shared") as err:
        experiment_scenario(tmp_path, "exp", _experiment_meta(scenario))
    assert "shared/ folder too" in err.value.hint
    registry.prepare(tmp_path, "digits", mode="augmentation", ratio=0.5, force=True)
    assert experiment_scenario(tmp_path, "exp", _experiment_meta(scenario)).load("train")


def test_changed_shared_array_or_split_file_is_one_line(tmp_path: Path) -> None:
    scenario = registry.prepare(tmp_path, "digits", mode="holdout", subclass=2)
    (source,) = scenario.arrays
    data = bytearray(source.path(tmp_path).read_bytes())
    data[-1] ^= 0xFF
    source.path(tmp_path).write_bytes(bytes(data))
    with pytest.raises(MlvarError, match="is not the data it was prepared with") as err:
        scenario.load("test")
    assert err.value.hint == "prepare the scenario again with --force"
    registry.prepare(tmp_path, "digits", mode="holdout", subclass=2, force=True)
    scenario = open_scenario(tmp_path, scenario.name)
    file = scenario.path / "train.npz"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(MlvarError, match="is not the file scenario .* was prepared with"):
        scenario.load("train")


def test_format_1_folders_still_load(tmp_path: Path) -> None:
    """A folder holding its arrays itself (written before the shared storage, or by hand
    without a source) loads, ships its own files and needs no shared folder."""
    rng = np.random.default_rng(0)
    split = SplitData(
        x=rng.integers(0, 255, (6, 4, 4, 1), dtype=np.uint8),
        y=np.arange(6, dtype=np.int64) % 2,
        id=np.arange(10, 16, dtype=np.int64),
        affected=np.array([1, 0, 0, 1, 0, 0], dtype=bool),
        group=np.full(6, -1, dtype=np.int64),
    )
    manifest = {"dataset": "digits", "mode": "holdout", "params": {}, "class_names": ["a", "b"]}
    written = write_scenario(tmp_path, "old", manifest, {"train": split, "test": split})
    stored = json.loads((written.path / "manifest.json").read_text())
    assert stored["format_version"] == 1 and "storage" not in stored
    assert not (tmp_path / "shared").exists()
    scenario = open_scenario(tmp_path, "old")
    assert scenario.arrays == [] and sorted(scenario.files()) == [
        "old/manifest.json",
        "old/test.npz",
        "old/train.npz",
    ]
    scenario.check_storage()
    loaded = scenario.load("train")
    for name in SPLIT_FIELDS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(split, name))
