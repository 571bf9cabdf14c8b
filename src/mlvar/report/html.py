"""``mlvar report html``: a static page that opens from disk with no network.

Everything shown comes from the run store through the analysis service; every string
that came from data (names, labels, ids) is escaped by jinja2's autoescaping.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from mlvar import __version__
from mlvar.analysis import service as analysis
from mlvar.analysis.metrics import METRICS
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import atomic_write_bytes, atomic_write_text
from mlvar.store import ExperimentStore

TOP_DEFAULT = 50


@dataclass
class ReportResult:
    experiment: str
    path: Path  # index.html
    n_runs: int

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "path": str(self.path), "n_runs": self.n_runs}


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("mlvar.report", "templates"),
        autoescape=True,  # data-derived text (names, labels, ids) is always escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _accuracy_histogram(per_run_acc: np.ndarray, split: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    bins = min(30, max(5, len(per_run_acc) // 2))
    ax.hist(per_run_acc, bins=bins, color="#4c72b0", edgecolor="white")
    mean = float(np.mean(per_run_acc))
    ax.axvline(mean, color="#c44e52", linestyle="--", label=f"mean {mean:.4f}")
    ax.set_xlabel(f"{split} accuracy")
    ax.set_ylabel("runs")
    ax.set_title(f"{split} accuracy of {len(per_run_acc)} seeds")
    ax.legend(frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    # Fixed metadata keeps the PNG identical for identical data.
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def build_report(
    store: ExperimentStore,
    out_dir: Path,
    split: str = "test",
    top: int = TOP_DEFAULT,
    by: str = analysis.DEFAULT_RANK_BY,
) -> ReportResult:
    """Write ``out_dir/index.html`` (and its plot) for one experiment."""
    # Check what can be checked before any analysis writes its files.
    if by not in METRICS:
        raise unknown_choice("metric", by, METRICS)
    out_dir = Path(out_dir)
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise MlvarError(
                    f"report folder {out_dir} is not a folder ({parent} is a file)",
                    "pick another --out",
                )
            break
    acc = analysis.accuracy(store, split)
    ranked = analysis.rank(store, split, by=by)
    per_run_acc = acc.per_run["accuracy"].to_numpy()
    class_names = store.class_names
    summary_rows = []
    for key, label in [
        ("accuracy", "all samples"),
        ("acc_affected", "affected"),
        ("acc_unaffected", "unaffected"),
    ] + [(f"acc_class_{i}", f"class {name}") for i, name in enumerate(class_names)]:
        s = acc.summary.get(key)
        if s and s.get("n"):
            summary_rows.append(
                [label]
                + [_fmt(s.get(k)) for k in ("mean", "std", "min", "max", "ci_low", "ci_high")]
            )
    metric_cols = [m for m in METRICS if m in ranked.ranking.columns]
    top_rows = ranked.ranking.head(top)
    detection_rows = []
    if ranked.detection is not None:
        for row in ranked.detection.to_dict(orient="records"):
            detection_rows.append(
                {
                    "metric": row["metric"],
                    "formula": METRICS[row["metric"]].formula,
                    "scope": row["scope"],
                    "cells": [
                        _fmt(row[k]) for k in ("auroc", "average_precision", "precision_at_k")
                    ]
                    + [
                        _fmt(row[k], 1)
                        for k in ("rank_first", "rank_median", "rank_top10_mean", "rank_mean")
                    ]
                    + [_fmt(row["rank_mean_norm"])],
                }
            )
    baseline_rows = []
    if ranked.baselines is not None:
        for row in ranked.baselines.to_dict(orient="records"):
            baseline_rows.append(
                [row["baseline"], row["stat"], row["scope"]]
                + [_fmt(row[k]) for k in ("auroc", "average_precision", "precision_at_k")]
                + [_fmt(row["rank_mean"], 1)]
            )
    meta = store.meta
    context = {
        "title": f"mlvar report: {store.name}",
        "experiment": store.name,
        # Imported stores may lack any of these: show what is there.
        "dataset": meta.get("dataset", "?"),
        "model": meta.get("model", "?"),
        "scenario": {
            k: meta.get("scenario", {}).get(k, "?") for k in ("name", "mode", "description")
        },
        "train": meta.get("train", {}),
        "split": split,
        "n_runs": acc.n_runs,
        "n_samples": len(ranked.ranking),
        "n_affected": int(ranked.ranking["affected"].sum()),
        "expected_std": _fmt(acc.expected_seed_std),
        "observed_std": _fmt(acc.observed_seed_std),
        "summary_rows": summary_rows,
        "detection_rows": detection_rows,
        "baseline_rows": baseline_rows,
        "by": by,
        "by_formula": METRICS[by].formula,
        "top": len(top_rows),
        "metric_cols": metric_cols,
        "top_rows": [
            {
                "rank": int(r["rank"]),
                "sample_id": r["sample_id"],
                "label": r["label_name"],
                "majority": r["majority_name"],
                "votes": r["votes"],
                "affected": bool(r["affected"]),
                "metrics": [_fmt(r[m]) for m in metric_cols],
            }
            for r in top_rows.to_dict(orient="records")
        ],
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    html = _environment().get_template("index.html").render(**context)
    atomic_write_bytes(out_dir / "accuracy_hist.png", _accuracy_histogram(per_run_acc, split))
    atomic_write_text(out_dir / "index.html", html)
    return ReportResult(store.name, out_dir / "index.html", acc.n_runs)
