"""``mlvar report html``: a static folder that opens from disk with no network.

Layout of ``<reports_root>/<experiment>/``::

    index.html            experiment, accuracy spread, detection, ROC curves, AUROC vs
                          number of runs, confidence scatter, retraining (when
                          retrain/summary.parquet exists: mlvar.report.retrain), the
                          ranking table
    style.css             the one stylesheet (the ranking table's script is inline)
    ranking-data.js       the whole ranking for the table's script (mlvar.report.ranking):
                          index.html stays small however many samples there are
    ranking.csv           the whole ranking, for use without JavaScript
    *.png                 the figures (matplotlib, Agg)
    samples/<page>.html   one page per sample of the top K and K random unaffected ones
    samples/<page>.png    their image, when the prepared scenario is at hand
    samples/<page>.saliency.png   their GradCAM (or gradient x input) strip, or for tabular
                          data their per-feature attribution chart, when ``mlvar analyze
                          saliency`` computed one (copied from analysis/saliency-<split>/)

Everything shown comes from the run store through the analysis service. Every string
that came from data (names, labels, ids, descriptions) is escaped: by jinja2's
autoescaping in the templates, and in the ranking data (JSON in a script file) by
escaping ``<``, ``>`` and ``&`` so that no ``</script>`` can end a block; the table's
script writes cells with ``textContent`` only. With many classes the per-class views show
the worst and best classes and fold the rest (:mod:`mlvar.report.classes`). The folder
is built under a temporary name and swapped in at the end, so a failed build leaves the
previous report as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from mlvar import __version__
from mlvar.analysis import service as analysis
from mlvar.analysis.metrics import METRICS
from mlvar.analysis.saliency import SaliencyIndex
from mlvar.analysis.saliency import read_index as saliency_index
from mlvar.analysis.scan import ExperimentScan, scan_experiment
from mlvar.analysis.selection import choose_samples
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import atomic_write_bytes, atomic_write_text, staging_dir
from mlvar.report import classes, plots
from mlvar.report import retrain as retrain_section
from mlvar.report.defaults import TOP_DEFAULT
from mlvar.report.ranking import (
    DATA_FILE,
    data_script,
    integral,
    json_for_script,  # noqa: F401 - part of this module's API
    ranking_data,
    votes_texts,
)
from mlvar.report.samples import (
    Inputs,
    SeedPredictions,
    load_inputs,
    page_names,
    seed_predictions,
)
from mlvar.store import ExperimentStore

CURVE_SUBSETS = 5


@dataclass
class ReportResult:
    experiment: str
    path: Path  # index.html
    n_runs: int
    n_pages: int = 0  # sample pages written
    inputs: str = ""  # why the sample pages show no input ("" when they do)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "path": str(self.path),
            "n_runs": self.n_runs,
            "n_pages": self.n_pages,
            "inputs_missing": self.inputs or None,
        }


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mlvar.report", "templates"),
        autoescape=True,  # data-derived text (names, labels, ids) is always escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env


_environment = environment


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell: fixed digits, "–" for missing."""
    if value is None:
        return "–"
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


_fmt = fmt


def stylesheet() -> str:
    return environment().loader.get_source(environment(), "report.css")[0]


def _check_out(out_dir: Path) -> None:
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise MlvarError(
                    f"report folder {out_dir} is not a folder ({parent} is a file)",
                    "pick another --out",
                )
            break


# ------------------------------------------------------------------ sections of the index


def _detection_rows(ranked: analysis.RankResult) -> list[dict[str, Any]]:
    rows = []
    if ranked.detection is None:
        return rows
    for row in ranked.detection.to_dict(orient="records"):
        rows.append(
            {
                "metric": row["metric"],
                "formula": METRICS[row["metric"]].formula if row["metric"] in METRICS else "",
                "scope": row["scope"],
                "cells": [fmt(row[k]) for k in ("auroc", "average_precision", "precision_at_k")]
                + [fmt(row[k], 1) for k in ("rank_first", "rank_median", "rank_top10_mean")]
                + [fmt(row["rank_mean"], 1), fmt(row["rank_mean_norm"])],
            }
        )
    return rows


