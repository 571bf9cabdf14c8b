"""The study across experiments as static pages, grouped by scenario family.

``mlvar report html --study`` writes ``<reports_root>/study/``; ``mlvar report html``
with no experiment writes one site for all experiments (:func:`build_site`): each
experiment's report in ``<reports_root>/<experiment>/`` and the study pages beside them,
``index.html`` linking every report. Layout of the study pages::

    index.html              the families (dataset + mode) with links to their pages; a
                            boxplot of AUROC per metric over every experiment; per family
                            AUROC of every metric against each parameter it varies and its
                            experiments (folded beyond 12), each linking to its report
    study.csv               the study table (one row per experiment and metric)
    retrain.html, retrain.csv, retrain_<k>.png   retraining across the experiments that
                            have retrain/summary.parquet (mlvar.report.retrain), linked
                            from the index
    auroc_box.png, auroc_vs_<k>.png   the index's figures
    _families/<family>.html one page per family: its experiments with their parameters,
                            accuracy and single-model AUROC; for each parameter it varies,
                            AUROC of each metric beside the worst and median single model,
                            accuracy of the affected and the other samples, and the rank
                            summaries; a boxplot and the AUROC of every metric
    _families/<family>-*.png          their figures

A holdout family whose experiments vary ``subclass`` and ``ratio`` also shows the study's
accuracy analyses (:mod:`mlvar.analysis.study_accuracy`): the scatter of its subclasses'
held-out accuracy at ratio 0 against the drop at ratio 1 coloured by KMeans group
(``<family>-subclasses.png``) and per group the Pearson correlations of validation with
held-out test accuracy; where the sweep cannot be grouped, the line saying what is missing.

(``_families`` cannot be an experiment's name: those start with a letter or a digit.)
Everything comes from the study table (:mod:`mlvar.analysis.study`). Within a family,
experiments of one model form a group; each parameter the group's experiments vary in
(``ratio``, ``subclass``, ``cluster``, ...; ``seed`` does not count) gets its plots, a
point being the mean over the experiments that share a value (they differ in another
parameter). The pages have no script; every text from data is escaped.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlvar import __version__
from mlvar.analysis.conventions import RANKS_MID, RANKS_STUDY
from mlvar.analysis.metrics import BASELINES, METRICS
from mlvar.analysis.service import DEFAULT_RANK_BY, analysis_dir, stored_ranks
from mlvar.analysis.study import matched_baseline, study
from mlvar.analysis.study_accuracy import HOLDOUT_MODE, subclass_accuracy
from mlvar.data.protocol import DEFAULT_PROTOCOL
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import atomic_write_bytes, staging_dir
from mlvar.report import plots, study_plots
from mlvar.report.html import TOP_DEFAULT, _check_out, environment, fmt, stylesheet
from mlvar.report.retrain import study_retrain
from mlvar.store import ExperimentStore, list_experiments

IGNORED_PARAMS = ("seed",)
FAMILIES_DIR = "_families"
OPEN_UP_TO = 12
"""A family's experiments are listed unfolded on the index up to this many."""
STUDY_LINK = "../index.html"
"""How a report of the site links back to the study page."""
MAX_CATEGORIES = 15
"""A parameter of more text values than this gets no line plots (its boxplot stays)."""


@dataclass
class StudyReportResult:
    path: Path  # index.html
    n_experiments: int
    skipped: dict[str, str]
    plots: int  # AUROC-against-parameter plots of the index
    families: int = 0
    figures: int = 0  # every figure written

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "n_experiments": self.n_experiments,
            "skipped": self.skipped,
            "plots": self.plots,
            "families": self.families,
            "figures": self.figures,
        }


def param_columns(table: pd.DataFrame) -> list[str]:
    """The scenario-parameter columns of a study table (between ``split`` and ``params``)."""
    cols = list(table.columns)
    return cols[cols.index("split") + 1 : cols.index("params")]


@dataclass
class Group:
    """The experiments of one family and model, and the parameters they vary in."""

    title: str
    model: str
    experiments: list[str]
    params: list[str]  # varying scenario parameters (seed aside)
    note: str  # why there is no plot ("" when there are)
    rows: pd.DataFrame  # their rows of the study table


