"""Sweeps at prepare time (registry.prepare_sweep): value lists, decimal ranges, keywords,
the study's sweep for options not given, everything checked before the first scenario is
written, members already prepared skipped. Counts per scenario are derived again in the
dataset test modules (test_data_digits, test_data_compas, test_data_cifar)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlvar.data import registry
from mlvar.data.sweep import expand_range, parse_values
from mlvar.errors import MlvarError

RATIO = registry.get_dataset("cifar10").variants("holdout")[0].params.options()["ratio"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:0.5:0.1", ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5"]),
        ("0:0.9:0.1", [f"0.{i}" for i in range(10)]),
        ("0.1:0.3:0.05", ["0.1", "0.15", "0.2", "0.25", "0.3"]),
        ("0:1:0.3", ["0.0", "0.3", "0.6", "0.9"]),  # stop not on a step: left out
        ("0.7:0.7:0.1", ["0.7"]),
        (" 0 : 0.2 : 0.1 ", ["0.0", "0.1", "0.2"]),
    ],
)
def test_ranges_are_exact_decimal_steps(text: str, expected: list[str]) -> None:
    values = expand_range("ratio", text)
    # Each value is the double nearest its decimal, as typing it would give.
    assert [repr(v) for v in values] == expected
    assert values == [float(v) for v in expected]


def test_value_lists_and_keywords() -> None:
    assert parse_values("ratio", RATIO, "0.1, 0.5,1") == [0.1, 0.5, 1.0]
    assert parse_values("ratio", RATIO, "0:0.2:0.1,0.9") == [0.0, 0.1, 0.2, 0.9]
    assert parse_values("ratio", RATIO, 0.3) == [0.3]  # a value, not text
    assert parse_values("ratio", RATIO, (0.1, 0.2)) == [0.1, 0.2]
    cls = registry.get_dataset("cifar10").variants("holdout")[0].params.options()["cls"]
    assert parse_values("cls", cls, "all").word == "all"


def test_float_range_names_r00_to_r05(tmp_path: Path) -> None:
    result = registry.prepare_sweep(tmp_path, "digits", mode="holdout-dup", ratio="0:0.5:0.1")
    assert result.names == [f"digits-holdout-dup-cls0-r0.{i}" for i in range(6)]
    assert result.prepared == result.names and result.skipped == []
    assert result.swept == {"ratio": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}
    assert result.defaulted == {} and result.note() == ""
    assert [s.manifest["params"]["ratio"] for s in result.scenarios] == result.swept["ratio"]


BAD = [
    ({"mode": "holdout", "ratio": "0:1:0"}, "--ratio range '0:1:0' needs a positive step"),
    ({"mode": "holdout", "ratio": "0:1:-0.1"}, "needs a positive step"),
    ({"mode": "holdout", "ratio": "1:0:0.1"}, "range '1:0:0.1' is empty"),
    ({"mode": "holdout", "ratio": "a:b"}, "--ratio range 'a:b' is not start:stop:step"),
    ({"mode": "holdout", "ratio": "0:x:0.1"}, "has a part that is not a number"),
    ({"mode": "holdout", "ratio": "0:inf:0.1"}, "has a part that is not a number"),
    ({"mode": "holdout", "ratio": ",,"}, "--ratio ',,' names no value"),
    ({"mode": "holdout", "ratio": "0.1,,0.2"}, "has an empty list item"),
    ({"mode": "holdout", "ratio": "0.1,0.10"}, "--ratio lists 0.1 twice"),
    ({"mode": "holdout", "ratio": "0:0.5:0.1,1.5"}, "holdout ratio 1.5 is out of range"),
    ({"mode": "holdout", "ratio": "half"}, "holdout ratio must be a number, got 'half'"),
    ({"mode": "holdout", "ratio": "0.5", "cls": "some"}, "class 'some' is not a class index"),
    ({"mode": "holdout", "ratio": "0.5", "cls": "0,all"}, "lists the keyword 'all' with"),
    ({"mode": "holdout", "ratio": "0.5", "cls": "0,10"}, "class '10' is not a class index 0-9"),
    ({"mode": "holdout", "subclass": "all,3"}, "lists the keyword 'all' with other values"),
    ({"mode": "holdout", "subclass": "3,3"}, "--subclass lists 3 twice"),
    ({"mode": "original", "ratio": "0:0.5:0.1"}, "digits mode 'original' takes no --ratio"),
    ({"mode": "holdout-dup", "ratio": "0:1:0.1"}, "cannot prepare --ratio 1.0 of the sweep"),
    ({"mode": "holdout-dup", "ratio": "0.5,0.95,1"}, "cannot prepare --ratio 1.0 of the"),
    ({"mode": "holdout", "subclass": "3", "cls": "1"}, "takes no --subclass with --cls"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_bad_sweeps_are_one_line_and_write_nothing(
    tmp_path: Path, tree_listing, kwargs: dict, message: str
) -> None:
    registry.prepare(tmp_path, "digits")  # something there already, left as it is
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError) as err:
        registry.prepare_sweep(tmp_path, "digits", **kwargs)
    assert message in err.value.message, err.value
    assert err.value.hint and "\n" not in str(err.value)
    assert tree_listing(tmp_path) == before


def test_a_value_that_cannot_be_prepared_is_named(tmp_path: Path) -> None:
    with pytest.raises(MlvarError) as err:
        registry.prepare_sweep(tmp_path, "digits", mode="holdout-dup", ratio="0.5,1,0.7")
    assert err.value.message.startswith(
        "digits mode 'holdout-dup' cannot prepare --ratio 1.0 of the sweep: holdout-dup "
        "with ratio 1.0 leaves no sample"
    )
    assert "use a ratio below 1.0" in err.value.hint
    with pytest.raises(MlvarError, match="lists 1.0 twice"):  # 1 and the range's 1.0
        registry.prepare_sweep(tmp_path, "digits", mode="holdout", cls=1, ratio="1,0:1:0.5")
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_syntax_errors_need_no_heavy_library(tmp_path: Path) -> None:
    """Bad lists and ranges are refused before any data is read (the fast CLI relies on
    it): no pandas, scikit-learn or torch imported, nothing written."""
    probe = f"""
