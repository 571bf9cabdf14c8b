"""The original study's analysis conventions beside mlvar's defaults: the
``std_pre_labels`` metric, ``--ranks study`` (0-based argsort positions), the prefix
design of the runs curve and detection on every split with affected samples (the study
table's ``--split all``). Expected values are worked out by hand or with plain numpy and
scikit-learn, never with mlvar's own code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner, Result

from mlvar.analysis import service
from mlvar.analysis.curve import prefix_sizes, runs_curve
from mlvar.analysis.detection import detect, detection_scores, study_positions
from mlvar.analysis.shards import merge_shards, write_shard
from mlvar.analysis.study import study
from mlvar.analysis.synthetic import synthetic_store
from mlvar.cli import app
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore

runner = CliRunner()


@pytest.fixture
def root(no_mlvar_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder, holding the runs, data and reports roots."""
    for var in ("RUNS", "DATA", "REPORTS"):
        monkeypatch.setenv(f"MLVAR_{var}_ROOT", str(no_mlvar_env / var.lower()))
    return no_mlvar_env


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def one_line_error(out: Result, *words: str) -> None:
    assert out.exit_code == 2, (out.exit_code, out.stdout, out.stderr)
    assert out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "(hint: " in line, line
    for word in words:
        assert word in line, (word, line)


def np_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def study_summary(values: np.ndarray, holdout: np.ndarray, higher_first: bool) -> list[float]:
    """The study's rank summary written out from its description: sort the values with
    numpy (stable, so ties are deterministic), reverse the order when high comes first,
    the 0-based positions of the held-out samples: first, median, mean of the first 10,
    mean, then each divided by the population."""
    order = np.argsort(values, kind="stable")
    if higher_first:
        order = np.flipud(order)
    positions = [i for i, sample in enumerate(order) if holdout[sample]]
    summary = [positions[0], np.median(positions), np.mean(positions[:10]), np.mean(positions)]
    return [float(v) for v in summary] + [float(v) / len(values) for v in summary]


RANK_KEYS = (
    "rank_first",
    "rank_median",
    "rank_top10_mean",
    "rank_mean",
    "rank_first_norm",
    "rank_median_norm",
    "rank_top10_mean_norm",
    "rank_mean_norm",
)


# ---------------------------------------------------------------- std_pre_labels


def test_std_pre_labels_by_hand_with_ties_of_votes() -> None:
    # 4 runs x 3 samples x 4 classes, each run's prediction put at a chosen class
    preds = np.array([[0, 3, 1], [0, 1, 1], [2, 3, 1], [2, 1, 1]])
    probs = np.full((4, 3, 4), 0.1)
    for r in range(4):
        for i in range(3):
            probs[r, i, preds[r, i]] = 0.7
    from mlvar.analysis.metrics import METRICS

    got = METRICS["std_pre_labels"].compute(probs, np.array([0, 1, 2]))
    # s0: labels 0,0,2,2 -> mean 1, every deviation 1 -> 1; s1: 3,1,3,1 -> mean 2 -> 1;
    # s2: always 1 -> 0
    np.testing.assert_allclose(got, [1.0, 1.0, 0.0], rtol=0, atol=1e-15)
    # the argmax of a tie is the first class: run 0 ties classes 1 and 2 -> 1
    tied = probs.copy()
    tied[0, 2] = [0.1, 0.4, 0.4, 0.1]
    tied[1, 2] = [0.1, 0.1, 0.4, 0.4]  # -> 2
    got = METRICS["std_pre_labels"].compute(tied, np.array([0, 1, 2]))
    # s2 now 1, 2, 1, 1 -> mean 1.25; sqrt((3 * .0625 + .5625) / 4) = sqrt(.1875)
    assert got[2] == pytest.approx(np.sqrt(0.1875), abs=1e-15)
    # equal spreads are equal to the bit, whatever the run order or the shift of labels:
    # 0,0,1 / 1,0,0 / 1,1,2 / 3,4,3 all have std sqrt(2/9)
    spread = np.array([[0, 1, 1, 3], [0, 0, 1, 4], [1, 0, 2, 3]])
    probs = np.full((3, 4, 5), 0.1)
    for r in range(3):
        probs[r, np.arange(4), spread[r]] = 0.6
    got = METRICS["std_pre_labels"].compute(probs, np.zeros(4, dtype=np.int64))
    assert len(set(got.tolist())) == 1 and got[0] == pytest.approx(np.sqrt(2 / 9), abs=1e-15)


