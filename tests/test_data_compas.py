"""COMPAS: fetch, load, filter, and the three scenarios, checked against independent code."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split
from sklearn.tree import DecisionTreeClassifier

from mlvar.data import compas, registry
from mlvar.errors import MlvarError
from mlvar.io import sha256_file

SPEC_FEATURES = [
    "sex",
    "age",
    "race",
    "juv_fel_count",
    "juv_misd_count",
    "juv_other_count",
    "priors_count",
    "c_charge_degree",
]
SPEC_CATEGORICAL = {"sex", "race", "c_charge_degree"}
SPEC_NUMERIC = ["age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count"]


class Reference:
    """The design's recipe, written again here without mlvar's code."""

    def __init__(self, csv: Path) -> None:
        df = pd.read_csv(csv)
        df = df[
            (df["days_b_screening_arrest"] <= 30)
            & (df["days_b_screening_arrest"] >= -30)
            & (df["is_recid"] != -1)
            & (df["c_charge_degree"] != "O")
            & df["score_text"].notna()
            & (df["score_text"] != "N/A")
        ].reset_index(drop=True)
        self.df = df
        parts = [
            pd.get_dummies(df[c], prefix=c, prefix_sep="=", dtype=float)
            if c in SPEC_CATEGORICAL
            else df[[c]]
            for c in SPEC_FEATURES
        ]
        frame = pd.concat(parts, axis=1)
        self.columns = list(frame.columns)
        self.x = frame.to_numpy(float)
        self.y = df["two_year_recid"].to_numpy()
        self.ids = df["id"].to_numpy()
        rest, test = train_test_split(np.arange(len(df)), test_size=0.165, random_state=69)
        train, val = train_test_split(rest, test_size=0.125, random_state=69)
        self.index = {"train": train, "val": val, "test": test}

    def clusters(self) -> tuple[np.ndarray, dict[str, list[int]]]:
        """Cluster index of every row and per-split cluster sizes (train before removal)."""
        tree = DecisionTreeClassifier(random_state=0, min_samples_leaf=300).fit(self.x, self.y)
        leaf = tree.apply(self.x)
        leaves = sorted(set(leaf.tolist()))
        n_train = {lf: int((leaf[self.index["train"]] == lf).sum()) for lf in leaves}
        ordered = sorted(leaves, key=lambda lf: (n_train[lf], lf))
        cluster = np.array([ordered.index(lf) for lf in leaf])
        sizes = {
            s: [int((cluster[i] == k).sum()) for k in range(len(ordered))]
            for s, i in self.index.items()
        }
        return cluster, sizes


@pytest.fixture(scope="module")
def ref(compas_csv: Path) -> Reference:
    return Reference(compas_csv)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, compas_csv: Path) -> Path:
    """One data root with the raw file, shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("compas") / "data"
    compas.fetch_compas(root, source=compas_csv)
    return root


def _load(scenario):
    return {s: scenario.load(s) for s in scenario.splits}


# --------------------------------------------------------------------------- filter, split


def test_filter_keeps_6172_rows(compas_csv: Path) -> None:
    df = compas.load_compas(compas_csv)
    assert len(df) == 7214
    assert len(compas.filter_compas(df)) == 6172


def test_filter_drops_na_score_in_either_spelling() -> None:
    base = {
        "days_b_screening_arrest": [0, 0, 0, 0, 31, 0, np.nan],
        "is_recid": [0, 0, 0, -1, 0, 0, 0],
        "c_charge_degree": ["F", "M", "O", "F", "F", "F", "F"],
        "score_text": ["Low", np.nan, "Low", "Low", "Low", "N/A", "High"],
    }
    kept = compas.filter_compas(pd.DataFrame(base))
    assert kept["score_text"].tolist() == ["Low"]


def test_na_score_text_in_a_csv_is_dropped(tmp_path: Path, compas_csv: Path) -> None:
    # pandas reads the literal 'N/A' as NaN by default; the filter must still drop it.
    df = pd.read_csv(compas_csv)
    expected = 6172 - len(compas.filter_compas(df.iloc[:5]))
    assert expected < 6172
    df.loc[df.index[:5], "score_text"] = "N/A"
    path = tmp_path / "na.csv"
    df.to_csv(path, index=False)
    assert len(compas.filter_compas(compas.load_compas(path))) == expected


