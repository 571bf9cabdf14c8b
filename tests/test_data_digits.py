"""digits: original and subclass holdout scenarios, checked against independent code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mlvar.data import digits, registry
from mlvar.errors import MlvarError
from mlvar.report.contact_sheet import write_contact_sheet


@pytest.fixture(scope="module")
def ref() -> dict:
    """The design's split recipe written again here: ids (load_digits order) per split."""
    bunch = load_digits()
    target = bunch.target
    rest, test = train_test_split(
        np.arange(len(target)), test_size=0.3, stratify=target, random_state=69
    )
    train, val = train_test_split(rest, test_size=0.1, stratify=target[rest], random_state=69)
    return {
        "images": bunch.images,
        "target": target,
        "index": {"train": train, "val": val, "test": test},
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits") / "data"


def _load(scenario):
    return {s: scenario.load(s) for s in scenario.splits}


def test_original(root: Path, ref: dict) -> None:
    scenario = registry.prepare(root, "digits")
    assert scenario.name == "digits-original" and scenario.mode == "original"
    assert scenario.class_names == [str(d) for d in range(10)]
    assert scenario.manifest["input"] == {"kind": "image", "shape": [8, 8, 1], "max_value": 16}
    assert scenario.manifest["source"]["name"] == "sklearn.datasets.load_digits"
    for s, data in _load(scenario).items():
        idx = ref["index"][s]
        assert data.x.dtype == np.uint8 and data.x.shape == (len(idx), 8, 8, 1)
        np.testing.assert_array_equal(data.x[..., 0], ref["images"][idx])
        np.testing.assert_array_equal(data.id, idx)
        np.testing.assert_array_equal(data.y, ref["target"][idx])
        assert not data.affected.any()
    assert sum(len(d) for d in _load(scenario).values()) == 1797


@pytest.mark.parametrize(("subclass", "ratio"), [(3, 1.0), (3, 0.5), (0, 0.0), (9, 0.25)])
def test_holdout_counts_match_reference(root: Path, ref: dict, subclass: int, ratio: float):
    scenario = registry.prepare(root, "digits", mode="holdout", subclass=subclass, ratio=ratio)
    assert scenario.name == f"digits-holdout-sub{subclass}-r{ratio}"
    assert scenario.class_names == ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert scenario.manifest["params"] == {"subclass": subclass, "ratio": ratio}
    splits = _load(scenario)
    target = ref["target"]
    assert scenario.splits == ["train", "val", "test", "full_val"]
    full = splits.pop("full_val")  # validation before the holdout (tests/test_pools.py)
    np.testing.assert_array_equal(full.id, ref["index"]["val"])
    np.testing.assert_array_equal(full.affected, target[full.id] == subclass)
    for s, data in splits.items():
        idx = ref["index"][s]
        members = idx[target[idx] == subclass]
        n_remove = math.floor(ratio * len(members)) if s != "test" else 0
        kept = np.setdiff1d(idx, members[:n_remove])
        # The remaining samples of the digit are the last ones in split order.
        np.testing.assert_array_equal(data.id[data.group == subclass], members[n_remove:])
        assert sorted(data.id.tolist()) == sorted(kept.tolist())
        expected = np.bincount(target[kept] // 2, minlength=5)
        np.testing.assert_array_equal(np.bincount(data.y, minlength=5), expected)
        np.testing.assert_array_equal(data.group, target[data.id])
        np.testing.assert_array_equal(data.y, target[data.id] // 2)
        if s == "test":
            np.testing.assert_array_equal(data.id, idx)  # untouched, same order
            np.testing.assert_array_equal(data.affected, target[idx] == subclass)
            assert data.affected.sum() == len(members)
        else:
            assert not data.affected.any()
            if ratio == 1.0:
                assert subclass not in data.group


def test_default_mode_and_string_subclass(root: Path) -> None:
    scenario = registry.prepare(root, "digits", subclass="4")
    assert scenario.name == "digits-holdout-sub4-r1.0" and scenario.mode == "holdout"


def test_preparing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    for kwargs in ({}, {"subclass": 5, "ratio": 0.5}):
        first = registry.prepare(tmp_path, "digits", **kwargs)
        files = {p.name: p.read_bytes() for p in sorted(first.path.iterdir())}
        pool = {"full_val.npz"} if kwargs else set()  # holdout scenarios write full_val
        assert set(files) == {"manifest.json", "train.npz", "val.npz", "test.npz"} | pool
        with pytest.raises(MlvarError, match="already exists"):
            registry.prepare(tmp_path, "digits", **kwargs)
        second = registry.prepare(tmp_path, "digits", force=True, **kwargs)
        assert {p.name: p.read_bytes() for p in sorted(second.path.iterdir())} == files


def test_scenario_info(root: Path) -> None:
    scenario = registry.prepare(root, "digits", subclass=2, ratio=1.0)
    info = registry.scenario_info(scenario)
    test = info["splits"]["test"]
    assert test["affected"] == test["per_class"]["2-3"]["affected"] > 0
    assert test["per_class"]["0-1"]["affected"] == 0
    assert info["splits"]["train"]["affected"] == 0
    assert {r["class"] for r in info["rows"]} == set(scenario.class_names)


def test_fetch_digits_writes_nothing(tmp_path: Path) -> None:
    info = registry.fetch(tmp_path / "data", "digits")
    assert info["rows"] == 1797 and "scikit-learn" in info["action"]
    assert not (tmp_path / "data").exists()
    assert not registry.DATASETS["digits"].needs_fetch
    assert registry.DATASETS["compas"].needs_fetch


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dataset": "digit"}, "unknown dataset 'digit'"),
        ({"dataset": "digits", "mode": "holdup"}, "unknown digits mode 'holdup'"),
        ({"dataset": "digits", "mode": "holdout"}, "needs --subclass"),
        ({"dataset": "digits", "subclass": 10}, "0-9"),
        ({"dataset": "digits", "subclass": -1}, "0-9"),
        ({"dataset": "digits", "subclass": "x"}, "0-9"),
        ({"dataset": "digits", "subclass": 3.5}, "0-9"),
        ({"dataset": "digits", "subclass": True}, "0-9"),
        ({"dataset": "digits", "subclass": 3, "ratio": 1.5}, r"\[0\.0, 1\.0\]"),
        ({"dataset": "digits", "subclass": 3, "ratio": -0.1}, r"\[0\.0, 1\.0\]"),
        ({"dataset": "digits", "subclass": 3, "ratio": float("nan")}, r"\[0\.0, 1\.0\]"),
        ({"dataset": "digits", "mode": "original", "subclass": 3}, "takes no --subclass"),
        ({"dataset": "digits", "mode": "original", "ratio": 0.5}, "takes no --ratio"),
        ({"dataset": "digits", "subclass": 3, "cluster": 1}, "takes no --cluster"),
        ({"dataset": "digits", "subclass": 3, "seed": 1}, "takes no --seed"),
    ],
)
def test_bad_input_writes_nothing(tmp_path: Path, tree_listing, kwargs: dict, pattern: str):
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=pattern):
        registry.prepare(tmp_path / "data", **kwargs)
    assert tree_listing(tmp_path) == before