@dataclass
class Family:
    """The experiments of one dataset and mode."""

    dataset: str
    mode: str
    slug: str  # file name of its page (without .html)
    experiments: list[str]
    params: list[str]  # scenario parameters any of them has
    groups: list[Group] = field(default_factory=list)
    protocol: str = DEFAULT_PROTOCOL  # the protocol its experiments follow

    @property
    def label(self) -> str:
        """The mode, and the protocol where it is not mlvar's: ``holdout (study)``."""
        return self.mode if self.protocol == DEFAULT_PROTOCOL else f"{self.mode} ({self.protocol})"

    @property
    def title(self) -> str:
        return f"{self.dataset} / {self.label}"

    @property
    def varied(self) -> list[str]:
        return list(dict.fromkeys(p for g in self.groups for p in g.params))


def _text(value: Any) -> str:
    return "?" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _slug(dataset: str, mode: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{mode}").strip("._") or "family"
    slug, k = base, 2
    while slug.lower() in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug.lower())
    return slug


def families(table: pd.DataFrame) -> list[Family]:
    """The experiments of a study table by family (dataset + mode, and the protocol where
    it is not mlvar's), in table order, each
    split into groups of one model with the parameters they vary in."""
    params = param_columns(table)
    out, taken = [], set()
    # experiments of another protocol than mlvar's are a family of their own
    protocols = (
        table["protocol"].map(_text)
        if "protocol" in table
        else pd.Series(DEFAULT_PROTOCOL, index=table.index)
    )
    keys = [table["dataset"].map(_text), table["mode"].map(_text), protocols]
    for (dataset, mode, protocol), rows in table.groupby(keys, sort=False):
        per_exp = rows.drop_duplicates("experiment")
        present = [p for p in params if per_exp[p].notna().any()]
        family = Family(dataset, mode, "", list(per_exp["experiment"]), present, protocol=protocol)
        family.slug = _slug(dataset, family.label, taken)
        for model, g in rows.groupby(rows["model"].map(_text), sort=False):
            exps = list(dict.fromkeys(g["experiment"]))
            one = g.drop_duplicates("experiment")
            varying = [
                p for p in present if p not in IGNORED_PARAMS and one[p].nunique(dropna=True) > 1
            ]
            note = ""
            if len(exps) < 2:
                note = "one experiment only"
            elif not varying:
                note = "the experiments differ in no scenario parameter"
            title = f"{family.title} / {model}"
            family.groups.append(Group(title, model, exps, varying, note, g))
        out.append(family)
    return out


