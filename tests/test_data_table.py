"""Your own table: fetch by name, the split, the encoding and every mode, checked against
independent computations on scikit-learn's breast cancer and wine tables written to CSV.

Group columns added to the tables (documented rules):

- breast cancer: ``size_group`` = ``small`` when ``mean radius`` <= 12, ``medium`` when
  <= 16, else ``large``; the held-out subgroup is ``size_group == "large"``.
- wine: ``note`` = ``"a"`` for even rows, ``"b"`` for odd ones, missing every 10th row;
  ``alcohol`` is missing every 7th row (imputation is checked).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.tree import DecisionTreeClassifier

from mlvar.analysis import service as analysis
from mlvar.analysis.metrics import softmax
from mlvar.config import Config, PathsConfig
from mlvar.data import registry, table
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore
from mlvar.train.study import train_study
from test_cli_errors import Listing, fails_cleanly, invoke, use_root

WHERE = 'size_group == "large"'


def _bc_frame() -> pd.DataFrame:
    frame = load_breast_cancer(as_frame=True).frame
    radius = frame["mean radius"]
    frame["size_group"] = np.where(radius <= 12, "small", np.where(radius <= 16, "medium", "large"))
    return frame


def _wine_frame() -> pd.DataFrame:
    frame = load_wine(as_frame=True).frame
    rows = np.arange(len(frame))
    frame["note"] = np.where(rows % 2 == 0, "a", "b").astype(object)
    frame.loc[rows % 10 == 0, "note"] = None
    frame.loc[rows % 7 == 0, "alcohol"] = np.nan
    return frame


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tables")
    _bc_frame().to_csv(folder / "bc.csv", index=False)
    _wine_frame().to_csv(folder / "wine.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def root(tables: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("table-root") / "data"
    registry.fetch(root, "table", source=tables / "bc.csv", name="bc", label="target")
    registry.fetch(root, "table", source=tables / "wine.csv", name="wine", label="target")
    return root


def _split(y: np.ndarray) -> dict[str, np.ndarray]:
    rest, test = train_test_split(np.arange(len(y)), test_size=0.165, random_state=69, stratify=y)
    train, val = train_test_split(rest, test_size=0.125, random_state=69, stratify=y[rest])
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------- fetching


def test_fetch_records_the_source_and_refetching_is_a_no_op(root: Path, tables: Path) -> None:
    info = json.loads((root / "user" / "bc" / "source.json").read_text())
    raw = (tables / "bc.csv").read_bytes()
    assert info["sha256"] == hashlib.sha256(raw).hexdigest()
    assert (info["kind"], info["name"], info["file"], info["format"]) == (
        "table",
        "bc",
        "bc.csv",
        "csv",
    )
    assert info["rows"] == 569 and info["classes"] == ["0", "1"]
    assert info["categorical"] == ["size_group"]
    assert {c["name"]: c["dtype"] for c in info["columns"]}["size_group"] == "string"
    stamp = (root / "user" / "bc" / "source.json").stat().st_mtime_ns
    again = registry.fetch(root, "table", source=tables / "bc.csv", name="bc", label="target")
    assert again["action"] == "unchanged"
    assert (root / "user" / "bc" / "source.json").stat().st_mtime_ns == stamp
    assert registry.get_dataset("bc", root).name == "bc"
    with pytest.raises(MlvarError, match="already fetched"):
        registry.fetch(root, "table", source=tables / "wine.csv", name="bc", label="target")


def test_force_replaces_and_names_are_checked(tables: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    registry.fetch(root, "table", source=tables / "bc.csv", name="t", label="target")
    done = registry.fetch(
        root, "table", source=tables / "wine.csv", name="t", label="target", force=True
    )
    assert done["action"] == "replaced" and done["rows"] == 178
    for bad in ("compas", "table", "Bad-Name", "9x"):
        with pytest.raises(MlvarError, match="--name"):
            registry.fetch(root, "table", source=tables / "bc.csv", name=bad, label="target")
    with pytest.raises(MlvarError, match="takes no --label"):
        registry.fetch(root, "compas", label="target")


# --------------------------------------------------------------------------- split, encoding


@pytest.fixture(scope="module")
def wine_original(root: Path):
    """``wine-original``, prepared once for the tests of this module that read it (each
    xdist worker has its own module fixtures, so no test relies on another's output)."""
    return registry.prepare(root, "wine", mode="original")


def test_split_is_stratified_and_seeded(wine_original) -> None:
    scenario = wine_original
    y = load_wine().target
    index = _split(y)
    for split, pos in index.items():
        data = scenario.load(split)
        np.testing.assert_array_equal(data.id, pos)  # ids are row numbers, in split order
        np.testing.assert_array_equal(data.y, y[pos])
        assert not data.affected.any()
    # stratified: each class's test share within one row of 16.5%
    counts = np.bincount(y)
    test_counts = np.bincount(y[index["test"]], minlength=3)
    assert np.all(np.abs(test_counts - 0.165 * counts) <= 1)
    assert scenario.class_names == ["0", "1", "2"]


def test_encoding_imputation_and_standardisation(wine_original) -> None:
    scenario = wine_original
    frame = _wine_frame()
    train = _split(frame["target"].to_numpy())["train"]
    features = [c for c in frame.columns if c != "target"]
    expected = []
    names = []
    for name in features:
        if name == "note":
            values = frame["note"].fillna("<missing>").astype(str)
            for category in sorted(values.unique()):  # "<missing>" sorts before "a"
                expected.append((values == category).to_numpy(np.float64))
                names.append(f"note={category}")
            continue
        values = frame[name].to_numpy(np.float64)
        values = np.where(np.isnan(values), np.nanmedian(values[train]), values)
        std = values[train].std()
        expected.append((values - values[train].mean()) / std)
        names.append(name)
    x = np.stack(expected, axis=1).astype(np.float32)
    assert scenario.manifest["feature_names"] == names
    assert names[-3:] == ["note=<missing>", "note=a", "note=b"]
    assert scenario.manifest["missing"]["imputed"]["alcohol"]["missing"] == 26
    for split in ("train", "val", "test"):
        data = scenario.load(split)
        np.testing.assert_allclose(data.x, x[data.id], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- modes


def test_holdout_removes_the_first_ratio_of_the_subgroup(root: Path) -> None:
    frame = _bc_frame()
    mask = (frame["size_group"] == "large").to_numpy()
    index = _split(frame["target"].to_numpy())
    result = registry.prepare_sweep(root, "bc", mode="holdout", where=WHERE, ratio="0.5,1")
    assert [s.name for s in result.scenarios] == [
        f"bc-holdout-w{table.where_tag(WHERE)}-r0.5",
        f"bc-holdout-w{table.where_tag(WHERE)}-r1.0",
    ]
    for ratio, scenario in zip((0.5, 1.0), result.scenarios, strict=True):
        for split in ("train", "val"):
            pos = index[split]
            members = pos[mask[pos]]
            removed = members[: int(np.floor(ratio * len(members)))]
            kept = pos[~np.isin(pos, removed)]
            data = scenario.load(split)
            np.testing.assert_array_equal(data.id, kept)
            np.testing.assert_array_equal(data.affected, mask[kept])
            np.testing.assert_array_equal(data.group, mask[kept].astype(np.int64))
        test = scenario.load("test")
        np.testing.assert_array_equal(test.id, index["test"])
        assert set(test.id[test.affected]) == set(index["test"][mask[index["test"]]])
        full_val = scenario.load("full_val")
        np.testing.assert_array_equal(full_val.id, index["val"])
        np.testing.assert_array_equal(full_val.affected, mask[index["val"]])
    assert mask[index["train"]].sum() > 0
    assert not result.scenarios[1].load("train").affected.any()


def test_label_noise_where_flips_the_documented_draw_of_matching_training_rows(
    root: Path,
) -> None:
    # The rule of docs/datasets.md "Label noise", recomputed here: floor(a * n) of the n
    # training rows the query matches, chosen by default_rng(seed).permutation, each
    # moved uniformly to another class by the same generator; val and test untouched.
    frame = _bc_frame()
    y = frame["target"].to_numpy()
    index = _split(y)
    (scenario,) = registry.prepare_sweep(
        root, "bc", mode="label-noise", where=WHERE, ratio="0.3"
    ).scenarios
    train_pos = index["train"]
    eligible = np.flatnonzero((frame["size_group"].to_numpy() == "large")[train_pos])
    rng = np.random.default_rng(0)
    k = int(np.floor(0.3 * len(eligible)))
    chosen = np.sort(eligible[rng.permutation(len(eligible))[:k]])
    new = (y[train_pos][chosen] + rng.integers(1, 2, size=k)) % 2
    train = scenario.load("train")
    np.testing.assert_array_equal(train.id, train_pos)
    expected = y[train_pos].copy()
    expected[chosen] = new
    np.testing.assert_array_equal(train.y, expected)
    np.testing.assert_array_equal(np.flatnonzero(train.affected), chosen)
    for split in ("val", "test"):
        data = scenario.load(split)
        np.testing.assert_array_equal(data.y, y[index[split]])
        assert not data.affected.any()
    assert k > 0 and scenario.manifest["detect_split"] == "train"


def test_artificial_feature_as_compas(root: Path) -> None:
    scenario = registry.prepare(root, "bc", mode="artificial", ratio=0.2, seed=3)
    rng = np.random.default_rng(3)
    for split, p in (("train", 0.2), ("val", 0.2), ("test", 0.5)):
        data = scenario.load(split)
        flips = rng.random(len(data.y)) < p
        feature = np.where(flips, 1 - data.y, data.y)
        np.testing.assert_array_equal(data.x[:, -1], feature)
        np.testing.assert_array_equal(data.affected, feature != data.y)
    with pytest.raises(MlvarError, match="binary label"):
        registry.prepare(root, "wine", mode="artificial", ratio=0.2)


def test_cluster_mode_is_compas_holdout_on_the_table(root: Path) -> None:
    frame = _bc_frame()
    y = frame["target"].to_numpy()
    index = _split(y)
    x = frame[[c for c in frame.columns if c not in ("target", "size_group")]].to_numpy()
    onehot = pd.get_dummies(frame["size_group"]).to_numpy(np.float64)  # sorted categories
    x = np.concatenate([x, onehot], axis=1).astype(np.float32)
    min_leaf = round(569 * 300 / 6172)
    leaves = DecisionTreeClassifier(random_state=0, min_samples_leaf=min_leaf).fit(x, y).apply(x)
    leaf_ids = np.unique(leaves)
    train_counts = np.array([(leaves[index["train"]] == leaf).sum() for leaf in leaf_ids])
    ordered = leaf_ids[np.lexsort((leaf_ids, train_counts))]
    result = registry.prepare_sweep(root, "bc", mode="cluster", cluster="all")
    assert len(result.scenarios) == len(ordered)
    for k in (0, len(ordered) - 1):
        scenario = result.scenarios[k]
        assert scenario.name == f"bc-cluster-cluster{k}"
        in_k = leaves == ordered[k]
        train = scenario.load("train")
        np.testing.assert_array_equal(train.id, index["train"][~in_k[index["train"]]])
        for split in ("val", "test"):
            data = scenario.load(split)
            np.testing.assert_array_equal(data.id, index[split])
            np.testing.assert_array_equal(data.affected, in_k[index[split]])
        clusters = scenario.manifest["clusters"]
        assert clusters["tree"]["min_samples_leaf"] == min_leaf
        assert clusters["removed_train_rows"] == int(in_k[index["train"]].sum())


def test_preparing_twice_is_byte_identical(root: Path) -> None:
    def files(name: str) -> dict[str, bytes]:
        folder = root / name
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    def prepare() -> str:
        given = {"where": WHERE, "ratio": "0.5"}
        return registry.prepare_sweep(root, "bc", "holdout", force=True, **given).prepared[0]

    name = prepare()
    before = files(name)
    assert prepare() == name and files(name) == before


def test_families_list_user_datasets(root: Path) -> None:
    from mlvar.data.families import scenario_families

    # sweeps of two skip the members already prepared by the tests above
    registry.prepare_sweep(root, "bc", "holdout", where=WHERE, ratio="0.5,1")
    registry.prepare_sweep(root, "bc", "artificial", ratio="0.2,0.3")
    if not (root / "wine-original").exists():
        registry.prepare(root, "wine")
    families = scenario_families(root)
    names = [f.name for f in families]
    # by dataset name, each dataset's modes in the order the table kind lists them
    assert names.index("bc holdout") < names.index("bc artificial") < names.index("wine original")
    holdout = families[names.index("bc holdout")]
    assert list(holdout.params) == ["where", "ratio"]
    assert holdout.params["where"] == [WHERE]


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def cli_root(tmp_path: Path, tables: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    use_root(tmp_path, monkeypatch)
    frame = _bc_frame()
    frame["patient"] = [f"p{i}" for i in range(len(frame))]
    frame.to_csv(tmp_path / "names.csv", index=False)
    rare = _wine_frame().iloc[:60].copy()
    rare.loc[0, "target"] = 7  # class 7 has one row: too few to stratify
    rare.to_csv(tmp_path / "rare.csv", index=False)
    (tmp_path / "bc.csv").write_bytes((tables / "bc.csv").read_bytes())
    return tmp_path


def test_bad_fetch_input_is_one_line_and_writes_nothing(
    cli_root: Path, tree_listing: Listing
) -> None:
    fetch = ("data", "fetch", "table", "--name", "t", "--source")
    fails_cleanly(cli_root, tree_listing, *fetch, "missing.csv", "--label", "target",
                  words=("missing.csv", "not found"))  # fmt: skip
    line = fails_cleanly(cli_root, tree_listing, *fetch, "bc.csv", "--label", "targt",
                         words=("targt", "did you mean 'target'"))  # fmt: skip
    assert "not in the table" in line
    fails_cleanly(cli_root, tree_listing, *fetch, "names.csv", "--label", "target",
                  words=("patient", "cannot be one-hot encoded", "--features"))  # fmt: skip
    fails_cleanly(cli_root, tree_listing, *fetch, "rare.csv", "--label", "target",
                  words=("class", "too few to stratify"))  # fmt: skip
    fails_cleanly(cli_root, tree_listing, *fetch, "bc.csv", words=("--label",))
    fails_cleanly(cli_root, tree_listing, "data", "fetch", "table", "--source", "bc.csv",
                  "--label", "target", "--name", "compas", words=("taken",))  # fmt: skip


def test_bad_where_is_one_line_and_writes_nothing(cli_root: Path, tree_listing: Listing) -> None:
    fetched = invoke("data", "fetch", "table", "--source", "bc.csv", "--name", "bc",
                     "--label", "target")  # fmt: skip
    assert fetched.exit_code == 0, fetched.output
    prepare = ("data", "prepare", "bc", "--mode", "holdout", "--where")
    fails_cleanly(cli_root, tree_listing, *prepare, "`mean radius` > 1000",
                  words=("selects no row",))  # fmt: skip
    fails_cleanly(cli_root, tree_listing, *prepare, "`mean radius` > 0",
                  words=("selects every row",))  # fmt: skip
    fails_cleanly(cli_root, tree_listing, *prepare, "size_group ==",
                  words=("does not parse",))  # fmt: skip
    fails_cleanly(cli_root, tree_listing, *prepare, "no_such_column > 1",
                  words=("does not parse",))  # fmt: skip
    fails_cleanly(cli_root, tree_listing, "data", "prepare", "table", words=("kind",))
    fails_cleanly(cli_root, tree_listing, "data", "prepare", "bcc", words=("did you mean 'bc'",))
    fails_cleanly(cli_root, tree_listing, "data", "prepare", "bc", "--mode", "cluster",
                  "--cluster", "99", words=("out of range",))  # fmt: skip


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cfg(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    runs = tmp_path_factory.mktemp("table-runs")
    return Config(paths=PathsConfig(root, runs / "runs", runs / "reports"))


def test_eight_seeds_rank_aurocs_match_the_stored_logits(cfg: Config) -> None:
    name = f"bc-holdout-w{table.where_tag(WHERE)}-r1.0"
    if not (cfg.paths.data_root / name).exists():
        registry.prepare_sweep(cfg.paths.data_root, "bc", "holdout", where=WHERE)
    done = train_study(cfg, "bc", scenario=name, runs=8)
    assert not done.failed
    store = ExperimentStore.open(cfg.paths.runs_root, next(iter(done.results)))
    result = analysis.rank(store, "test", write=False)
    samples = store.samples("test")
    logits = np.stack([run.load_logits("test") for run in store.runs()])
    assert logits.shape[0] == 8
    probs = softmax(logits.astype(np.float64))
    labels = samples["label"].to_numpy()
    gconf = probs[:, np.arange(len(labels)), labels]
    affected = samples["affected"].to_numpy()
    assert affected.sum() == 25
    detection = result.detection.set_index("metric")
    assert detection.loc["gconf_mean", "auroc"] == pytest.approx(
        roc_auc_score(affected, -gconf.mean(axis=0)), abs=1e-12
    )
    assert detection.loc["gconf_std", "auroc"] == pytest.approx(
        roc_auc_score(affected, gconf.std(axis=0)), abs=1e-12
    )


def test_a_worker_with_the_scenarios_only_trains_with_plain_defaults(tmp_path: Path) -> None:
    from mlvar.config import default_train

    # A backend uploads prepared scenarios, not user/<name>/: the job's spec carries the
    # training config, so a name known by its scenarios gets the plain defaults.
    (tmp_path / "bc-original").mkdir()
    (tmp_path / "bc-original" / "manifest.json").write_text('{"dataset": "bc"}')
    assert default_train("bc", tmp_path).model == "mlp"
    with pytest.raises(MlvarError, match="unknown dataset 'wine'"):
        default_train("wine", tmp_path)


def test_demo_on_a_table_file(cfg: Config, tables: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlvar.demo import demo_name, run_data_demo
    from mlvar.report import html

    # The report is the digits demo's (tests/test_pipeline.py builds one); its plots cost
    # seconds, so here it only records what it was asked for.
    asked = []

    def report(store, out, top, data_root):
        asked.append((store.name, out, top, data_root))
        return SimpleNamespace(path=out / "index.html")

    monkeypatch.setattr(html, "build_report", report)

    assert demo_name(Path("Breast Cancer.csv")) == "breast_cancer"
    assert demo_name(Path("compas.csv")) == "compas_data"
    assert demo_name(tables / "bc.csv") == "bc"
    steps: list[str] = []
    # bc.csv is recorded as "bc" already, with that subgroup prepared and 8 seeds trained
    # (the test above): the demo reuses them and analyses and reports.
    options = {"label": "target", "where": WHERE}
    result = run_data_demo(cfg, tables / "bc.csv", options, runs=8, step=steps.append)
    assert steps[0] == f"recording {tables / 'bc.csv'} as table 'bc'"
    assert result.scenario == f"bc-holdout-w{table.where_tag(WHERE)}-r1.0"
    assert result.experiment == f"{result.scenario}-mlp"
    assert asked == [
        (result.experiment, cfg.paths.reports_root / result.experiment, 20, cfg.paths.data_root)
    ]
    assert result.report == cfg.paths.reports_root / result.experiment / "index.html"
    assert result.accuracy.n_runs == 8
    assert result.ranking.detection is not None


def test_tsv_and_parquet_read_as_the_csv(root: Path, tables: Path, tmp_path: Path) -> None:
    frame = _wine_frame()
    frame.to_csv(tmp_path / "wine.tsv", sep="\t", index=False)
    frame.to_parquet(tmp_path / "wine.parquet", index=False)
    csv = json.loads((root / "user" / "wine" / "source.json").read_text())
    for fmt in ("tsv", "parquet"):
        info = registry.fetch(
            tmp_path / "data", "table", source=tmp_path / f"wine.{fmt}", name=f"w{fmt}",
            label="target",
        )  # fmt: skip
        recorded = json.loads(Path(info["path"], "source.json").read_text())
        assert recorded["format"] == fmt and recorded["rows"] == 178
        assert recorded["features"] == csv["features"]
        assert recorded["categorical"] == ["note"] and recorded["classes"] == csv["classes"]
    with pytest.raises(MlvarError, match="not a known table format"):
        (tmp_path / "wine.xlsx").write_bytes(b"x")
        registry.fetch(tmp_path / "data", "table", source=tmp_path / "wine.xlsx", name="x",
                       label="target")  # fmt: skip


def test_a_train_table_of_mlvar_toml_sets_a_user_dataset(root: Path, tmp_path: Path) -> None:
    from mlvar.config import load_config

    toml = tmp_path / "mlvar.toml"
    toml.write_text(f'[paths]\ndata_root = "{root}"\n[train.bc]\nepochs = 3\n')
    cfg = load_config(toml, env={})
    assert cfg.train_for("bc").epochs == 3 and cfg.train_for("bc").model == "mlp"
    assert cfg.train_for("wine").epochs == 10  # not in the file: the kind's defaults
    toml.write_text(f'[paths]\ndata_root = "{root}"\n[train.bcc]\nepochs = 3\n')
    with pytest.raises(MlvarError, match="bcc"):
        load_config(toml, env={})