def test_original_splits_features_and_ids(root: Path, ref: Reference) -> None:
    scenario = registry.prepare(root, "compas")
    assert scenario.name == "compas-original"
    splits = _load(scenario)
    assert {s: len(d) for s, d in splits.items()} == {"train": 4508, "val": 645, "test": 1019}
    names = scenario.manifest["feature_names"]
    assert names == ref.columns
    assert not any("decile" in n or "score" in n for n in names)
    assert scenario.manifest["input"] == {"kind": "tabular", "n_features": len(ref.columns)}
    assert scenario.class_names == ["no_recid", "recid"]
    for s, data in splits.items():
        idx = ref.index[s]
        assert data.x.dtype == np.float32 and data.x.shape == (len(idx), len(ref.columns))
        assert data.y.dtype == np.int64 and data.id.dtype == np.int64
        np.testing.assert_array_equal(data.id, ref.ids[idx])
        np.testing.assert_array_equal(data.y, ref.y[idx])
        assert not data.affected.any()
        assert (data.group == -1).all()


def test_standardisation_uses_train_statistics(root: Path, ref: Reference) -> None:
    scenario = registry.prepare(root, "compas", force=True)
    splits = _load(scenario)
    names = scenario.manifest["feature_names"]
    numeric = [names.index(c) for c in SPEC_NUMERIC]
    train = splits["train"].x[:, numeric].astype(float)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-4)
    raw_train = ref.df.loc[ref.index["train"], SPEC_NUMERIC].to_numpy(float)
    stats = scenario.manifest["standardisation"]
    assert stats["columns"] == SPEC_NUMERIC
    np.testing.assert_allclose(stats["mean"], raw_train.mean(axis=0))
    np.testing.assert_allclose(stats["std"], raw_train.std(axis=0))
    # Test rows are scaled with the train statistics, not their own.
    raw_test = ref.df.loc[ref.index["test"], SPEC_NUMERIC].to_numpy(float)
    expected = (raw_test - raw_train.mean(axis=0)) / raw_train.std(axis=0)
    np.testing.assert_allclose(splits["test"].x[:, numeric], expected, rtol=1e-5, atol=1e-5)
    one_hot = [i for i in range(len(names)) if i not in numeric]
    for data in splits.values():
        assert set(np.unique(data.x[:, one_hot])) <= {0.0, 1.0}


# --------------------------------------------------------------------------- artificial


def _within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5])
def test_artificial_feature_agreement(root: Path, ratio: float) -> None:
    scenario = registry.prepare(root, "compas", mode="artificial", ratio=ratio)
    assert scenario.name == f"compas-artificial-r{ratio}"
    assert scenario.manifest["params"] == {"ratio": ratio, "seed": 0}
    assert scenario.manifest["feature_names"][-1] == "artificial"
    original = _load(registry.prepare(root, "compas", force=True))
    for s, data in _load(scenario).items():
        feature = data.x[:, -1]
        assert set(np.unique(feature)) <= {0.0, 1.0}
        agree = float((feature == data.y).mean())
        p = 1 - ratio if s != "test" else 0.5
        if p in (0.0, 1.0):
            assert agree == p
        else:
            assert _within(agree, p, len(data)), (s, agree, p)
        np.testing.assert_array_equal(data.affected, feature != data.y)
        np.testing.assert_array_equal(data.x[:, :-1], original[s].x)
        np.testing.assert_array_equal(data.id, original[s].id)


def test_artificial_seed_changes_feature_and_name(root: Path) -> None:
    a = registry.prepare(root, "compas", mode="artificial", ratio=0.2, force=True)
    b = registry.prepare(root, "compas", mode="artificial", ratio=0.2, seed=7)
    assert b.name == "compas-artificial-r0.2-s7"
    assert not np.array_equal(a.load("train").x[:, -1], b.load("train").x[:, -1])


# --------------------------------------------------------------------------- holdout


