"""Per-sample metrics of run-to-run variability (docs/design.md section 7).

Every metric maps ``probs`` of shape ``[R, n, C]`` (R runs, n samples, C classes, rows
summing to 1) and ``labels`` of shape ``[n]`` to one float64 value per sample. Each value
depends only on that sample's column, so the caller may stream over chunks of samples
and concatenate the results.

Conventions:

* The predicted class of a run is ``numpy.argmax`` over classes, i.e. the *first*
  maximal class when several share the top probability.
* ``grank`` counts the classes with probability strictly greater than ``p_r[y]``, so a
  label tied for the top has rank 0 even when argmax picks another class.
* Entropies use the natural logarithm with ``0 * log 0 = 0``.
* Standard deviations over runs use ``ddof=0`` (so they are 0 for a single run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from mlvar.errors import MlvarError, unknown_choice

ComputeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64.

    Parameters
    ----------
    logits
        Array of any shape (float16/32/64).
    axis
        Class axis.

    Returns
    -------
    numpy.ndarray
        float64 probabilities of the same shape, summing to 1 along ``axis``.
    """
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    # A row of all -inf would give nan from (-inf) - (-inf); shift such rows by 0 instead.
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (natural log) along ``axis`` with ``0 * log 0 = 0``.

    Parameters
    ----------
    p
        Probabilities (non-negative, summing to 1 along ``axis``).
    axis
        Axis to sum over.

    Returns
    -------
    numpy.ndarray
        float64 entropies, finite even for probabilities exactly 0 or 1.
    """
    p = np.asarray(p, dtype=np.float64)
    plogp = np.log(p, out=np.zeros_like(p), where=p > 0)
    plogp *= p
    # ``0.0 - x`` rather than ``-x`` so a certain prediction gives +0.0, not -0.0.
    return 0.0 - np.sum(plogp, axis=axis)


def sequential_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the first axis in order (``x[0] + x[1] + ...``), as float64.

    ``numpy.sum(axis=0)`` may associate the additions differently depending on the other
    dimensions, so the same sample could get a different last bit in a different chunk;
    this order never changes, which makes streamed and sharded results exact.
    """
    x = np.asarray(x)
    if x.shape[0] == 0:
        return np.zeros(x.shape[1:])
    acc = np.array(x[0], dtype=np.float64)
    for row in x[1:]:
        acc += row
    return acc


class _Stats:
    """Intermediate per-run arrays shared by several metrics, each computed once on demand.

    Only ``probs`` itself (and short-lived temporaries) has size R*n*C; everything cached
    here is [R, n] or [n, C].
    """

    def __init__(self, probs: np.ndarray, labels: np.ndarray) -> None:
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels)
        if probs.ndim != 3:
            raise MlvarError(
                f"probabilities must have shape [runs, samples, classes], got {probs.shape}",
                "pass one [samples, classes] array per run stacked along the first axis",
            )
        r, n, c = probs.shape
        if r == 0 or c == 0:
            raise MlvarError(
                f"probabilities need at least one run and one class, got shape {probs.shape}",
                "check that the run store holds finished runs",
            )
        if labels.shape != (n,):
            raise MlvarError(
                f"labels have shape {labels.shape} but probabilities hold {n} samples",
                "labels must be one integer per sample, in the row order of the runs' arrays",
            )
        if n and not np.issubdtype(labels.dtype, np.integer):
            raise MlvarError(
                f"labels must be integers, got dtype {labels.dtype}", "store labels as int64"
            )
        labels = labels.astype(np.int64, copy=False)
        if n and (labels.min() < 0 or labels.max() >= c):
            raise MlvarError(
                f"labels must lie in [0, {c - 1}], found {labels.min()}..{labels.max()}",
                "check that the labels belong to the same dataset as the predictions",
            )
        self.probs = probs
        self.labels = labels
        self.n_runs, self.n, self.n_classes = r, n, c

    @cached_property
    def gconf(self) -> np.ndarray:  # [R, n]
        return self.probs[:, np.arange(self.n), self.labels]

    @cached_property
    def maxconf(self) -> np.ndarray:  # [R, n]
        return self.probs.max(axis=2)

    @cached_property
    def gap(self) -> np.ndarray:  # [R, n]
        return self.maxconf - self.gconf

    @cached_property
    def grank(self) -> np.ndarray:  # [R, n]
        # Strictly greater: tie-robust, a label tied with others at the top has rank 0.
        return (self.probs > self.gconf[:, :, None]).sum(axis=2).astype(np.float64)

    @cached_property
    def preds(self) -> np.ndarray:  # [R, n]
        return self.probs.argmax(axis=2)

    @cached_property
    def votes(self) -> np.ndarray:  # [n, C] int: runs predicting each class
        flat = self.preds + (np.arange(self.n, dtype=np.int64) * self.n_classes)[None, :]
        counts = np.bincount(flat.ravel(), minlength=self.n * self.n_classes)
        return counts.reshape(self.n, self.n_classes)

    @cached_property
    def predictive_entropy(self) -> np.ndarray:  # [n]
        return entropy(self.probs.mean(axis=0), axis=1)

    @cached_property
    def expected_entropy(self) -> np.ndarray:  # [n]
        return entropy(self.probs, axis=2).mean(axis=0)


