"""The study across experiments as static pages.

``mlvar report html --study`` writes ``<reports_root>/study/``; ``mlvar report html``
with no experiment writes one site for all experiments (:func:`build_site`): each
experiment's report in ``<reports_root>/<experiment>/`` and the study table as
``<reports_root>/index.html``, its experiment names linking to their reports.

The study page reads the detection results in the run store (:mod:`mlvar.analysis.study`):
one row per experiment (AUROC of the ranking metric, the best metric, the single-model
baseline), AUROC of every metric per experiment, and, for each group of experiments (same
dataset, mode and model) that differ in exactly one scenario parameter (``ratio``,
``subclass``, ``cluster``, ...; ``seed`` does not count), a plot of AUROC per metric
against that parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from mlvar import __version__
from mlvar.analysis.metrics import METRICS
from mlvar.analysis.service import DEFAULT_RANK_BY
from mlvar.analysis.study import study
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import atomic_write_bytes, staging_dir
from mlvar.report import plots
from mlvar.report.html import TOP_DEFAULT, _check_out, environment, fmt, stylesheet
from mlvar.store import ExperimentStore, list_experiments

IGNORED_PARAMS = ("seed",)


@dataclass
class StudyReportResult:
    path: Path  # index.html
    n_experiments: int
    skipped: dict[str, str]
    plots: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "n_experiments": self.n_experiments,
            "skipped": self.skipped,
            "plots": self.plots,
        }


def param_columns(table: pd.DataFrame) -> list[str]:
    """The scenario-parameter columns of a study table (between ``split`` and ``params``)."""
    cols = list(table.columns)
    return cols[cols.index("split") + 1 : cols.index("params")]


def varying_groups(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Groups of experiments (dataset, mode, model) with the parameter they vary in:
    ``{"title", "param", "rows", "note"}``; ``param`` is None when it is not exactly one."""
    params = param_columns(table)
    out = []
    keys = ["dataset", "mode", "model"]
    for key, g in table.groupby(keys, sort=False, dropna=False):
        n_exp = g["experiment"].nunique()
        if n_exp < 2:
            continue
        per_exp = g.drop_duplicates("experiment")
        varying = [
            p for p in params if p not in IGNORED_PARAMS and per_exp[p].nunique(dropna=True) > 1
        ]
        title = " / ".join(str(k) for k in key)
        note = ""
        if len(varying) != 1:
            note = (
                "the experiments differ in no scenario parameter"
                if not varying
                else "the experiments differ in several parameters: " + ", ".join(varying)
            )
        param = varying[0] if len(varying) == 1 else None
        rows = g[(g["kind"] == "metric") & g[param].notna()] if param else g
        out.append({"title": title, "param": param, "rows": rows, "note": note, "n": n_exp})
    return out


def build_study_report(
    runs_root: Path,
    out_dir: Path,
    split: str = "test",
    by: str = DEFAULT_RANK_BY,
    compute_missing: bool = False,
) -> StudyReportResult:
    """Write ``out_dir/index.html`` (and its plots) from the study table of ``runs_root``."""
    if by not in METRICS:
        raise unknown_choice("metric", by, METRICS)
    out_dir = Path(out_dir)
    _check_out(out_dir)
    page = _study_page(runs_root, split, by, compute_missing)
    with staging_dir(out_dir, replace=True) as tmp:
        for name, data in page.files.items():
            atomic_write_bytes(tmp / name, data)
    return StudyReportResult(out_dir / "index.html", page.n_experiments, page.skipped, page.plots)


@dataclass
class _Page:
    files: dict[str, bytes]  # name -> content, index.html among them
    n_experiments: int
    skipped: dict[str, str]
    plots: int