@pytest.mark.parametrize("k", [0, 5])
def test_holdout_clusters_match_independent_tree(root: Path, ref: Reference, k: int) -> None:
    cluster, sizes = ref.clusters()
    scenario = registry.prepare(root, "compas", mode="holdout", cluster=k)
    assert scenario.name == f"compas-holdout-cluster{k}"
    info = scenario.manifest["clusters"]
    assert info["n_clusters"] == len(sizes["train"])
    assert info["sizes"] == sizes
    assert sizes["train"] == sorted(sizes["train"])
    splits = _load(scenario)
    held_ids = set(ref.ids[ref.index["train"]][cluster[ref.index["train"]] == k].tolist())
    assert len(held_ids) == sizes["train"][k] > 0
    assert not held_ids & set(splits["train"].id.tolist())
    assert len(splits["train"]) == len(ref.index["train"]) - sizes["train"][k]
    assert not splits["train"].affected.any()
    for s in ("val", "test"):
        data = splits[s]
        assert len(data) == len(ref.index[s])
        np.testing.assert_array_equal(data.group, cluster[ref.index[s]])
        assert int(data.affected.sum()) == sizes[s][k]
        np.testing.assert_array_equal(data.affected, data.group == k)
    np.testing.assert_array_equal(
        splits["train"].group, cluster[ref.index["train"]][cluster[ref.index["train"]] != k]
    )


def test_holdout_cluster_out_of_range_names_range(
    root: Path, ref: Reference, tmp_path: Path, tree_listing
) -> None:
    n = len(ref.clusters()[1]["train"])
    before = tree_listing(root)
    for bad in (n, -1):
        with pytest.raises(MlvarError, match=rf"0\.\.{n - 1}"):
            registry.prepare(root, "compas", mode="holdout", cluster=bad)
    assert tree_listing(root) == before


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"mode": "artificial", "ratio": 0.3}, {"mode": "holdout", "cluster": 2}],
)
def test_preparing_twice_gives_identical_bytes(compas_root: Path, kwargs: dict) -> None:
    first = registry.prepare(compas_root, "compas", **kwargs)
    files = {p.name: p.read_bytes() for p in sorted(first.path.iterdir())}
    pool = {"full_val.npz"} if kwargs.get("mode") == "holdout" else set()
    assert set(files) == {"manifest.json", "train.npz", "val.npz", "test.npz"} | pool
    with pytest.raises(MlvarError, match="already exists"):
        registry.prepare(compas_root, "compas", **kwargs)
    second = registry.prepare(compas_root, "compas", force=True, **kwargs)
    assert second.path == first.path
    assert {p.name: p.read_bytes() for p in sorted(second.path.iterdir())} == files
    assert not [p for p in compas_root.iterdir() if p.name.startswith(".tmp")]


def test_scenario_info_counts(root: Path) -> None:
    scenario = registry.prepare(root, "compas", mode="artificial", ratio=0.1, force=True)
    info = registry.scenario_info(scenario)
    assert info["dataset"] == "compas" and info["mode"] == "artificial"
    for s in ("train", "val", "test"):
        data = scenario.load(s)
        split = info["splits"][s]
        assert split["total"] == len(data)
        assert split["affected"] == int(data.affected.sum())
        for c, name in enumerate(["no_recid", "recid"]):
            entry = split["per_class"][name]
            assert entry["affected"] == int((data.affected & (data.y == c)).sum())
            assert entry["unaffected"] == int((~data.affected & (data.y == c)).sum())
    assert len(info["rows"]) == 3 * 2


# --------------------------------------------------------------------------- fetch


def test_fetch_copy_and_download(tmp_path: Path, compas_csv: Path, monkeypatch) -> None:
    info = registry.fetch(tmp_path / "a", "compas", source=compas_csv)
    assert info["sha256"] == compas.COMPAS_SHA256 and info["rows"] == 7214 and info["verified"]
    assert Path(info["path"]) == compas.raw_path(tmp_path / "a")
    # The download path, served from a file:// URL so the test runs offline.
    monkeypatch.setattr(compas, "COMPAS_URL", compas_csv.resolve().as_uri())
    calls = []
    info = compas.fetch_compas(tmp_path / "b", progress=lambda d, t: calls.append((d, t)))
    assert sha256_file(info["path"]) == compas.COMPAS_SHA256
    assert calls and calls[-1][0] == compas_csv.stat().st_size
    assert all(d1 <= d2 for (d1, _), (d2, _) in zip(calls, calls[1:], strict=False))
    assert sorted(p.name for p in (tmp_path / "b" / "raw").iterdir()) == [compas.COMPAS_FILENAME]


