"""CIFAR-10 and CIFAR-100 scenarios on tiny archives in the real formats, each expectation
derived again here from the archive's own arrays and the design's recipe."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split
from typer.testing import CliRunner

from conftest import CIFAR10_NAMES, TinyCifar
from mlvar.cli import app
from mlvar.data import registry
from mlvar.errors import MlvarError

KEPT = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "fruit_and_vegetables",
    "insects",
    "medium_mammals",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
]


def _floor(ratio: float, n: int) -> int:
    # Ratios used below are exact binary fractions or tenths; Fraction avoids float traps.
    from fractions import Fraction

    return int(Fraction(str(ratio)) * n)


def _luma(x: np.ndarray) -> np.ndarray:
    """Reference grayscale (ITU-R 601-2), as floats."""
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


@pytest.fixture(scope="module")
def c10_root(tmp_path_factory: pytest.TempPathFactory, tiny_cifar10: TinyCifar) -> Path:
    root = tmp_path_factory.mktemp("c10") / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    return root


@pytest.fixture(scope="module")
def c100_root(tmp_path_factory: pytest.TempPathFactory, tiny_cifar100: TinyCifar) -> Path:
    root = tmp_path_factory.mktemp("c100") / "data"
    registry.fetch(root, "cifar100", source=tiny_cifar100.archive, verify=False)
    return root


def _ref_split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    train, val = train_test_split(ids, test_size=0.1, random_state=69)
    return np.sort(train), np.sort(val)


def _load(scenario) -> dict:
    return {s: scenario.load(s) for s in scenario.splits}


# ---------------------------------------------------------------- CIFAR-10


def test_fetched_arrays(c10_root: Path, tiny_cifar10: TinyCifar) -> None:
    raw = c10_root / "raw" / "cifar10"
    np.testing.assert_array_equal(np.load(raw / "x_train.npy"), tiny_cifar10.x_train)
    np.testing.assert_array_equal(np.load(raw / "y_train.npy"), tiny_cifar10.y_train)
    np.testing.assert_array_equal(np.load(raw / "x_test.npy"), tiny_cifar10.x_test)
    source = json.loads((raw / "source.json").read_text())
    assert source["class_names"] == CIFAR10_NAMES and source["verified"] is False


def test_original(c10_root: Path, tiny_cifar10: TinyCifar) -> None:
    scenario = registry.prepare(c10_root, "cifar10")
    assert scenario.name == "cifar10-original"
    m = scenario.manifest
    assert m["input"] == {"kind": "image", "shape": [32, 32, 3], "max_value": 255}
    assert m["source"]["sha256"] and m["class_names"] == CIFAR10_NAMES
    train_ids, val_ids = _ref_split(np.arange(len(tiny_cifar10.y_train)))
    splits = _load(scenario)
    assert splits["train"].x.dtype == np.uint8
    np.testing.assert_array_equal(splits["train"].id, train_ids)
    np.testing.assert_array_equal(splits["val"].id, val_ids)
    np.testing.assert_array_equal(splits["test"].id, 50_000 + np.arange(50))
    np.testing.assert_array_equal(splits["val"].x, tiny_cifar10.x_train[val_ids])
    for data in splits.values():
        assert not data.affected.any()


@pytest.mark.parametrize(
    ("mode", "cls", "ratio"),
    [
        ("holdout", 0, 0.5),
        ("holdout", 3, 1.0),
        ("holdout", 7, 0.0),
        ("holdout-dup", 0, 0.5),
        ("holdout-dup", 4, 0.9),
        ("augmentation", 0, 0.5),
        ("augmentation", 9, 1.0),
        ("augmentation-all", None, 0.3),
    ],
)
def test_cifar10_modes(
    c10_root: Path, tiny_cifar10: TinyCifar, mode: str, cls: int | None, ratio: float
) -> None:
    t = tiny_cifar10
    scenario = registry.prepare(c10_root, "cifar10", mode=mode, cls=cls, ratio=ratio, force=True)
    expected_name = f"cifar10-{mode}" + (f"-cls{cls}" if cls is not None else "") + f"-r{ratio}"
    assert scenario.name == expected_name
    splits = _load(scenario)
    appearance = mode.startswith("augmentation")
    pool = set() if appearance else {"full_val"}  # holdout modes: validation before the change
    assert set(splits) == {"train", "val", "test"} | ({"test_gray"} if appearance else pool)

    # Validation is fixed before anything is changed, and never changes.
    train_ids, val_ids = _ref_split(np.arange(len(t.y_train)))
    val = splits["val"]
    np.testing.assert_array_equal(val.id, val_ids)
    np.testing.assert_array_equal(val.x, t.x_train[val_ids])
    if pool:  # so the full validation split is validation itself
        full = splits["full_val"]
        np.testing.assert_array_equal(full.id, val_ids)
        np.testing.assert_array_equal(full.x, t.x_train[val_ids])
        np.testing.assert_array_equal(full.affected, t.y_train[val_ids] == cls)
    # Test untouched (same images, ids, order); affected = the target class.
    test = splits["test"]
    np.testing.assert_array_equal(test.x, t.x_test)
    np.testing.assert_array_equal(test.y, t.y_test)
    np.testing.assert_array_equal(test.id, 50_000 + np.arange(len(t.y_test)))
    if mode == "augmentation-all":
        assert not test.affected.any() and not val.affected.any()
    else:
        np.testing.assert_array_equal(test.affected, t.y_test == cls)
        np.testing.assert_array_equal(val.affected, t.y_train[val_ids] == cls)

    # The affected training samples: the first floor(ratio * n) of each target class.
    classes = range(10) if mode == "augmentation-all" else [cls]
    chosen: dict[int, np.ndarray] = {}
    for c in classes:
        members = train_ids[t.y_train[train_ids] == c]
        chosen[c] = members[: _floor(ratio, len(members))]
    all_chosen = np.concatenate(list(chosen.values()))
    train = splits["train"]
    np.testing.assert_array_equal(train.y, t.y_train[train.id])
    if mode == "holdout":
        np.testing.assert_array_equal(train.id, np.setdiff1d(train_ids, all_chosen))
        assert not train.affected.any()
        np.testing.assert_array_equal(train.x, t.x_train[train.id])
        expected = np.bincount(t.y_train[train_ids], minlength=10)
        expected[cls] -= len(all_chosen)
        assert scenario.manifest["counts"]["train"]["per_class"] == expected.tolist()
        return
    np.testing.assert_array_equal(train.id, train_ids)  # sizes unchanged
    np.testing.assert_array_equal(train.affected, np.isin(train.id, all_chosen))
    untouched = ~train.affected
    np.testing.assert_array_equal(train.x[untouched], t.x_train[train.id[untouched]])
    assert scenario.manifest["counts"]["train"]["affected"] == len(all_chosen)
    if mode == "holdout-dup":
        copies = scenario.manifest["change"]["copies"]
        assert copies["ids"] == all_chosen.tolist()
        members = train_ids[t.y_train[train_ids] == cls]
        remaining = set(members[len(all_chosen) :].tolist())
        assert set(copies["source_ids"]) <= remaining  # drawn only from the rest of the class
        rows = np.searchsorted(train.id, all_chosen)
        np.testing.assert_array_equal(train.x[rows], t.x_train[copies["source_ids"]])
        return
    # Grayscale: equal channels, the luma of the original image.
    gray = train.x[train.affected]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    diff = gray[..., 0].astype(float) - _luma(t.x_train[train.id[train.affected]].astype(float))
    assert np.abs(diff).max() <= 1
    test_gray = splits["test_gray"]
    np.testing.assert_array_equal(test_gray.id, test.id)
    np.testing.assert_array_equal(test_gray.y, test.y)
    assert (test_gray.x[..., 0] == test_gray.x[..., 2]).all()
    assert np.abs(test_gray.x[..., 0] - _luma(t.x_test.astype(float))).max() <= 1
    if mode == "augmentation-all":
        assert test_gray.affected.all()
    else:
        np.testing.assert_array_equal(test_gray.affected, test.affected)


def test_holdout_dup_seed_changes_the_draw(c10_root: Path) -> None:
    a = registry.prepare(c10_root, "cifar10", mode="holdout-dup", ratio=0.8, force=True)
    b = registry.prepare(c10_root, "cifar10", mode="holdout-dup", ratio=0.8, seed=3)
    assert b.name == "cifar10-holdout-dup-cls0-r0.8-s3"
    assert a.manifest["change"]["copies"]["ids"] == b.manifest["change"]["copies"]["ids"]
    assert (
        a.manifest["change"]["copies"]["source_ids"] != b.manifest["change"]["copies"]["source_ids"]
    )


def test_preparing_twice_gives_identical_bytes(tmp_path: Path, tiny_cifar10: TinyCifar) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    for kwargs in (
        {"mode": "holdout-dup", "ratio": 0.5, "cls": 2},
        {"mode": "augmentation-all", "ratio": 0.5},
    ):
        first = registry.prepare(root, "cifar10", **kwargs)
        files = {p.name: p.read_bytes() for p in sorted(first.path.iterdir())}
        second = registry.prepare(root, "cifar10", force=True, **kwargs)
        assert {p.name: p.read_bytes() for p in sorted(second.path.iterdir())} == files


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mode": "holdot"}, "unknown cifar10 mode 'holdot'"),
        ({"mode": "holdout"}, "needs --ratio"),
        ({"mode": "holdout", "ratio": 1.5}, r"\[0\.0, 1\.0\]"),
        ({"mode": "holdout", "ratio": 0.5, "cls": 10}, "0-9"),
        ({"mode": "holdout", "ratio": 0.5, "cls": "x"}, "0-9"),
        ({"mode": "holdout-dup", "ratio": 1.0}, "no sample of the class to copy"),
        ({"mode": "augmentation-all", "ratio": 0.5, "cls": 1}, "takes no --cls"),
        ({"mode": "original", "ratio": 0.5}, "takes no --ratio"),
        ({"mode": "holdout", "ratio": 0.5, "seed": 2}, "takes no --seed"),
        ({"mode": "holdout", "ratio": 0.5, "subclass": "baby"}, "takes no --subclass"),
        ({"mode": "holdout", "ratio": 0.5, "cluster": 1}, "takes no --cluster"),
    ],
)
def test_bad_input_writes_nothing(c10_root: Path, tree_listing, kwargs: dict, pattern: str) -> None:
    before = tree_listing(c10_root)
    with pytest.raises(MlvarError, match=pattern):
        registry.prepare(c10_root, "cifar10", **kwargs)
    assert tree_listing(c10_root) == before


def test_prepare_without_fetch(tmp_path: Path, tree_listing) -> None:
    for dataset, kwargs in (
        ("cifar10", {"mode": "holdout", "ratio": 0.5}),
        ("cifar100", {"subclass": "baby"}),
    ):
        with pytest.raises(MlvarError, match=f"mlvar data fetch {dataset}"):
            registry.prepare(tmp_path / "data", dataset, **kwargs)
    assert tree_listing(tmp_path) == []


def test_torchvision_folder_source(tmp_path: Path, tiny_cifar10: TinyCifar) -> None:
    tv_root = tmp_path / "torchvision"
    tv_root.mkdir()
    with tarfile.open(tiny_cifar10.archive) as tar:
        tar.extractall(tv_root, filter="data")
    info = registry.fetch(tmp_path / "a", "cifar10", source=tv_root, verify=False)
    assert info["action"] == "read folder"
    direct = registry.fetch(
        tmp_path / "b", "cifar10", source=tv_root / "cifar-10-batches-py", verify=False
    )
    assert direct["sha256"] == info["sha256"]
    np.testing.assert_array_equal(np.load(Path(info["path"]) / "x_train.npy"), tiny_cifar10.x_train)
    # The tiny files are not the published ones: with verification on, that is an error.
    with pytest.raises(MlvarError, match="checksum mismatch for cifar-10-batches-py/data_batch"):
        registry.fetch(tmp_path / "c", "cifar10", source=tv_root)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize(
    ("subclass", "ratio"), [("baby", 1.0), ("man+boy", 0.5), ("ray", 0.0), ("mushroom", 0.75)]
)
def test_cifar100_holdout(
    c100_root: Path, tiny_cifar100: TinyCifar, subclass: str, ratio: float
) -> None:
    t = tiny_cifar100
    fine_names = sorted(f for f in _fine_names())
    coarse_names = sorted(_hierarchy())
    subs = sorted(fine_names.index(s) for s in subclass.split("+"))
    scenario = registry.prepare(c100_root, "cifar100", subclass=subclass, ratio=ratio, force=True)
    canonical = "+".join(fine_names[f] for f in subs)
    assert scenario.name == f"cifar100-holdout-{canonical}-r{ratio}"
    assert scenario.class_names == KEPT
    kept_coarse = [coarse_names.index(c) for c in KEPT]
    kept_train = np.flatnonzero(np.isin(t.coarse_train, kept_coarse))
    train_ids, val_ids = _ref_split(kept_train)
    expected = {"train": train_ids, "val": val_ids}
    for s in ("train", "val"):
        drop = []
        for f in subs:
            members = expected[s][t.y_train[expected[s]] == f]
            drop.extend(members[: _floor(ratio, len(members))])
        expected[s] = np.setdiff1d(expected[s], drop)
    expected_left = {s: [i for i in expected[s] if t.y_train[i] in subs] for s in ("train", "val")}
    kept_test = np.flatnonzero(np.isin(t.coarse_test, kept_coarse))
    splits = _load(scenario)
    for s in ("train", "val"):
        data = splits[s]
        np.testing.assert_array_equal(data.id, expected[s])
        np.testing.assert_array_equal(data.x, t.x_train[data.id])
        np.testing.assert_array_equal(data.group, t.y_train[data.id])
        relabelled = [KEPT.index(coarse_names[c]) for c in t.coarse_train[data.id]]
        np.testing.assert_array_equal(data.y, relabelled)
        # the fine classes' samples left in train and val (ratio < 1) are affected too
        np.testing.assert_array_equal(data.affected, np.isin(t.y_train[data.id], subs))
        assert data.affected.sum() == len(expected_left[s])
    test = splits["test"]
    np.testing.assert_array_equal(test.id, 50_000 + kept_test)
    np.testing.assert_array_equal(test.x, t.x_test[kept_test])
    np.testing.assert_array_equal(test.affected, np.isin(t.y_test[kept_test], subs))
    assert test.affected.sum() == 2 * len(subs)  # two test images per fine class
    groups = {(g["split"], g["group"]): g for g in registry.scenario_info(scenario)["groups"]}
    for f in subs:
        assert groups[("test", fine_names[f])]["affected"] == 2


@pytest.mark.parametrize(
    ("subclass", "words"),
    [
        ("babby", ["unknown CIFAR-100 fine class 'babby'", "baby"]),
        ("bus", ["'bus'", "vehicles_1", "drops"]),
        ("baby+bicycle", ["'bicycle'", "vehicles_1"]),
        ("baby+baby", ["given twice"]),
        ("Man", ["unknown", "man"]),
    ],
)
def test_cifar100_bad_subclass(
    c100_root: Path, tree_listing, subclass: str, words: list[str]
) -> None:
    before = tree_listing(c100_root)
    with pytest.raises(MlvarError) as err:
        registry.prepare(c100_root, "cifar100", subclass=subclass)
    for word in words:
        assert word in str(err.value)
    assert tree_listing(c100_root) == before


def test_cifar100_original_and_options(c100_root: Path, tree_listing) -> None:
    scenario = registry.prepare(c100_root, "cifar100", force=True)
    assert scenario.name == "cifar100-original" and scenario.manifest["counts"]["test"][
        "total"
    ] == (50 * 2)
    before = tree_listing(c100_root)
    for kwargs, pattern in (
        ({"mode": "holdout"}, "needs --subclass"),
        ({"subclass": "baby", "cls": 1}, "takes no --cls"),
        ({"subclass": "baby", "ratio": 2.0}, r"\[0\.0, 1\.0\]"),
        ({"mode": "original", "subclass": "baby"}, "takes no --subclass"),
    ):
        with pytest.raises(MlvarError, match=pattern):
            registry.prepare(c100_root, "cifar100", **kwargs)
    assert tree_listing(c100_root) == before


def _hierarchy() -> dict[str, list[str]]:
    from conftest import CIFAR100_HIERARCHY

    return CIFAR100_HIERARCHY


def _fine_names() -> list[str]:
    return [f for fines in _hierarchy().values() for f in fines]


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(tmp_path / "data"))
    return tmp_path


def _run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_fetch_prepare_info_sheet(cli_root: Path, tiny_cifar10: TinyCifar) -> None:
    fetched = _run(
        "data", "fetch", "cifar10", "--source", tiny_cifar10.archive, "--no-verify", "--json"
    )
    assert fetched.exit_code == 0, fetched.stderr
    assert "Warning: checksum not verified" in fetched.stderr
    assert json.loads(fetched.stdout)["verified"] is False
    prepared = _run(
        "data", "prepare", "cifar10", "--mode", "augmentation", "--ratio", "0.5", "--cls", "1"
    )
    assert prepared.exit_code == 0, prepared.stderr
    assert "cifar10-augmentation-cls1-r0.5" in prepared.stdout
    sheet = cli_root / "out" / "sheet.png"
    info = _run("data", "info", "cifar10-augmentation-cls1-r0.5", "--sheet", sheet, "--json")
    assert info.exit_code == 0, info.stderr
    details = json.loads(info.stdout)
    assert details["sheet"] == str(sheet)
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert details["splits"]["test_gray"]["per_class"]["automobile"]["affected"] == 5


def test_cli_errors_write_nothing(cli_root: Path, tiny_cifar10: TinyCifar, tree_listing) -> None:
    assert (
        _run("data", "fetch", "cifar10", "--source", tiny_cifar10.archive, "--no-verify").exit_code
        == 0
    )
    assert _run("data", "prepare", "digits").exit_code == 0
    (cli_root / "folder.png").mkdir()
    for args, words in (
        (["prepare", "cifar10", "--mode", "holdout-dup", "--ratio", "1.0"], "to copy"),
        (
            ["prepare", "cifar10", "--mode", "augmentation-all", "--ratio", "1", "--cls", "2"],
            "--cls",
        ),
        (["prepare", "cifar100", "--subclass", "baby"], "mlvar data fetch cifar100"),
        (["info", "digits-original", "--sheet", cli_root / "folder.png"], "is a folder"),
        (["info", "digits-original", "--sheet", cli_root / "x.jpg"], ".png"),
    ):
        before = tree_listing(cli_root)
        result = _run("data", *args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert line.startswith("Error: ") and "(hint: " in line and "\n" not in line
        assert words in line and "Traceback" not in line
        assert tree_listing(cli_root) == before


# ---------------------------------------------------------------- study sweeps


@pytest.mark.parametrize("mode", ["holdout", "holdout-dup", "augmentation"])
def test_cifar10_study_sweep(tmp_path: Path, tiny_cifar10: TinyCifar, mode: str) -> None:
    """``mlvar data prepare cifar10 --mode MODE``: ratios 0.0 ... 0.9 of class 0, counts
    from the archive's own arrays; they share the source and store only what they change."""
    root = tmp_path / "data"
    registry.fetch(root, "cifar10", source=tiny_cifar10.archive, verify=False)
    result = registry.prepare_sweep(root, "cifar10", mode=mode)
    assert result.defaulted == {"ratio": "0:0.9:0.1"}
    assert result.names == [f"cifar10-{mode}-cls0-r0.{i}" for i in range(10)]
    t = tiny_cifar10
    train_ids, _ = _ref_split(np.arange(len(t.y_train)))
    members = train_ids[t.y_train[train_ids] == 0]
    for i, scenario in enumerate(result.scenarios):
        chosen = members[: _floor(i / 10, len(members))]
        train = scenario.load("train")
        if mode == "holdout":
            np.testing.assert_array_equal(train.id, np.setdiff1d(train_ids, chosen))
        else:
            np.testing.assert_array_equal(train.id[train.affected], chosen)
        np.testing.assert_array_equal(scenario.load("test").x, t.x_test)
    shared = sorted((root / "shared").iterdir())
    changed = {a.sha256 for s in result.scenarios for a in s.arrays if "changed" in a.what}
    sources = {a.sha256 for s in result.scenarios for a in s.arrays if "source" in a.what}
    assert len(sources) == 2  # train and test images, read by every scenario
    assert {p.stem for p in shared} == sources | changed
    if mode == "augmentation":
        # one array of changed train images per ratio above 0, and one test_gray for all
        assert len(changed) == 9 + 1
    else:
        assert changed == set()  # holdout-dup's copies are other source images


