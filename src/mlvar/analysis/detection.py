"""How well a suspicion score finds the affected samples (docs/design.md section 7).

A *score* is oriented so that higher means more suspicious (see
:meth:`mlvar.analysis.metrics.Metric.suspicion`); ``affected`` is the scenario's ground
truth. All scores treat tied values as one threshold, so the result never depends on
the order of tied samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.conventions import RANKS_MID, RANKS_STUDY, check_ranks
from mlvar.analysis.metrics import ALL_METRICS, BASELINES
from mlvar.errors import MlvarError, unknown_choice

RANK_COLUMNS: tuple[str, ...] = ("rank_first", "rank_median", "rank_top10_mean", "rank_mean")
SCORE_COLUMNS: tuple[str, ...] = (
    "auroc",
    "average_precision",
    "precision_at_k",
    *RANK_COLUMNS,
    *(f"{c}_norm" for c in RANK_COLUMNS),
)
"""Columns of :func:`detection_scores` besides ``n`` and ``n_affected``."""

STATS: tuple[str, ...] = ("min", "median", "max")
"""Summaries of the single-model baselines over runs."""


def _check(score: np.ndarray, affected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score = np.asarray(score, dtype=np.float64)
    affected = np.asarray(affected)
    if score.ndim != 1 or affected.shape != score.shape:
        raise MlvarError(
            f"score has shape {score.shape} but affected has shape {affected.shape}",
            "pass one score and one affected flag per sample",
        )
    if np.isnan(score).any():
        raise MlvarError("score contains NaN", "metric values must be numbers to rank them")
    return score, affected.astype(bool)


def _tie_groups(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal scores in descending order: (group index of each sample, group sizes)."""
    # np.unique sorts ascending; negate so group 0 holds the highest score.
    _, inverse, counts = np.unique(-score, return_inverse=True, return_counts=True)
    return inverse.reshape(score.shape), counts


def average_ranks(score: np.ndarray) -> np.ndarray:
    """1-based ranks in descending order of ``score``; tied values share their mean rank.

    Parameters
    ----------
    score
        1-D scores (higher = more suspicious), no NaN.

    Returns
    -------
    numpy.ndarray
        float64 ranks, e.g. ``[3, 1, 3, 2]`` gives ``[1.5, 4, 1.5, 3]``.
    """
    score = np.asarray(score, dtype=np.float64)
    if score.size == 0:
        return np.zeros(0)
    return _ranks(*_tie_groups(score))


def study_positions(score: np.ndarray, higher_is_suspicious: bool = True) -> np.ndarray:
    """0-based positions in the original study's order (``--ranks study``).

    The study sorted a metric's values ascending with ``numpy.argsort`` and reversed that
    order for a metric where high is suspicious. The ascending sort here is stable, so
    tied values keep sample order when ascending and come last sample first when
    reversed: what the study's sort gave wherever values are distinct (and on small
    arrays); among ties its order was numpy's unspecified one.

    Parameters
    ----------
    score
        1-D suspicion scores (higher = more suspicious, :meth:`Metric.suspicion`), no NaN.
    higher_is_suspicious
        The metric's orientation: True when ``score`` is its value, False when ``score``
        is its negation (the study then sorted the value ascending).

    Returns
    -------
    numpy.ndarray
        int64 position of each sample, 0 = most suspicious; e.g. ``[3, 1, 3, 2]`` gives
        ``[1, 3, 0, 2]`` when high is suspicious, ``[0, 3, 1, 2]`` when low is (as the
        negated values ``[-3, -1, -3, -2]`` sort).
    """
    score = np.asarray(score, dtype=np.float64)
    if higher_is_suspicious:
        order = np.argsort(score, kind="stable")[::-1]
    else:
        order = np.argsort(-score, kind="stable")  # the value itself, ascending
    positions = np.empty(score.size, dtype=np.int64)
    positions[order] = np.arange(score.size)
    return positions