def test_fetch_unverified_modified_copy(tmp_path: Path, compas_csv: Path) -> None:
    modified = tmp_path / "modified.csv"
    modified.write_bytes(b"\n".join(compas_csv.read_bytes().splitlines()[:-1]) + b"\n")
    info = compas.fetch_compas(tmp_path / "data", source=modified, verify=False)
    assert not info["verified"] and info["rows"] == 7213
    assert info["sha256"] != compas.COMPAS_SHA256


@pytest.fixture(scope="module")
def bad_sources(
    tmp_path_factory: pytest.TempPathFactory, compas_csv: Path
) -> dict[str, tuple[Path, str]]:
    """Broken source files and a pattern their error message must match."""
    src = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    (src / "random.bin").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (src / "empty.csv").write_bytes(b"")
    (src / "garbage.csv").write_text('a,b\n1,"2\n3,4\n')
    df = pd.read_csv(compas_csv)
    df.drop(columns=["priors_count", "score_text"]).to_csv(src / "cols.csv", index=False)
    (src / "mod.csv").write_bytes(compas_csv.read_bytes().replace(b"Male", b"Mail", 1))
    return {
        "missing": (src / "nope.csv", r"nope\.csv"),
        "random": (src / "random.bin", "not a CSV"),
        "empty": (src / "empty.csv", "empty"),
        "garbage": (src / "garbage.csv", "not a valid CSV|lacks required columns"),
        "columns": (src / "cols.csv", "priors_count, score_text"),
        "checksum": (src / "mod.csv", "checksum mismatch"),
    }


@pytest.mark.parametrize("case", ["missing", "random", "empty", "garbage", "columns", "checksum"])
@pytest.mark.parametrize("root_exists", [False, True])
def test_fetch_bad_source_leaves_nothing(
    tmp_path: Path, bad_sources: dict, tree_listing, case: str, root_exists: bool
) -> None:
    source, pattern = bad_sources[case]
    data_root = tmp_path / "data"
    if root_exists:
        (data_root / "raw").mkdir(parents=True)
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=pattern):
        registry.fetch(data_root, "compas", source=source)
    assert tree_listing(tmp_path) == before


def test_fetch_columns_checked_even_without_verify(tmp_path: Path, bad_sources: dict) -> None:
    source, _ = bad_sources["columns"]
    with pytest.raises(MlvarError, match="lacks required columns: priors_count, score_text"):
        compas.fetch_compas(tmp_path / "data", source=source, verify=False)
    assert not (tmp_path / "data").exists()


def test_fetch_network_error_hints_source(tmp_path: Path, tree_listing, monkeypatch) -> None:
    monkeypatch.setattr(compas, "COMPAS_URL", (tmp_path / "absent.csv").as_uri())
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError) as err:
        compas.fetch_compas(tmp_path / "data")
    assert "--source" in err.value.hint
    assert tree_listing(tmp_path) == before


def test_fetch_failure_keeps_existing_good_file(compas_root: Path, tmp_path: Path) -> None:
    path = compas.raw_path(compas_root)
    bad = tmp_path / "bad.csv"
    bad.write_text("x\n1\n")
    with pytest.raises(MlvarError):
        compas.fetch_compas(compas_root, source=bad, verify=False)
    assert sha256_file(path) == compas.COMPAS_SHA256