def _num(value: Any) -> Any:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _experiments(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """One row per experiment: its first row of the table (dataset, parameters,
    accuracy, ...) with ``by``'s AUROC and its single models' worst and median."""
    first = table.drop_duplicates("experiment").set_index("experiment")
    rows = table[(table["kind"] == "metric") & (table["metric"] == by)].set_index("experiment")
    for key in ("auroc", "baseline_worst_auroc", "baseline_median_auroc"):
        first[f"by_{key}"] = rows[key].reindex(first.index)
    return first


def _accuracy_text(row: pd.Series, group: str) -> str:
    mean, std = _num(row.get(f"{group}_mean")), _num(row.get(f"{group}_std"))
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "–"
    return f"{mean:.4f} ± {fmt(std)}"


def _summary_row(r: dict[str, Any], links: dict[str, str] | None) -> dict[str, Any]:
    """A row of the index's table of a family's experiments."""
    return {
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


def _box_names(metrics: list[str]) -> list[tuple[str, str]]:
    names = [(m, m) for m in metrics]
    for b in BASELINES:
        names += [(f"{b}[min]", f"{b}: worst single model"), (f"{b}[median]", f"{b}: median")]
    return names


def build_study_report(
    runs_root: Path,
    out_dir: Path,
    split: str = "test",
    by: str = DEFAULT_RANK_BY,
    compute_missing: bool = False,
) -> StudyReportResult:
    """Write ``out_dir/index.html``, its family pages and plots from the study table of
    ``runs_root``."""
    if by not in METRICS:
        raise unknown_choice("metric", by, METRICS)
    out_dir = Path(out_dir)
    _check_out(out_dir)
    page = _study_page(runs_root, split, by, compute_missing)
    with staging_dir(out_dir, replace=True) as tmp:
        for name, data in page.files.items():
            atomic_write_bytes(tmp / name, data)
    return page.result(out_dir / "index.html")


@dataclass
class _Page:
    files: dict[str, bytes]  # path relative to the study folder -> content
    n_experiments: int
    skipped: dict[str, str]
    plots: int
    families: int

    def result(self, path: Path) -> StudyReportResult:
        figures = sum(name.endswith(".png") for name in self.files)
        return StudyReportResult(
            path, self.n_experiments, self.skipped, self.plots, self.families, figures
        )


def _parameter_plots(
    family: Family,
    experiments: pd.DataFrame,
    metrics: list[str],
    by: str,
    files: dict[str, bytes],
) -> list[dict[str, Any]]:
    """Draw the family page's figures per group and parameter into ``files``; return
    one block per (group, parameter) for the page: its figures and notes."""
    singles = [f"{b}[median]" for b in BASELINES]
    blocks = []
    for g in family.groups:
        one = experiments.loc[g.experiments]
        for param in g.params:
            block: dict[str, Any] = {"title": g.title, "param": param, "note": ""}
            block |= dict.fromkeys(("metrics", "accuracy", "ranks", "accuracy_note"))
            blocks.append(block)
            numeric, order = study_plots.parameter_axis(one[param])
            if not numeric and len(order) > MAX_CATEGORIES:
                block["note"] = (
                    f"{len(order)} values of {param}: too many for line plots; see the "
                    "table and the boxplot"
                )
                continue
            name = f"{family.slug}-{len(blocks) - 1}"
            rows = g.rows[g.rows[param].notna()]
            names = set(rows["metric"])
            title = f"{g.title}: against {param}"
            figures = {
                "metrics": study_plots.metric_panels(
                    rows[rows["kind"] == "metric"], param, metrics, by, title
                ),
                "accuracy": study_plots.accuracy_plot(one[one[param].notna()], param, title),
                "ranks": study_plots.rank_panels(
                    rows,
                    param,
                    metrics,
                    by,
                    title,
                    [b for b in singles if b in names],
                ),
            }
            for kind, data in figures.items():
                if data is not None:
                    files[f"{FAMILIES_DIR}/{name}-{kind}.png"] = data
                    block[kind] = f"{name}-{kind}.png"
            if figures["accuracy"] is None:
                block["note"] = "no accuracy results (run 'mlvar analyze accuracy')"
            elif one[one[param].notna()].groupby(param).size().max() == 1:
                block["accuracy_note"] = "Bars: one std across seeds."
            else:
                block["accuracy_note"] = (
                    "Points: mean over the experiments sharing a value; bars: the std of "
                    "their means (one std across seeds where one experiment has the value)."
                )
    return blocks


_CORRELATION_CELLS = (
    "centre_acc_ratio0",
    "centre_drop",
    "r_val_mean",
    "p_val_mean",
    "r_val_std",
    "p_val_std",
)


def _subclass_section(
    family: Family, runs_root: Path, files: dict[str, bytes]
) -> dict[str, Any] | None:
    """The study's accuracy analyses of a holdout family whose experiments vary a subclass
    and a ratio (:mod:`mlvar.analysis.study_accuracy`, computed without writing): the
    scatter of its KMeans groups into ``files`` and the correlation table; where the
    sweep cannot be grouped, the one line saying what is missing. None for other
    families."""
    if family.mode != HOLDOUT_MODE or not {"subclass", "ratio"} <= set(family.params):
        return None
    try:
        result = subclass_accuracy(runs_root, family.dataset, protocol=family.protocol, write=False)
    except MlvarError as exc:
        return {"missing": f"{exc.message} ({exc.hint})" if exc.hint else exc.message}
    image = f"{family.slug}-subclasses.png"
    files[f"{FAMILIES_DIR}/{image}"] = study_plots.subclass_scatter(
        result.subclasses,
        f"{family.dataset}: {len(result.subclasses)} subclasses in {result.n_groups} groups",
    )
    return {
        "missing": None,
        "image": image,
        "n_groups": result.n_groups,
        "notes": result.notes,
        "groups": [
            {
                "group": r["group"],
                "subclasses": r["subclasses"],
                "n": r["n_experiments"],
                "cells": [fmt(_num(r[k])) for k in _CORRELATION_CELLS],
            }
            for r in result.correlations.to_dict(orient="records")
        ],
    }


def _family_page(
    family: Family,
    table: pd.DataFrame,
    per: pd.DataFrame,
    experiments: pd.DataFrame,
    metrics: list[str],
    by: str,
    links: dict[str, str] | None,
    files: dict[str, bytes],
    runs_root: Path,
) -> dict[str, Any]:
    """Draw a family's figures into ``files`` and return its page's context."""
    rows = table[table["experiment"].isin(family.experiments)]
    blocks = _parameter_plots(family, experiments, metrics, by, files)
    subclass_groups = _subclass_section(family, runs_root, files)
    box = None
    if len(family.experiments) > 1:
        box = f"{family.slug}-box.png"
        files[f"{FAMILIES_DIR}/{box}"] = study_plots.auroc_box(
            rows,
            _box_names(metrics),
            by,
            f"{family.title}: AUROC over {len(family.experiments)} experiments",
        )
    metric_rows = rows[rows["kind"] == "metric"]
    pivot = metric_rows.pivot_table(
        index="experiment", columns="metric", values="auroc", aggfunc="first", sort=False
    )

    def link(e: str) -> str | None:
        return f"../{links[e]}" if links and e in links else None

    # Experiments by model, then by their parameters (missing values last).
    order = experiments.loc[family.experiments].reset_index()
    order = order.sort_values(["model", *family.params], kind="stable", na_position="last")
    table_rows = []
    for e in order["experiment"]:
        r, p = experiments.loc[e], per.loc[e]
        table_rows.append(
            {
                "experiment": e,
                "link": link(e),
                "model": _text(r["model"]),
                "params": ["–" if pd.isna(r[q]) else r[q] for q in family.params],
                "cells": [
                    r["n_runs"],
                    r["n_affected"],
                    fmt(_num(r["by_auroc"])),
                    fmt(_num(r["by_baseline_worst_auroc"])),
                    fmt(_num(r["by_baseline_median_auroc"])),
                ],
                "best": p["best_metric"] or "–",
                "best_auroc": fmt(_num(p["best_auroc"])),
                "acc_affected": _accuracy_text(r, "acc_affected"),
                "acc_unaffected": _accuracy_text(r, "acc_unaffected"),
                "stale": bool(r["stale"]),
            }
        )
    notes = dict.fromkeys(g.note for g in family.groups if g.note)
    return {
        "title": f"mlvar study: {family.title}",
        "root": "../",
        "dataset": family.dataset,
        "mode": family.label,
        "n": len(family.experiments),
        "params": family.params,
        "varied": ", ".join(family.varied),
        "rows": table_rows,
        "plots": blocks,
        "subclass_groups": subclass_groups,
        "no_plot": "; ".join(notes) or "no scenario parameter varies",
        "box": box,
        "metrics": metrics,
        "by_baseline": matched_baseline(by),
        "pivot": [
            {
                "experiment": e,
                "link": link(e),
                "cells": [
                    fmt(_num(pivot.at[e, m])) if e in pivot.index and m in pivot else "–"
                    for m in metrics
                ],
            }
            for e in order["experiment"]
        ],
    }


def _site_ranks(runs_root: Path, split: str) -> str:
    """The rank convention of the site's study table: ``study`` when every experiment's
    stored detection results were made under it, else the default (those made under the
    other convention are then listed as skipped, with the command that remakes them)."""
    made = set()
    for name in list_experiments(runs_root):
        store = ExperimentStore.open(runs_root, name)
        if (analysis_dir(store) / f"detection-{split}.parquet").is_file():
            made.add(stored_ranks(store, split))
    return RANKS_STUDY if made == {RANKS_STUDY} else RANKS_MID


def _study_page(
    runs_root: Path,
    split: str,
    by: str,
    compute_missing: bool,
    links: dict[str, str] | None = None,
) -> _Page:
    """The study pages' files; ``links``: experiment -> href of its report (relative to
    the study folder)."""
    # The site shows every experiment; protocols stay apart as families of their own.
    result = study(
        runs_root,
        split,
        compute_missing=compute_missing,
        write=False,
        ranks=_site_ranks(runs_root, split),
        allow_mixed=True,
    )
    table = result.table
    per = result.per_experiment(by)
    per_index = per.set_index("experiment")
    experiments = _experiments(table, by)
    metric_rows = table[table["kind"] == "metric"]
    metrics = [m for m in METRICS if m in set(metric_rows["metric"])]
    figures: dict[str, bytes] = {}
    env = environment()
    fams = families(table)
    family_pages: dict[str, bytes] = {}
    index_families = []
    n_overview = 0
    common = {
        "split": split,
        "by": by,
        "site": links is not None,
        "version": __version__,
    }
    contexts = []
    for f in fams:
        contexts.append(
            _family_page(
                f, table, per_index, experiments, metrics, by, links, family_pages, runs_root
            )
        )
        overview = []
        for g in f.groups:
            if g.note and len(g.experiments) < 2:
                continue
            if not g.params:
                overview.append({"title": g.title, "param": None, "note": g.note, "image": None})
            for param in g.params:
                image = f"auroc_vs_{n_overview}.png"
                n_overview += 1
                rows = g.rows[(g.rows["kind"] == "metric") & g.rows[param].notna()]
                figures[image] = plots.study_auroc(
                    rows, param, f"{g.title}: AUROC against {param}", by
                )
                overview.append({"title": g.title, "param": param, "note": "", "image": image})
        f_metric = metric_rows[metric_rows["experiment"].isin(f.experiments)]
        medians = f_metric.groupby("metric")["auroc"].median().reindex(metrics)
        best = medians.idxmax() if medians.notna().any() else None
        index_families.append(
            {
                "title": f.title,
                "slug": f.slug,
                "page": f"{FAMILIES_DIR}/{f.slug}.html",
                "n": len(f.experiments),
                "models": ", ".join(g.model for g in f.groups),
                "varied": ", ".join(
                    f"{p} ({experiments.loc[f.experiments, p].nunique()} values)" for p in f.varied
                ),
                "by_auroc": fmt(_num(medians.get(by))),
                "best": best or "–",
                "best_auroc": fmt(_num(medians.get(best))) if best else "–",
                "overview": overview,
                "open": len(f.experiments) <= OPEN_UP_TO,
                "summary": [
                    _summary_row(per_index.loc[e].to_dict() | {"experiment": e}, links)
                    for e in f.experiments
                ],
            }
        )
    if len(experiments) > 1:
        figures["auroc_box.png"] = study_plots.auroc_box(
            table,
            _box_names(metrics),
            by,
            f"AUROC of every metric over {len(experiments)} experiments",
        )
    files: dict[str, bytes] = {"style.css": stylesheet().encode(), **figures}
    files.update(family_pages)
    retrain = study_retrain(runs_root, links, env, common, families, fmt)
    files.update(retrain.files)
    for i, (f, context) in enumerate(zip(fams, contexts, strict=True)):
        nav = {
            "prev": {"title": fams[i - 1].title, "page": f"{fams[i - 1].slug}.html"}
            if i > 0
            else None,
            "next": {"title": fams[i + 1].title, "page": f"{fams[i + 1].slug}.html"}
            if i + 1 < len(fams)
            else None,
        }
        html = env.get_template("family.html").render(**common, **context, **nav)
        files[f"{FAMILIES_DIR}/{f.slug}.html"] = html.encode()
    context = {
        **common,
        "title": "mlvar study: detection across experiments",
        "root": "",
        "runs_root": str(runs_root),
        "n_experiments": len(experiments),
        "families": index_families,
        "box": "auroc_box.png" if "auroc_box.png" in figures else None,
        "skipped": result.skipped,
        "computed": result.computed,
        "retrain": retrain.index,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    html = env.get_template("study.html").render(**context)
    files["study.csv"] = table.to_csv(index=False, float_format="%.6g").encode()
    files["index.html"] = html.encode()  # last: the page appears once its parts are there
    return _Page(files, len(experiments), result.skipped, n_overview, len(fams))


@dataclass
class SiteResult:
    """What :func:`build_site` wrote."""

    path: Path  # <reports_root>/index.html
    reports: dict[str, Path]  # experiment -> its index.html
    skipped: dict[str, str]  # experiment -> why it has no report
    n_study: int  # experiments in the study table
    families: int = 0  # family pages written

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "reports": {k: str(v) for k, v in self.reports.items()},
            "skipped": self.skipped,
            "n_study": self.n_study,
            "families": self.families,
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
                out = reports_root / name
                done = build_report(store, out, split, top, by, data_root, study_link=STUDY_LINK)
                reports[name] = done.path
            except MlvarError as exc:
                skipped[name] = exc.message
            if progress:
                progress(k + 1, len(names), name)
    links = {name: f"{name}/index.html" for name in reports}
    page = _study_page(Path(runs_root), split, by, False, links)
    # The family pages are swapped in as one folder (no page of a former family stays),
    # then the files beside the reports, the index last.
    prefix = f"{FAMILIES_DIR}/"
    with staging_dir(reports_root / FAMILIES_DIR, replace=True) as tmp:
        for name, data in page.files.items():
            if name.startswith(prefix):
                atomic_write_bytes(tmp / name[len(prefix) :], data)
    for name, data in page.files.items():
        if not name.startswith(prefix):
            atomic_write_bytes(reports_root / name, data)
    skipped = {**skipped, **{k: v for k, v in page.skipped.items() if k not in skipped}}
    return SiteResult(
        reports_root / "index.html", reports, skipped, page.n_experiments, page.families
    )