def _baseline_rows(ranked: analysis.RankResult) -> list[list[str]]:
    if ranked.baselines is None:
        return []
    return [
        [row["baseline"], row["stat"], row["scope"]]
        + [fmt(row[k]) for k in ("auroc", "average_precision", "precision_at_k")]
        + [fmt(row["rank_mean"], 1)]
        for row in ranked.baselines.to_dict(orient="records")
    ]


def _roc(ranked: analysis.RankResult) -> bytes | None:
    """ROC curves of every scored metric, in the population its score was ranked in."""
    if ranked.detection is None:
        return None
    table = ranked.ranking
    labels = table["label"].to_numpy()
    affected = table["affected"].to_numpy(dtype=bool)
    curves = []
    for row in ranked.detection.to_dict(orient="records"):
        name = row["metric"]
        if name not in table.columns or name not in METRICS:
            continue
        score = METRICS[name].suspicion(table[name].to_numpy())
        mask = np.ones(len(table), dtype=bool)
        if str(row["scope"]).startswith("class "):
            mask = labels == int(str(row["scope"])[6:])
        s, a = score[mask], affected[mask]
        ok = ~np.isnan(s)
        s, a = s[ok], a[ok]
        if a.all() or not a.any():
            continue
        fpr, tpr = plots.roc_points(s, a)
        title = name if row["scope"] == "split" else f"{name} ({row['scope']})"
        curves.append((title, fpr, tpr, float(row["auroc"])))
    return plots.roc_curves(curves) if curves else None


def _curve(scan: ExperimentScan) -> tuple[pd.DataFrame | None, str]:
    if scan.curve is None:
        return None, scan.curve_note
    if scan.curve.summary["n_runs"].nunique() < 2:
        return None, "one run only: nothing to vary"
    return scan.curve.summary, ""


# ------------------------------------------------------------------ sample pages


def _metric_ranks(ranking: pd.DataFrame, metric_cols: list[str]) -> dict[str, np.ndarray]:
    """Per metric, each row's 1-based rank by that metric's suspicion (over the split)."""
    out = {}
    for m in metric_cols:
        s = METRICS[m].suspicion(ranking[m].to_numpy())
        s = np.where(np.isnan(s), -np.inf, s)
        order = np.argsort(-s, kind="stable")
        r = np.empty(len(s), dtype=np.int64)
        r[order] = np.arange(1, len(s) + 1)
        out[m] = r
    return out