def _disagreement(s: _Stats) -> np.ndarray:
    r = s.n_runs
    if r == 1:
        # No pair of runs exists; a single run cannot disagree with itself.
        return np.zeros(s.n)
    v = s.votes.astype(np.float64)
    agreeing_pairs = (v * (v - 1.0)).sum(axis=1) / 2.0
    return 1.0 - agreeing_pairs / (r * (r - 1) / 2.0)


def _mutual_information(s: _Stats) -> np.ndarray:
    # Non-negative in exact arithmetic (Jensen); clip float round-off below zero.
    return np.maximum(s.predictive_entropy - s.expected_entropy, 0.0)


# name -> (function of the shared stats, formula, uses_label, higher_is_suspicious)
_SPECS: dict[str, tuple[Callable[[_Stats], np.ndarray], str, bool, bool]] = {
    "n_correct": (
        lambda s: (s.preds == s.labels[None, :]).sum(axis=0).astype(np.float64),
        "sum_r [argmax_c p_r[c] = y]",
        True,
        False,
    ),
    "gconf_mean": (lambda s: s.gconf.mean(axis=0), "mean_r p_r[y]", True, False),
    "gconf_std": (lambda s: s.gconf.std(axis=0), "std_r p_r[y] (ddof 0)", True, True),
    "maxconf_mean": (lambda s: s.maxconf.mean(axis=0), "mean_r max_c p_r[c]", False, False),
    "maxconf_std": (lambda s: s.maxconf.std(axis=0), "std_r max_c p_r[c] (ddof 0)", False, True),
    "gap_mean": (lambda s: s.gap.mean(axis=0), "mean_r (max_c p_r[c] - p_r[y])", True, True),
    "gap_std": (
        lambda s: s.gap.std(axis=0),
        "std_r (max_c p_r[c] - p_r[y]) (ddof 0)",
        True,
        True,
    ),
    "grank_mean": (
        lambda s: s.grank.mean(axis=0),
        "mean_r #{c : p_r[c] > p_r[y]} (rank of y, 0 = top)",
        True,
        True,
    ),
    "grank_std": (
        lambda s: s.grank.std(axis=0),
        "std_r #{c : p_r[c] > p_r[y]} (ddof 0)",
        True,
        True,
    ),
    "n_distinct_pred": (
        lambda s: (s.votes > 0).sum(axis=1).astype(np.float64),
        "#{argmax_c p_r[c] : r = 1..R}",
        False,
        True,
    ),
    "vote_entropy": (
        lambda s: entropy(s.votes / s.n_runs, axis=1),
        "-sum_c (n_c/R) ln(n_c/R), n_c = #{r : argmax_c p_r = c}",
        False,
        True,
    ),
    "disagreement": (
        _disagreement,
        "1 - sum_c C(n_c,2) / C(R,2) (0 when R = 1)",
        False,
        True,
    ),
    "variation_ratio": (
        lambda s: 1.0 - s.votes.max(axis=1) / s.n_runs,
        "1 - max_c n_c / R",
        False,
        True,
    ),
    "predictive_entropy": (
        lambda s: s.predictive_entropy,
        "H(mean_r p_r), H(p) = -sum_c p[c] ln p[c]",
        False,
        True,
    ),
    "expected_entropy": (
        lambda s: s.expected_entropy,
        "mean_r H(p_r)",
        False,
        True,
    ),
    "mutual_information": (
        _mutual_information,
        "H(mean_r p_r) - mean_r H(p_r)",
        False,
        True,
    ),
}