def test_std_pre_labels_is_listed_and_ranks(root: Path) -> None:
    out = invoke("analyze", "metrics", "--json")
    listed = {m["name"]: m for m in json.loads(out.stdout)}
    assert listed["std_pre_labels"]["uses_label"] == "no"
    assert listed["std_pre_labels"]["suspicious_when"] == "high"
    assert "std_pre_labels" in invoke("analyze", "metrics").stdout
    store = synthetic_store(root / "runs", name="exp", n_runs=6, n_samples=80, n_classes=4)
    out = invoke("analyze", "rank", "exp", "--by", "std_pre_labels", "--json")
    assert out.exit_code == 0, out.stderr
    ranking = pd.DataFrame(json.loads(out.stdout)["ranking"])
    logits = np.stack([r.load_logits("test", mmap=False) for r in store.runs()])
    expected = np_softmax(logits).argmax(axis=2).std(axis=0)  # the study's np.std
    by_id = dict(zip(store.samples("test")["sample_id"], expected, strict=True))
    got = ranking.set_index("sample_id")["std_pre_labels"]
    np.testing.assert_allclose(got.to_numpy(), [by_id[i] for i in got.index], atol=1e-12)
    assert (np.diff(ranking["std_pre_labels"].to_numpy()) <= 0).all()  # high first


def test_std_pre_labels_sharded_equals_unsharded(root: Path) -> None:
    synthetic_store(root / "runs", name="exp", n_runs=7, n_samples=97, n_classes=5)
    whole = invoke("analyze", "rank", "exp", "--by", "std_pre_labels", "--json")
    for i in (1, 2, 3):
        for j in (1, 2):
            out = invoke("analyze", "rank", "exp", "--shard", f"{i}/3", "--run-shard", f"{j}/2")
            assert out.exit_code == 0, out.stderr
    merged = invoke("analyze", "rank", "exp", "--merge", "--by", "std_pre_labels", "--json")
    assert merged.exit_code == 0, merged.stderr
    a, b = json.loads(whole.stdout), json.loads(merged.stdout)
    # vote counts add exactly over run shards, so the metric and its order are exact
    assert [r["sample_id"] for r in a["ranking"]] == [r["sample_id"] for r in b["ranking"]]
    assert [r["std_pre_labels"] for r in a["ranking"]] == [
        r["std_pre_labels"] for r in b["ranking"]
    ]
    det_a = {r["metric"]: r for r in a["detection"]}["std_pre_labels"]
    det_b = {r["metric"]: r for r in b["detection"]}["std_pre_labels"]
    assert det_a == det_b


# ---------------------------------------------------------------- --ranks study


def test_study_positions_by_hand_with_ties() -> None:
    values = np.array([0.5, 0.2, 0.5, 0.9, 0.2])
    # high first: ascending 0.2(1) 0.2(4) 0.5(0) 0.5(2) 0.9(3), reversed 3 2 0 4 1
    np.testing.assert_array_equal(study_positions(values, True), [2, 4, 1, 0, 3])
    # low first (the score is the negated value): ascending values -0.9(3) -0.5(0)
    # -0.5(2) -0.2(1) -0.2(4)
    np.testing.assert_array_equal(study_positions(values, False), [1, 3, 2, 0, 4])