def _sample_context(
    row_no: int,
    row: dict[str, Any],
    position: int,
    page: str,
    class_names: list[str],
    metric_cols: list[str],
    metric_ranks: dict[str, np.ndarray],
    preds: SeedPredictions,
    inputs: Inputs,
    image: str | None,
    n_samples: int,
    whole: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    probs = preds.of(position)  # [R, C]
    votes = [int(v) for v in str(row["votes"]).split()]
    label = int(row["label"])
    mean, std = probs.mean(axis=0), probs.std(axis=0)
    r = max(1, preds.n_runs)
    per_class = [
        {
            "name": name,
            "votes": votes[c] if c < len(votes) else 0,
            "share": 100.0 * (votes[c] if c < len(votes) else 0) / r,
            "p": float(mean[c]),
            "mean": fmt(float(mean[c])),
            "std": fmt(float(std[c])),
            "is_label": c == label,
        }
        for c, name in enumerate(class_names)
    ]
    listed, folded = classes.vote_rows(per_class)
    runs = [
        {
            "run_id": rid,
            "seed": "–" if seed is None else seed,
            "pred": class_names[int(p.argmax())],
            "correct": int(p.argmax()) == label,
            "gconf": fmt(float(p[label])),
            "maxconf": fmt(float(p.max())),
        }
        for rid, seed, p in zip(preds.run_ids, preds.seeds, probs, strict=True)
    ]
    features = []
    x = inputs.rows.get(position)
    if inputs.kind == "tabular" and x is not None:
        flat = np.asarray(x).ravel()
        names = inputs.feature_names
        for i, v in enumerate(flat.tolist()):
            features.append((names[i] if i < len(names) else f"feature {i}", fmt(float(v))))
    if inputs.kind is None:
        no_input = inputs.reason
    elif x is None:
        no_input = "this sample id is not in the prepared scenario"
    else:
        no_input = ""
    return {
        "page": page,
        "row_no": row_no,
        "rank": int(row["rank"]),
        "sample_id": row["sample_id"],
        "label": row["label_name"],
        "majority": row["majority_name"],
        "affected": bool(row["affected"]),
        "group": row.get("group", -1),
        "image": image,
        "features": features,
        "no_input": no_input,
        "classes": listed,
        "classes_folded": folded,
        "runs": runs,
        "metrics": [
            {
                "name": m,
                "value": fmt(row[m], 0 if m in whole else 4),
                "rank": int(metric_ranks[m][row_no]),
                "formula": METRICS[m].formula,
                "higher": METRICS[m].higher_is_suspicious,
            }
            for m in metric_cols
        ],
        "n_samples": n_samples,
        # Per-sample attributions (docs/design.md section 8): a list of {"title", "image"}
        # dicts, set by build_report when analysis/saliency-<split>/ has a strip or chart of
        # the sample;
        # tabular samples also get their per-feature attributions (name, value, true, pred).
        "attribution": None,
        "feature_attribution": None,
    }


def _method(meta: dict[str, Any]) -> str:
    """How a saliency folder attributes: its method, with the layer for GradCAM."""
    method = str(meta.get("method", "GradCAM"))
    if method.startswith("GradCAM"):
        return f"GradCAM at layer {meta.get('layer', '?')}"
    return method


def _strip_title(strips: SaliencyIndex, label: Any) -> str:
    meta = strips.meta
    n = len(meta.get("run_ids", []))
    if meta.get("input") == "tabular":
        return (
            f"{_method(meta)} per feature of {n} runs: left for the true class ({label}), "
            "right for each run's predicted class; bars the mean across runs, whiskers the "
            "std, dots the runs (red: a wrong prediction)"
        )
    what = _method(meta)
    if not what.startswith("GradCAM"):
        what += " (|attribution| summed over channels, each map scaled to 0..1)"
    return (
        f"{what} of {n} runs: top row the true class "
        f"({label}), bottom row each run's predicted class (red frame: wrong); columns the "
        "input, each run, and the mean, std (0 to 0.5) and max - min across runs"
    )


def _feature_attribution(
    row: dict[str, Any], features: list[tuple[str, str]]
) -> list[tuple[str, str, str, str]] | None:
    """Per feature of a tabular sample: name, value, and the gradient x input of the true
    and of the predicted class as "mean ± std" across runs (None without attributions)."""
    cols = ("attr_true_mean", "attr_true_std", "attr_pred_mean", "attr_pred_std")
    try:
        tm, ts, pm, ps = (np.asarray(row[c], dtype=np.float64) for c in cols)
    except (KeyError, TypeError, ValueError):
        return None
    if not features or not (len(tm) == len(ts) == len(pm) == len(ps) == len(features)):
        return None
    return [
        (name, value, f"{fmt(tm[i])} ± {fmt(ts[i])}", f"{fmt(pm[i])} ± {fmt(ps[i])}")
        for i, (name, value) in enumerate(features)
    ]


def _saliency_note(strips: SaliencyIndex | None, n_pages: int, split: str) -> str:
    if strips is None:
        return ""
    if not n_pages:
        return (
            f"The saliency in analysis/saliency-{split}/ covers none of these pages "
            "(computed with another --top or --by)."
        )
    meta = strips.meta
    method = str(meta.get("method", "GradCAM"))
    gradcam = method.startswith("GradCAM")
    what = "attribution charts" if meta.get("input") == "tabular" else "strips"
    layer = f"layer {meta.get('layer', '?')}, " if gradcam else ""
    return (
        f"{n_pages} of these pages show {'GradCAM' if gradcam else method} {what} "
        f"({layer}{len(meta.get('run_ids', []))} runs; from analysis/saliency-{split}/, "
        "written by 'mlvar analyze saliency')."
    )


# ------------------------------------------------------------------ the report


def build_report(
    store: ExperimentStore,
    out_dir: Path,
    split: str = "test",
    top: int = TOP_DEFAULT,
    by: str = analysis.DEFAULT_RANK_BY,
    data_root: Path | None = None,
    curve_subsets: int = CURVE_SUBSETS,
    seed: int = 0,
    study_link: str | None = None,
) -> ReportResult:
    """Write the report folder ``out_dir`` (``index.html``, figures, sample pages).

    ``top``: rows of the static (no-script) table and samples with a page, plus as many
    random unaffected ones (drawn with ``seed``). ``data_root``: where to look for the
    prepared scenario whose inputs the sample pages show. ``study_link``: the href of the
    study page the report is part of (:func:`mlvar.report.study.build_site`), shown
    first in its navigation.
    """
    # Check what can be checked before any analysis writes its files.
    if by not in METRICS:
        raise unknown_choice("metric", by, METRICS)
    if top < 1:
        raise MlvarError(f"--top must be at least 1, got {top}", "use e.g. 50")
    out_dir = Path(out_dir)
    _check_out(out_dir)
    retrain_summary = retrain_section.load(store)  # a malformed one stops before any write
    # Accuracy and ranking are written to analysis/ as the analyze commands write them
    # (under the rank convention they were last written with, so a report does not undo
    # 'analyze rank --ranks study'); the curve is computed afresh from the same scan.
    ranks = analysis.stored_ranks(store, split)
    scan = scan_experiment(store, split, by, curve_subsets, ranks=ranks)
    acc, ranked = scan.accuracy, scan.ranked
    ranking = ranked.ranking
    class_names = store.class_names
    metric_cols = [m for m in METRICS if m in ranking.columns]
    curve, curve_note = _curve(scan)

    # Which samples get a page, and what they show (pages need unique sample ids).
    position_of = pd.Index(store.samples(split)["sample_id"].astype(str))
    page_rows = choose_samples(ranking, top, seed) if position_of.is_unique else []
    names = page_names(ranking["sample_id"])
    pages = {i: f"samples/{names[i]}.html" for i in page_rows}
    ids = ranking["sample_id"].astype(str).to_numpy()
    positions = {i: int(position_of.get_loc(ids[i])) for i in page_rows}
    inputs = load_inputs(store, data_root, split, sorted(positions.values()))
    preds = seed_predictions(store, split, list(positions.values()), scan.predictions)
    strips = saliency_index(store, split)
    with_strip = (
        {i for i in page_rows if str(ids[i]) in strips.overlays} if strips is not None else set()
    )
    meta = store.meta
    scenario = meta.get("scenario") or {}
    n_affected = int(ranking["affected"].sum())
    context = {
        "title": f"mlvar report: {store.name}",
        "root": "",
        "study_link": study_link,
        "experiment": store.name,
        # Imported stores may lack any of these: show what is there.
        "dataset": meta.get("dataset", "?"),
        "model": meta.get("model", "?"),
        "scenario": {k: scenario.get(k, "?") for k in ("name", "mode", "description")},
        "params": scenario.get("params") or {},
        "train": meta.get("train", {}),
        "split": split,
        "n_runs": acc.n_runs,
        "n_samples": len(ranking),
        "n_affected": n_affected,
        "expected_std": fmt(acc.expected_seed_std),
        "observed_std": fmt(acc.observed_seed_std),
        "accuracy": classes.accuracy_table(acc.summary, acc.class_names, fmt),
        "detection_rows": _detection_rows(ranked),
        "baseline_rows": _baseline_rows(ranked),
        "curve_rows": []
        if curve is None
        else [
            [int(r["n_runs"]), int(r["n_subsets"])]
            + [fmt(r[k]) for k in ("auroc_mean", "auroc_std", "auroc_min", "auroc_max")]
            for r in curve[curve["metric"] == by].to_dict(orient="records")
        ],
        "curve_note": curve_note,
        "curve_subsets": curve_subsets,
        "by": by,
        "by_formula": METRICS[by].formula,
        "top": min(top, len(ranking)),
        "n_pages": len(page_rows),
        "inputs_note": inputs.reason,
        "saliency_note": _saliency_note(strips, len(with_strip), split),
        "metric_cols": metric_cols,
        "top_rows": [
            {
                "rank": int(r["rank"]),
                "sample_id": r["sample_id"],
                "label": r["label_name"],
                "majority": r["majority_name"],
                "votes": votes,
                "affected": bool(r["affected"]),
                "page": pages.get(i),
                "metrics": [fmt(r[m]) for m in metric_cols],
            }
            for i, (r, votes) in enumerate(
                zip(
                    ranking.head(top).to_dict(orient="records"),
                    votes_texts([str(v) for v in ranking["votes"].head(top)], class_names),
                    strict=True,
                )
            )
        ],
        "ranking_file": DATA_FILE,
        "class_names": class_names,
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    figures = {
        "accuracy_hist.png": plots.accuracy_histogram(acc.per_run["accuracy"].to_numpy(), split),
        "class_accuracy.png": classes.accuracy_plot(acc.summary, acc.class_names),
        "roc.png": _roc(ranked),
        "auroc_vs_runs.png": None if curve is None else plots.auroc_vs_runs(curve, by),
        "confidence.png": plots.confidence_scatter(
            ranking["gconf_mean"].to_numpy(),
            ranking["gconf_std"].to_numpy(),
            ranking["affected"].to_numpy(dtype=bool),
        )
        if {"gconf_mean", "gconf_std"} <= set(ranking.columns)
        else None,
    }
    context["retrain"] = None
    if retrain_summary is not None:
        retrained = retrain_section.section(retrain_summary, store.name, fmt)
        context["retrain"] = retrained.context
        figures.update(retrained.figures)
    context["figures"] = {k: v is not None for k, v in figures.items()}
    env = environment()
    html = env.get_template("index.html").render(**context)

    metric_ranks = _metric_ranks(ranking, metric_cols)
    whole = frozenset(m for m in metric_cols if integral(ranking[m].to_numpy()))
    ranking_js = data_script(ranking_data(ranking, metric_cols, pages, class_names))
    records = ranking.iloc[page_rows].to_dict(orient="records")
    with staging_dir(out_dir, replace=True) as tmp:
        atomic_write_text(tmp / "style.css", stylesheet())
        for name, data in figures.items():
            if data is not None:
                atomic_write_bytes(tmp / name, data)
        csv = ranking.to_csv(index=False, float_format="%.6g")
        atomic_write_text(tmp / "ranking.csv", csv)
        atomic_write_text(tmp / DATA_FILE, ranking_js)
        atomic_write_text(tmp / "index.html", html)
        template = env.get_template("sample.html")
        for k, (row_no, row) in enumerate(zip(page_rows, records, strict=True)):
            page = names[row_no]
            position = positions[row_no]
            image = None
            x = inputs.rows.get(position)
            if inputs.kind == "image" and x is not None:
                image = f"{page}.png"
                atomic_write_bytes(tmp / "samples" / image, plots.thumbnail(x, inputs.max_value))
            sample = _sample_context(
                row_no,
                row,
                position,
                page,
                class_names,
                metric_cols,
                metric_ranks,
                preds,
                inputs,
                image,
                len(ranking),
                whole,
            )
            if row_no in with_strip:
                strip = f"{page}.saliency.png"
                data = strips.overlays[str(ids[row_no])].read_bytes()
                atomic_write_bytes(tmp / "samples" / strip, data)
                sample["attribution"] = [
                    {"title": _strip_title(strips, row["label_name"]), "image": strip}
                ]
                sample["feature_attribution"] = _feature_attribution(
                    strips.rows[str(ids[row_no])], sample["features"]
                )
            nav = {
                "prev": f"{names[page_rows[k - 1]]}.html" if k > 0 else None,
                "next": f"{names[page_rows[k + 1]]}.html" if k + 1 < len(page_rows) else None,
                "index": k + 1,
                "total": len(page_rows),
                "kind": "top" if row_no < top else "random unaffected",
            }
            atomic_write_text(
                tmp / "samples" / f"{page}.html",
                template.render(
                    title=f"sample {row['sample_id']} of {store.name}",
                    root="../",
                    experiment=store.name,
                    split=split,
                    by=by,
                    n_runs=acc.n_runs,
                    s=sample,
                    nav=nav,
                    version=__version__,
                ),
            )
    return ReportResult(
        store.name, out_dir / "index.html", acc.n_runs, len(page_rows), inputs.reason
    )
