"""Reading ``<experiment>/retrain/summary.parquet`` (written by ``mlvar retrain``) and its
per strategy x budget statistics, for the report and the study site.

The summary has one row per strategy x budget x run (docs/retrain.md): ``strategy``,
``budget``, ``n_added``, ``run_id``, ``seed``, the test accuracies ``acc``,
``acc_affected`` (the held-out group), ``acc_unaffected`` (the other samples), the gains
``gain``, ``gain_affected``, ``gain_unaffected`` over the same run's budget-0
continuation, ``oracle`` (the strategy reads labels) and ``pool`` (the split the added
samples came from). :func:`load_summary` is meant to be
``mlvar.analysis.retrain.load_summary``; this module holds it until the two meet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mlvar.errors import MlvarError

RETRAIN_DIR = "retrain"
SUMMARY_FILE = "summary.parquet"
ACCURACY_COLUMNS = ("acc", "acc_affected", "acc_unaffected")
GAIN_COLUMNS = ("gain", "gain_affected", "gain_unaffected")
SUMMARY_COLUMNS = (
    "strategy",
    "budget",
    "n_added",
    "run_id",
    "seed",
    *ACCURACY_COLUMNS,
    *GAIN_COLUMNS,
    "oracle",
    "pool",
)
_NUMERIC = ("budget", "n_added", *ACCURACY_COLUMNS, *GAIN_COLUMNS)
STATS = ("mean", "std", "min", "max", "median")
"""The statistics over runs of each gain (std with ddof 1: NaN for one run)."""


def summary_path(experiment_dir: Path) -> Path:
    """Where an experiment's retraining summary lies."""
    return Path(experiment_dir) / RETRAIN_DIR / SUMMARY_FILE


def load_summary(experiment_dir: Path) -> pd.DataFrame | None:
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
        for col in ACCURACY_COLUMNS:
            v = g[col].to_numpy(dtype=np.float64)
            row[f"{col}_mean"] = _nan_stat(np.nanmean, v)
            row[f"{col}_std"] = _nan_stat(lambda a: np.nanstd(a, ddof=1), v, 2)
        for col in GAIN_COLUMNS:
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
