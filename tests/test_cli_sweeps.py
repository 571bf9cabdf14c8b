"""``mlvar data prepare`` sweeps and ``mlvar data list`` families, through the real CLI on
fresh stores: the commands a new user types work as typed, every count is derived again
here from the raw arrays, and bad sweeps are one line, exit code 2, nothing written.

The sweep service itself (every syntax, keyword and combination) is tested in
test_data_sweeps.py; here the CLI's wiring and what it prints.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split
from typer.testing import CliRunner, Result

from conftest import TinyCifar
from mlvar.cli import app
from mlvar.cli import common as cli_common
from mlvar.data.families import scenario_families, values_text
from mlvar.data.scenario import open_scenario
from test_data_compas import Reference

runner = CliRunner()


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def use_root(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``root/data`` is the data root (and ``root`` the cwd, so no mlvar.toml is read)."""
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    for var, sub in (("DATA", "data"), ("RUNS", "runs"), ("REPORTS", "reports")):
        monkeypatch.setenv(f"MLVAR_{var}_ROOT", str(root / sub))
    return root / "data"


def table_rows(stdout: str, prefix: str) -> dict[str, list[str]]:
    """The printed table's rows whose first cell starts with ``prefix``, by that cell."""
    rows = [line.split() for line in stdout.splitlines() if line.strip().startswith(prefix)]
    return {cells[0]: cells[1:] for cells in rows}


def scenario_folders(data_root: Path) -> list[str]:
    return sorted(p.name for p in data_root.iterdir() if (p / "manifest.json").is_file())


def leftovers(data_root: Path) -> list[str]:
    """Temporary or half-written things anywhere under the data root."""
    return [str(p) for p in data_root.rglob("*") if "tmp" in p.name or p.name.startswith(".")]


def _floor(ratio: str, n: int) -> int:
    return int(Fraction(ratio) * n)


# ---------------------------------------------------------------- the commands as typed


def test_prepare_cifar10_holdout_dup_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cifar10: TinyCifar
) -> None:
    """``mlvar data prepare cifar10 --mode holdout-dup`` on a fresh store: the study's ten
    ratios of class 0; per ratio, floor(ratio * n) of class 0's training images are
    copies of others, counted here from the archive's own labels."""
    data_root = use_root(tmp_path, monkeypatch)
    ok("data", "fetch", "cifar10", "--source", tiny_cifar10.archive, "--no-verify")
    out = ok("data", "prepare", "cifar10", "--mode", "holdout-dup").stdout
    lines = out.splitlines()
    assert lines[0] == (
        "no --ratio given: the study's sweep of cifar10 holdout-dup, --ratio 0:0.9:0.1 "
        "(10 scenarios)"
    )
    assert lines[-1] == "Prepared 10 of 10 scenarios."
    ratios = [f"0.{i}" for i in range(10)]
    names = [f"cifar10-holdout-dup-cls0-r{r}" for r in ratios]
    assert scenario_folders(data_root) == names

    # The reference: the design's split (docs/design.md), then class 0 of the train part.
    t = tiny_cifar10
    train_ids, val_ids = train_test_split(np.arange(len(t.y_train)), test_size=0.1, random_state=69)
    train_ids, val_ids = np.sort(train_ids), np.sort(val_ids)
    members = train_ids[t.y_train[train_ids] == 0]
    table = table_rows(out, "cifar10-holdout-dup-")
    assert list(table) == names
    for ratio, name in zip(ratios, names, strict=True):
        n_copies = _floor(ratio, len(members))
        status, shown_ratio, *counts = table[name]
        assert (status, shown_ratio) == ("prepared", ratio)
        expected = [
            len(train_ids),
            n_copies,
            len(val_ids),
            int((t.y_train[val_ids] == 0).sum()),
            len(t.y_test),
            int((t.y_test == 0).sum()),
            # full_val: validation is split off before the change, so it is val itself
            len(val_ids),
            int((t.y_train[val_ids] == 0).sum()),
        ]
        assert [int(c) for c in counts] == expected, name
        train = open_scenario(data_root, name).load("train")
        np.testing.assert_array_equal(train.id[train.affected], members[:n_copies])

    # Typed again: every member is there already, nothing is rewritten.
    again = json.loads(ok("data", "prepare", "cifar10", "--mode", "holdout-dup", "--json").stdout)
    assert again["prepared"] == [] and again["skipped"] == names
    assert again["defaulted"] == {"ratio": "0:0.9:0.1"}
    assert [r["train affected"] for r in again["scenarios"]] == [
        _floor(r, len(members)) for r in ratios
    ]
    assert leftovers(data_root) == []


@pytest.fixture(scope="module")
def compas_reference(compas_csv: Path) -> Reference:
    return Reference(compas_csv)


