"""The HTML report folder: layout, escaping, sample pages, inputs, atomic rebuild, the
study page and the ``mlvar report html`` command line (the browser test is in
``test_report_browser.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mlvar.analysis import service as analysis
from mlvar.cli import app
from mlvar.data.scenario import SplitData, write_scenario
from mlvar.report import html as report_html
from mlvar.report.html import build_report, json_for_script
from mlvar.report.study import build_study_report
from mlvar.store import ExperimentStore

EVIL = "<script>alert(1)</script>"
PNG = b"\x89PNG\r\n\x1a\n"


def make_store(
    runs_root: Path,
    name: str = "synthetic",
    class_names: list[str] | None = None,
    n: int = 120,
    runs: int = 6,
    scenario: dict | None = None,
    seed: int = 0,
) -> ExperimentStore:
    """A store whose affected samples (half of class 0) are less confident in their label."""
    class_names = class_names or [EVIL, "b&c", "plain"]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(class_names), n)
    affected = np.zeros(n, dtype=bool)
    affected[labels == 0] = rng.random((labels == 0).sum()) < 0.5
    meta = {
        "dataset": "synthetic",
        "class_names": class_names,
        "scenario": scenario
        or {
            "name": "<b>scenario</b>",
            "mode": "m<i>",
            "description": "<script>alert('x')</script>",
        },
        "model": "none",
        "train": {},
    }
    samples = {
        "test": {
            "sample_id": np.arange(1000, 1000 + n),
            "label": labels,
            "affected": affected,
            "group": np.full(n, -1),
        }
    }
    store = ExperimentStore.create(runs_root, name, meta, samples)
    logits = rng.normal(size=(runs, n, len(class_names))).astype(np.float32)
    logits[:, affected, 0] -= 2.0
    for r in range(runs):
        store.write_run(f"run-{r:04d}", {"test": logits[r]}, {"seed": r, "config": {"x": 1}})
    return store


def write_inputs(data_root: Path, store: ExperimentStore, kind: str) -> None:
    """A prepared scenario holding the store's samples: 8x8 images or 3 features."""
    samples = store.samples("test")
    n = len(samples)
    rng = np.random.default_rng(1)
    if kind == "image":
        x = rng.integers(0, 17, size=(n, 8, 8, 1)).astype(np.uint8)
        extra = {"input": {"kind": "image", "shape": [8, 8, 1], "max_value": 16}}
    else:
        x = rng.normal(size=(n, 3)).astype(np.float32)
        extra = {
            "input": {"kind": "tabular", "n_features": 3},
            "feature_names": ["age", "<b>priors</b>", "sex"],
        }
    split = SplitData(
        x=x,
        y=samples["label"].to_numpy(),
        id=samples["sample_id"].to_numpy(),
        affected=samples["affected"].to_numpy(),
        group=samples["group"].to_numpy(),
    )
    manifest = {"dataset": "synthetic", "mode": "m", "class_names": store.class_names} | extra
    write_scenario(data_root, store.meta["scenario"]["name"], manifest, {"test": split})


def report_with_images(root: Path, n: int = 120, top: int = 5):
    """A report whose sample pages show 8x8 images; returns (result, ranking)."""
    store = make_store(root / "runs", n=n, scenario={"name": "synthetic-images", "mode": "m"})
    write_inputs(root / "data", store, "image")
    result = build_report(store, root / "report", top=top, data_root=root / "data")
    ranking = analysis.rank(store, "test", write=False).ranking
    return result, ranking


def _ranking_json(report: Path) -> dict:
    """The ranking data of a report folder: the JSON its data file assigns."""
    text = (report / "ranking-data.js").read_text()
    prefix, suffix = "window.MLVAR_RANKING = JSON.parse(", ");\n"
    assert text.startswith(prefix) and text.endswith(suffix), "no ranking data"
    return json.loads(json.loads(text[len(prefix) : -len(suffix)]))


def test_json_for_script_cannot_close_the_block() -> None:
    text = str(json_for_script({"a": "</script><script>alert(1)</script>", "b": "x & y"}))
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"a": "</script><script>alert(1)</script>", "b": "x & y"}


