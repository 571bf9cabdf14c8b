"""Retraining in the reports: the experiment report's "Retraining" section and the study
site's retraining page, from ``<experiment>/retrain/summary.parquet`` files built here
row by row (their aggregates recomputed with numpy), and the malformed summary."""

from __future__ import annotations

import html as html_lib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mlvar.analysis.retrain import read_summary, summary_stats
from mlvar.cli import app
from mlvar.errors import MlvarError
from test_report import EVIL, PNG, make_store

STRATEGIES = (("random", False), ("maxconf_std", False), (EVIL, False), ("gconf_mean", True))
BUDGETS = (0.0, 0.1, 0.5)
RUNS = 3
POOL_SIZE = 40


def summary_rows(seed: int) -> pd.DataFrame:
    """One row per strategy x budget x run; budget 0 gains 0, accuracies the run's own
    budget-0 accuracy plus its gain. The EVIL strategy's runs add 20, 20 and 19 samples
    at budget 0.5 (a range in the table)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.6, 0.9, size=(RUNS, 3))  # per run: all, held-out, other at b0
    rows = []
    for strategy, oracle in STRATEGIES:
        for budget in BUDGETS:
            for r in range(RUNS):
                gain = np.zeros(3) if budget == 0 else np.round(rng.normal(0.01, 0.02, 3), 6)
                short = strategy == EVIL and budget == 0.5 and r == 2
                n_added = round(budget * POOL_SIZE) - short
                acc = base[r] + gain
                rows.append(
                    {
                        "strategy": strategy,
                        "budget": budget,
                        "n_added": n_added,
                        "run_id": f"run-{r:04d}",
                        "seed": r,
                        "acc": acc[0],
                        "acc_affected": acc[1],
                        "acc_unaffected": acc[2],
                        "gain": gain[0],
                        "gain_affected": gain[1],
                        "gain_unaffected": gain[2],
                        "oracle": oracle,
                        "pool": "full_val",
                    }
                )
    return pd.DataFrame(rows)


def write_summary(experiment_dir: Path, table: pd.DataFrame) -> None:
    (experiment_dir / "retrain").mkdir(exist_ok=True)
    table.to_parquet(experiment_dir / "retrain" / "summary.parquet")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A site of three experiments of one family (ratio 0.5, 1.0 with retraining, and
    one without), built once."""
    from mlvar.report.study import build_site

    root = tmp_path_factory.mktemp("retrain-site")
    summaries = {}
    for k, ratio in enumerate((0.5, 1.0, 0.7)):
        name = f"exp-r{ratio}"
        scenario = {"name": "s", "mode": "holdout", "params": {"ratio": ratio}}
        store = make_store(root / "runs", name, n=40, runs=RUNS, scenario=scenario, seed=k)
        if ratio != 0.7:
            summaries[name] = summary_rows(k)
            write_summary(store.root, summaries[name])
    result = build_site(root / "runs", root / "site", top=2)
    assert not result.skipped
    return {"root": root, "site": root / "site", "summaries": summaries}


def _table_rows(html: str, table_id: str) -> list[list[str]]:
    """The data rows of a table: each row's cell texts (tags stripped, still escaped)."""
    body = html.split(f'<table id="{table_id}">', 1)[1].split("</table>", 1)[0]
    rows = []
    for tr in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S):
        if "<td" in tr:
            cells = re.findall(r"<td[^>]*>(.*?)</td>", tr, flags=re.S)
            rows.append([re.sub(r"<[^>]+>", "", c).strip() for c in cells])
    return rows


def _f(x: float) -> str:
    return f"{x:.4f}"


def test_section_table_equals_independent_aggregates(site: dict) -> None:
    html = (site["site"] / "exp-r1.0" / "index.html").read_text()
    table = site["summaries"]["exp-r1.0"]
    rows = _table_rows(html, "retrain-table")
    assert len(rows) == len(STRATEGIES) * len(BUDGETS)
    k = 0
    for strategy, oracle in STRATEGIES:  # in the summary's order, budgets ascending
        for budget in BUDGETS:
            row = rows[k]
            k += 1
            g = table[(table["strategy"] == strategy) & (table["budget"] == budget)]
            name = html_lib.escape(strategy, quote=False)
            assert row[0] == name + (" oracle" if oracle else "")
            assert row[1] == f"{budget:g}" and row[3] == str(RUNS)
            n_added = g["n_added"].to_numpy()
            assert row[2] == (
                str(n_added[0]) if len(set(n_added)) == 1 else f"{n_added.min()}–{n_added.max()}"
            )
            expected = [_f(np.mean(g[c])) for c in ("acc", "acc_affected", "acc_unaffected")]
            for col in ("gain", "gain_affected", "gain_unaffected"):
                v = g[col].to_numpy()
                expected += [
                    _f(f(v))
                    for f in (
                        np.mean,
                        lambda a: np.std(a, ddof=1),
                        np.min,
                        np.max,
                        np.median,
                    )
                ]
            assert row[4:] == expected, (strategy, budget)
    assert "19–20" in html  # the EVIL strategy's range at budget 0.5


