"""AUROC against the number of runs: how many seeds a metric needs (docs/design.md section 7).

The default design (``random``): for each size R' in 1, 2, 4, ... (powers of two below R)
and R itself, up to ``subsets`` subsets of R' runs are drawn (seeded; every subset when
there are no more than ``subsets`` of them, so R' = R is the single full set). The study's
design (``prefix``): one subset per size, the first ``step``, ``2 step``, ... runs in run
order, nested, ending with all R runs. Every metric is computed on each subset by
streaming over only its runs' arrays, and its detection scores are summarised over the
subsets of each size.

One scan over the samples serves many subsets: each chunk's per-run values are computed
once for all runs (:class:`~mlvar.analysis.metrics.RunValues`) and each subset's
statistics are reduced from its rows of them, in run order, so every subset's metrics are
bit for bit those of a scan over that subset alone. The subsets' metric columns are held
until their detection is scored; subsets are scanned in batches that hold at most
:data:`CURVE_BYTES` of them.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.conventions import DESIGN_PREFIX, DESIGN_RANDOM, check_design
from mlvar.analysis.detection import detect
from mlvar.analysis.metrics import (
    ALL_METRICS,
    DYNAMICS_METRICS,
    METRICS,
    STATISTICS,
    SUM,
    RunValues,
    Sufficient,
    reduce_runs,
    statistics_of,
)
from mlvar.analysis.service import Predictions, analysis_dir, load_predictions, write_table
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore

CURVE_BYTES = 512 * 2**20
"""float64 metric columns of the subsets one scan holds at most."""

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


def prefix_sizes(n_runs: int, step: int) -> list[int]:
    """``step``, ``2 step``, ... up to ``n_runs``, then ``n_runs`` when it is no multiple
    of ``step`` (the study's 10, 20, ..., 100 of 100 runs)."""
    sizes = list(range(step, n_runs + 1, step))
    return sizes if sizes and sizes[-1] == n_runs else [*sizes, n_runs]


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
    design: str = DESIGN_RANDOM  # how the subsets were chosen
    step: int | None = None  # the prefix design's step

    def to_dict(self) -> dict[str, Any]:
        out = {
            "experiment": self.experiment,
            "split": self.split,
            "n_runs": self.n_runs,
            "subsets": self.subsets,
            "seed": self.seed,
            "summary": json.loads(self.summary.to_json(orient="records")),
            "details": json.loads(self.details.to_json(orient="records")),
            "files": self.files,
        }
        if self.design != DESIGN_RANDOM:  # recorded when not the default
            out |= {"design": self.design, "step": self.step}
        return out

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


class _RunsOf:
    """The per-run values of some runs of a :class:`RunValues`: its rows, the same bits
    as computing them from those runs' probabilities alone (every per-run value is
    computed run by run)."""

    def __init__(self, values: RunValues, index: list[int]) -> None:
        self._values = values
        self._index = index
        self.n_runs, self.n, self.n_classes = len(index), values.n, values.n_classes
        self.labels = values.labels

    def __getattr__(self, name: str) -> np.ndarray:
        return getattr(self._values, name)[self._index]


def _sum_rows(x: np.ndarray, index: list[int]) -> np.ndarray:
    """``sequential_sum(x[index])`` without copying the rows: the same additions in the
    same order."""
    acc = np.array(x[index[0]], dtype=np.float64)
    for i in index[1:]:
        acc += x[i]
    return acc


Subset = tuple[int, int, tuple[int, ...]]
"""``(size, index among the subsets of that size, run indices)``."""


def curve_plan(
    n_runs: int, subsets: int, seed: int, design: str = DESIGN_RANDOM, step: int | None = None
) -> list[Subset]:
    """Every subset the curve scores, by size: random subsets (:func:`curve_sizes`,
    :func:`draw_subsets`), or under ``design="prefix"`` the first R' runs for each R' of
    :func:`prefix_sizes` (``subsets`` and ``seed`` unused)."""
    step = check_design(design, step)
    if design == DESIGN_PREFIX:
        assert step is not None
        return [(size, 0, tuple(range(size))) for size in prefix_sizes(n_runs, step)]
    return [
        (size, index, subset)
        for size in curve_sizes(n_runs)
        for index, subset in enumerate(draw_subsets(n_runs, size, subsets, seed))
    ]


class SubsetScan:
    """Every metric of each subset of a batch, filled chunk by chunk (:meth:`add`), then
    scored against the ground truth (:meth:`rows`)."""

    def __init__(self, preds: Predictions, batch: list[Subset]) -> None:
        self.preds = preds
        self.batch = batch
        self.dynamics = preds.has_dynamics
        self.names = list(METRICS) + (list(DYNAMICS_METRICS) if self.dynamics else [])
        wanted = statistics_of(METRICS.values())
        # Sums of the probabilities themselves are added row by row from the whole
        # block (as sequential_sum adds them), not from a copy of the subset's rows.
        self.of_probs = [s for s in wanted if STATISTICS[s].value == "probs"]
        assert all(STATISTICS[s].reduce == SUM for s in self.of_probs)
        self.per_run = [s for s in wanted if s not in self.of_probs]
        n = len(preds.samples)
        self.columns = [{m: np.empty(n) for m in self.names} for _ in batch]

    def add(self, start: int, stop: int, values: RunValues) -> None:
        """Fill samples ``start:stop`` from the per-run values of every run of ``preds``."""
        for columns, (_, _, subset) in zip(self.columns, self.batch, strict=True):
            index = list(subset)
            view = _RunsOf(values, index)
            arrays = reduce_runs(view, self.per_run)  # type: ignore[arg-type]
            for name in self.of_probs:
                arrays[name] = _sum_rows(values.probs, index)
            if self.dynamics:
                runs = [self.preds.runs[i] for i in index]
                arrays |= self.preds.dynamics_sums(runs, start, stop)
            stats = Sufficient(arrays, len(index), values.labels)
            for name in self.names:
                columns[name][start:stop] = ALL_METRICS[name].finish(stats)

    def rows(self) -> list[dict[str, Any]]:
        """One row per subset and metric: its detection scores and run ids."""
        labels, affected = self.preds.labels, self.preds.affected
        out = []
        for columns, subset in zip(self.columns, self.batch, strict=True):
            metrics = pd.DataFrame(columns, columns=self.names, copy=False)
            out += detection_rows(self.preds, subset, detect(metrics, labels, affected))
        return out


def detection_rows(
    preds: Predictions, subset: Subset, detection: pd.DataFrame
) -> list[dict[str, Any]]:
    """The curve's rows of one subset from its detection table (:func:`detect` of the
    metrics over its runs)."""
    size, index, runs = subset
    ids = " ".join(preds.runs[i].run_id for i in runs)
    return [
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
        for rec in detection.to_dict(orient="records")
    ]


def curve_batches(preds: Predictions, plan: list[Subset]) -> list[list[Subset]]:
    """``plan`` cut into batches whose metric columns take at most :data:`CURVE_BYTES`."""
    n_metrics = len(METRICS) + (len(DYNAMICS_METRICS) if preds.has_dynamics else 0)
    per_subset = 8 * max(1, len(preds.samples)) * n_metrics
    size = max(1, CURVE_BYTES // per_subset)
    return [plan[i : i + size] for i in range(0, len(plan), size)]


def scan_subsets(preds: Predictions, batch: list[Subset], chunk: int | None = None) -> SubsetScan:
    """One scan over the samples of every run of ``preds`` filling ``batch``."""
    scan = SubsetScan(preds, batch)
    for a, b, probs in preds.chunks(chunk):
        scan.add(a, b, RunValues(probs, preds.labels[a:b]))
    return scan


def check_affected(preds: Predictions) -> None:
    """Refuse a split with no affected samples, or only affected ones."""
    affected = preds.affected
    if not affected.any() or affected.all():
        raise MlvarError(
            f"split '{preds.split}' of '{preds.store.name}' has "
            f"{'no' if not affected.any() else 'only'} affected samples: no detection to score",
            "the curve needs a scenario that marks some samples as affected",
        )


def runs_curve(
    store: ExperimentStore,
    split: str = "test",
    subsets: int = 5,
    seed: int = 0,
    allow_mixed: bool = False,
    chunk: int | None = None,
    write: bool = True,
    design: str = DESIGN_RANDOM,
    step: int | None = None,
) -> CurveResult:
    """AUROC, AP and P@k of every metric for growing numbers of runs.

    Writes ``analysis/auroc-vs-runs-<split>.{parquet,csv}`` (the summary: mean, std
    (ddof 1; NaN for one subset), min and max over subsets of each size) and
    ``auroc-vs-runs-<split>-subsets.{parquet,csv}`` (every subset, with its run ids).
    ``design="prefix"`` takes the nested prefixes of ``step`` (default 10), ``2 step``,
    ... runs in run order instead of random subsets (``subsets`` and ``seed`` unused);
    both tables then end with a column ``design``.
    """
    step = check_design(design, step)
    if subsets < 1:
        raise MlvarError(f"--subsets must be at least 1, got {subsets}", "use e.g. 5")
    preds = load_predictions(store, split, allow_mixed)
    check_affected(preds)
    rows = []
    plan = curve_plan(len(preds.runs), subsets, seed, design, step)
    for batch in curve_batches(preds, plan):
        rows += scan_subsets(preds, batch, chunk).rows()
    # one subset per size under the prefix design
    subsets = 1 if design == DESIGN_PREFIX else subsets
    return curve_result(preds, subsets, seed, rows, write, design, step)


def curve_result(
    preds: Predictions,
    subsets: int,
    seed: int,
    rows: list[dict[str, Any]],
    write: bool,
    design: str = DESIGN_RANDOM,
    step: int | None = None,
) -> CurveResult:
    """The curve from the rows of :meth:`SubsetScan.rows` of every subset of the plan:
    summarised per size and metric, and written when ``write``; a ``design`` other than
    the default is recorded in a last column of both tables."""
    store, split = preds.store, preds.split
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
    if design != DESIGN_RANDOM:
        summary["design"] = design
        details["design"] = design
    files: list[str] = []
    if write:
        out = analysis_dir(store)
        files += write_table(summary, out / f"auroc-vs-runs-{split}")
        files += write_table(details, out / f"auroc-vs-runs-{split}-subsets")
    return CurveResult(
        store.name, split, len(preds.runs), subsets, seed, summary, details, files, design, step
    )