def test_report_layout_and_escaping(tmp_path: Path) -> None:
    store = make_store(tmp_path / "runs")
    result = build_report(store, tmp_path / "report", top=5)
    out = tmp_path / "report"
    html = result.path.read_text()
    # Data never becomes markup: the only <script> tags are the report's own two.
    assert "<script>alert" not in html and "<b>scenario" not in html
    assert len(re.findall(r"<script[ >]", html)) == 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # label option, static table
    assert "&lt;b&gt;scenario&lt;/b&gt;" in html and "b&amp;c" in html
    data = _ranking_json(out)
    assert data["n"] == 120 and EVIL in data["columns"]["label"]
    for name in (
        "accuracy_hist.png",
        "class_accuracy.png",
        "roc.png",
        "auroc_vs_runs.png",
        "confidence.png",
    ):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f'src="{name}"' in html
    assert (out / "style.css").is_file()
    ranking = pd.read_csv(out / "ranking.csv")
    assert len(ranking) == 120 and list(ranking["rank"]) == list(range(1, 121))
    # No reference leaves the folder: no http(s) URL in any page or stylesheet.
    for page in out.rglob("*.*"):
        if page.suffix in (".html", ".css"):
            assert not re.search(r"(src|href)=\"(https?:)?//", page.read_text()), page
    # Static (no-script) table: the top 5 rows.
    static = html.split('<table class="static">')[1].split("</table>")[0]
    assert len(re.findall(r"<tr[ >]", static)) == 1 + 5
    # Sample pages: every one escapes the label, and there are 5 + 5.
    pages = sorted((out / "samples").glob("*.html"))
    assert len(pages) == result.n_pages == 10
    for page in pages:
        text = page.read_text()
        assert "<script" not in text
        assert "No input shown: no data root was given" in text
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in p.read_text() for p in pages)


def test_sample_pages_are_top_k_plus_random_unaffected(tmp_path: Path) -> None:
    result, ranking = report_with_images(tmp_path, top=7)
    data = _ranking_json(result.path.parent)
    linked = [i for i, p in enumerate(data["columns"]["page"]) if p]
    assert linked[:7] == list(range(7))
    extra = linked[7:]
    assert len(extra) == 7 and all(i >= 7 for i in extra)
    assert not ranking["affected"].iloc[extra].any()
    for i in linked:
        page = result.path.parent / data["columns"]["page"][i]
        sid = ranking["sample_id"].iloc[i]
        assert page.name == f"sample-{sid}.html"
        text = page.read_text()
        assert f'<span id="sample-id">{sid}</span>' in text
        image = page.with_suffix(".png")
        assert image.read_bytes()[:8] == PNG
        assert f'src="{image.name}"' in text
        # votes per class sum to the number of runs; one row per run
        votes = [int(v) for v in re.findall(r"</td><td>(\d+)</td>\s*<td class=\"l\"><span", text)]
        assert sum(votes) == 6
        assert text.count('<td class="l">run-') == 6
    from PIL import Image

    img = Image.open(page.with_suffix(".png"))
    assert img.size == (96, 96)  # 8x8 upscaled by 12, nearest neighbour


def test_tabular_inputs_show_feature_names(tmp_path: Path) -> None:
    store = make_store(tmp_path / "runs", scenario={"name": "synthetic-tab", "mode": "m"})
    write_inputs(tmp_path / "data", store, "tabular")
    result = build_report(store, tmp_path / "report", top=2, data_root=tmp_path / "data")
    assert result.inputs == ""
    page = next((tmp_path / "report" / "samples").glob("*.html")).read_text()
    assert '<td class="l">age</td>' in page and "&lt;b&gt;priors&lt;/b&gt;" in page
    assert not list((tmp_path / "report" / "samples").glob("*.png"))


def test_absent_scenario_is_explained(tmp_path: Path) -> None:
    store = make_store(tmp_path / "runs", scenario={"name": "gone", "mode": "m"})
    result = build_report(store, tmp_path / "report", top=2, data_root=tmp_path / "data")
    assert "'gone' is not in the data root" in result.inputs
    page = next((tmp_path / "report" / "samples").glob("*.html")).read_text()
    assert "No input shown: the prepared scenario &#39;gone&#39; is not in the data root" in page


def test_failed_build_keeps_the_old_report(tmp_path: Path, monkeypatch) -> None:
    store = make_store(tmp_path / "runs")
    result = build_report(store, tmp_path / "report", top=3)
    before = result.path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_html.plots, "thumbnail", boom)
    monkeypatch.setattr(report_html, "_sample_context", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(store, tmp_path / "report", top=3)
    assert result.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]  # no temp folder