def _study_page(
    runs_root: Path,
    split: str,
    by: str,
    compute_missing: bool,
    links: dict[str, str] | None = None,
) -> _Page:
    """The study page's files; ``links``: experiment -> href of its report."""
    result = study(runs_root, split, compute_missing=compute_missing, write=False)
    table = result.table
    per = result.per_experiment(by)
    metric_rows = table[table["kind"] == "metric"]
    metrics = [m for m in METRICS if m in set(metric_rows["metric"])]
    pivot = metric_rows.pivot_table(
        index="experiment", columns="metric", values="auroc", aggfunc="first", sort=False
    )
    experiments = list(dict.fromkeys(table["experiment"]))
    figures: dict[str, bytes] = {}
    groups = []
    for i, g in enumerate(varying_groups(table)):
        image = None
        if g["param"] is not None and len(g["rows"]):
            image = f"auroc_vs_{i}.png"
            figures[image] = plots.study_auroc(
                g["rows"], g["param"], f"{g['title']}: AUROC against {g['param']}", by
            )
        groups.append({"title": g["title"], "param": g["param"], "note": g["note"], "image": image})
    context = {
        "title": "mlvar study: detection across experiments",
        "root": "",
        "split": split,
        "by": by,
        "runs_root": str(runs_root),
        "summary": [
            {
                "experiment": r["experiment"],
                "link": (links or {}).get(r["experiment"]),
                "mode": r["mode"],
                "params": r["params"],
                "cells": [
                    r["n_runs"],
                    r["n_affected"],
                    fmt(_num(r["auroc"])),
                    fmt(_num(r["average_precision"])),
                    fmt(_num(r["precision_at_k"])),
                ],
                "best": r["best_metric"] or "–",
                "best_auroc": fmt(_num(r["best_auroc"])),
                "baseline": fmt(_num(r["baseline_auroc"])),
                "stale": bool(r["stale"]),
            }
            for r in per.to_dict(orient="records")
        ],
        "metrics": metrics,
        "pivot": [
            {
                "experiment": e,
                "link": (links or {}).get(e),
                "cells": [
                    fmt(_num(pivot.at[e, m])) if e in pivot.index and m in pivot else "–"
                    for m in metrics
                ],
            }
            for e in experiments
        ],
        "groups": groups,
        "skipped": result.skipped,
        "computed": result.computed,
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    context["site"] = links is not None
    html = environment().get_template("study.html").render(**context)
    files = {"style.css": stylesheet().encode(), **figures}
    files["study.csv"] = table.to_csv(index=False, float_format="%.6g").encode()
    files["index.html"] = html.encode()  # last: the page appears once its parts are there
    return _Page(files, len(experiments), result.skipped, len(figures))


@dataclass
class SiteResult:
    """What :func:`build_site` wrote."""

    path: Path  # <reports_root>/index.html
    reports: dict[str, Path]  # experiment -> its index.html
    skipped: dict[str, str]  # experiment -> why it has no report
    n_study: int  # experiments in the study table

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "reports": {k: str(v) for k, v in self.reports.items()},
            "skipped": self.skipped,
            "n_study": self.n_study,
        }


#: ``progress(done, total, experiment)`` after each experiment's report.
SiteProgress = Callable[[int, int, str], None]


def build_site(
    runs_root: Path,
    reports_root: Path,
    data_root: Path | None = None,
    split: str = "test",
    by: str = DEFAULT_RANK_BY,
    top: int = TOP_DEFAULT,
    progress: SiteProgress | None = None,
) -> SiteResult:
    """One site for every experiment of ``runs_root``: each report in
    ``<reports_root>/<experiment>/`` (as ``mlvar report html EXPERIMENT`` writes it, which
    also stores its detection results), then the study page ``<reports_root>/index.html``
    linking them. An experiment that cannot be reported (no finished runs, no such split)
    is listed with the reason and left out; the others go on.
    """
    from mlvar.report.html import build_report

    if by not in METRICS:
        raise unknown_choice("metric", by, METRICS)
    reports_root = Path(reports_root)
    _check_out(reports_root)
    names = list_experiments(Path(runs_root))
    if not names:
        raise MlvarError(
            f"there are no experiments in the runs root {runs_root}",
            "train one first, e.g. 'mlvar train digits --runs 8', or run 'mlvar demo'",
        )
    reports: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-run warnings belong to the single reports
        for k, name in enumerate(names):
            try:
                store = ExperimentStore.open(Path(runs_root), name)
                done = build_report(store, reports_root / name, split, top, by, data_root)
                reports[name] = done.path
            except MlvarError as exc:
                skipped[name] = exc.message
            if progress:
                progress(k + 1, len(names), name)
    links = {name: f"{name}/index.html" for name in reports}
    page = _study_page(Path(runs_root), split, by, False, links)
    for name, data in page.files.items():
        atomic_write_bytes(reports_root / name, data)
    skipped = {**skipped, **{k: v for k, v in page.skipped.items() if k not in skipped}}
    return SiteResult(reports_root / "index.html", reports, skipped, page.n_experiments)


def _num(value: Any) -> Any:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
