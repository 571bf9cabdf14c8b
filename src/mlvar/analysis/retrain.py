"""Results of ``mlvar retrain`` read back: the summary of every retraining set, its
loaders, and the statistics ``mlvar analyze retrain`` prints (docs/retrain.md).

``<experiment>/retrain/`` holds one run store per retraining set (``b0``, the budget-0
continuation every gain is measured against, and ``<strategy>-b<budget>``), each with an
``experiment.json`` whose ``"retrain"`` entry names its strategy, budget, pool and so on,
plus ``selected.parquet`` (the samples each run added) and ``summary.parquet``/``.csv``.

The summary has one row per strategy x budget x run, computed from the stored test logits
of each continued run and ``samples/test.parquet``: ``acc`` (the fraction of test samples
whose argmax is the label), ``acc_affected``/``acc_unaffected`` (the same over the
affected / other test samples; NaN for an empty group) and the gains, each minus the same
run's value in ``b0``. Budget-0 rows (from ``b0``) appear under every strategy with gain 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.accuracy import summarize
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, RunRecord

RETRAIN_DIR = "retrain"
SELECTED_FILE = "selected.parquet"
SUMMARY_STEM = "summary"
BASELINE_SET = "b0"
TEST_SPLIT = "test"

SUMMARY_COLUMNS: tuple[str, ...] = (
    "strategy",
    "budget",
    "n_added",
    "run_id",
    "seed",
    "acc",
    "acc_affected",
    "acc_unaffected",
    "gain",
    "gain_affected",
    "gain_unaffected",
    "oracle",
    "pool",
)
"""The columns of ``summary.parquet``, in order."""

SELECTED_COLUMNS: tuple[str, ...] = ("strategy", "budget", "run_id", "sample_id", "position")
"""The columns of ``selected.parquet``: ``position`` is the sample's row in
``samples/<pool>.parquet`` (the pool order the continuation adds by)."""

GAINS: tuple[str, ...] = ("gain", "gain_affected", "gain_unaffected")
STATS: tuple[str, ...] = ("mean", "std", "min", "max", "median")

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0
"""The paired comparison's bootstrap over runs: resamples, coverage, seed."""


def retrain_dir(store: ExperimentStore) -> Path:
    """``<experiment>/retrain/``."""
    return store.root / RETRAIN_DIR


def list_sets(root: Path) -> dict[str, ExperimentStore]:
    """The retraining sets under ``root`` (``<experiment>/retrain``): every folder with an
    ``experiment.json`` holding a ``"retrain"`` entry, by name (``b0`` first)."""
    out: dict[str, ExperimentStore] = {}
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir(), key=lambda p: (p.name != BASELINE_SET, p.name)):
        if not path.is_dir() or not (path / "experiment.json").is_file():
            continue
        store = ExperimentStore.open(root, path.name)
        if isinstance(store.meta.get("retrain"), dict):
            out[path.name] = store
    return out


def test_accuracies(store: ExperimentStore, runs: Sequence[RunRecord]) -> pd.DataFrame:
    """``acc``, ``acc_affected``, ``acc_unaffected`` on the test split of each run
    (index: run id), from its stored test logits (memory-mapped)."""
    samples = store.samples(TEST_SPLIT)
    labels = samples["label"].to_numpy()
    affected = samples["affected"].to_numpy().astype(bool)
    rows = {}
    for run in runs:
        correct = np.asarray(run.load_logits(TEST_SPLIT)).argmax(axis=1) == labels
        rows[run.run_id] = {
            "acc": float(correct.mean()) if correct.size else float("nan"),
            "acc_affected": float(correct[affected].mean()) if affected.any() else float("nan"),
            "acc_unaffected": (
                float(correct[~affected].mean()) if (~affected).any() else float("nan")
            ),
        }
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(SUMMARY_COLUMNS[5:8]))


