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
"""The statistics over runs of each gain (std with ddof 1: NaN for one run)."""
ACCURACIES: tuple[str, ...] = ("acc", "acc_affected", "acc_unaffected")
_NUMERIC = ("budget", "n_added", *ACCURACIES, *GAINS)

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
    """``retrain/summary.parquet`` of ``store``, checked (:func:`read_summary`);
    :class:`MlvarError` when there is none."""
    table = read_summary(store.root)
    if table is None:
        raise MlvarError(
            f"experiment '{store.name}' has no retraining results "
            f"({summary_path(store.root)} is missing or empty)",
            f"run 'mlvar retrain {store.name}' first",
        )
    return table


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
    """:func:`summary_stats` with ``n_added``: the number of samples each run added (the
    same for every run of a strategy and budget, since k depends on the pool's size)."""
    stats = summary_stats(summary)
    return stats.assign(n_added=stats["n_added_max"])


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


def summary_path(experiment_dir: Path) -> Path:
    """Where an experiment's retraining summary lies."""
    return Path(experiment_dir) / RETRAIN_DIR / f"{SUMMARY_STEM}.parquet"


def read_summary(experiment_dir: Path) -> pd.DataFrame | None:
    """The retraining summary of the experiment folder ``experiment_dir``, or None when
    it has none (no file, or one without rows: no budget-0 run had finished).

    Raises
    ------
    MlvarError
        The file is unreadable, lacks a column or has a column of the wrong kind (one
        line naming it).
    """
    path = summary_path(experiment_dir)
    if not path.is_file():
        return None
    hint = f"rerun 'mlvar retrain {Path(experiment_dir).name}' to rewrite it"
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MlvarError(f"retraining summary {path} is unreadable: {first}", hint) from exc
    missing = [c for c in SUMMARY_COLUMNS if c not in table.columns]
    if missing:
        raise MlvarError(
            f"retraining summary {path} lacks the column(s) {', '.join(missing)}", hint
        )
    if table.empty:  # written before any budget-0 run finished: nothing to show yet
        return None
    for col in _NUMERIC:
        if not pd.api.types.is_numeric_dtype(table[col]) or pd.api.types.is_bool_dtype(table[col]):
            raise MlvarError(
                f"retraining summary {path}: column {col} is not numeric ({table[col].dtype})",
                hint,
            )
    for col in ("budget", "n_added"):
        if table[col].isna().any():
            raise MlvarError(f"retraining summary {path}: column {col} has missing values", hint)
    if table["oracle"].isna().any() or not pd.api.types.is_bool_dtype(table["oracle"]):
        raise MlvarError(
            f"retraining summary {path}: column oracle is not true/false ({table['oracle'].dtype})",
            hint,
        )
    table = table.copy()
    for col in ("strategy", "run_id", "pool"):
        table[col] = table[col].astype(str)
    return table


def summary_stats(summary: pd.DataFrame) -> pd.DataFrame:
    """Per pool, strategy and budget (strategies in order of first appearance, budgets
    ascending): ``oracle``, ``n_runs``, ``n_added_min`` / ``n_added_max`` over runs, the
    mean and std (ddof 1) over runs of each accuracy (``acc_mean``, ``acc_std``, ...)
    and ``mean``, ``std`` (ddof 1), ``min``, ``max``, ``median`` of each gain
    (``gain_mean``, ``gain_affected_std``, ...)."""
    order = {s: i for i, s in enumerate(dict.fromkeys(summary["strategy"]))}
    pools = {p: i for i, p in enumerate(dict.fromkeys(summary["pool"]))}
    rows = []
    for (pool, strategy, budget), g in summary.groupby(["pool", "strategy", "budget"], sort=False):
        row = {
            "pool": pool,
            "strategy": strategy,
            "budget": float(budget),
            "oracle": bool(g["oracle"].any()),
            "n_runs": len(g),
            "n_added_min": int(g["n_added"].min()),
            "n_added_max": int(g["n_added"].max()),
        }
        for col in ACCURACIES:
            v = g[col].to_numpy(dtype=np.float64)
            row[f"{col}_mean"] = _nan_stat(np.nanmean, v)
            row[f"{col}_std"] = _nan_stat(lambda a: np.nanstd(a, ddof=1), v, 2)
        for col in GAINS:
            v = g[col].to_numpy(dtype=np.float64)
            row[f"{col}_mean"] = _nan_stat(np.nanmean, v)
            row[f"{col}_std"] = _nan_stat(lambda a: np.nanstd(a, ddof=1), v, 2)
            row[f"{col}_min"] = _nan_stat(np.nanmin, v)
            row[f"{col}_max"] = _nan_stat(np.nanmax, v)
            row[f"{col}_median"] = _nan_stat(np.nanmedian, v)
        rows.append(row)
    out = pd.DataFrame(rows)
    key = [out["pool"].map(pools), out["strategy"].map(order), out["budget"]]
    out = out.assign(_p=key[0], _s=key[1]).sort_values(["_p", "_s", "budget"], kind="stable")
    return out.drop(columns=["_p", "_s"]).reset_index(drop=True)


def _nan_stat(fn, values: np.ndarray, need: int = 1) -> float:
    """``fn`` over the non-NaN values, NaN when fewer than ``need`` (e.g. no held-out
    samples in the test split: ``acc_affected`` is NaN in every row)."""
    if np.count_nonzero(~np.isnan(values)) < need:
        return float("nan")
    return float(fn(values))


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
