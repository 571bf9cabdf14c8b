"""The study's accuracy analyses over a holdout sweep (``mlvar analyze subclasses``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.cluster import KMeans
from typer.testing import CliRunner

from mlvar.analysis.study_accuracy import subclass_accuracy
from mlvar.cli import app
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore

EVIL = "<b>ray</b>&$x$"
N_CLASSES = 3
RUNS = 3


def _holdout(
    root: Path, subclass: str, ratio: float, seed: int, model: str = "none"
) -> ExperimentStore:
    """A cifar100-like holdout experiment with val and test predictions of 3 runs: each
    run gets a seeded number of the 20 affected test samples (the subclass) right, fewer
    the larger the ratio, and a seeded share of the validation samples."""
    rng = np.random.default_rng(seed)
    n, n_affected = 40, 20
    samples = {}
    for split in ("val", "test"):
        affected = np.zeros(n, bool)
        if split == "test":
            affected[:n_affected] = True
        samples[split] = {
            "sample_id": np.arange(n) + (0 if split == "val" else 1000),
            "label": rng.integers(0, N_CLASSES, n),
            "affected": affected,
            "group": np.where(affected, 7, -1),
        }
    meta = {
        "dataset": "cifar100",
        "class_names": ["a", "b", "c"],
        "scenario": {
            "name": f"cifar100-holdout-{subclass}-r{ratio}",
            "mode": "holdout",
            "params": {"subclass": subclass, "ratio": ratio},
        },
        "model": model,
        "train": {},
    }
    store = ExperimentStore.create(root, f"h-{model}-{seed:03d}", meta, samples)
    base, drop = rng.integers(8, 20), rng.integers(0, 8)
    for r in range(RUNS):
        arrays = {}
        for split, s in samples.items():
            labels = s["label"]
            correct = rng.random(n) < rng.uniform(0.4, 0.95)
            if split == "test":
                k = int(np.clip(base - round(ratio * drop) + rng.integers(-2, 3), 0, n_affected))
                correct[:n_affected] = np.arange(n_affected) < k
            pred = np.where(correct, labels, (labels + 1) % N_CLASSES)
            logits = rng.normal(scale=0.1, size=(n, N_CLASSES)).astype(np.float32)
            logits[np.arange(n), pred] += 5.0
            arrays[split] = logits
        store.write_run(f"run-{r:04d}", arrays, {"seed": r, "config": {"x": 1}})
    return store


def _sweep(root: Path, n_subclasses: int, ratios=(0.0, 0.5, 1.0)) -> list[str]:
    subclasses = [EVIL] + [f"fine{k:02d}" for k in range(1, n_subclasses)]
    seed = 0
    for s in subclasses:
        for a in ratios:
            _holdout(root, s, a, seed)
            seed += 1
    return subclasses


def _expected_points(root: Path) -> pd.DataFrame:
    """Per experiment, from the stored logits: mean held-out test accuracy over runs,
    mean and std (ddof 1) of the validation accuracy."""
    rows = []
    for exp in sorted(p.name for p in root.iterdir() if p.is_dir()):
        store = ExperimentStore.open(root, exp)
        params = store.meta["scenario"]["params"]
        test, val = store.samples("test"), store.samples("val")
        held, vals = [], []
        for run in store.runs():
            t = run.load_logits("test", mmap=False).argmax(axis=1)
            v = run.load_logits("val", mmap=False).argmax(axis=1)
            aff = test["affected"].to_numpy()
            held.append(np.mean(t[aff] == test["label"].to_numpy()[aff]))
            vals.append(np.mean(v == val["label"].to_numpy()))
        rows.append(
            {
                "subclass": params["subclass"],
                "ratio": params["ratio"],
                "held": np.mean(held),
                "val_mean": np.mean(vals),
                "val_std": np.std(vals, ddof=1),
            }
        )
    return pd.DataFrame(rows)


def test_subclass_accuracy_equals_independent_computation(tmp_path: Path) -> None:
    _sweep(tmp_path, 11)
    _holdout(tmp_path, "partial", 0.5, 999)  # no ratio 0 or 1: not grouped
    _holdout(tmp_path, "partial", 0.0, 998)
    result = subclass_accuracy(tmp_path)
    expected = _expected_points(tmp_path)

    points = result.points.set_index(["subclass", "ratio"])
    for r in expected.to_dict(orient="records"):
        got = points.loc[(r["subclass"], r["ratio"])]
        assert got["heldout_acc_mean"] == pytest.approx(r["held"])
        assert got["val_acc_mean"] == pytest.approx(r["val_mean"])
        assert got["val_acc_std"] == pytest.approx(r["val_std"])

    # per subclass: accuracy at 0, drop at 1, in name order (the KMeans rows)
    exp = expected.pivot(index="subclass", columns="ratio", values="held").drop("partial")
    table = result.subclasses.set_index("subclass")
    assert list(table.index) == sorted(exp.index)
    assert table["acc_ratio0"].to_numpy() == pytest.approx(exp[0.0].to_numpy())
    assert table["drop"].to_numpy() == pytest.approx((exp[0.0] - exp[1.0]).to_numpy())
    features = np.column_stack([exp[0.0].to_numpy(), (exp[0.0] - exp[1.0]).to_numpy()])
    kmeans = KMeans(n_clusters=10, random_state=42, n_init=10).fit(features)
    assert table["group"].tolist() == kmeans.labels_.tolist()
    assert "partial" in " ".join(result.notes)

    # per group: Pearson r and p over the group's experiments at every ratio
    group_of = dict(zip(exp.index, kmeans.labels_, strict=True))
    expected["group"] = expected["subclass"].map(group_of)
    corr = result.correlations.set_index("group")
    assert sorted(corr.index) == list(range(10))
    checked = 0
    for g, one in expected.dropna(subset=["group"]).groupby("group"):
        row = corr.loc[int(g)]
        assert row["n_experiments"] == len(one)
        r, p = stats.pearsonr(one["val_mean"], one["held"])
        assert row["r_val_mean"] == pytest.approx(r) and row["p_val_mean"] == pytest.approx(p)
        r, p = stats.pearsonr(one["val_std"], one["held"])
        assert row["r_val_std"] == pytest.approx(r) and row["p_val_std"] == pytest.approx(p)
        checked += 1
    assert checked == 10

    on_disk = pd.read_csv(tmp_path / "study-subclasses.csv")
    assert on_disk["subclass"].tolist() == table.index.tolist()
    assert (tmp_path / "study-correlations.parquet").is_file()
    assert len(pd.read_parquet(tmp_path / "study-correlations.parquet")) == 10


def test_missing_subclasses_are_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "runs"
    _sweep(root, 2)
    _holdout(root, "lonely", 0.0, 77)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(root))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    runner = CliRunner()
    out = runner.invoke(app, ["analyze", "subclasses"])
    assert out.exit_code == 2
    (line,) = out.stderr.strip().splitlines()
    assert "10 groups" in line and "2 have both" in line and "8 more needed" in line
    assert "lonely (no ratio 1)" in line and "--groups" in line
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written

    # an experiment still without finished runs is left out with a note
    unfinished = _holdout(root, "later", 0.5, 79)
    for run in unfinished.runs():
        (run.path / "run.json").unlink()
    out = runner.invoke(app, ["analyze", "subclasses", "--groups", "2"])
    assert out.exit_code == 0, out.output
    assert "lonely" in out.stdout and (root / "study-subclasses.csv").is_file()
    assert f"{unfinished.name}: left out" in out.stdout
    assert set(pd.read_csv(root / "study-subclasses.csv")["group"]) == {0, 1}

    # a second series of the same subclasses needs choosing
    _holdout(root, "fine01", 0.0, 78, model="other")
    out = runner.invoke(app, ["analyze", "subclasses", "--groups", "2"])
    assert out.exit_code == 2 and "--model" in out.stderr
    out = runner.invoke(app, ["analyze", "subclasses", "--groups", "2", "--model", "none"])
    assert out.exit_code == 0, out.output


def test_bad_options(tmp_path: Path) -> None:
    _sweep(tmp_path, 2)
    with pytest.raises(MlvarError, match="unknown protocol"):
        subclass_accuracy(tmp_path, protocol="nope")
    with pytest.raises(MlvarError, match="no digits holdout experiments") as exc:
        subclass_accuracy(tmp_path, dataset="digits")
    assert "mlvar data prepare digits --subclass all" in exc.value.hint
    with pytest.raises(MlvarError, match="no compas holdout experiments") as exc:
        subclass_accuracy(tmp_path, dataset="compas")  # compas holds out clusters
    assert exc.value.hint == (
        "'compas' has no subclass holdout; the analyses read one of digits, cifar100 (--dataset)"
    )


def test_study_site_draws_the_groups_and_escapes_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlvar.report import study as study_site
    from mlvar.report.study import build_study_report

    # The families' per-parameter figures (tested in test_report) are slow and beside
    # the point here.
    monkeypatch.setattr(study_site, "_parameter_plots", lambda *args: [])
    root = tmp_path / "runs"
    _sweep(root, 10, ratios=(0.0, 1.0))
    result = build_study_report(root, tmp_path / "site", compute_missing=True)
    family_pages = list((tmp_path / "site" / "_families").glob("*.html"))
    (page,) = family_pages
    html = page.read_text()
    image = page.with_name(page.stem + "-subclasses.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f'src="{image.name}"' in html and 'id="subclass-groups"' in html
    assert EVIL not in html and "&lt;b&gt;ray&lt;/b&gt;&amp;$x$" in html
    expected = subclass_accuracy(root, write=False).correlations
    assert html.count("<tr><td>") >= len(expected) and result.families == 1
    assert not (root / "study-subclasses.csv").exists()  # the site writes no tables

    # a sweep that cannot be grouped says what is missing instead
    small = tmp_path / "small"
    _sweep(small, 2, ratios=(0.0, 1.0))
    build_study_report(small, tmp_path / "site2", compute_missing=True)
    (page,) = (tmp_path / "site2" / "_families").glob("*.html")
    html = page.read_text()
    assert "No grouping: grouping into 10 groups needs at least 10 subclasses" in html
    assert "8 more needed" in html and not list(page.parent.glob("*-subclasses.png"))