def summary_table(
    root: Path, strategies: Sequence[str] = (), pool: str | None = None
) -> pd.DataFrame:
    """The summary of every retraining set under ``root`` (columns :data:`SUMMARY_COLUMNS`,
    sorted by strategy, budget, run id); empty when there is no ``b0`` set yet.

    ``b0``'s rows appear under every strategy of a set there and under ``strategies``
    (those asked for with ``pool``, even at budget 0 alone). Only verified runs are read
    (a run whose arrays fail their sha256 is skipped with a warning). A run continued in a
    set but not in ``b0`` has NaN gains.
    """
    from mlvar.analysis.acquisition import STRATEGIES

    sets = list_sets(root)
    if BASELINE_SET not in sets:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    acc = {}
    seeds: dict[str, Any] = {}
    for name, store in sets.items():
        runs = store.runs(verify=True)
        acc[name] = test_accuracies(store, runs)
        seeds.update({r.run_id: r.seed for r in runs})
    base = acc[BASELINE_SET]
    known: dict[str, dict[str, Any]] = {}
    frames = []
    for name, store in sets.items():
        if name == BASELINE_SET:
            continue
        info = store.meta["retrain"]
        known.setdefault(info["strategy"], info)
        frames.append(_rows(acc[name], base, info, float(info["budget"]), int(info["k"])))
    for strategy in strategies:
        oracle = strategy in STRATEGIES and STRATEGIES[strategy].oracle
        known.setdefault(strategy, {"strategy": strategy, "pool": pool, "oracle": oracle})
    for info in known.values():
        frames.append(_rows(base, base, info, 0.0, 0))
    if not frames:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    table = pd.concat(frames, ignore_index=True)
    table["seed"] = [seeds.get(r) for r in table["run_id"]]
    table = table.sort_values(["strategy", "budget", "run_id"], kind="stable")
    return table[list(SUMMARY_COLUMNS)].reset_index(drop=True)


def _rows(
    acc: pd.DataFrame, base: pd.DataFrame, info: dict[str, Any], budget: float, k: int
) -> pd.DataFrame:
    joined = acc.join(base.add_suffix("_b0"), how="left")
    out = pd.DataFrame(
        {
            "strategy": info["strategy"],
            "budget": budget,
            "n_added": k,
            "run_id": acc.index.astype(str),
        }
    )
    for col in ("acc", "acc_affected", "acc_unaffected"):
        out[col] = joined[col].to_numpy()
        gain = "gain" + col[3:]
        out[gain] = joined[col].to_numpy() - joined[f"{col}_b0"].to_numpy()
    out["oracle"] = bool(info.get("oracle", False))
    out["pool"] = str(info.get("pool"))
    return out