def test_prepare_compas_artificial_as_typed(
    compas_root: Path, monkeypatch: pytest.MonkeyPatch, compas_reference: Reference
) -> None:
    """``mlvar data prepare compas --mode artificial`` on a store holding only the CSV:
    the study's ratios 0.0 ... 0.5; each split's affected rows are the label flips of
    default_rng(0), drawn here again on the reference split sizes."""
    data_root = use_root(compas_root.parent, monkeypatch)
    out = ok("data", "prepare", "compas", "--mode", "artificial").stdout
    assert out.splitlines()[0] == (
        "no --ratio given: the study's sweep of compas artificial, --ratio 0:0.5:0.1 (6 scenarios)"
    )
    ratios = [f"0.{i}" for i in range(6)]
    names = [f"compas-artificial-r{r}" for r in ratios]
    assert scenario_folders(data_root) == names
    sizes = {s: len(i) for s, i in compas_reference.index.items()}
    table = table_rows(out, "compas-artificial-")
    assert list(table) == names
    for ratio, name in zip(ratios, names, strict=True):
        rng = np.random.default_rng(0)
        p = float(ratio)
        flips = [int((rng.random(sizes[s]) < q).sum()) for s, q in (("train", p), ("val", p))]
        flips.append(int((rng.random(sizes["test"]) < 0.5).sum()))
        status, shown_ratio, *counts = table[name]
        assert (status, shown_ratio) == ("prepared", ratio)
        assert [int(c) for c in counts] == [
            sizes["train"],
            flips[0],
            sizes["val"],
            flips[1],
            sizes["test"],
            flips[2],
        ], name
    assert leftovers(data_root) == []


# ---------------------------------------------------------------- ranges and bad sweeps


def test_float_range_gives_six_scenarios_with_a_progress_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_root = use_root(tmp_path, monkeypatch)
    seen: list[tuple[str, float, float | None]] = []
    monkeypatch.setattr(
        cli_common.ProgressBar,
        "update",
        lambda self, description, completed, total=None: seen.append(
            (description, completed, total)
        ),
    )
    out = ok("data", "prepare", "digits", "--mode", "holdout-dup", "--ratio", "0:0.5:0.1").stdout
    names = [f"digits-holdout-dup-cls0-r0.{i}" for i in range(6)]
    assert scenario_folders(data_root) == names
    assert list(table_rows(out, "digits-holdout-dup-")) == names
    assert "no --" not in out  # nothing defaulted: no study note
    assert seen == [(f"preparing {n}", i, 6) for i, n in enumerate(names)] + [("prepared", 6, 6)]
    # A second, overlapping range prepares only the new members and says so.
    seen.clear()
    out = ok("data", "prepare", "digits", "--mode", "holdout-dup", "--ratio", "0.4:0.6:0.1").stdout
    assert {name: cells[0] for name, cells in table_rows(out, "digits-holdout-dup-").items()} == {
        "digits-holdout-dup-cls0-r0.4": "existing",
        "digits-holdout-dup-cls0-r0.5": "existing",
        "digits-holdout-dup-cls0-r0.6": "prepared",
    }
    assert out.splitlines()[-1] == "Prepared 1 of 3 scenarios, skipped 2 already prepared."
    assert seen == []  # one scenario to build: no bar


def test_one_value_prepares_one_scenario_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_root = use_root(tmp_path, monkeypatch)
    out = ok("data", "prepare", "digits", "--mode", "holdout-dup", "--ratio", "0.3").stdout
    name = "digits-holdout-dup-cls0-r0.3"
    assert out.splitlines()[-1] == f"Prepared {name} in {data_root / name}"
    assert "split" in out and "unaffected" in out  # the per split and class table
    info = json.loads(ok("data", "info", name, "--json").stdout)
    assert info["params"] == {"cls": 0, "ratio": 0.3, "seed": 0}