import sys, json
from mlvar.data import registry
from mlvar.errors import MlvarError
for kw in ({{"dataset": "cifar10", "mode": "holdout", "ratio": "0:1:0"}},
           {{"dataset": "compas", "mode": "artificial", "ratio": ",,"}},
           {{"dataset": "compas", "mode": "holdout", "cluster": "some"}},
           {{"dataset": "cifar10", "mode": "holdout-dup", "ratio": "0:1:0.1"}},
           {{"dataset": "digits", "mode": "augmentation", "ratio": "0.1,0.1"}}):
    try:
        registry.prepare_sweep({str(tmp_path)!r}, **kw)
    except MlvarError:
        pass
    else:
        raise SystemExit("no error")
heavy = {{"pandas", "sklearn", "torch", "matplotlib", "scipy"}}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & heavy)))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- preparing a sweep


def test_existing_members_are_skipped_and_force_rebuilds(tmp_path: Path) -> None:
    first = registry.prepare_sweep(tmp_path, "digits", mode="augmentation", ratio="0.2")
    assert first.names == ["digits-augmentation-cls0-r0.2"]
    bytes_of = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    seen: list[tuple[int, int, str]] = []
    result = registry.prepare_sweep(
        tmp_path,
        "digits",
        mode="augmentation",
        ratio="0:0.4:0.2",
        progress=lambda done, total, name: seen.append((done, total, name)),
    )
    names = [f"digits-augmentation-cls0-r{r}" for r in ("0.0", "0.2", "0.4")]
    assert result.names == names
    assert result.skipped == [names[1]] and result.prepared == [names[0], names[2]]
    assert seen == [(0, 2, names[0]), (1, 2, names[2]), (2, 2, "")]
    assert [r["status"] for r in result.rows()] == ["prepared", "existing", "prepared"]
    for path, data in bytes_of.items():  # the member already there was not touched
        assert path.read_bytes() == data
    again = registry.prepare_sweep(tmp_path, "digits", mode="augmentation", ratio="0:0.4:0.2")
    assert again.prepared == [] and again.skipped == names
    forced = registry.prepare_sweep(
        tmp_path, "digits", mode="augmentation", ratio="0:0.4:0.2", force=True
    )
    assert forced.prepared == names
    for path, data in bytes_of.items():  # rebuilt byte for byte
        assert path.read_bytes() == data
    # One scenario given in full is one prepare: refused when it exists, as before.
    with pytest.raises(MlvarError, match="already exists") as err:
        registry.prepare_sweep(tmp_path, "digits", mode="augmentation", ratio="0.2")
    assert err.value.hint == "pass --force to rebuild it"