def test_load_compas_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MlvarError, match="not found"):
        compas.load_compas(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- bad prepare input


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dataset": "compass"}, "unknown dataset 'compass'"),
        ({"dataset": "compas", "mode": "holdup"}, "unknown compas mode 'holdup'"),
        ({"dataset": "compas", "mode": "artificial", "ratio": 0.6}, "out of range"),
        ({"dataset": "compas", "mode": "artificial", "ratio": -0.1}, "out of range"),
        ({"dataset": "compas", "mode": "artificial", "ratio": "x"}, "must be a number"),
        ({"dataset": "compas", "mode": "artificial"}, "needs --ratio"),
        ({"dataset": "compas", "mode": "holdout"}, "needs --cluster"),
        ({"dataset": "compas", "mode": "holdout", "cluster": 99}, r"0\.\.\d+"),
        ({"dataset": "compas", "mode": "holdout", "cluster": 1.5}, "must be an integer"),
        ({"dataset": "compas", "ratio": 0.3}, "takes no --ratio"),
        ({"dataset": "compas", "mode": "artificial", "ratio": 0.3, "cluster": 1}, "--cluster"),
        ({"dataset": "compas", "mode": "holdout", "cluster": 1, "seed": 3}, "--seed"),
        ({"dataset": "compas", "subclass": 3}, "takes no --subclass"),
    ],
)
def test_bad_prepare_input_writes_nothing(
    compas_root: Path, tmp_path: Path, tree_listing, kwargs: dict, pattern: str
) -> None:
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=pattern):
        registry.prepare(compas_root, **kwargs)
    assert tree_listing(tmp_path) == before


def test_ratio_message_gives_range(compas_root: Path) -> None:
    with pytest.raises(MlvarError) as err:
        registry.prepare(compas_root, "compas", mode="artificial", ratio=0.7)
    assert "[0.0, 0.5]" in str(err.value)


def test_prepare_without_raw_file_hints_fetch(tmp_path: Path, tree_listing) -> None:
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError) as err:
        registry.prepare(tmp_path / "data", "compas")
    assert "mlvar data fetch compas" in err.value.hint
    assert tree_listing(tmp_path) == before


def test_prepare_rejects_corrupt_raw_file(compas_root: Path, tmp_path: Path, tree_listing) -> None:
    shutil.copyfile(compas_root / "raw" / compas.COMPAS_FILENAME, tmp_path / "keep.csv")
    compas.raw_path(compas_root).write_bytes(b"\x00\x01\x02" * 100)
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match="not a CSV"):
        registry.prepare(compas_root, "compas")
    assert tree_listing(tmp_path) == before


# --------------------------------------------------------------------------- study sweeps


def test_artificial_study_sweep(compas_root: Path, ref: Reference) -> None:
    """``mlvar data prepare compas --mode artificial``: ratios 0.0 ... 0.5; each scenario's
    affected counts are the flips of default_rng(0) drawn here again, split by split."""
    result = registry.prepare_sweep(compas_root, "compas", mode="artificial")
    assert result.defaulted == {"ratio": "0:0.5:0.1"}
    assert result.names == [f"compas-artificial-r0.{i}" for i in range(6)]
    sizes = {s: len(i) for s, i in ref.index.items()}
    for i, scenario in enumerate(result.scenarios):
        rng = np.random.default_rng(0)
        flips = {
            s: int((rng.random(sizes[s]) < p).sum())
            for s, p in (("train", i / 10), ("val", i / 10), ("test", 0.5))
        }
        counts = scenario.manifest["counts"]
        assert {s: counts[s]["total"] for s in sizes} == sizes
        assert {s: counts[s]["affected"] for s in sizes} == flips


def test_holdout_study_sweep_is_every_cluster(compas_root: Path, ref: Reference) -> None:
    cluster, sizes = ref.clusters()
    n = len(sizes["train"])
    result = registry.prepare_sweep(compas_root, "compas", mode="holdout")
    assert result.defaulted == {"cluster": "all"} and n == 14  # the published file's 14
    assert result.names == [f"compas-holdout-cluster{k}" for k in range(n)]
    held_test = []
    for k, scenario in enumerate(result.scenarios):
        counts = scenario.manifest["counts"]
        assert counts["train"]["total"] == len(ref.index["train"]) - sizes["train"][k]
        assert counts["val"]["affected"] == sizes["val"][k]
        assert counts["test"]["affected"] == sizes["test"][k]
        test = scenario.load("test")
        held_test += test.id[test.affected].tolist()
    # The clusters partition the test rows: each is held out by exactly one scenario.
    assert sorted(held_test) == sorted(ref.ids[ref.index["test"]].tolist())
    with pytest.raises(MlvarError, match=r"cannot prepare --cluster 14, --cluster 20 of the"):
        registry.prepare_sweep(compas_root, "compas", mode="holdout", cluster="1,14,20")
