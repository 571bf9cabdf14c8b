"""Retraining in the reports: the "Retraining" section of an experiment's report and the
study site's page of retraining across experiments (``retrain.html``).

Both read ``<experiment>/retrain/summary.parquet`` (written by ``mlvar retrain``) through
:mod:`mlvar.analysis.retrain_summary_io`; an experiment without one has no section and
is not on the page. Strategy, pool and experiment names come from files: the templates
escape them, and the figures draw them verbatim (no mathtext).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlvar.analysis.retrain import (
    ACCURACIES,
    GAINS,
    STATS,
    read_summary,
    summary_stats,
)
from mlvar.analysis.study import experiment_protocol
from mlvar.errors import MlvarError
from mlvar.report import retrain_plots
from mlvar.store import ExperimentStore, list_experiments

SECTION_FIGURE = "retrain.png"
STUDY_PAGE = "retrain.html"
STUDY_CSV = "retrain.csv"
MAX_PANELS = 12
"""A parameter of more values than this gets no panel plot on the study page."""
Formatter = Callable[..., str]
GAIN_TITLES = {"gain": "all", "gain_affected": "held-out", "gain_unaffected": "other"}


def budget_text(budget: float) -> str:
    return f"{float(budget):g}"


def n_added_text(low: int, high: int) -> str:
    """``n_added`` over runs: one number when every run added as many, else the range."""
    return str(low) if low == high else f"{low}–{high}"


def _row(r: dict[str, Any]) -> dict[str, Any]:
    """What every table row of a strategy and budget shows (a row of ``summary_stats``)."""
    return {
        "pool": r["pool"],
        "strategy": r["strategy"],
        "oracle": r["oracle"],
        "budget": budget_text(r["budget"]),
        "n_added": n_added_text(r["n_added_min"], r["n_added_max"]),
        "n_runs": r["n_runs"],
    }


# ------------------------------------------------------------------ the experiment's section


@dataclass
class Section:
    """The report's retraining section: its template context and figures."""

    context: dict[str, Any]
    figures: dict[str, bytes] = field(default_factory=dict)


def load(store: ExperimentStore) -> pd.DataFrame | None:
    """The experiment's retraining summary (None without one; MlvarError if malformed)."""
    return read_summary(store.root)


def section(summary: pd.DataFrame, experiment: str, fmt: Formatter) -> Section:
    """The section of an experiment's retraining ``summary``: the table of each strategy
    and budget (``n_added``; mean, std, min, max, median over runs of each gain) and its
    figure (accuracy and gain against the budget; bands one std over runs). ``fmt``: the
    report's number format (:func:`mlvar.report.html.fmt`)."""
    stats = summary_stats(summary)
    rows = [
        _row(r)
        | {
            "acc": [fmt(r[f"{a}_mean"]) for a in ACCURACIES],
            "cells": [fmt(r[f"{g}_{s}"]) for g in GAINS for s in STATS],
        }
        for r in stats.to_dict(orient="records")
    ]
    strategies = stats.drop_duplicates("strategy")
    figures = {
        SECTION_FIGURE: retrain_plots.against_budget(
            stats, f"{experiment}: test accuracy after retraining and gain over budget 0"
        )
    }
    context = {
        "pools": list(dict.fromkeys(stats["pool"])),
        "n_runs": int(summary["run_id"].nunique()),
        "strategies": [
            {"name": s, "oracle": bool(o)}
            for s, o in zip(strategies["strategy"], strategies["oracle"], strict=True)
        ],
        "stats": list(STATS),
        "gains": [GAIN_TITLES[g] for g in GAINS],
        "rows": rows,
        "several_pools": stats["pool"].nunique() > 1,
    }
    return Section(context, figures)


# ------------------------------------------------------------------ the study page


@dataclass
class StudyRetrain:
    """The study site's retraining page: its files and what the index says of it."""

    files: dict[str, bytes]
    index: dict[str, Any] | None  # None: no experiment has retraining results


def _experiment_row(store: ExperimentStore) -> dict[str, Any]:
    meta = store.meta
    scenario = meta.get("scenario") or {}
    params = scenario.get("params") or {}
    return {
        "experiment": store.name,
        "dataset": meta.get("dataset"),
        "scenario": scenario.get("name"),
        "mode": scenario.get("mode"),
        "model": meta.get("model"),
        "protocol": experiment_protocol(meta),
    } | {f"param:{k}": v for k, v in params.items()}