def test_detection_scores_study_ranks_by_hand() -> None:
    score = np.array([0.9, 0.8, 0.8, 0.8, 0.3, 0.3])
    affected = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    mid = detection_scores(score, affected)
    high = detection_scores(score, affected, "study", higher_is_suspicious=True)
    # ascending 0.3(4) 0.3(5) 0.8(1) 0.8(2) 0.8(3) 0.9(0), reversed: 0 3 2 1 5 4; the
    # affected 0, 2, 4 sit at positions 0, 2, 5
    assert [high[k] for k in RANK_KEYS] == pytest.approx(
        [0, 2, 7 / 3, 7 / 3, 0, 2 / 6, 7 / 18, 7 / 18]
    )
    # low is suspicious: the value -score ascending keeps sample order among the ties:
    # positions 0..5, the affected at 0, 2, 4
    low = detection_scores(score, affected, "study", higher_is_suspicious=False)
    assert [low[k] for k in RANK_KEYS] == pytest.approx([0, 2, 2, 2, 0, 2 / 6, 2 / 6, 2 / 6])
    for d in (high, low):  # the convention changes the rank summaries only
        for k in ("n", "n_affected", "auroc", "average_precision", "precision_at_k"):
            assert d[k] == mid[k]
    with pytest.raises(MlvarError, match="unknown rank convention 'nosuch'"):
        detection_scores(score, affected, "nosuch")


def test_detect_study_ranks_against_the_study_procedure() -> None:
    rng = np.random.default_rng(5)
    n = 40
    labels = rng.integers(0, 3, n)
    affected = (labels == 1) & (rng.random(n) < 0.5)
    # rounded, so that many values tie
    frame = pd.DataFrame(
        {
            "gconf_mean": np.round(rng.random(n), 1),  # label-aware, low is suspicious
            "maxconf_std": np.round(rng.random(n), 1),  # label-free, high is suspicious
            "std_pre_labels": np.round(rng.random(n) * 2, 0) / 2,
        }
    )
    got = detect(frame, labels, affected, ranks="study").set_index("metric")
    assert (got["ranks"] == "study").all()
    in_class = labels == 1
    expected = {
        "gconf_mean": study_summary(
            frame["gconf_mean"].to_numpy()[in_class], affected[in_class], False
        ),
        "maxconf_std": study_summary(frame["maxconf_std"].to_numpy(), affected, True),
        "std_pre_labels": study_summary(frame["std_pre_labels"].to_numpy(), affected, True),
    }
    for metric, summary in expected.items():
        assert [got.loc[metric, k] for k in RANK_KEYS] == pytest.approx(summary), metric
    assert got.loc["gconf_mean", "scope"] == "class 1"
    mid = detect(frame, labels, affected)
    assert "ranks" not in mid.columns  # the default's table is as it was
    pd.testing.assert_series_equal(mid["auroc"], got["auroc"].reset_index(drop=True))


def test_rank_study_writes_and_records_the_convention(root: Path) -> None:
    store = synthetic_store(root / "runs", name="exp", n_runs=5, n_samples=60, n_classes=3)
    out = invoke("analyze", "rank", "exp")
    assert out.exit_code == 0, out.stderr
    analysis = store.root / "analysis"
    default_info = json.loads((analysis / "rank-test.json").read_text())
    default_det = pd.read_parquet(analysis / "detection-test.parquet")
    assert "ranks" not in default_info and "ranks" not in default_det.columns
    out = invoke("analyze", "rank", "exp", "--ranks", "study")
    assert out.exit_code == 0, out.stderr
    assert "0-based positions" in out.stdout
    info = json.loads((analysis / "rank-test.json").read_text())
    det = pd.read_parquet(analysis / "detection-test.parquet").set_index("metric")
    base = pd.read_parquet(analysis / "baselines-test.parquet")
    assert info["ranks"] == "study" and (det["ranks"] == "study").all()
    assert (base["ranks"] == "study").all()
    # against the study's procedure on numpy's own metric values
    samples = store.samples("test")
    labels, affected = samples["label"].to_numpy(), samples["affected"].to_numpy()
    probs = np_softmax(np.stack([r.load_logits("test", mmap=False) for r in store.runs()]))
    maxconf_std = probs.max(axis=2).std(axis=0)
    assert [det.loc["maxconf_std", k] for k in RANK_KEYS] == pytest.approx(
        study_summary(maxconf_std, affected, True)
    )
    gconf = probs[:, np.arange(len(labels)), labels]
    mask = labels == 0
    assert [det.loc["gconf_mean", k] for k in RANK_KEYS] == pytest.approx(
        study_summary(gconf.mean(axis=0)[mask], affected[mask], False)
    )
    # single-model baselines: each run's g_conf ranked ascending, min/median/max over runs
    per_run = np.array([study_summary(g[mask], affected[mask], False) for g in gconf])
    rows = base[base["baseline"] == "neg_gconf"].set_index("stat")
    for stat, fn in (("min", np.min), ("median", np.median), ("max", np.max)):
        assert [rows.loc[stat, k] for k in RANK_KEYS] == pytest.approx(fn(per_run, axis=0))
    # the scores are the default's
    for k in ("auroc", "average_precision", "precision_at_k"):
        np.testing.assert_array_equal(det[k].to_numpy(), default_det[k].to_numpy())


