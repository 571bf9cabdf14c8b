"""Accuracy spread across runs (docs/design.md section 7): per run, per class, per affected group,
with summary statistics, a bootstrap interval, and the seed variance expected from
per-sample accuracies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mlvar.errors import MlvarError


def summarize(
    values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Summarise one value per run.

    Parameters
    ----------
    values
        One value per run; NaN entries (e.g. a class absent from the split) are dropped.
    n_boot
        Bootstrap resamples of the runs.
    seed
        Seed of ``numpy.random.default_rng`` for the bootstrap.
    level
        Coverage of the interval.

    Returns
    -------
    dict
        ``mean``, ``std`` (ddof=1; NaN for one value), ``min``, ``max``, ``ci_low``,
        ``ci_high`` (percentile bootstrap interval of the mean; both equal the value when
        there is one) and ``n`` (number of non-NaN values). All NaN when ``n`` is 0.
    """
    if not 0.0 < level < 1.0:
        raise MlvarError(f"confidence level must lie in (0, 1), got {level}", "use e.g. 0.95")
    if n_boot < 1:
        raise MlvarError(f"n_boot must be at least 1, got {n_boot}", "use e.g. 2000")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    nan = float("nan")
    if n == 0:
        return dict.fromkeys(("mean", "std", "min", "max", "ci_low", "ci_high"), nan) | {"n": 0}
    if n == 1:
        ci_low = ci_high = float(v[0])
    else:
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        alpha = (1.0 - level) / 2.0
        ci_low, ci_high = (float(q) for q in np.quantile(means, [alpha, 1.0 - alpha]))
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if n > 1 else nan,
        "min": float(v.min()),
        "max": float(v.max()),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "n": n,
    }


def _check(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if preds.ndim != 2 or labels.shape != (preds.shape[1],):
        raise MlvarError(
            f"predictions have shape {preds.shape} and labels {labels.shape}",
            "pass predictions as [runs, samples] and one label per sample",
        )
    return preds, labels


def _mean_or_nan(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    counts = np.broadcast_to(counts, sums.shape)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def run_accuracies(
    preds: np.ndarray, labels: np.ndarray, affected: np.ndarray, n_classes: int
) -> pd.DataFrame:
    """Accuracy of each run overall, per class and per affected group.

    Parameters
    ----------
    preds
        Predicted classes, shape ``[R, n]``.
    labels
        True classes, shape ``[n]``.
    affected
        Ground truth, bool ``[n]``.
    n_classes
        Number of classes C.

    Returns
    -------
    pandas.DataFrame
        One row per run (index ``run``): ``accuracy``, ``acc_class_<c>`` for c in 0..C-1
        (NaN when the class has no samples), ``acc_affected``, ``acc_unaffected`` (NaN
        when the group is empty).
    """
    preds, labels = _check(preds, labels)
    affected = np.asarray(affected).astype(bool)
    if affected.shape != labels.shape:
        raise MlvarError(
            f"affected has shape {affected.shape}, labels {labels.shape}",
            "pass one affected flag per sample",
        )
    correct = (preds == labels[None, :]).astype(np.float64)  # [R, n]
    n = labels.size
    onehot = (labels[:, None] == np.arange(n_classes)[None, :]).astype(np.float64)  # [n, C]
    per_class = _mean_or_nan(correct @ onehot, onehot.sum(axis=0)[None, :])
    groups = np.stack([affected, ~affected], axis=1).astype(np.float64)  # [n, 2]
    per_group = _mean_or_nan(correct @ groups, groups.sum(axis=0)[None, :])
    data: dict[str, np.ndarray] = {
        "accuracy": _mean_or_nan(correct.sum(axis=1), np.array(n)),
    }
    for c in range(n_classes):
        data[f"acc_class_{c}"] = per_class[:, c]
    data["acc_affected"] = per_group[:, 0]
    data["acc_unaffected"] = per_group[:, 1]
    return pd.DataFrame(data, index=pd.RangeIndex(preds.shape[0], name="run"))


def expected_seed_std(preds: np.ndarray, labels: np.ndarray) -> float:
    """Std of accuracy across runs expected if samples flipped independently.

    With ``p_i`` the fraction of runs that classify sample i correctly, returns
    ``sqrt(sum_i p_i (1 - p_i)) / n`` (the std of a mean of independent Bernoullis).

    Parameters
    ----------
    preds
        Predicted classes, shape ``[R, n]``.
    labels
        True classes, shape ``[n]``.

    Returns
    -------
    float
        The expected std; NaN when there are no samples.
    """
    preds, labels = _check(preds, labels)
    n = labels.size
    if n == 0:
        return float("nan")
    p = (preds == labels[None, :]).mean(axis=0)
    return float(np.sqrt(np.sum(p * (1.0 - p))) / n)


def accuracy_summary(
    preds: np.ndarray,
    labels: np.ndarray,
    affected: np.ndarray,
    n_classes: int,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Per-run accuracies and their summaries.

    Parameters
    ----------
    preds, labels, affected, n_classes
        As for :func:`run_accuracies`.
    n_boot, seed, level
        Passed to :func:`summarize`.

    Returns
    -------
    dict
        ``per_run`` (DataFrame of :func:`run_accuracies`), ``summary`` (``{column:
        summarize(column)}``), ``expected_seed_std`` (:func:`expected_seed_std`) and
        ``observed_seed_std`` (ddof=1 std of per-run accuracy; NaN for one run).
    """
    per_run = run_accuracies(preds, labels, affected, n_classes)
    summary = {
        col: summarize(per_run[col].to_numpy(), n_boot=n_boot, seed=seed, level=level)
        for col in per_run.columns
    }
    return {
        "per_run": per_run,
        "summary": summary,
        "expected_seed_std": expected_seed_std(preds, labels),
        "observed_seed_std": summary["accuracy"]["std"],
    }