def _family_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per experiment in the shape :func:`mlvar.report.study.families` groups:
    fixed columns, the scenario parameters between ``split`` and ``params``."""
    table = pd.DataFrame(rows)
    params = sorted(c for c in table.columns if c.startswith("param:"))
    table["split"] = "test"
    table["params"] = ""
    fixed = ["experiment", "dataset", "scenario", "mode", "model", "split"]
    table = table[[*fixed, *params, "params", "protocol"]]
    taken = (*fixed, "params", "protocol")
    return table.rename(columns={c: c[6:] for c in params if c[6:] not in taken})


def study_retrain(
    runs_root: Path,
    links: dict[str, str] | None,
    env: Any,
    common: dict[str, Any],
    families: Callable[[pd.DataFrame], list[Any]],
    fmt: Formatter,
) -> StudyRetrain:
    """Gather the retraining summaries of every experiment of ``runs_root`` into the
    page ``retrain.html`` (one row per experiment x pool x strategy x budget with the
    mean gains over runs; per family and model, the mean held-out gain against the budget
    per strategy, a panel per value of each parameter the experiments vary in) and
    ``retrain.csv``. An experiment whose summary is malformed is listed as left out.

    ``env``, ``common``: the study pages' jinja2 environment and context;
    ``families``: :func:`mlvar.report.study.families` (passed in, so that this module
    imports neither the study pages nor the report); ``fmt``: the number format."""
    skipped: dict[str, str] = {}
    infos: list[dict[str, Any]] = []
    params_text: dict[str, str] = {}  # as experiment.json has them (no float from NaN mixing)
    per: list[pd.DataFrame] = []
    for name in list_experiments(Path(runs_root)):
        try:
            store = ExperimentStore.open(Path(runs_root), name)
            summary = load(store)
        except MlvarError as exc:
            skipped[name] = exc.message
            continue
        if summary is None:
            continue
        infos.append(_experiment_row(store))
        params = (store.meta.get("scenario") or {}).get("params") or {}
        params_text[name] = " ".join(f"{k}={v}" for k, v in sorted(params.items()))
        per.append(summary_stats(summary).assign(experiment=name))
    if not infos:  # no page; the index lists the summaries it could not read
        return StudyRetrain({}, _left_out_index(skipped))
    table = _family_table(infos)
    stats = pd.concat(per, ignore_index=True)
    fams = families(table)
    params_of = table.set_index("experiment")
    files: dict[str, bytes] = {}
    blocks = []
    k = 0
    for f in fams:
        for g in f.groups:
            block: dict[str, Any] = {"title": g.title, "plots": [], "notes": []}
            blocks.append(block)
            points = stats[stats["experiment"].isin(g.experiments)].copy()
            keys: Sequence[str | None] = g.params or [None]
            for param in keys:
                if param is not None:
                    points[param] = points["experiment"].map(params_of[param])
                    n_values = points[param].nunique(dropna=True)
                    if n_values > MAX_PANELS:
                        block["notes"].append(
                            f"{n_values} values of {param}: too many panels; see the table"
                        )
                        continue
                image = f"retrain_{k}.png"
                k += 1
                against = f"per {param}" if param else f"{len(g.experiments)} experiment(s)"
                files[image] = retrain_plots.family_gains(
                    points, param, f"{g.title}: mean held-out gain against the budget ({against})"
                )
                block["plots"].append({"param": param, "image": image})
    table_rows = []
    for r in stats.to_dict(orient="records"):
        e = r["experiment"]
        p = params_of.loc[e]
        table_rows.append(
            _row(r)
            | {
                "experiment": e,
                "link": f"{links[e]}#retraining" if links and e in links else None,
                "family": f"{p['dataset']} / {p['mode']}",
                "model": p["model"],
                "params": params_text[e],
                "cells": [fmt(r[f"{g}_mean"]) for g in GAINS],
            }
        )
    described = stats.assign(
        dataset=stats["experiment"].map(params_of["dataset"]),
        mode=stats["experiment"].map(params_of["mode"]),
        model=stats["experiment"].map(params_of["model"]),
        params=stats["experiment"].map(params_text),
    )
    csv = described[
        [
            *("experiment", "dataset", "mode", "model", "params", "pool", "strategy"),
            *("oracle", "budget", "n_runs", "n_added_min", "n_added_max"),
            *(f"{g}_{s}" for g in GAINS for s in ("mean", "std")),
        ]
    ]
    html = env.get_template("study_retrain.html").render(
        **common,
        title="mlvar study: retraining across experiments",
        root="",
        n_experiments=len(infos),
        blocks=blocks,
        rows=table_rows,
        skipped=skipped,
        csv=STUDY_CSV,
    )
    files[STUDY_CSV] = csv.to_csv(index=False, float_format="%.6g").encode()
    files[STUDY_PAGE] = html.encode()
    return StudyRetrain(files, {"page": STUDY_PAGE, "n": len(infos), "skipped": skipped})


def _left_out_index(skipped: dict[str, str]) -> dict[str, Any] | None:
    """What the index says when no summary could be read: the ones left out, if any."""
    return {"page": None, "n": 0, "skipped": skipped} if skipped else None