def _ranks(inverse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    end = np.cumsum(counts)  # last 1-based position of each group
    start = end - counts + 1  # first 1-based position
    return ((start + end) / 2.0)[inverse]


def _auroc(ranks: np.ndarray, affected: np.ndarray) -> float:
    # Mann-Whitney U from ascending ranks; ties count 1/2, which matches the trapezoidal
    # area under the ROC curve that sklearn computes.
    n = ranks.size
    n_pos = int(affected.sum())
    n_neg = n - n_pos
    ascending = n + 1 - ranks[affected]
    u = ascending.sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_precision(
    score: np.ndarray, affected: np.ndarray, groups: tuple[np.ndarray, np.ndarray] | None = None
) -> float:
    # Step-wise AP as in sklearn: sum over thresholds of (recall increase) * precision,
    # with every distinct score one threshold. ``groups``: _tie_groups(score), if known.
    inverse, counts = _tie_groups(score) if groups is None else groups
    pos = np.bincount(inverse, weights=affected.astype(np.float64), minlength=counts.size)
    tp = np.cumsum(pos)
    precision = tp / np.cumsum(counts)
    return float(np.sum(pos * precision) / tp[-1])


def _precision_at_k(
    score: np.ndarray,
    affected: np.ndarray,
    k: int,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    inverse, counts = _tie_groups(score) if groups is None else groups
    # The k-th largest score: the value of the tie group holding position k.
    t = score[np.argmax(inverse == np.searchsorted(np.cumsum(counts), k))]
    above = score > t
    tied = score == t
    n_above = int(above.sum())
    # The k - n_above remaining slots are filled from the tied samples; in expectation
    # over their order, a fraction affected[tied].mean() of them are affected.
    expected_tied = (k - n_above) * affected[tied].sum() / tied.sum()
    return float((affected[above].sum() + expected_tied) / k)


def detection_scores(
    score: np.ndarray,
    affected: np.ndarray,
    ranks: str = RANKS_MID,
    higher_is_suspicious: bool = True,
) -> dict[str, Any]:
    """Score how well ``score`` ranks the affected samples first.

    Parameters
    ----------
    score
        1-D suspicion scores, higher = more suspicious.
    affected
        1-D bool ground truth of the same length.
    ranks
        The rank summaries' convention: ``"mid"`` (:func:`average_ranks`) or
        ``"study"`` (:func:`study_positions`; only they read ``higher_is_suspicious``).
    higher_is_suspicious
        Whether ``score`` is the metric's value (True) or its negation.

    Returns
    -------
    dict
        ``n``, ``n_affected`` and every name in :data:`SCORE_COLUMNS`: ``auroc``
        (ties count 1/2), ``average_precision`` (as sklearn), ``precision_at_k`` with
        k = n_affected (ties at the k-th score filled in expectation), and the ranks of
        the affected samples (:func:`average_ranks`, or under ``"study"`` their 0-based
        :func:`study_positions`): first, median, mean of the 10 best, mean; ``*_norm``
        divides each by n. Scores are NaN when no sample or every sample is affected.
    """
    check_ranks(ranks)
    score, affected = _check(score, affected)
    n = int(score.size)
    n_affected = int(affected.sum())
    out: dict[str, Any] = {"n": n, "n_affected": n_affected}
    out.update(dict.fromkeys(SCORE_COLUMNS, float("nan")))
    if n_affected == 0 or n_affected == n:
        return out
    groups = _tie_groups(score)  # one sort serves the ranks and the precision
    mid = _ranks(*groups)
    if ranks == RANKS_STUDY:
        aff_ranks = np.sort(study_positions(score, higher_is_suspicious)[affected])
    else:
        aff_ranks = np.sort(mid[affected])
    out["auroc"] = _auroc(mid, affected)
    out["average_precision"] = _average_precision(score, affected, groups)
    out["precision_at_k"] = _precision_at_k(score, affected, n_affected, groups)
    out["rank_first"] = float(aff_ranks[0])
    out["rank_median"] = float(np.median(aff_ranks))
    out["rank_top10_mean"] = float(aff_ranks[:10].mean())
    out["rank_mean"] = float(aff_ranks.mean())
    for col in RANK_COLUMNS:
        out[f"{col}_norm"] = out[col] / n
    return out


def _scope(
    uses_label: bool, labels: np.ndarray, affected: np.ndarray
) -> tuple[str, np.ndarray | None]:
    """The population a score is ranked in: (scope text, sample mask or None for all)."""
    if uses_label:
        classes = np.unique(labels[affected])
        if classes.size == 1:
            # A label-aware metric partly measures the label itself; comparing within the
            # affected class keeps it from "detecting" the class instead of the samples.
            # When the whole class is affected (a held-out class) there is nothing to
            # compare within, so the split is the population.
            c = classes[0]
            in_class = labels == c
            if not affected[in_class].all():
                return f"class {c}", in_class
    return "split", None


def _check_labels(labels: np.ndarray, affected: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    labels = np.asarray(labels)
    affected = np.asarray(affected).astype(bool)
    if labels.shape != (n,) or affected.shape != (n,):
        raise MlvarError(
            f"expected {n} labels and affected flags, got shapes {labels.shape} and "
            f"{affected.shape}",
            "labels and affected must follow the row order of the metric values",
        )
    return labels, affected


def detect(
    metrics_df: pd.DataFrame,
    labels: np.ndarray,
    affected: np.ndarray,
    names: Sequence[str] | None = None,
    ranks: str = RANKS_MID,
) -> pd.DataFrame:
    """Detection scores of every metric against the ground truth.

    Label-aware metrics are ranked within the affected samples' class when all affected
    samples share one label, otherwise over the whole split; label-free metrics always
    over the whole split.

    Parameters
    ----------
    metrics_df
        Metric columns (:func:`~mlvar.analysis.metrics.compute_metrics`, or a ranking's),
        one row per sample.
    labels, affected
        Per-sample labels and ground truth, in the row order of ``metrics_df``.
    names
        Metrics to score (default: every registry metric present in ``metrics_df``,
        training-dynamics metrics included).
    ranks
        Convention of the rank summaries (:func:`detection_scores`).

    Returns
    -------
    pandas.DataFrame
        One row per metric, in registry order: ``metric``, ``scope`` (``"class <c>"`` or
        ``"split"``), ``population`` (samples ranked), ``n``, ``n_affected`` and
        :data:`SCORE_COLUMNS`; under ``ranks="study"`` a last column ``ranks``.
    """
    check_ranks(ranks)
    n = len(metrics_df)
    labels, affected = _check_labels(labels, affected, n)
    if names is None:
        chosen = [m for m in ALL_METRICS if m in metrics_df.columns]
    else:
        for name in names:
            if name not in ALL_METRICS:
                raise unknown_choice("metric", name, ALL_METRICS)
            if name not in metrics_df.columns:
                raise MlvarError(
                    f"metric '{name}' was not computed",
                    "computed: " + ", ".join(map(str, metrics_df.columns)),
                )
        chosen = [m for m in ALL_METRICS if m in set(names)]
    rows = []
    for name in chosen:
        metric = ALL_METRICS[name]
        score = metric.suspicion(metrics_df[name].to_numpy())
        scope, mask = _scope(metric.uses_label, labels, affected)
        s, a = (score, affected) if mask is None else (score[mask], affected[mask])
        scores = detection_scores(s, a, ranks, metric.higher_is_suspicious)
        rows.append({"metric": name, "scope": scope, "population": int(s.size)} | scores)
    columns = ["metric", "scope", "population", "n", "n_affected", *SCORE_COLUMNS]
    return _mark_ranks(pd.DataFrame(rows, columns=columns), ranks)


def _mark_ranks(table: pd.DataFrame, ranks: str) -> pd.DataFrame:
    """Record a non-default rank convention in a last column ``ranks``."""
    if ranks != RANKS_MID:
        table["ranks"] = ranks
    return table


def ranks_of(table: pd.DataFrame) -> str:
    """The rank convention a detection or baselines table was scored under."""
    if "ranks" in table.columns and len(table):
        return str(table["ranks"].iloc[0])
    return RANKS_MID


def _nan_stat(values: np.ndarray, stat: str) -> float:
    if np.isnan(values).all():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fn = {"min": np.nanmin, "median": np.nanmedian, "max": np.nanmax}[stat]
        return float(fn(values))


def detect_baselines(
    baseline_scores: Mapping[str, np.ndarray],
    labels: np.ndarray,
    affected: np.ndarray,
    ranks: str = RANKS_MID,
) -> pd.DataFrame:
    """Detection scores of the single-model baselines, summarised over runs.

    Parameters
    ----------
    baseline_scores
        Output of :func:`~mlvar.analysis.metrics.baseline_scores`: ``{name: [R, n]}``.
    labels, affected
        Per-sample labels and ground truth, shape ``[n]``.
    ranks
        Convention of the rank summaries (:func:`detection_scores`; a baseline's score
        is the negation of its value, which the study sorted ascending).

    Returns
    -------
    pandas.DataFrame
        One row per (baseline, stat) with stat in ``min``, ``median``, ``max`` (NaN-aware,
        over runs): ``baseline``, ``stat``, ``scope``, ``population``, ``n``,
        ``n_affected`` and :data:`SCORE_COLUMNS`; under ``ranks="study"`` a last column
        ``ranks``. ``neg_gconf`` follows the label-aware scope rule of :func:`detect`;
        ``neg_maxconf`` is ranked over the whole split.
    """
    check_ranks(ranks)
    rows = []
    for name, scores in baseline_scores.items():
        if name not in BASELINES:
            raise unknown_choice("baseline", name, BASELINES)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2:
            raise MlvarError(
                f"baseline '{name}' scores must have shape [runs, samples], got {scores.shape}",
                "pass the output of baseline_scores",
            )
        labels_, affected_ = _check_labels(labels, affected, scores.shape[1])
        scope, mask = _scope(BASELINES[name].uses_label, labels_, affected_)
        if mask is not None:
            scores, affected_ = scores[:, mask], affected_[mask]
        per_run = [detection_scores(run, affected_, ranks, False) for run in scores]
        for stat in STATS:
            row: dict[str, Any] = {
                "baseline": name,
                "stat": stat,
                "scope": scope,
                "population": int(scores.shape[1]),
                "n": int(scores.shape[1]),
                "n_affected": int(affected_.sum()),
            }
            for col in SCORE_COLUMNS:
                row[col] = _nan_stat(np.array([d[col] for d in per_run]), stat)
            rows.append(row)
    columns = ["baseline", "stat", "scope", "population", "n", "n_affected", *SCORE_COLUMNS]
    return _mark_ranks(pd.DataFrame(rows, columns=columns), ranks)