@dataclass(frozen=True)
class Metric:
    """A per-sample metric of variability across runs.

    Attributes
    ----------
    name
        Column name in outputs.
    formula
        One-line plain-text definition.
    uses_label
        Whether the metric needs the true label ``y``.
    higher_is_suspicious
        Orientation: True when a larger value marks a more suspicious sample.
    compute
        ``compute(probs [R, n, C], labels [n]) -> float64 [n]``; for a training-dynamics
        metric (``needs == "dynamics"``), ``compute(probs [R, E, n, C], labels [n])``
        with E epochs.
    needs
        ``"probs"`` (final predictions of any split) or ``"dynamics"`` (per-epoch
        predictions on the train split, :data:`DYNAMICS_METRICS`).
    """

    name: str
    formula: str
    uses_label: bool
    higher_is_suspicious: bool
    compute: ComputeFn
    needs: str = "probs"

    def suspicion(self, values: np.ndarray) -> np.ndarray:
        """Return ``values`` oriented so that higher means more suspicious (float64)."""
        v = np.asarray(values, dtype=np.float64)
        return v if self.higher_is_suspicious else -v


def _standalone(fn: Callable[[_Stats], np.ndarray]) -> ComputeFn:
    def compute(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.asarray(fn(_Stats(probs, labels)), dtype=np.float64)

    return compute


METRICS: dict[str, Metric] = {
    name: Metric(name, formula, uses_label, higher, _standalone(fn))
    for name, (fn, formula, uses_label, higher) in _SPECS.items()
}
"""Registry of per-sample metrics, in output column order."""


def _resolve(names: Sequence[str] | None) -> list[str]:
    if names is None:
        return list(METRICS)
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name not in METRICS:
            raise unknown_choice("metric", name, METRICS)
    wanted = set(names)
    return [name for name in METRICS if name in wanted]


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Compute per-sample metrics for one chunk of samples.

    Parameters
    ----------
    probs
        Probabilities, shape ``[R, n, C]``.
    labels
        Integer labels, shape ``[n]``.
    names
        Metrics to compute (default: all). Columns come out in registry order.

    Returns
    -------
    pandas.DataFrame
        One float64 column per metric and one row per sample (RangeIndex; the caller
        attaches ``sample_id``).

    Raises
    ------
    MlvarError
        For an unknown metric name or inconsistent shapes.
    """
    chosen = _resolve(names)
    stats = _Stats(probs, labels)
    # Shared intermediates (argmax, votes, gconf, ...) are cached on ``stats``, so each is
    # computed once for the whole chunk.
    data = {name: np.asarray(_SPECS[name][0](stats), dtype=np.float64) for name in chosen}
    return pd.DataFrame(data, index=pd.RangeIndex(stats.n), columns=chosen)


BASELINES: dict[str, str] = {
    "neg_gconf": "-p_r[y] of one run",
    "neg_maxconf": "-max_c p_r of one run",
}
"""Single-model baselines: suspicion scores computed from each run on its own."""

BASELINE_USES_LABEL: dict[str, bool] = {"neg_gconf": True, "neg_maxconf": False}
"""Whether each baseline needs the true label (decides its detection scope)."""


def baseline_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Suspicion scores of the single-model baselines, per run.

    Parameters
    ----------
    probs
        Probabilities, shape ``[R, n, C]``.
    labels
        Integer labels, shape ``[n]``.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{name: float64 [R, n]}`` for every name in :data:`BASELINES`; higher means
        more suspicious.
    """
    stats = _Stats(probs, labels)
    return {"neg_gconf": -stats.gconf, "neg_maxconf": -stats.maxconf}


# ---------------------------------------------------------------- training dynamics

# name -> (formula, uses_label, higher_is_suspicious). Each is the mean over runs of a
# per-run value computed from that run's per-epoch probabilities p_e (e = 1..E) on the
# train split (:func:`dynamics_run_values`).
_DYNAMICS_SPECS: dict[str, tuple[str, bool, bool]] = {
    "dm_confidence": ("mean_r mean_e p_e[y] (Data Maps confidence)", True, False),
    "dm_variability": ("mean_r std_e p_e[y] (ddof 0; Data Maps variability)", True, True),
    "dm_correctness": (
        "mean_r mean_e [argmax_c p_e[c] = y] (Data Maps correctness)",
        True,
        False,
    ),
    "forgetting_events": (
        "mean_r #{e : correct at epoch e, wrong at e+1} (Toneva forgetting events)",
        True,
        True,
    ),
    "never_learnt": ("mean_r [wrong at every epoch] (fraction of runs)", True, True),
}


def _check_dynamics(dyn_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dyn = np.asarray(dyn_probs, dtype=np.float64)
    if dyn.ndim != 4 or 0 in (dyn.shape[0], dyn.shape[1], dyn.shape[3]):
        raise MlvarError(
            f"training dynamics must have shape [runs, epochs, samples, classes] with at "
            f"least one run, epoch and class, got {dyn.shape}",
            "pass one [epochs, samples, classes] array per run stacked along the first axis",
        )
    labels = np.asarray(labels)
    if labels.shape != (dyn.shape[2],):
        raise MlvarError(
            f"labels have shape {labels.shape} but the dynamics hold {dyn.shape[2]} samples",
            "labels must follow the row order of the train split",
        )
    return dyn, labels.astype(np.int64, copy=False)


def dynamics_run_values(probs_e: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Data Maps and forgetting statistics of one run.

    Parameters
    ----------
    probs_e
        Per-epoch probabilities of one run, shape ``[E, n, C]`` (float64).
    labels
        Integer labels, shape ``[n]``.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{name: float64 [n]}`` for every name in :data:`DYNAMICS_METRICS`: confidence
        (mean over epochs of ``p_e[y]``), variability (its std, ddof 0), correctness
        (fraction of epochs whose argmax is y), forgetting events (transitions correct ->
        wrong between consecutive epochs) and never learnt (1.0 when no epoch is correct).
    """
    e, n = probs_e.shape[0], probs_e.shape[1]
    p_y = probs_e[:, np.arange(n), labels]  # [E, n]
    correct = probs_e.argmax(axis=2) == labels[None, :]  # [E, n]
    forgotten = correct[:-1] & ~correct[1:] if e > 1 else np.zeros((0, n), dtype=bool)
    confidence = sequential_sum(p_y) / e
    dev = p_y - confidence[None, :]
    return {
        "dm_confidence": confidence,
        "dm_variability": np.sqrt(sequential_sum(dev * dev) / e),
        "dm_correctness": correct.sum(axis=0) / e,
        "forgetting_events": forgotten.sum(axis=0).astype(np.float64),
        "never_learnt": (~correct.any(axis=0)).astype(np.float64),
    }


def _dynamics_compute(name: str) -> ComputeFn:
    def compute(dyn_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return compute_dynamics_metrics(dyn_probs, labels, [name])[name].to_numpy()

    return compute


DYNAMICS_METRICS: dict[str, Metric] = {
    name: Metric(name, formula, uses_label, higher, _dynamics_compute(name), needs="dynamics")
    for name, (formula, uses_label, higher) in _DYNAMICS_SPECS.items()
}
"""Registry of training-dynamics metrics (train split, when runs recorded per-epoch
predictions), in output column order. Kept apart from :data:`METRICS` so that
:func:`compute_metrics` needs nothing but final probabilities."""

ALL_METRICS: dict[str, Metric] = {**METRICS, **DYNAMICS_METRICS}
"""Every metric: :data:`METRICS` then :data:`DYNAMICS_METRICS`."""


def compute_dynamics_metrics(
    dyn_probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Training-dynamics metrics for one chunk of train samples.

    Parameters
    ----------
    dyn_probs
        Per-epoch probabilities, shape ``[R, E, n, C]``.
    labels
        Integer labels, shape ``[n]``.
    names
        Metrics to compute (default: all of :data:`DYNAMICS_METRICS`).

    Returns
    -------
    pandas.DataFrame
        One float64 column per metric (mean over runs), one row per sample.
    """
    if names is None:
        chosen = list(DYNAMICS_METRICS)
    else:
        for name in names:
            if name not in DYNAMICS_METRICS:
                raise unknown_choice("training-dynamics metric", name, DYNAMICS_METRICS)
        chosen = [m for m in DYNAMICS_METRICS if m in set(names)]
    dyn, labels = _check_dynamics(dyn_probs, labels)
    sums = dynamics_sums(iter(dyn), labels)
    r = dyn.shape[0]
    return pd.DataFrame(
        {name: sums[name] / r for name in chosen},
        index=pd.RangeIndex(dyn.shape[2]),
        columns=chosen,
    )


def dynamics_sums(runs, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sum over runs, in the order given, of :func:`dynamics_run_values`.

    ``runs`` yields one ``[E, n, C]`` probability array per run, so only one run's
    dynamics is held at a time. Dividing by the number of runs gives the metrics.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    total: dict[str, np.ndarray] | None = None
    for probs_e in runs:
        values = dynamics_run_values(np.asarray(probs_e, dtype=np.float64), labels)
        if total is None:
            total = {k: v.copy() for k, v in values.items()}
        else:
            for k, v in values.items():
                total[k] += v
    if total is None:
        raise MlvarError("no runs with training dynamics", "record per-epoch predictions")
    return total