def test_prepare_digits_direct_errors(tmp_path: Path) -> None:
    with pytest.raises(MlvarError, match="takes no --ratio"):
        digits.prepare_digits(tmp_path, mode="original", ratio=0.5)
    with pytest.raises(MlvarError, match="needs --subclass"):
        digits.prepare_digits(tmp_path)
    with pytest.raises(MlvarError, match="takes no --source"):
        registry.fetch(tmp_path, "digits", source=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- class modes (--cls)


@pytest.mark.parametrize(
    ("mode", "cls", "ratio"),
    [
        ("holdout", 3, 0.5),
        ("holdout", 0, 1.0),
        ("holdout-dup", 3, 0.5),
        ("augmentation", 3, 0.5),
        ("augmentation", 8, 1.0),
        ("augmentation-all", None, 0.25),
    ],
)
def test_class_modes_match_reference(
    root: Path, ref: dict, mode: str, cls: int | None, ratio: float
) -> None:
    scenario = registry.prepare(root, "digits", mode=mode, cls=cls, ratio=ratio, force=True)
    assert scenario.name == (
        f"digits-{mode}" + (f"-cls{cls}" if cls is not None else "") + f"-r{ratio}"
    )
    assert scenario.class_names == [str(d) for d in range(10)]
    assert scenario.manifest["input"] == {"kind": "image", "shape": [8, 8, 1], "max_value": 16}
    splits = _load(scenario)
    images = ref["images"].astype(np.uint8)
    target = ref["target"]
    train = ref["index"]["train"]
    classes = range(10) if mode == "augmentation-all" else [cls]
    chosen = np.concatenate(
        [
            train[target[train] == c][: math.floor(ratio * (target[train] == c).sum())]
            for c in classes
        ]
    )
    appearance = mode.startswith("augmentation")
    pool = set() if appearance else {"full_val"}  # holdout modes: validation before the change
    assert set(splits) == {"train", "val", "test"} | ({"test_gray"} if appearance else pool)
    for s in ("val", "test", *pool):
        data, idx = splits[s], ref["index"]["val" if s == "full_val" else s]
        np.testing.assert_array_equal(data.id, idx)
        np.testing.assert_array_equal(data.x[..., 0], images[idx])
        expected = np.zeros(len(idx), bool) if mode == "augmentation-all" else target[idx] == cls
        np.testing.assert_array_equal(data.affected, expected)
    data = splits["train"]
    np.testing.assert_array_equal(data.y, target[data.id])
    if mode == "holdout":
        np.testing.assert_array_equal(data.id, train[~np.isin(train, chosen)])
        assert not data.affected.any()
        return
    np.testing.assert_array_equal(data.id, train)
    np.testing.assert_array_equal(data.affected, np.isin(train, chosen))
    keep = ~data.affected
    np.testing.assert_array_equal(data.x[keep, ..., 0], images[train[keep]])
    if mode == "holdout-dup":
        copies = scenario.manifest["change"]["copies"]
        members = train[target[train] == cls]
        assert set(copies["source_ids"]) <= set(members[len(chosen) :].tolist())
        np.testing.assert_array_equal(data.x[data.affected, ..., 0], images[copies["source_ids"]])
        return
    # Colour inversion 16 - x, in train and in the test_gray copy of test.
    np.testing.assert_array_equal(
        data.x[data.affected, ..., 0], 16 - images[data.id[data.affected]]
    )
    test, inverted = splits["test"], splits["test_gray"]
    np.testing.assert_array_equal(inverted.x, 16 - test.x)
    np.testing.assert_array_equal(inverted.id, test.id)
    if mode == "augmentation-all":
        assert inverted.affected.all()
    else:
        np.testing.assert_array_equal(inverted.affected, test.affected)


def test_class_mode_twice_identical_bytes(tmp_path: Path) -> None:
    kwargs = {"mode": "holdout-dup", "cls": 5, "ratio": 0.5, "seed": 2}
    first = registry.prepare(tmp_path, "digits", **kwargs)
    assert first.name == "digits-holdout-dup-cls5-r0.5-s2"
    files = {p.name: p.read_bytes() for p in sorted(first.path.iterdir())}
    second = registry.prepare(tmp_path, "digits", force=True, **kwargs)
    assert {p.name: p.read_bytes() for p in sorted(second.path.iterdir())} == files


def test_holdout_subclass_group_counts(root: Path) -> None:
    scenario = registry.prepare(root, "digits", subclass=3, ratio=1.0, force=True)
    groups = {(g["split"], g["group"]): g for g in registry.scenario_info(scenario)["groups"]}
    assert groups[("train", "3")]["total"] == 0
    assert groups[("test", "3")]["affected"] == groups[("test", "3")]["total"] > 0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mode": "holdout", "cls": 3, "subclass": 3, "ratio": 0.5}, "not both|with --cls"),
        ({"mode": "augmentation", "subclass": 3, "ratio": 0.5}, "takes no --subclass"),
        ({"mode": "augmentation-all", "cls": 3, "ratio": 0.5}, "takes no --cls"),
        ({"mode": "augmentation", "cls": 3}, "needs --ratio"),
        ({"mode": "holdout-dup", "cls": 3, "ratio": 1.0}, "no sample of the class to copy"),
        ({"mode": "holdout", "cls": 10, "ratio": 0.5}, "0-9"),
        ({"mode": "original", "cls": 3}, "takes no --cls"),
        ({"mode": "augmentation", "cls": 3, "ratio": 0.5, "seed": 1}, "takes no --seed"),
    ],
)
def test_class_mode_bad_input_writes_nothing(
    tmp_path: Path, tree_listing, kwargs: dict, pattern: str
) -> None:
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=pattern):
        registry.prepare(tmp_path / "data", "digits", **kwargs)
    assert tree_listing(tmp_path) == before


