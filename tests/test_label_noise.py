"""label-noise (a mode of every dataset): the flipped rows and labels derived again here from
the documented draw, seeded and byte-identical twice, val and test clean, --where on a
table, bad input; and the acceptance experiment: digits with 10% of class 2's labels
flipped, trained with --record-dynamics, detected on the train split (AUROC checked
against scikit-learn on the stored logits), the report saying where the flaw is."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from mlvar.analysis import service as analysis
from mlvar.analysis.defaults import detect_split
from mlvar.cli import app
from mlvar.config import Config, PathsConfig
from mlvar.data import registry
from mlvar.data.scenario import open_scenario
from mlvar.report.html import detect_note
from mlvar.store import ExperimentStore
from mlvar.train.service import train

runner = CliRunner()
Listing = Callable[[Path], list[tuple[str, int]]]


def expected_flips(
    y: np.ndarray, ratio: float, seed: int, cls: int | None, to: int | None, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """docs/datasets.md, "Label noise", written again: the positions flipped, new labels."""
    eligible = np.arange(len(y)) if cls is None else np.flatnonzero(y == cls)
    if to is not None:
        eligible = eligible[y[eligible] != to]
    k = math.floor(ratio * len(eligible) + 1e-9)
    rng = np.random.default_rng(seed)
    chosen = np.sort(eligible[rng.permutation(len(eligible))[:k]])
    if to is not None:
        return chosen, np.full(k, to)
    return chosen, (y[chosen] + rng.integers(1, n_classes, size=k)) % n_classes


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("noise") / "data"


@pytest.fixture(scope="module")
def original(root: Path):
    scenario = registry.prepare(root, "digits")
    return {s: scenario.load(s) for s in scenario.splits}


@pytest.mark.parametrize(
    ("given", "name", "to"),
    [
        ({"cls": 2, "ratio": 0.1}, "digits-label-noise-cls2-r0.1", None),
        ({"cls": 2, "to": 5, "ratio": 0.1}, "digits-label-noise-cls2-to5-r0.1", 5),
        ({"to": 7, "ratio": 0.05, "seed": 3}, "digits-label-noise-to7-r0.05-s3", 7),
        ({"ratio": 0.1}, "digits-label-noise-r0.1", None),
    ],
)
def test_flipped_rows_and_labels_follow_the_documented_draw(
    root: Path, original: dict, given: dict, name: str, to: int | None
) -> None:
    result = registry.prepare_sweep(root, "digits", mode="label-noise", **given)
    (scenario,) = result.scenarios
    assert scenario.name == name
    clean = original["train"]
    chosen, new = expected_flips(
        clean.y, given["ratio"], given.get("seed", 0), given.get("cls"), to, 10
    )
    train_ = scenario.load("train")
    np.testing.assert_array_equal(train_.id, clean.id)  # rows kept, in split order
    np.testing.assert_array_equal(train_.x, clean.x)
    np.testing.assert_array_equal(np.flatnonzero(train_.affected), chosen)
    want_y = clean.y.copy()
    want_y[chosen] = new
    np.testing.assert_array_equal(train_.y, want_y)
    assert (train_.y[chosen] != clean.y[chosen]).all()  # always another class
    if given.get("cls") is not None:
        assert (clean.y[chosen] == given["cls"]).all()
        assert len(chosen) == math.floor(given["ratio"] * (clean.y == given["cls"]).sum())
    noise = scenario.manifest["label_noise"]
    assert noise["ids"] == clean.id[chosen].tolist() and noise["flipped"] == len(chosen)
    pairs: dict[str, int] = {}
    for a, b in zip(clean.y[chosen], new, strict=True):
        pairs[f"{a}->{b}"] = pairs.get(f"{a}->{b}", 0) + 1
    assert noise["counts"] == pairs
    assert scenario.manifest["detect_split"] == "train"
    for split in ("val", "test"):  # clean: the labels of the original, nothing affected
        data = scenario.load(split)
        np.testing.assert_array_equal(data.y, original[split].y)
        np.testing.assert_array_equal(data.id, original[split].id)
        assert not data.affected.any()


def test_seeded_and_byte_identical_twice(tmp_path: Path, tree_listing: Listing) -> None:
    def files(data_root: Path) -> dict[str, bytes]:
        scenario = registry.prepare_sweep(
            data_root, "digits", mode="label-noise", cls="2", ratio="0.1"
        ).scenarios[0]
        return {
            str(p.relative_to(data_root)): p.read_bytes()
            for p in sorted(data_root.rglob("*"))
            if p.is_file() and (p.is_relative_to(scenario.path) or "shared" in p.parts)
        }

    first, second = files(tmp_path / "a"), files(tmp_path / "b")
    assert first == second and any(k.endswith("train.npz") for k in first)
    other = registry.prepare_sweep(
        tmp_path / "c", "digits", mode="label-noise", cls="2", ratio="0.1", seed="1"
    ).scenarios[0]
    assert other.name == "digits-label-noise-cls2-r0.1-s1"
    assert (
        other.manifest["label_noise"]["ids"]
        != open_scenario(tmp_path / "a", "digits-label-noise-cls2-r0.1").manifest["label_noise"][
            "ids"
        ]
    )


def test_ratio_sweep_names_each_ratio(tmp_path: Path) -> None:
    result = registry.prepare_sweep(
        tmp_path, "digits", mode="label-noise", cls="2", ratio="0.1:0.2:0.05"
    )
    assert result.names == [f"digits-label-noise-cls2-r{r}" for r in ("0.1", "0.15", "0.2")]
    counts = [s.manifest["label_noise"]["flipped"] for s in result.scenarios]
    assert counts == [math.floor(r * 112 + 1e-9) for r in (0.1, 0.15, 0.2)]  # 112 of class 2


def test_compas_where_flips_rows_of_the_query(compas_root: Path) -> None:
    given = {"where": ["age < 25"], "ratio": 0.5}
    scenario = registry.prepare_sweep(compas_root, "compas", mode="label-noise", **given)
    (made,) = scenario.scenarios
    assert made.name.startswith("compas-label-noise-r0.5-where")
    clean = registry.prepare(compas_root, "compas").load("train")
    std = made.manifest["standardisation"]
    col = made.manifest["feature_names"].index("age")
    k = std["columns"].index("age")
    age = clean.x[:, col] * std["std"][k] + std["mean"][k]
    eligible = np.flatnonzero(np.round(age, 3) < 25)
    chosen, new = expected_flips(clean.y[eligible], 0.5, 0, None, None, 2)
    flipped = made.load("train")
    np.testing.assert_array_equal(np.flatnonzero(flipped.affected), eligible[chosen])
    np.testing.assert_array_equal(flipped.y[eligible[chosen]], 1 - clean.y[eligible[chosen]])


def _one_line_error(args: list[str], root: Path, tree_listing: Listing, *words: str) -> None:
    before = tree_listing(root)
    result = runner.invoke(app, ["data", "prepare", *args], env={"MLVAR_DATA_ROOT": str(root)})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert tree_listing(root) == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--ratio", "1.5"], ("ratio 1.5 is out of range", "[0.0, 1.0]")),
        (["--ratio", "-0.1"], ("out of range",)),
        (["--ratio", "0.1", "--where", "x > 1"], ("takes no --where",)),
        (["--ratio", "0.1", "--cls", "2", "--to", "2"], ("flips nothing",)),
        (["--ratio", "0.1", "--to", "10"], ("not a class index 0-9",)),
        (["--cls", "2"], ("needs --ratio",)),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, tree_listing: Listing, args: list[str], words: tuple[str, ...]
) -> None:
    _one_line_error(["digits", "--mode", "label-noise", *args], tmp_path, tree_listing, *words)


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("age <", ("is not a valid query",)),
        ("age > 500", ("matches no training row",)),
        ("age > 0", ("matches every training row",)),
    ],
)
def test_bad_where_is_one_line(
    compas_root: Path, tree_listing: Listing, where: str, words: tuple[str, ...]
) -> None:
    args = ["compas", "--mode", "label-noise", "--ratio", "0.1", "--where", where]
    _one_line_error(args, compas_root, tree_listing, *words)


# --------------------------------------------------------------------------- acceptance


@pytest.fixture(scope="module")
def noisy(root: Path) -> ExperimentStore:
    """digits, 10% of class 2 flipped uniformly; 4 MLP runs with per-epoch predictions."""
    if not (root / "digits-label-noise-cls2-r0.1").exists():  # the first test may have
        registry.prepare_sweep(root, "digits", mode="label-noise", cls="2", ratio="0.1")
    cfg = Config(paths=PathsConfig(root, root.parent / "runs", root.parent / "reports"))
    overrides = {"epochs": 8, "record_dynamics": True}
    made = train(cfg, "digits", "digits-label-noise-cls2-r0.1", runs=4, overrides=overrides)
    return ExperimentStore.open(root.parent / "runs", made.experiment)


def test_detection_on_the_train_split_matches_sklearn(noisy: ExperimentStore) -> None:
    assert detect_split(noisy.meta) == "train"
    samples = noisy.samples("train")
    assert samples["affected"].sum() == 11  # floor(0.1 * 112)
    assert not noisy.samples("test")["affected"].any()
    result = analysis.rank(noisy, "train", write=False)
    assert result.dynamics  # the training-dynamics metrics are there
    det = result.detection.set_index("metric")
    # gconf_mean, independently: mean over runs of softmax p[label] of the stored logits.
    p = []
    for run in sorted(noisy.runs(), key=lambda r: r.run_id):
        z = np.asarray(run.load_logits("train"), dtype=np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p.append((e / e.sum(axis=1, keepdims=True))[np.arange(len(z)), samples["label"]])
    auroc = roc_auc_score(samples["affected"], -np.mean(p, axis=0))
    assert det.loc["gconf_mean", "scope"] == "split"  # flipped to several classes
    assert det.loc["gconf_mean", "auroc"] == pytest.approx(auroc, abs=1e-12)
    assert det.loc["gconf_mean", "auroc"] > 0.9  # flipped labels are found
    for metric in ("dm_confidence", "forgetting_events", "disagreement"):
        assert 0 <= det.loc[metric, "auroc"] <= 1


def test_rank_defaults_to_the_train_split_and_the_report_says_so(
    noisy: ExperimentStore, root: Path
) -> None:
    env = {"MLVAR_DATA_ROOT": str(root), "MLVAR_RUNS_ROOT": str(root.parent / "runs")}
    result = runner.invoke(app, ["analyze", "rank", noisy.name, "--json", "--top", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert '"split": "train"' in result.stdout
    assert (noisy.root / "analysis" / "rank-train.json").is_file()
    scenario = noisy.meta["scenario"]
    assert "scores their detection on the train split" in detect_note(scenario, "train")
    assert "--split train" in detect_note(scenario, "test")
    assert detect_note({"name": "x"}, "test") == ""