def test_unknown_ranks_is_one_line(root: Path, tree_listing) -> None:
    synthetic_store(root / "runs", name="exp", n_runs=2, n_samples=20)
    before = tree_listing(root)
    one_line_error(invoke("analyze", "rank", "exp", "--ranks", "mean"), "rank convention 'mean'")
    assert tree_listing(root) == before


def test_merge_refuses_shards_of_the_other_convention(root: Path, tree_listing) -> None:
    store = synthetic_store(root / "runs", name="exp", n_runs=4, n_samples=50)
    for i in (1, 2):
        assert invoke("analyze", "rank", "exp", "--shard", f"{i}/2").exit_code == 0
    before = tree_listing(root)
    out = invoke("analyze", "rank", "exp", "--merge", "--ranks", "study")
    one_line_error(out, "made under --ranks mid", "--ranks study")
    assert tree_listing(root) == before  # nothing written
    assert not (store.root / "analysis" / "rank-test.json").exists()
    # shards made under study merge under study by default, equal to the unsharded rank
    for i in (1, 2):
        out = invoke("analyze", "rank", "exp", "--shard", f"{i}/2", "--ranks", "study")
        assert out.exit_code == 0, out.stderr
    before = tree_listing(root)
    one_line_error(invoke("analyze", "rank", "exp", "--merge", "--ranks", "mid"), "--ranks study")
    assert tree_listing(root) == before
    merged = merge_shards(store, "test")
    assert merged.ranks == "study"
    whole = service.rank(store, "test", write=False, ranks="study")
    pd.testing.assert_frame_equal(merged.detection, whole.detection, check_exact=True)
    pd.testing.assert_frame_equal(merged.baselines, whole.baselines, check_exact=True)
    info = json.loads((store.root / "analysis" / "rank-test.json").read_text())
    assert info["ranks"] == "study"
    # shards of both conventions are refused; shards that record none (a backend's
    # jobs) merge under either
    write_shard(store, "test", (1, 2), ranks="mid")
    with pytest.raises(MlvarError, match="different rank conventions"):
        merge_shards(store, "test")
    for i in (1, 2):
        write_shard(store, "test", (i, 2))
    assert merge_shards(store, "test", write=False).ranks == "mid"
    assert merge_shards(store, "test", write=False, ranks="study").ranks == "study"


# ---------------------------------------------------------------- the study table


def _three_splits(root: Path, name: str, affected_in: tuple[str, ...], seed: int = 0) -> None:
    """An experiment with train, val and test splits; samples of class 0 are affected in
    the splits ``affected_in``."""
    rng = np.random.default_rng(seed)
    sizes = {"train": 60, "val": 30, "test": 40}
    samples, base = {}, {}
    for split, n in sizes.items():
        labels = rng.integers(0, 3, n)
        affected = (labels == 0) & (rng.random(n) < 0.5) & (split in affected_in)
        samples[split] = {
            "sample_id": np.arange(n),
            "label": labels,
            "affected": affected,
            "group": np.full(n, -1),
        }
        logits = rng.normal(scale=0.5, size=(n, 3))
        logits[np.arange(n), labels] += 2.0
        logits[affected, 0] -= 2.0
        base[split] = logits
    meta = {
        "name": name,
        "dataset": "synthetic",
        "class_names": ["c0", "c1", "c2"],
        "scenario": {"name": "s", "mode": "synthetic", "params": {}, "description": "x"},
        "model": "none",
        "train": {},
    }
    store = ExperimentStore.create(root, name, meta, samples)
    for r in range(3):
        noisy = {s: (x + rng.normal(size=x.shape)).astype(np.float32) for s, x in base.items()}
        store.write_run(f"run-{r:04d}", noisy, {"seed": r, "config": {"synthetic": True}})


