"""AUROC against the number of runs: how many seeds a metric needs (docs/design.md section 7).

For each size R' in 1, 2, 4, ... (powers of two below R) and R itself, up to
``subsets`` subsets of R' runs are drawn (seeded; every subset when there are no more
than ``subsets`` of them, so R' = R is the single full set), every metric is computed on
each subset by streaming over only its runs' arrays, and its detection scores are
summarised over the subsets of each size.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.detection import detect
from mlvar.analysis.service import analysis_dir, compute, load_predictions, write_table
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore

SUMMARY_COLUMNS = (
    "n_runs",
    "metric",
    "scope",
    "n_subsets",
    "auroc_mean",
    "auroc_std",
    "auroc_min",
    "auroc_max",
    "average_precision_mean",
    "average_precision_std",
    "precision_at_k_mean",
    "precision_at_k_std",
)


def curve_sizes(n_runs: int) -> list[int]:
    """1, 2, 4, ... below ``n_runs``, then ``n_runs``."""
    sizes = [2**e for e in range(max(1, n_runs).bit_length()) if 2**e < n_runs]
    return sizes + [n_runs]


def draw_subsets(n_runs: int, size: int, subsets: int, seed: int) -> list[tuple[int, ...]]:
    """Subsets of ``size`` run indices: all of them when there are at most ``subsets``,
    else ``subsets`` distinct ones drawn with ``numpy.random.default_rng(seed + size)``."""
    if math.comb(n_runs, size) <= subsets:
        return list(itertools.combinations(range(n_runs), size))
    rng = np.random.default_rng([seed, size])
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < subsets:
        pick = tuple(sorted(int(i) for i in rng.choice(n_runs, size=size, replace=False)))
        if pick not in chosen:
            chosen.append(pick)
    return chosen


@dataclass
class CurveResult:
    """Detection scores per metric against the number of runs."""

    experiment: str
    split: str
    n_runs: int
    subsets: int
    seed: int
    summary: pd.DataFrame  # one row per (n_runs, metric): SUMMARY_COLUMNS
    details: pd.DataFrame  # one row per (n_runs, subset, metric)
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "split": self.split,
            "n_runs": self.n_runs,
            "subsets": self.subsets,
            "seed": self.seed,
            "summary": json.loads(self.summary.to_json(orient="records")),
            "details": json.loads(self.details.to_json(orient="records")),
            "files": self.files,
        }

    @property
    def sizes(self) -> list[int]:
        """The numbers of runs of the curve, ascending."""
        return sorted(int(n) for n in self.summary["n_runs"].unique())

    def auroc_by_metric(self) -> dict[str, list[tuple[float, float]]]:
        """Per metric (in the summary's order), the mean and std over subsets of its
        AUROC at each of :attr:`sizes` (std NaN where one subset was drawn)."""
        sizes, out = self.sizes, {}
        for metric, g in self.summary.groupby("metric", sort=False):
            cells = g.set_index("n_runs")
            out[str(metric)] = [
                (float(cells.loc[size, "auroc_mean"]), float(cells.loc[size, "auroc_std"]))
                for size in sizes
            ]
        return out


def _std(values: pd.Series) -> float:
    v = values.to_numpy(dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.std(ddof=1)) if v.size > 1 else float("nan")


def runs_curve(
    store: ExperimentStore,
    split: str = "test",
    subsets: int = 5,
    seed: int = 0,
    allow_mixed: bool = False,
    chunk: int | None = None,
    write: bool = True,
) -> CurveResult:
    """AUROC, AP and P@k of every metric for growing numbers of runs.

    Writes ``analysis/auroc-vs-runs-<split>.{parquet,csv}`` (the summary: mean, std
    (ddof 1; NaN for one subset), min and max over subsets of each size) and
    ``auroc-vs-runs-<split>-subsets.{parquet,csv}`` (every subset, with its run ids).
    """
    if subsets < 1:
        raise MlvarError(f"--subsets must be at least 1, got {subsets}", "use e.g. 5")
    preds = load_predictions(store, split, allow_mixed)
    affected = preds.affected
    if not affected.any() or affected.all():
        raise MlvarError(
            f"split '{split}' of '{store.name}' has "
            f"{'no' if not affected.any() else 'only'} affected samples: no detection to score",
            "the curve needs a scenario that marks some samples as affected",
        )
    labels = preds.labels
    r = len(preds.runs)
    rows = []
    for size in curve_sizes(r):
        for index, subset in enumerate(draw_subsets(r, size, subsets, seed)):
            runs = [preds.runs[i] for i in subset]
            metrics = compute(preds, runs, chunk).metrics
            det = detect(metrics, labels, affected)
            ids = " ".join(run.run_id for run in runs)
            for rec in det.to_dict(orient="records"):
                rows.append(
                    {
                        "n_runs": size,
                        "subset": index,
                        "run_ids": ids,
                        "metric": rec["metric"],
                        "scope": rec["scope"],
                        "auroc": rec["auroc"],
                        "average_precision": rec["average_precision"],
                        "precision_at_k": rec["precision_at_k"],
                    }
                )
    details = pd.DataFrame(rows)
    summary_rows = []
    order = {m: i for i, m in enumerate(dict.fromkeys(details["metric"]))}
    for (size, metric), g in details.groupby(["n_runs", "metric"], sort=False):
        summary_rows.append(
            {
                "n_runs": int(size),
                "metric": metric,
                "scope": g["scope"].iloc[0],
                "n_subsets": len(g),
                "auroc_mean": float(g["auroc"].mean()),
                "auroc_std": _std(g["auroc"]),
                "auroc_min": float(g["auroc"].min()),
                "auroc_max": float(g["auroc"].max()),
                "average_precision_mean": float(g["average_precision"].mean()),
                "average_precision_std": _std(g["average_precision"]),
                "precision_at_k_mean": float(g["precision_at_k"].mean()),
                "precision_at_k_std": _std(g["precision_at_k"]),
            }
        )
    summary = pd.DataFrame(summary_rows, columns=list(SUMMARY_COLUMNS))
    summary = summary.sort_values(
        ["n_runs", "metric"], key=lambda c: c.map(order) if c.name == "metric" else c
    ).reset_index(drop=True)
    files: list[str] = []
    if write:
        out = analysis_dir(store)
        files += write_table(summary, out / f"auroc-vs-runs-{split}")
        files += write_table(details, out / f"auroc-vs-runs-{split}-subsets")
    return CurveResult(store.name, split, r, subsets, seed, summary, details, files)