def test_section_escapes_names_labels_oracles_and_names_the_pool(site: dict) -> None:
    out = site["site"] / "exp-r1.0"
    html = (out / "index.html").read_text()
    assert "<script>alert" not in html
    assert len(re.findall(r"<script[ >]", html)) == 2  # the report's own two
    assert '<a href="#retraining">Retraining</a>' in html and 'id="retraining"' in html
    assert "<b>full_val</b>" in html
    for row in _table_rows(html, "retrain-table"):
        assert row[0].endswith(" oracle") == row[0].startswith("gconf_mean")
    assert 'src="retrain.png"' in html and (out / "retrain.png").read_bytes()[:8] == PNG


def test_section_absent_without_summary(site: dict) -> None:
    out = site["site"] / "exp-r0.7"
    html = (out / "index.html").read_text()
    assert 'id="retraining"' not in html and "retrain" not in html
    assert not (out / "retrain.png").exists()


def test_study_site_gathers_retraining(site: dict) -> None:
    root = site["site"]
    index = (root / "index.html").read_text()
    assert '<a href="retrain.html" id="retrain-link">Retraining across 2 experiments</a>' in index
    page = (root / "retrain.html").read_text()
    assert "<script" not in page
    rows = _table_rows(page, "retrain-study")
    assert len(rows) == 2 * len(STRATEGIES) * len(BUDGETS)
    seen = set()
    for row in rows:
        name, strategy, budget = row[0], row[5], float(row[6])
        table = site["summaries"][name]
        raw = html_lib.unescape(strategy.removesuffix(" oracle"))
        g = table[(table["strategy"] == raw) & (table["budget"] == budget)]
        assert row[1:5] == ["synthetic / holdout", "none", f"ratio={name[5:]}", "full_val"]
        assert row[8] == str(RUNS)
        assert row[9:] == [_f(np.mean(g[c])) for c in ("gain", "gain_affected", "gain_unaffected")]
        seen.add((name, raw, budget))
    assert len(seen) == len(rows)  # every experiment x strategy x budget once
    assert "exp-r0.7" not in page  # no summary: not on the page
    assert '<a href="exp-r0.5/index.html#retraining">exp-r0.5</a>' in page
    images = re.findall(r'<img class="plot" src="([^"]+)"', page)
    assert images == ["retrain_0.png"] and (root / "retrain_0.png").read_bytes()[:8] == PNG
    assert "one panel per ratio" in page
    csv = pd.read_csv(root / "retrain.csv")
    both = pd.concat([t.assign(experiment=n) for n, t in site["summaries"].items()])
    means = both.groupby(["experiment", "strategy", "budget"])["gain_affected"].mean()
    got = csv.set_index(["experiment", "strategy", "budget"])["gain_affected_mean"]
    assert np.allclose(got.sort_index(), means.sort_index(), atol=1e-6)


def test_malformed_summary_is_one_line_exit_2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    for var, sub in (("DATA", "data"), ("RUNS", "runs"), ("REPORTS", "reports")):
        monkeypatch.setenv(f"MLVAR_{var}_ROOT", str(tmp_path / sub))
    store = make_store(tmp_path / "runs", "exp-bad", n=20, runs=2)
    write_summary(store.root, summary_rows(0).drop(columns=["gain_affected"]))
    result = CliRunner().invoke(app, ["report", "html", "exp-bad"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "lacks the column(s) gain_affected" in line and "mlvar retrain exp-bad" in line
    assert not (tmp_path / "reports").exists() and not (store.root / "analysis").exists()


def test_read_summary_checks_the_file(tmp_path: Path) -> None:
    assert read_summary(tmp_path) is None  # no retrain/summary.parquet
    table = summary_rows(1)
    (tmp_path / "retrain").mkdir()
    (tmp_path / "retrain" / "summary.parquet").write_bytes(b"not parquet")
    with pytest.raises(MlvarError, match="unreadable"):
        read_summary(tmp_path)
    for bad, what in (
        (table.assign(gain="x"), "column gain is not numeric"),
        (table.assign(oracle="yes"), "column oracle is not true/false"),
    ):
        write_summary(tmp_path, bad)
        with pytest.raises(MlvarError, match=what):
            read_summary(tmp_path)
    write_summary(tmp_path, pd.DataFrame(columns=list(table.columns)))  # no run finished yet
    assert read_summary(tmp_path) is None
    # no held-out samples in the test split: their accuracy and gain are NaN, shown as –
    write_summary(tmp_path, table.assign(acc_affected=np.nan, gain_affected=np.nan))
    stats = summary_stats(read_summary(tmp_path))
    assert stats["gain_affected_mean"].isna().all() and stats["gain_mean"].notna().all()
    assert len(stats) == len(STRATEGIES) * len(BUDGETS)