def test_combinations_rows_and_note(tmp_path: Path) -> None:
    result = registry.prepare_sweep(tmp_path, "digits", mode="holdout", cls="2,5", ratio="0.5,1")
    assert result.names == [
        "digits-holdout-cls2-r0.5",
        "digits-holdout-cls2-r1.0",
        "digits-holdout-cls5-r0.5",
        "digits-holdout-cls5-r1.0",
    ]
    assert result.mode == "holdout" and result.swept == {
        "cls": [2, 2, 5, 5],
        "ratio": [0.5, 1.0] * 2,
    }
    rows = result.rows()
    assert [(r["cls"], r["ratio"]) for r in rows] == [(2, 0.5), (2, 1.0), (5, 0.5), (5, 1.0)]
    for row, scenario in zip(rows, result.scenarios, strict=True):
        counts = scenario.manifest["counts"]
        assert row["train"] == counts["train"]["total"]
        assert row["test affected"] == counts["test"]["affected"]
        assert row["name"] == scenario.name and (tmp_path / scenario.name).is_dir()
    defaulted = registry.prepare_sweep(tmp_path, "digits", mode="holdout", cls="all", ratio=1)
    assert len(defaulted.names) == 10 and defaulted.skipped == [
        "digits-holdout-cls2-r1.0",
        "digits-holdout-cls5-r1.0",
    ]
    study = registry.prepare_sweep(tmp_path, "digits", mode="augmentation-all")
    assert study.defaulted == {"ratio": "0:0.9:0.1"}
    assert study.note() == (
        "no --ratio given: the study's sweep of digits augmentation-all, --ratio 0:0.9:0.1 "
        "(10 scenarios)"
    )
    assert [s.name for s in study.scenarios][-1] == "digits-augmentation-all-r0.9"


def test_a_sweep_interrupted_midway_leaves_complete_scenarios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep killed while writing its third member (its split files written, not yet its
    manifest): the first two are complete, the third is not there (no half scenario), and
    running the sweep again prepares the rest."""
    from mlvar.data import scenario as scenario_module

    real = scenario_module.atomic_write_bytes
    manifests = []

    def killed(path, data):
        if Path(path).name == "manifest.json":
            manifests.append(path)
            if len(manifests) == 3:
                raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(scenario_module, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        registry.prepare_sweep(tmp_path, "digits", mode="holdout-dup", ratio="0:0.4:0.1")
    monkeypatch.setattr(scenario_module, "atomic_write_bytes", real)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("digits")) == [
        "digits-holdout-dup-cls0-r0.0",
        "digits-holdout-dup-cls0-r0.1",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    rest = registry.prepare_sweep(tmp_path, "digits", mode="holdout-dup", ratio="0:0.4:0.1")
    assert rest.prepared == [f"digits-holdout-dup-cls0-r0.{i}" for i in (2, 3, 4)]
    for scenario in rest.scenarios:
        assert len(scenario.load("train").y) == scenario.manifest["counts"]["train"]["total"]


def test_sweep_help_names_the_forms_and_the_study_sweeps() -> None:
    text = registry.sweep_help("ratio")
    assert text.startswith("Several values: a comma-separated list or a range start:stop:step.")
    assert "compas artificial: 0:0.5:0.1" in text
    assert "cifar10 holdout, holdout-dup, augmentation, augmentation-all: 0:0.9:0.1" in text
    assert "'all' or 'study'" in registry.sweep_help("subclass")
    assert "compas holdout: all" in registry.sweep_help("cluster")


def test_values_given_as_numbers_and_sequences(tmp_path: Path) -> None:
    """A notebook passes values, not text: one number, or a list."""
    one = registry.prepare_sweep(tmp_path, "digits", mode="holdout", subclass=4)
    assert one.names == ["digits-holdout-sub4-r1.0"]
    many = registry.prepare_sweep(tmp_path, "digits", subclass=[1, 2], ratio=np.float64(0.5))
    assert many.names == ["digits-holdout-sub1-r0.5", "digits-holdout-sub2-r0.5"]


def test_a_folder_in_the_way_is_refused_before_anything_is_written(
    tmp_path: Path, tree_listing
) -> None:
    (tmp_path / "digits-holdout-dup-cls0-r0.2").mkdir(parents=True)
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match="is in the way: it is not a prepared scenario"):
        registry.prepare_sweep(tmp_path, "digits", mode="holdout-dup", ratio="0:0.4:0.1")
    assert tree_listing(tmp_path) == before