def test_cifar100_study_sweep_and_all(tmp_path: Path, tiny_cifar100: TinyCifar) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "cifar100", source=tiny_cifar100.archive, verify=False)
    t = tiny_cifar100
    fine_names = sorted(_fine_names())
    coarse_names = sorted(_hierarchy())
    kept = np.flatnonzero(np.isin(t.coarse_train, [coarse_names.index(c) for c in KEPT]))
    train_ids, val_ids = _ref_split(kept)
    result = registry.prepare_sweep(root, "cifar100", mode="holdout")
    assert result.defaulted == {"subclass": "study"}
    study = ["ray", "mushroom", "caterpillar", "porcupine", "baby"]
    study += ["boy+man", "girl+woman", "boy+girl", "man+woman"]
    assert result.names == [f"cifar100-holdout-{s}-r1.0" for s in study]
    for sub, scenario in zip(study, result.scenarios, strict=True):
        subs = [fine_names.index(f) for f in sub.split("+")]
        counts = scenario.manifest["counts"]
        assert counts["train"]["total"] == int((~np.isin(t.y_train[train_ids], subs)).sum())
        assert counts["val"]["total"] == int((~np.isin(t.y_train[val_ids], subs)).sum())
        assert counts["test"]["affected"] == 2 * len(subs)  # two test images per fine class
    every = registry.prepare_sweep(root, "cifar100", subclass="all")
    expected = sorted(f for c in KEPT for f in _hierarchy()[c])
    assert every.names == [f"cifar100-holdout-{f}-r1.0" for f in expected]
    # in sweep order: the single fine classes of the study, already prepared
    assert every.skipped == [f"cifar100-holdout-{f}-r1.0" for f in sorted(study[:5])]


def test_cifar100_sweep_names_every_bad_subclass(c100_root: Path, tree_listing) -> None:
    before = tree_listing(c100_root)
    with pytest.raises(MlvarError) as err:
        registry.prepare_sweep(c100_root, "cifar100", subclass="baby,babby,bus")
    assert err.value.message == (
        "cifar100 mode 'holdout' cannot prepare --subclass babby, --subclass bus of the sweep: "
        "unknown CIFAR-100 fine class 'babby'"
    )
    assert "baby" in err.value.hint
    with pytest.raises(MlvarError, match="are the same scenario 'cifar100-holdout-boy\\+man-r1.0'"):
        registry.prepare_sweep(c100_root, "cifar100", subclass="boy+man,man+boy")
    with pytest.raises(MlvarError, match="'study' with other values"):
        registry.prepare_sweep(c100_root, "cifar100", subclass="study,baby")
    assert tree_listing(c100_root) == before