@pytest.fixture(scope="module")
def full_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_cifar100: TinyCifar, compas_csv: Path
) -> Path:
    """A work folder whose data root holds CIFAR-100 and COMPAS fetched and one digits
    scenario prepared (bad sweeps must leave it all as it is)."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        use_root(root, mp)
        ok("data", "fetch", "cifar100", "--source", tiny_cifar100.archive, "--no-verify")
        ok("data", "fetch", "compas", "--source", compas_csv)
        ok("data", "prepare", "digits")
    return root


BAD_SWEEPS = [
    (["digits", "--mode", "holdout-dup", "--ratio", "0:0.5:0"], "needs a positive step"),
    (["digits", "--mode", "holdout-dup", "--ratio", "0.5:0:0.1"], "range '0.5:0:0.1' is empty"),
    (["digits", "--mode", "holdout-dup", "--ratio", "0:x:0.1"], "a part that is not a number"),
    (["digits", "--mode", "holdout-dup", "--ratio", "0:0.5"], "is not start:stop:step"),
    (["digits", "--mode", "holdout", "--subclass", ","], "--subclass ',' names no value"),
    (["digits", "--mode", "augmentation", "--ratio", "0.1,,0.2"], "has an empty list item"),
    (["digits", "--mode", "augmentation", "--ratio", "0.1,0.10"], "--ratio lists 0.1 twice"),
    (["cifar10", "--mode", "holdout-dup", "--ratio", "0.8:1:0.1"], "cannot prepare --ratio 1.0"),
    (["cifar100", "--subclass", "baby,babby"], "cannot prepare --subclass babby of the sweep"),
    (["compas", "--mode", "holdout", "--cluster", "1,14,20"], "--cluster 14, --cluster 20"),
    (["digits", "--mode", "holdout", "--cls", "0,12", "--ratio", "0.5"], "class '12'"),
]


@pytest.mark.parametrize(("args", "words"), BAD_SWEEPS, ids=[" ".join(a) for a, _ in BAD_SWEEPS])
def test_bad_sweeps_are_one_line_and_write_nothing(
    full_store: Path, monkeypatch: pytest.MonkeyPatch, tree_listing, args: list[str], words: str
) -> None:
    data_root = use_root(full_store, monkeypatch)
    before = tree_listing(full_store)
    result = invoke("data", "prepare", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert words in lines[0] and "(hint: " in lines[0], lines[0]
    assert tree_listing(full_store) == before
    assert scenario_folders(data_root) == ["digits-original"]
    assert leftovers(data_root) == []


# ---------------------------------------------------------------- data list: families


def test_data_list_groups_a_real_sweep_by_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_root = use_root(tmp_path, monkeypatch)
    dup_ratios = ["0.0", "0.1", "0.2", "0.3"]
    ok("data", "prepare", "digits", "--mode", "holdout-dup", "--ratio", ",".join(dup_ratios))
    ok("data", "prepare", "digits", "--subclass", "7,2")
    ok("data", "prepare", "digits")
    expected = {
        "digits original": (["digits-original"], {}),
        "digits holdout": (
            ["digits-holdout-sub2-r1.0", "digits-holdout-sub7-r1.0"],
            {"subclass": [2, 7], "ratio": [1.0]},
        ),
        "digits holdout-dup": (
            [f"digits-holdout-dup-cls0-r{r}" for r in dup_ratios],
            {"cls": [0], "ratio": [float(r) for r in dup_ratios], "seed": [0]},
        ),
    }
    families = scenario_families(data_root)
    assert {f.name: (f.names, f.params) for f in families} == expected
    assert [f.name for f in families] == ["digits original", "digits holdout", "digits holdout-dup"]

    out = ok("data", "list").stdout
    rows = {
        " ".join(cells[:2]): cells[2:]
        for cells in (line.split() for line in out.splitlines())
        if cells[:1] == ["digits"]
    }
    assert rows == {
        "digits original": ["1"],
        "digits holdout": ["2", "subclass", "2,", "7;", "ratio", "1.0"],
        "digits holdout-dup": [
            "4",
            "cls",
            "0;",
            "ratio",
            "0.0,",
            "0.1,",
            "...,",
            "0.3;",
            "seed",
            "0",
        ],
    }
    # the title (rich wraps it to the table's width, a long path even inside a word)
    title = f"7 scenarios in {data_root}, by family"
    assert "".join(out.split()).startswith("".join(title.split()))

    flat = ok("data", "list", "--flat").stdout
    every = [n for names, _ in expected.values() for n in names]
    assert list(table_rows(flat, "digits-")) == every
    assert table_rows(flat, "digits-")["digits-holdout-sub7-r1.0"][:2] == ["digits", "holdout"]

    listed = json.loads(ok("data", "list", "--json").stdout)
    assert [s["name"] for s in listed] == every
    assert {s["name"]: s["family"] for s in listed} == {
        n: family for family, (names, _) in expected.items() for n in names
    }
    assert listed[-1]["params"] == {"cls": 0, "ratio": 0.3, "seed": 0}


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "0.0, 0.1, ..., 0.5"),
        ([0.0, 0.1, 0.3, 0.4], "0.0, 0.1, 0.3, 0.4"),  # not evenly spaced: all of them
        ([0, 3, 6], "0, 3, 6"),
        (list(range(14)), "0, 1, ..., 13"),
        ([f"c{i:02d}" for i in range(10)], ", ".join(f"c{i:02d}" for i in range(10))),
        (
            [f"c{i:02d}" for i in range(12)],
            "c00, c01, c02, c03, c04, c05, c06, c07, ..., c11 (12 values)",
        ),
        (["baby"], "baby"),
    ],
)
def test_values_text(values: list, text: str) -> None:
    assert values_text(values) == text