def test_study_report(tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    for i, ratio in enumerate((0.1, 0.3, 0.5)):
        scenario = {
            "name": f"s-r{ratio}",
            "mode": "artificial",
            "params": {"ratio": ratio, "seed": 0},
            "description": "<i>injected</i>",
        }
        store = make_store(runs_root, f"exp-{i}", scenario=scenario, seed=i)
        analysis.rank(store, "test")
    make_store(runs_root, "not-ranked", scenario={"name": "x", "mode": "m"})
    result = build_study_report(runs_root, tmp_path / "reports" / "study")
    html = result.path.read_text()
    assert result.n_experiments == 3 and result.plots == 1
    assert "not-ranked" in html and "mlvar analyze rank not-ranked" in html
    assert "against ratio" in html
    assert (result.path.parent / "auroc_vs_0.png").read_bytes()[:8] == PNG
    assert (result.path.parent / "study.csv").is_file()
    for name in ("exp-0", "exp-1", "exp-2"):
        assert f'<td class="l">{name}</td>' in html
    assert "<script" not in html


# ------------------------------------------------------------------ command line

runner = CliRunner()


@pytest.fixture
def roots(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    for var, sub in (("DATA", "data"), ("RUNS", "runs"), ("REPORTS", "reports")):
        monkeypatch.setenv(f"MLVAR_{var}_ROOT", str(tmp_path / sub))
    return tmp_path


def _error(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result.stderr.strip()


def test_cli_site_of_every_experiment(roots: Path) -> None:
    """'mlvar report html' with no experiment: every report, and the study table as the
    site's index linking them; an experiment that cannot be reported is listed, not fatal."""
    line = _error("report", "html")
    assert "no experiments in the runs root" in line and "mlvar demo" in line
    assert not (roots / "reports").exists()
    make_store(roots / "runs", "exp-a", scenario={"name": "s", "mode": "m", "params": {"r": 1}})
    make_store(roots / "runs", "exp-b", scenario={"name": "s", "mode": "m", "params": {"r": 2}})
    ExperimentStore.create(  # no finished runs: no report
        roots / "runs",
        "exp-empty",
        {"dataset": "synthetic", "class_names": ["a", "b"]},
        {
            "test": {
                "sample_id": np.arange(3),
                "label": np.array([0, 1, 0]),
                "affected": np.zeros(3, bool),
                "group": np.full(3, -1),
            }
        },
    )
    result = runner.invoke(app, ["report", "html", "--top", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    site = roots / "reports"
    assert Path(info["path"]) == site / "index.html" and info["n_study"] == 2
    assert sorted(info["reports"]) == ["exp-a", "exp-b"]
    assert "no finished runs" in info["skipped"]["exp-empty"]
    index = (site / "index.html").read_text()
    for name in ("exp-a", "exp-b"):
        assert f'<a href="{name}/index.html">{name}</a>' in index
        assert (site / name / "index.html").is_file()
    assert (site / "style.css").is_file() and (site / "study.csv").is_file()
    assert "auroc_vs_0.png" in index and (site / "auroc_vs_0.png").is_file()  # r varies
    result = runner.invoke(app, ["report", "html", "--top", "2"])
    assert result.exit_code == 0 and "no report of exp-empty" in result.stdout


def test_cli_study_takes_no_experiment(roots: Path) -> None:
    make_store(roots / "runs", "exp-a")
    line = _error("report", "html", "exp-a", "--study")
    assert "takes no experiment name" in line
    # An experiment named 'study' would land where the study report lives.
    make_store(roots / "runs", "study")
    line = _error("report", "html", "study")
    assert "would replace the study report" in line and "--out" in line
    assert not (roots / "reports").exists()
    result = runner.invoke(app, ["report", "html", "study", "--out", str(roots / "r-study")])
    assert result.exit_code == 0, result.stderr
    assert (roots / "r-study" / "index.html").is_file()


def test_cli_report_and_study(roots: Path) -> None:
    store = make_store(roots / "runs", "exp-a", scenario={"name": "synthetic-images", "mode": "m"})
    write_inputs(roots / "data", store, "image")
    result = runner.invoke(app, ["report", "html", "exp-a", "--top", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["n_pages"] == 6 and info["inputs_missing"] is None
    assert Path(info["path"]) == roots / "reports" / "exp-a" / "index.html"
    assert len(list((roots / "reports" / "exp-a" / "samples").glob("*.png"))) == 6
    result = runner.invoke(app, ["report", "html", "--study", "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert Path(info["path"]) == roots / "reports" / "study" / "index.html"
    assert info["n_experiments"] == 1


def test_sample_pages_show_saliency_strips(tmp_path: Path) -> None:
    """A page gets the GradCAM strip of its sample from analysis/saliency-<split>/ (as
    ``mlvar analyze saliency`` writes it; tests/test_saliency.py builds a real one), the
    index says how many pages have one, and text from the folder is escaped."""
    from mlvar.analysis import saliency

    store = make_store(tmp_path / "runs", n=60)
    result = build_report(store, tmp_path / "report", top=3)
    assert "saliency-note" not in result.path.read_text()  # no saliency: no note, no strip
    assert not list((tmp_path / "report" / "samples").glob("*.saliency.png"))

    ranking = analysis.rank(store, "test", write=False).ranking
    ids = [int(s) for s in ranking["sample_id"].head(2)] + [999_999]  # one not in the split
    base = saliency.folder(store, "test")
    (base / "overlays").mkdir(parents=True)
    for sid in ids:
        (base / "overlays" / f"{sid}.png").write_bytes(
            report_html.plots.thumbnail(np.full((4, 4), 7, dtype=np.uint8), 16)
        )
    rows = [{"sample_id": sid, "overlay": f"overlays/{sid}.png"} for sid in ids]
    rows.append({"sample_id": ids[0] + 1, "overlay": "../../experiment.json"})  # refused
    (base / "samples.json").write_text(json.dumps(rows))
    (base / "saliency.json").write_text(json.dumps({"layer": EVIL, "run_ids": ["a", "b"]}))

    result = build_report(store, tmp_path / "report", top=3)
    html = result.path.read_text()
    assert "2 of these pages show GradCAM strips (layer &lt;script&gt;" in html
    assert ", 2 runs; from analysis/saliency-test/" in html and EVIL not in html
    strips = sorted((tmp_path / "report" / "samples").glob("*.saliency.png"))
    assert [p.name for p in strips] == sorted(f"sample-{sid}.saliency.png" for sid in ids[:2])
    page = (tmp_path / "report" / "samples" / f"sample-{ids[0]}.html").read_text()
    assert f'src="sample-{ids[0]}.saliency.png"' in page and "Attribution across seeds" in page
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    other = sorted((tmp_path / "report" / "samples").glob("*.html"))
    assert sum("Attribution across seeds" in p.read_text() for p in other) == 2


def test_page_choice_of_a_smaller_top_is_a_subset() -> None:
    """Saliency with --top 10 explains samples that a report with --top 50 has pages for."""
    from mlvar.analysis.selection import choose_samples

    rng = np.random.default_rng(3)
    ranking = pd.DataFrame({"affected": rng.random(400) < 0.3})
    for seed in range(5):
        pages = {top: choose_samples(ranking, top, seed) for top in (1, 10, 50, 400, 500)}
        for small, large in [(1, 10), (10, 50), (50, 400), (400, 500)]:
            assert set(pages[small]) <= set(pages[large]), (seed, small, large)
        ten = pages[10]
        assert ten[:10] == list(range(10)) and len(ten) == 20 and len(set(ten)) == 20
        assert not ranking["affected"].to_numpy()[ten[10:]].any()
    assert choose_samples(ranking, 10, 0) != choose_samples(ranking, 10, 1)  # seeded


# ------------------------------------------------------------------ study site


def make_sweep(runs_root: Path, ratios=(0.1, 0.3, 0.5, 0.7), clusters=("a", "b")) -> list[str]:
    """A study: one experiment per ratio of mode 'artificial', one per cluster of a mode
    whose name holds markup; returns the experiment names."""
    names = []
    for i, ratio in enumerate(ratios):
        name = f"art-r{ratio}"
        scenario = {"name": f"s-{name}", "mode": "artificial", "params": {"ratio": ratio}}
        make_store(runs_root, name, scenario=scenario, seed=i)
        names.append(name)
    for i, cluster in enumerate(clusters):
        name = f"hold-{cluster}"
        scenario = {"name": f"s-{name}", "mode": "<i>hold</i>", "params": {"cluster": cluster}}
        make_store(runs_root, name, scenario=scenario, seed=10 + i)
        names.append(name)
    return names


def _links(html: str) -> list[str]:
    return re.findall(r'<a href="([^"]+)"', html)


def test_study_site_groups_experiments_by_family(tmp_path: Path) -> None:
    from mlvar.report.study import build_site

    names = make_sweep(tmp_path / "runs")
    result = build_site(tmp_path / "runs", tmp_path / "site", top=2)
    site = tmp_path / "site"
    assert sorted(result.reports) == sorted(names) and result.families == 2
    index = (site / "index.html").read_text()
    assert "<script" not in index and "<i>hold" not in index and "&lt;i&gt;hold" in index
    pages = sorted(p.name for p in (site / "_families").glob("*.html"))
    assert pages == ["synthetic-_i_hold_i.html", "synthetic-artificial.html"]
    for page in pages:
        assert f'href="_families/{page}"' in index
    for name in names:  # the index links every report, inside its family's section
        assert f'<a href="{name}/index.html">{name}</a>' in index
    family = (site / "_families" / "synthetic-artificial.html").read_text()
    assert "<script" not in family
    linked = {h for h in _links(family) if h.endswith("/index.html")}
    assert linked == {f"../{n}/index.html" for n in names if n.startswith("art-")} | {
        "../index.html"
    }
    for image in re.findall(r'<img class="plot" src="([^"]+)"', family):
        assert (site / "_families" / image).read_bytes()[:8] == PNG, image
    for kind in ("metrics", "accuracy", "ranks"):
        assert f'src="synthetic-artificial-0-{kind}.png"' in family
    assert 'src="synthetic-artificial-box.png"' in family
    assert "against ratio" in family and (site / "auroc_box.png").read_bytes()[:8] == PNG
    # the experiment table: ratio in its own column, sorted, accuracy mean ± std
    rows = re.findall(r'<tr><td class="l"><a href="\.\./(art-r[0-9.]+)/index.html">', family)
    assert rows[: len(names) - 2] == ["art-r0.1", "art-r0.3", "art-r0.5", "art-r0.7"]
    assert re.search(r"<td>0\.\d{4} ± 0\.\d{4}</td>", family)
    # A rebuild leaves no page of a family that no longer exists.
    (site / "_families" / "gone.html").write_text("old")
    build_site(tmp_path / "runs", tmp_path / "site", top=2)
    assert not (site / "_families" / "gone.html").exists()


def test_study_accuracy_points_against_the_table(tmp_path: Path) -> None:
    """The accuracy plot's points: one experiment per value, its seed mean and std; two
    experiments sharing a value, the mean and std (ddof 1) of their means."""
    from mlvar.report.study_plots import accuracy_points

    per = pd.DataFrame(
        {
            "ratio": [0.1, 0.3, 0.3],
            "acc_affected_mean": [0.5, 0.2, 0.4],
            "acc_affected_std": [0.05, 0.01, 0.02],
        }
    )
    points = accuracy_points(per, "ratio", "acc_affected")
    assert points.index.tolist() == [0.1, 0.3]
    assert points.loc[0.1, "mean"] == 0.5 and points.loc[0.1, "std"] == 0.05
    assert points.loc[0.3, "mean"] == pytest.approx(0.3)
    assert points.loc[0.3, "std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert points["n"].tolist() == [1, 2]


def test_study_page_folds_large_families(tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    for i in range(13):
        scenario = {"name": f"s{i}", "mode": "sweep", "params": {"ratio": i / 20}}
        store = make_store(runs_root, f"e{i:02d}", n=60, runs=3, scenario=scenario, seed=i)
        analysis.rank(store, "test")
        analysis.accuracy(store, "test")
    store = make_store(runs_root, "other", n=60, runs=3, scenario={"name": "o", "mode": "one"})
    analysis.rank(store, "test")
    result = build_study_report(runs_root, tmp_path / "study")
    html = result.path.read_text()
    assert result.families == 2 and result.n_experiments == 14
    assert "<details><summary>The 13 experiments of synthetic / sweep</summary>" in html
    assert "<details open><summary>The 1 experiment of synthetic / one</summary>" in html
    family = (tmp_path / "study" / "_families" / "synthetic-one.html").read_text()
    assert "No plot: one experiment only" in family
    assert "no accuracy" not in family  # a single experiment gets no parameter plots
    table = pd.read_csv(tmp_path / "study" / "study.csv")
    sweep = table[table["mode"] == "sweep"]
    assert sweep["acc_affected_mean"].notna().all()
    assert table.loc[table["experiment"] == "other", "acc_mean"].isna().all()


# ------------------------------------------------------------------ reports at scale


def test_ranking_data_file_is_escaped_and_index_stays_small(tmp_path: Path) -> None:
    """The ranking lives in ranking-data.js, whose JSON cannot end a script block; the
    index's size does not grow with the number of samples."""
    names = ["</script><script>alert(1)</script>", "a\u2028b & <c>", "plain"]
    small = make_store(tmp_path / "runs", "small", class_names=names, n=120)
    large = make_store(tmp_path / "runs", "large", class_names=names, n=3000, seed=1)
    sizes = {}
    for store in (small, large):
        out = tmp_path / store.name
        build_report(store, out, top=5)
        text = (out / "ranking-data.js").read_text()
        body = text[text.index("(") + 1 : text.rindex(")")]
        for char in "<>&\u2028":
            assert char not in body, repr(char)
        data = _ranking_json(out)
        assert data["n"] == len(store.samples("test"))
        assert set(data["columns"]["label"]) == set(names)  # decoded exactly
        html = (out / "index.html").read_text()
        assert '"columns"' not in html and 'src="ranking-data.js"' in html
        sizes[store.name] = len(html.encode())
    assert abs(sizes["large"] - sizes["small"]) < 2048, sizes


def test_views_of_many_classes(tmp_path: Path) -> None:
    """Beyond 20 classes: the accuracy table and chart show the 10 worst and 10 best
    classes and fold every class; votes name the most voted classes; sample pages list
    the voted and likely classes and fold the rest. Checked against the logits."""
    from mlvar.report.ranking import votes_texts

    names = [f"k{i:02d}" for i in range(30)]
    store = make_store(tmp_path / "runs", class_names=names, n=900, runs=5)
    result = build_report(store, tmp_path / "report", top=3)
    html = result.path.read_text()
    samples = store.samples("test")
    labels = samples["label"].to_numpy()
    logits = np.stack([r.load_logits("test", mmap=False) for r in store.runs()])
    pred = logits.argmax(axis=2)  # softmax keeps the argmax
    correct = (pred == labels[None, :]).astype(float)
    class_mean = np.array([correct[:, labels == c].mean() for c in range(30)])
    order = sorted(range(30), key=lambda c: (class_mean[c], c))
    shown = [names[c] for c in order[:10] + order[-10:]]
    table = html.split('<table id="accuracy-table">')[1].split("</table>")[0]
    listed = re.findall(r'<td class="l">class (k\d\d)</td>', table)
    assert listed == shown
    folded = html.split('<details id="every-class">')[1].split("</details>")[0]
    assert re.findall(r'<td class="l">class (k\d\d)</td>', folded) == names
    assert (tmp_path / "report" / "class_accuracy.png").read_bytes()[:8] == PNG

    data = _ranking_json(tmp_path / "report")
    ranking = analysis.rank(store, "test", write=False).ranking
    position = {sid: i for i, sid in enumerate(samples["sample_id"])}
    for row in range(0, len(ranking), 97):
        votes = np.bincount(pred[:, position[ranking["sample_id"].iloc[row]]], minlength=30)
        voted = sorted(np.flatnonzero(votes), key=lambda c: (-votes[c], c))
        parts = [f"{names[c]} {votes[c]}" for c in voted]
        if len(parts) > 4:
            parts = parts[:3] + [f"+{len(parts) - 3} more"]
        assert data["columns"]["votes"][row] == " · ".join(parts)
    assert votes_texts(["1 2 0"], ["a", "b", "c"]) == ["1 2 0"]  # few classes: as stored

    page_file = next((tmp_path / "report" / "samples").glob("*.html"))
    page = page_file.read_text()
    i = position[int(page_file.stem.split("-")[1])]
    probs = np.exp(logits[:, i] - logits[:, i].max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).mean(axis=0)
    must = {names[c] for c in np.flatnonzero(np.bincount(pred[:, i], minlength=30))}
    must |= {names[labels[i]]} | {names[c] for c in np.argsort(-probs, kind="stable")[:5]}
    votes_table = page.split('<table id="votes">')[1].split("</table>")[0]
    listed = re.findall(r'<tr(?: class="is-label")?><td class="l">(k\d\d)', votes_table)
    folded = page.split('<details id="votes-folded">')[1].split("</details>")[0]
    rest = re.findall(r'<tr><td class="l">(k\d\d)</td>', folded)
    assert sorted(listed + rest) == names and set(listed) == must
    assert "(label)" in votes_table


@pytest.mark.parametrize("seed", range(4))
def test_roc_points_equal_sklearn(seed: int) -> None:
    """The ROC figure's points are those of sklearn's roc_curve, ties included (the
    report no longer imports scikit-learn for them)."""
    from sklearn.metrics import roc_curve

    from mlvar.report.plots import roc_points

    rng = np.random.default_rng(seed)
    n = [40, 700, 5000, 30000][seed]
    score = rng.random(n)
    if seed % 2:
        score = np.round(score, 2) - 0.5  # many ties, zeros of both signs
        score[score == 0] = -0.0
    affected = rng.random(n) < 0.15
    fpr, tpr, _ = roc_curve(affected, score)
    got_fpr, got_tpr = roc_points(score, affected)
    np.testing.assert_array_equal(got_fpr, fpr)
    np.testing.assert_array_equal(got_tpr, tpr)


def test_study_pages_put_another_protocol_in_a_family_of_its_own(tmp_path: Path) -> None:
    from mlvar.analysis.study import study
    from mlvar.report.study import _study_page, families

    names = make_sweep(tmp_path / "runs", ratios=(0.1, 0.3), clusters=())
    make_store(
        tmp_path / "runs",
        "art-r0.5-study",
        scenario={"name": "s-study", "mode": "artificial", "params": {"ratio": 0.5}},
        seed=7,
    )
    file = tmp_path / "runs" / "art-r0.5-study" / "experiment.json"
    meta = json.loads(file.read_text())
    meta["protocol"] = meta["scenario"]["protocol"] = "study"
    file.write_text(json.dumps(meta))
    table = study(tmp_path / "runs", compute_missing=True, allow_mixed=True).table
    got = {(f.dataset, f.label, f.slug): f.experiments for f in families(table)}
    assert got == {
        ("synthetic", "artificial", "synthetic-artificial"): names,
        ("synthetic", "artificial (study)", "synthetic-artificial_study"): ["art-r0.5-study"],
    }
    # the site's study pages show mixed protocols (each in its family) rather than refuse
    page = _study_page(tmp_path / "runs", "test", "gconf_mean", compute_missing=False)
    assert page.n_experiments == 3 and page.families == 2
    assert "_families/synthetic-artificial_study.html" in page.files


def test_report_keeps_the_rank_convention_the_analysis_was_written_with(tmp_path: Path) -> None:
    from mlvar.analysis import service

    store = make_store(tmp_path / "runs")
    rank_json = store.root / "analysis" / "rank-test.json"
    build_report(store, tmp_path / "report-mid", top=2)
    assert "ranks" not in json.loads(rank_json.read_text())  # the default, as before
    study_ranks = service.rank(store, "test", ranks="study").detection
    build_report(store, tmp_path / "report", top=2)
    assert json.loads(rank_json.read_text())["ranks"] == "study"
    detection = pd.read_parquet(store.root / "analysis" / "detection-test.parquet")
    assert set(detection["ranks"]) == {"study"}
    pd.testing.assert_frame_equal(detection, study_ranks.reset_index(drop=True), check_dtype=False)


def test_study_pages_follow_the_experiments_rank_convention(tmp_path: Path) -> None:
    from mlvar.analysis import service
    from mlvar.report.study import _study_page

    runs = tmp_path / "runs"
    names = make_sweep(runs, ratios=(0.1, 0.3), clusters=())
    for name in names:  # every experiment analysed under the study's ranks only
        service.rank(ExperimentStore.open(runs, name), "test", ranks="study")
    page = _study_page(runs, "test", "gconf_mean", compute_missing=False)
    assert page.n_experiments == 2 and page.skipped == {}
    service.rank(ExperimentStore.open(runs, names[0]), "test")  # one under the default
    page = _study_page(runs, "test", "gconf_mean", compute_missing=False)
    assert page.n_experiments == 1
    assert "made under --ranks study" in page.skipped[names[1]]