def write_summary(
    root: Path, strategies: Sequence[str] = (), pool: str | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Write ``summary.parquet`` and ``summary.csv`` under ``root`` atomically from the
    stored sets (:func:`summary_table`); return the table and both paths."""
    from mlvar.analysis.service import write_table

    table = summary_table(root, strategies, pool)
    return table, write_table(table, root / SUMMARY_STEM)


def load_summary(store: ExperimentStore) -> pd.DataFrame:
    """``retrain/summary.parquet`` of ``store``; :class:`MlvarError` when absent."""
    return _load(store, f"{SUMMARY_STEM}.parquet")


def load_selected(store: ExperimentStore) -> pd.DataFrame:
    """``retrain/selected.parquet`` of ``store``; :class:`MlvarError` when absent."""
    return _load(store, SELECTED_FILE)


def _load(store: ExperimentStore, name: str) -> pd.DataFrame:
    file = retrain_dir(store) / name
    if not file.is_file():
        raise MlvarError(
            f"experiment '{store.name}' has no retraining results ({file} is missing)",
            f"run 'mlvar retrain {store.name}' first",
        )
    return pd.read_parquet(file)


def gain_stats(summary: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and budget: ``n_runs``, ``n_added``, ``oracle``, the mean ``acc`` and
    the mean, std (ddof 1; NaN for one run), min, max and median over runs of each gain
    (``gain_mean``, ``gain_affected_std``, ...). NaN gains (no ``b0`` run) are left out."""
    rows = []
    for (strategy, budget), group in summary.groupby(["strategy", "budget"], sort=True):
        row: dict[str, Any] = {
            "strategy": strategy,
            "budget": float(budget),
            "n_added": int(group["n_added"].iloc[0]),
            "n_runs": int(len(group)),
            "oracle": bool(group["oracle"].iloc[0]),
            "acc_mean": float(group["acc"].mean()),
        }
        for gain in GAINS:
            v = group[gain].to_numpy(dtype=np.float64)
            v = v[~np.isnan(v)]
            nan = float("nan")
            row |= {
                f"{gain}_mean": float(v.mean()) if v.size else nan,
                f"{gain}_std": float(v.std(ddof=1)) if v.size > 1 else nan,
                f"{gain}_min": float(v.min()) if v.size else nan,
                f"{gain}_max": float(v.max()) if v.size else nan,
                f"{gain}_median": float(np.median(v)) if v.size else nan,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def versus_random(
    summary: pd.DataFrame,
    n_boot: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """The paired comparison of each strategy with ``random`` at each budget > 0 both have.

    For every gain, over the runs both continued (``n_runs``): the mean of the per-run
    differences ``gain(strategy, r) - gain(random, r)`` (``<gain>_diff``) and its
    percentile bootstrap interval over runs (``<gain>_ci_low``/``_ci_high``: ``n_boot``
    resamples of the runs with replacement drawn by ``numpy.random.default_rng(seed)``,
    coverage ``level``; :func:`mlvar.analysis.accuracy.summarize`).
    """
    from mlvar.analysis.acquisition import RANDOM

    rows = []
    keys = ["budget", "run_id"]
    rand = summary[(summary["strategy"] == RANDOM) & (summary["budget"] > 0)]
    others = summary[(summary["strategy"] != RANDOM) & (summary["budget"] > 0)]
    for (strategy, budget), group in others.groupby(["strategy", "budget"], sort=True):
        paired = group.merge(rand, on=keys, suffixes=("", "_random"))
        if paired.empty:
            continue
        row: dict[str, Any] = {
            "strategy": strategy,
            "budget": float(budget),
            "n_runs": int(len(paired)),
            "oracle": bool(group["oracle"].iloc[0]),
        }
        for gain in GAINS:
            diff = paired[gain].to_numpy(float) - paired[f"{gain}_random"].to_numpy(float)
            s = summarize(diff, n_boot=n_boot, seed=seed, level=level)
            row |= {f"{gain}_diff": s["mean"], f"{gain}_ci_low": s["ci_low"]}
            row[f"{gain}_ci_high"] = s["ci_high"]
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class RetrainStats:
    """What ``mlvar analyze retrain`` reports: gains per strategy and budget, and each
    strategy against ``random``."""

    experiment: str
    gains: pd.DataFrame
    versus_random: pd.DataFrame
    n_boot: int = BOOTSTRAP_RESAMPLES
    level: float = BOOTSTRAP_LEVEL

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "bootstrap": {"resamples": self.n_boot, "level": self.level, "seed": BOOTSTRAP_SEED},
            "gains": json_records(self.gains),
            "versus_random": json_records(self.versus_random),
        }


def json_records(df: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The rows of ``df`` as JSON-ready dicts: NaN becomes None, numpy scalars Python's."""
    if df is None:
        return []

    def clean(v: Any) -> Any:
        if isinstance(v, float | np.floating) and np.isnan(v):
            return None
        return v.item() if isinstance(v, np.generic) else v

    return [{k: clean(v) for k, v in r.items()} for r in df.to_dict(orient="records")]


def retrain_stats(store: ExperimentStore) -> RetrainStats:
    """The statistics of ``store``'s stored retraining summary (:func:`gain_stats`,
    :func:`versus_random`)."""
    summary = load_summary(store)
    return RetrainStats(store.name, gain_stats(summary), versus_random(summary))