def test_study_table_over_every_split_with_affected_samples(root: Path, tree_listing) -> None:
    runs = root / "runs"
    _three_splits(runs, "a", ("train", "val", "test"))
    _three_splits(runs, "b", ("train", "test"), seed=1)  # val: nothing affected
    _three_splits(runs, "clean", (), seed=2)
    result = study(runs, "all", compute_missing=True)
    table = result.table
    got = {(e, s) for e, s in zip(table["experiment"], table["split"], strict=True)}
    assert got == {("a", "train"), ("a", "val"), ("a", "test"), ("b", "train"), ("b", "test")}
    assert result.skipped == {"clean": "no affected samples"}
    assert sorted(result.computed) == sorted(f"{e} ({s})" for e, s in got)
    # each split's rows are its own detection table
    store = ExperimentStore.open(runs, "a")
    for split in ("train", "val"):
        det = service.rank(store, split, write=False).detection.set_index("metric")
        rows = table[(table["experiment"] == "a") & (table["split"] == split)]
        rows = rows[rows["kind"] == "metric"].set_index("metric")
        assert rows["auroc"].to_dict() == pytest.approx(det["auroc"].to_dict())
    per = result.per_experiment()
    assert list(zip(per["experiment"], per["split"], strict=True)) == list(
        dict.fromkeys(zip(table["experiment"], table["split"], strict=True))
    )
    assert "ranks" not in table.columns
    # the CLI: --split all for the study table only
    out = invoke("analyze", "rank", "--merge", "--split", "all")
    assert out.exit_code == 0, out.stderr
    assert "a [val]" in out.stdout and "b [train]" in out.stdout
    assert set(pd.read_csv(runs / "study.csv")["split"]) == {"train", "val", "test"}
    before = tree_listing(root)
    one_line_error(invoke("analyze", "rank", "a", "--split", "all"), "--split all")
    assert tree_listing(root) == before


def test_study_table_keeps_one_rank_convention(root: Path, tree_listing) -> None:
    runs = root / "runs"
    for name in ("e1", "e2"):
        synthetic_store(runs, name=name, n_runs=3, n_samples=50)
        assert invoke("analyze", "rank", name).exit_code == 0
    before = tree_listing(root)
    out = invoke("analyze", "rank", "--merge", "--ranks", "study")
    one_line_error(out, "under --ranks study")  # every experiment skipped: nothing written
    assert tree_listing(root) == before
    assert invoke("analyze", "rank", "e2", "--ranks", "study").exit_code == 0
    result = study(runs, ranks="study", write=False)
    assert set(result.table["experiment"]) == {"e2"}
    assert "made under --ranks mid" in result.skipped["e1"]
    assert "mlvar analyze rank e1 --ranks study" in result.skipped["e1"]
    result = study(runs, ranks="study", compute_missing=True)
    assert result.computed == ["e1"] and (result.table["ranks"] == "study").all()
    assert set(result.table["experiment"]) == {"e1", "e2"}
    store = ExperimentStore.open(runs, "e1")
    det = service.rank(store, "test", write=False, ranks="study").detection.set_index("metric")
    rows = result.table[(result.table["experiment"] == "e1") & (result.table["kind"] == "metric")]
    rows = rows.set_index("metric")
    assert rows["rank_median_norm"].to_dict() == pytest.approx(det["rank_median_norm"].to_dict())
    # now stored under study: the default table skips them in turn
    with pytest.raises(MlvarError, match="no experiment .* on split 'test'"):
        study(runs, write=False)
    assert invoke("analyze", "rank", "e1").exit_code == 0
    assert "made under --ranks study" in study(runs, write=False).skipped["e2"]