def test_digits_contact_sheet(tmp_path: Path) -> None:
    scenario = registry.prepare(tmp_path / "data", "digits", mode="augmentation", cls=3, ratio=0.5)
    out = write_contact_sheet(scenario, tmp_path / "sheet.png")
    assert (tmp_path / "sheet.png").read_bytes()[:4] == b"\x89PNG"
    assert "train: affected" in out["rows"] and "test_gray: affected" in out["rows"]


# --------------------------------------------------------------------------- study sweeps


def test_holdout_study_sweep_is_every_digit(tmp_path: Path, ref: dict) -> None:
    """``mlvar data prepare digits --mode holdout``: no --subclass, so every digit at ratio
    1.0; each scenario's counts derived again from the reference split."""
    result = registry.prepare_sweep(tmp_path, "digits", mode="holdout")
    assert result.defaulted == {"subclass": "all"} and "--subclass all (10 scenarios)" in (
        result.note()
    )
    assert result.names == [f"digits-holdout-sub{d}-r1.0" for d in range(10)]
    target, index = ref["target"], ref["index"]
    for digit, scenario in enumerate(result.scenarios):
        counts = scenario.manifest["counts"]
        for s in ("train", "val"):
            assert counts[s]["total"] == len(index[s]) - int((target[index[s]] == digit).sum())
            assert counts[s]["affected"] == 0
        assert counts["test"]["total"] == len(index["test"])
        assert counts["test"]["affected"] == int((target[index["test"]] == digit).sum())
        train = scenario.load("train")
        np.testing.assert_array_equal(train.id, index["train"][target[index["train"]] != digit])
        np.testing.assert_array_equal(train.x[..., 0], ref["images"][train.id].astype(np.uint8))


@pytest.mark.parametrize("mode", ["holdout", "holdout-dup", "augmentation"])
def test_class_mode_study_sweep_is_ten_ratios(tmp_path: Path, ref: dict, mode: str) -> None:
    """A class mode with --cls and no --ratio: ratios 0.0, 0.1, ..., 0.9 of that class."""
    from fractions import Fraction

    result = registry.prepare_sweep(tmp_path, "digits", mode=mode, cls="4")
    assert result.defaulted == {"ratio": "0:0.9:0.1"}
    assert result.names == [f"digits-{mode}-cls4-r0.{i}" for i in range(10)]
    target, index = ref["target"], ref["index"]
    members = int((target[index["train"]] == 4).sum())
    for i, scenario in enumerate(result.scenarios):
        chosen = int(Fraction(i, 10) * members)
        counts = scenario.manifest["counts"]
        if mode == "holdout":
            assert counts["train"]["total"] == len(index["train"]) - chosen
        else:
            assert counts["train"]["total"] == len(index["train"])
            assert counts["train"]["affected"] == chosen
        assert counts["test"]["affected"] == int((target[index["test"]] == 4).sum())