# ---------------------------------------------------------------- the prefix curve


def test_prefix_sizes() -> None:
    assert prefix_sizes(100, 10) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert prefix_sizes(25, 10) == [10, 20, 25]
    assert prefix_sizes(30, 10) == [10, 20, 30]
    assert prefix_sizes(5, 10) == [5]
    assert prefix_sizes(3, 1) == [1, 2, 3]


def test_prefix_curve_equals_numpy_on_the_first_runs(root: Path) -> None:
    store = synthetic_store(root / "runs", name="exp", n_runs=5, n_samples=90, n_classes=4)
    result = runs_curve(store, "test", design="prefix", step=2, chunk=17)
    assert result.design == "prefix" and result.step == 2 and result.sizes == [2, 4, 5]
    summary, details = result.summary, result.details
    assert (summary["design"] == "prefix").all() and (details["design"] == "prefix").all()
    assert set(summary["n_subsets"]) == {1}
    assert set(details["run_ids"]) == {
        "run-0000 run-0001",
        "run-0000 run-0001 run-0002 run-0003",
        "run-0000 run-0001 run-0002 run-0003 run-0004",
    }
    samples = store.samples("test")
    labels, affected = samples["label"].to_numpy(), samples["affected"].to_numpy()
    logits = np.stack([r.load_logits("test", mmap=False) for r in store.runs()])
    mask = labels == 0
    for size in (2, 4, 5):
        probs = np_softmax(logits[:size])  # the first runs, in run order
        gconf = probs[:, np.arange(len(labels)), labels].mean(axis=0)
        expected = {
            "maxconf_std": roc_auc_score(affected, probs.max(axis=2).std(axis=0)),
            # rounded: np.std over runs may differ in the last bit for equal spreads
            "std_pre_labels": roc_auc_score(
                affected, np.round(probs.argmax(axis=2).std(axis=0), 12)
            ),
            "gconf_mean": roc_auc_score(affected[mask], -gconf[mask]),
        }
        got = summary[summary["n_runs"] == size].set_index("metric")
        for metric, auroc in expected.items():
            assert got.loc[metric, "auroc_mean"] == pytest.approx(auroc, abs=1e-12), metric
            assert np.isnan(got.loc[metric, "auroc_std"])
    files = [Path(f).name for f in result.files]
    assert "auroc-vs-runs-test.parquet" in files
    on_disk = pd.read_parquet(store.root / "analysis" / "auroc-vs-runs-test.parquet")
    assert (on_disk["design"] == "prefix").all()
    assert result.to_dict()["design"] == "prefix"
    # the default design is as it was: no design column, random subsets of 1, 2, 4, ...
    default = runs_curve(store, "test", subsets=2, write=False)
    assert "design" not in default.summary.columns and default.sizes == [1, 2, 4, 5]
    assert "design" not in default.to_dict()
    # the report's plot reads either summary
    from mlvar.report import plots

    assert plots.auroc_vs_runs(summary, "gconf_mean")[:4] == b"\x89PNG"


def test_prefix_curve_cli_and_bad_input(root: Path, tree_listing) -> None:
    synthetic_store(root / "runs", name="exp", n_runs=4, n_samples=40)
    out = invoke("analyze", "curve", "exp", "--design", "prefix", "--step", "2")
    assert out.exit_code == 0, out.stderr
    assert "nested prefixes" in out.stdout and "2 runs" in out.stdout
    out = invoke("analyze", "curve", "exp", "--design", "prefix", "--json")
    data = json.loads(out.stdout)
    assert data["step"] == 10 and {r["n_runs"] for r in data["summary"]} == {4}
    before = tree_listing(root)
    one_line_error(invoke("analyze", "curve", "exp", "--design", "nested"), "design 'nested'")
    one_line_error(invoke("analyze", "curve", "exp", "--step", "3"), "--step applies only")
    one_line_error(
        invoke("analyze", "curve", "exp", "--design", "prefix", "--step", "0"), "--step must"
    )
    assert tree_listing(root) == before
