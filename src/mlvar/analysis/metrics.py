"""Per-sample metrics of run-to-run variability: the registry (docs/design.md section 7).

Each metric is one :class:`Metric` record: its name, formula, orientation, whether it
uses the label, the sufficient statistics it reads and ``finish``, the function from
those statistics to one float64 value per sample. A sufficient statistic is one
:class:`Statistic` record: a per-sample array reduced over runs from a per-run value
(a sum, a sum of squared deviations, class counts, or every run's value), which merges
exactly over blocks of samples and combines over blocks of runs. Single-model baselines
(:class:`Baseline`) read every run's own value from a statistic the same way.

Both paths use these records and nothing else:

* in memory, :func:`compute_metrics` (``probs [R, n, C]``), :func:`baseline_scores` and
  :func:`compute_dynamics_metrics` (``[R, E, n, C]``) compute the statistics their metrics
  need and finish them;
* streaming and sharded, :mod:`mlvar.analysis.partial` computes every statistic chunk
  by chunk, concatenates sample blocks, combines run blocks and finishes the same records.

Adding a metric is one :class:`Metric` record (and its test against a hand-computed
example); it needs a new :class:`Statistic` only when it reads a per-run quantity that
no statistic reduces yet, and a new per-run value only when :class:`RunValues` or
:class:`EpochValues` lacks it.

Conventions:

* The predicted class of a run is ``numpy.argmax`` over classes, i.e. the *first*
  maximal class when several share the top probability.
* ``grank`` counts the classes with probability strictly greater than ``p_r[y]``, so a
  label tied for the top has rank 0 even when argmax picks another class.
* Entropies use the natural logarithm with ``0 * log 0 = 0``.
* Standard deviations over runs use ``ddof=0`` (so they are 0 for a single run).
* Every sum over runs (and over epochs) is taken in order, run 0 first
  (:func:`sequential_sum`), so a sample's values depend on its own column only: they are
  bit for bit the same however the samples are chunked or sharded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from mlvar.errors import MlvarError, unknown_choice

if TYPE_CHECKING:  # pandas loads where metric tables are built: the CLI lists the
    # metrics and checks a --by without it
    import pandas as pd


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


# ---------------------------------------------------------------- per-run values


class RunValues:
    """The final probabilities of R runs on a block of samples and the per-run values
    derived from them, each computed once on demand (the values statistics reduce).

    Every value is ``[R, n]`` except ``probs`` (``[R, n, C]``); nothing cached here is
    larger than ``probs`` itself.
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
    def gconf(self) -> np.ndarray:
        """``p_r[y]``."""
        return self.probs[:, np.arange(self.n), self.labels]

    @cached_property
    def maxconf(self) -> np.ndarray:
        """``max_c p_r[c]``."""
        return self.probs.max(axis=2)

    @cached_property
    def gap(self) -> np.ndarray:
        """``max_c p_r[c] - p_r[y]``."""
        return self.maxconf - self.gconf

    @cached_property
    def grank(self) -> np.ndarray:
        """``#{c : p_r[c] > p_r[y]}`` (float64)."""
        # Strictly greater: tie-robust, a label tied with others at the top has rank 0.
        return (self.probs > self.gconf[:, :, None]).sum(axis=2).astype(np.float64)

    @cached_property
    def preds(self) -> np.ndarray:
        """``argmax_c p_r[c]`` (int)."""
        return self.probs.argmax(axis=2)

    @cached_property
    def entropy(self) -> np.ndarray:
        """``H(p_r)``."""
        return entropy(self.probs, axis=2)


class EpochValues:
    """The per-epoch probabilities ``p_e`` (e = 1..E) of one run on the train samples and
    the per-run training-dynamics values derived from them (each ``[n]`` float64)."""

    def __init__(self, probs_e: np.ndarray, labels: np.ndarray) -> None:
        self.probs_e = np.asarray(probs_e, dtype=np.float64)
        self.labels = np.asarray(labels).astype(np.int64, copy=False)
        self.n_epochs, self.n = self.probs_e.shape[0], self.probs_e.shape[1]

    @cached_property
    def p_y(self) -> np.ndarray:  # [E, n]
        return self.probs_e[:, np.arange(self.n), self.labels]

    @cached_property
    def correct(self) -> np.ndarray:  # [E, n] bool
        return self.probs_e.argmax(axis=2) == self.labels[None, :]

    @cached_property
    def confidence(self) -> np.ndarray:
        """``mean_e p_e[y]``."""
        return sequential_sum(self.p_y) / self.n_epochs

    @cached_property
    def variability(self) -> np.ndarray:
        """``std_e p_e[y]`` (ddof 0)."""
        dev = self.p_y - self.confidence[None, :]
        return np.sqrt(sequential_sum(dev * dev) / self.n_epochs)

    @cached_property
    def correctness(self) -> np.ndarray:
        """Fraction of epochs whose argmax is y."""
        return self.correct.sum(axis=0) / self.n_epochs

    @cached_property
    def forgetting_events(self) -> np.ndarray:
        """Transitions correct -> wrong between consecutive epochs."""
        c = self.correct
        if self.n_epochs < 2:
            return np.zeros(self.n)
        return (c[:-1] & ~c[1:]).sum(axis=0).astype(np.float64)

    @cached_property
    def never_learnt(self) -> np.ndarray:
        """1.0 when no epoch is correct."""
        return (~self.correct.any(axis=0)).astype(np.float64)


# ---------------------------------------------------------------- sufficient statistics

SUM, M2, COUNT, RUNS = "sum", "m2", "count", "runs"
"""How a statistic reduces a per-run value over runs (:attr:`Statistic.reduce`)."""

PROBS, DYNAMICS = "probs", "dynamics"
"""What a statistic is computed from (:attr:`Statistic.source`)."""


@dataclass(frozen=True)
class Statistic:
    """A per-sample sufficient statistic: one array reduced over runs from a per-run value.

    Attributes
    ----------
    name
        Array name (a shard holds it as ``<name>.npy``).
    value
        The per-run value reduced: a :class:`RunValues` attribute (source ``"probs"``) or
        an :class:`EpochValues` attribute (source ``"dynamics"``).
    reduce
        ``"sum"``: the sum over runs (``[n]``, or ``[n, C]`` for ``probs``), added when run
        blocks combine; ``"m2"``: the sum of squared deviations from the mean over the
        runs, combined with Chan et al.'s pairwise update (it needs the ``"sum"``
        statistic of the same value); ``"count"``: per class, the number of runs whose
        integer value is that class (``[n, C]`` int64), added; ``"runs"``: every run's
        value (``[R, n]``), concatenated.
    source
        ``"probs"`` (final predictions of any split) or ``"dynamics"`` (per-epoch
        predictions on the train split; only ``"sum"``).
    """

    name: str
    value: str
    reduce: str
    source: str = PROBS

    @property
    def sample_axis(self) -> int:
        """The axis of the array that runs over samples."""
        return 1 if self.reduce == RUNS else 0


def _statistics(*stats: Statistic) -> dict[str, Statistic]:
    out: dict[str, Statistic] = {}
    for s in stats:
        if s.reduce not in (SUM, M2, COUNT, RUNS) or s.source not in (PROBS, DYNAMICS):
            raise ValueError(f"statistic {s.name}: unknown reduce or source")
        if s.source == DYNAMICS and s.reduce != SUM:
            raise ValueError(f"statistic {s.name}: dynamics statistics are sums over runs")
        if s.name in out:
            raise ValueError(f"statistic {s.name} defined twice")
        out[s.name] = s
    for s in out.values():
        if s.reduce == M2 and _sum_of(s, out) is None:
            raise ValueError(f"statistic {s.name}: no sum statistic of {s.value}")
    return out


def _sum_of(stat: Statistic, registry: Mapping[str, Statistic]) -> str | None:
    for s in registry.values():
        if s.reduce == SUM and s.value == stat.value and s.source == stat.source:
            return s.name
    return None


_MOMENT_VALUES = ("gconf", "maxconf", "gap", "grank")

STATISTICS: dict[str, Statistic] = _statistics(
    *(Statistic(f"sum_{v}", v, SUM) for v in _MOMENT_VALUES),
    *(Statistic(f"m2_{v}", v, M2) for v in _MOMENT_VALUES),
    Statistic("votes", "preds", COUNT),
    Statistic("prob_sum", "probs", SUM),
    Statistic("entropy_sum", "entropy", SUM),
    Statistic("run_gconf", "gconf", RUNS),
    Statistic("run_maxconf", "maxconf", RUNS),
    Statistic("dyn_dm_confidence", "confidence", SUM, DYNAMICS),
    Statistic("dyn_dm_variability", "variability", SUM, DYNAMICS),
    Statistic("dyn_dm_correctness", "correctness", SUM, DYNAMICS),
    Statistic("dyn_forgetting_events", "forgetting_events", SUM, DYNAMICS),
    Statistic("dyn_never_learnt", "never_learnt", SUM, DYNAMICS),
)
"""Registry of sufficient statistics, in the order a partial result holds them."""


def sum_statistic(name: str) -> str:
    """The ``"sum"`` statistic an ``"m2"`` statistic ``name`` is combined with."""
    found = _sum_of(STATISTICS[name], STATISTICS)
    assert found is not None  # checked when the registry is built
    return found


def reduce_runs(values: RunValues, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The ``"probs"`` statistics ``names`` (default: all of them) of one block of runs,
    as ``{name: array}`` in registry order (dynamics statistics: :func:`dynamics_sums`)."""
    wanted = set(STATISTICS if names is None else names)
    by_value: dict[str, list[Statistic]] = {}
    for stat in STATISTICS.values():
        if stat.name in wanted and stat.source == PROBS:
            by_value.setdefault(stat.value, []).append(stat)
    out: dict[str, np.ndarray] = {}
    # Every statistic of one per-run value in turn, while that value is in the cache.
    for value, stats in by_value.items():
        x = getattr(values, value)
        total = None
        for stat in stats:
            if stat.reduce in (SUM, M2) and total is None:
                total = sequential_sum(x)
            if stat.reduce == SUM:
                out[stat.name] = total
            elif stat.reduce == M2:
                d = x - (total / values.n_runs)[None, :]
                out[stat.name] = sequential_sum(d * d)
            elif stat.reduce == COUNT:
                k = values.n_classes
                flat = x + (np.arange(values.n, dtype=np.int64) * k)[None, :]
                counts = np.bincount(flat.ravel(), minlength=values.n * k)
                out[stat.name] = counts.reshape(values.n, k).astype(np.int64)
            else:  # RUNS
                out[stat.name] = x.copy()
    return {k: out[k] for k in STATISTICS if k in out}


def dynamics_names() -> list[str]:
    """The names of the training-dynamics statistics, in registry order."""
    return [s.name for s in STATISTICS.values() if s.source == DYNAMICS]


def dynamics_run_values(
    probs_e: np.ndarray, labels: np.ndarray, names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """The per-run training-dynamics values of one run, by statistic name.

    Parameters
    ----------
    probs_e
        Per-epoch probabilities of one run, shape ``[E, n, C]`` (float64).
    labels
        Integer labels, shape ``[n]``.
    names
        Dynamics statistics (default: all of them).

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{statistic: float64 [n]}``: confidence (mean over epochs of ``p_e[y]``),
        variability (its std, ddof 0), correctness (fraction of epochs whose argmax is
        y), forgetting events (transitions correct -> wrong between consecutive epochs)
        and never learnt (1.0 when no epoch is correct).
    """
    values = EpochValues(probs_e, labels)
    chosen = dynamics_names() if names is None else [n for n in dynamics_names() if n in names]
    return {name: getattr(values, STATISTICS[name].value) for name in chosen}


def dynamics_sums(
    runs: Iterable[np.ndarray], labels: np.ndarray, names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """The training-dynamics statistics: sums over runs, in the order given, of
    :func:`dynamics_run_values`.

    ``runs`` yields one ``[E, n, C]`` probability array per run, so only one run's
    dynamics is held at a time. Dividing by the number of runs gives the metrics.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    names = None if names is None else set(names)
    total: dict[str, np.ndarray] | None = None
    for probs_e in runs:
        values = dynamics_run_values(np.asarray(probs_e, dtype=np.float64), labels, names)
        if total is None:
            total = {k: v.copy() for k, v in values.items()}
        else:
            for k, v in values.items():
                total[k] += v
    if total is None:
        raise MlvarError("no runs with training dynamics", "record per-epoch predictions")
    return total


@dataclass(frozen=True)
class Sufficient:
    """What a metric is finished from: statistics of ``n`` samples over ``n_runs`` runs."""

    arrays: Mapping[str, np.ndarray]
    n_runs: int
    labels: np.ndarray  # int64 [n]
    _shared: dict[Callable[..., np.ndarray], np.ndarray] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def shared(self, fn: Callable[[Sufficient], np.ndarray]) -> np.ndarray:
        """``fn(self)``, computed once for all the metrics that read it."""
        if fn not in self._shared:
            self._shared[fn] = fn(self)
        return self._shared[fn]

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def mean(self, value: str) -> np.ndarray:
        """Mean over runs of a per-run value (from its ``sum_<value>``)."""
        return self[f"sum_{value}"] / self.n_runs

    def std(self, value: str) -> np.ndarray:
        """Std over runs (ddof 0) of a per-run value (from its ``m2_<value>``)."""
        return np.sqrt(self[f"m2_{value}"] / self.n_runs)


# ---------------------------------------------------------------- metrics

FinishFn = Callable[[Sufficient], np.ndarray]


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
    statistics
        The names of the :data:`STATISTICS` ``finish`` reads.
    finish
        ``finish(s: Sufficient) -> [n]``: the metric from those statistics.
    """

    name: str
    formula: str
    uses_label: bool
    higher_is_suspicious: bool
    statistics: tuple[str, ...]
    finish: FinishFn

    @property
    def needs(self) -> str:
        """``"probs"`` (final predictions of any split) or ``"dynamics"`` (per-epoch
        predictions on the train split, :data:`DYNAMICS_METRICS`)."""
        sources = {STATISTICS[s].source for s in self.statistics}
        return DYNAMICS if DYNAMICS in sources else PROBS

    def suspicion(self, values: np.ndarray) -> np.ndarray:
        """Return ``values`` oriented so that higher means more suspicious (float64)."""
        v = np.asarray(values, dtype=np.float64)
        return v if self.higher_is_suspicious else -v

    def compute(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """This metric in memory: ``probs [R, n, C]``, or for a training-dynamics metric
        ``[R, E, n, C]`` (E epochs); returns float64 ``[n]``."""
        if self.needs == DYNAMICS:
            frame = compute_dynamics_metrics(probs, labels, [self.name])
        else:
            frame = compute_metrics(probs, labels, [self.name])
        return frame[self.name].to_numpy()


def _disagreement(s: Sufficient) -> np.ndarray:
    r = s.n_runs
    if r == 1:
        # No pair of runs exists; a single run cannot disagree with itself.
        return np.zeros(s.n)
    v = s["votes"].astype(np.float64)
    agreeing_pairs = (v * (v - 1.0)).sum(axis=1) / 2.0
    return 1.0 - agreeing_pairs / (r * (r - 1) / 2.0)


def _predictive_entropy(s: Sufficient) -> np.ndarray:
    return entropy(s["prob_sum"] / s.n_runs, axis=1)


def _expected_entropy(s: Sufficient) -> np.ndarray:
    return s["entropy_sum"] / s.n_runs


def _mutual_information(s: Sufficient) -> np.ndarray:
    # Non-negative in exact arithmetic (Jensen); clip float round-off below zero.
    return np.maximum(s.shared(_predictive_entropy) - s.shared(_expected_entropy), 0.0)


def _std_pred_label(s: Sufficient) -> np.ndarray:
    # The std over runs of the predicted class index c_r from the vote counts n_c, as
    # sqrt(R sum_r c_r^2 - (sum_r c_r)^2) / R with the sums in exact integers: equal
    # spreads give equal bits (a float std over runs in run order can differ in the last
    # bit, turning ties into an order), and run shards merge exactly, as the counts do.
    votes = np.asarray(s["votes"], dtype=np.int64)
    classes = np.arange(votes.shape[1], dtype=np.int64)
    total = votes @ classes
    squares = votes @ (classes * classes)
    return np.sqrt((s.n_runs * squares - total * total).astype(np.float64)) / s.n_runs


def _registry(*metrics: Metric) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for m in metrics:
        unknown = [s for s in m.statistics if s not in STATISTICS]
        if unknown or m.name in out:
            raise ValueError(f"metric {m.name}: duplicate, or unknown statistics {unknown}")
        out[m.name] = m
    return out


METRICS: dict[str, Metric] = _registry(
    Metric(
        "n_correct",
        "sum_r [argmax_c p_r[c] = y]",
        True,
        False,
        ("votes",),
        lambda s: s["votes"][np.arange(s.n), s.labels].astype(np.float64),
    ),
    Metric("gconf_mean", "mean_r p_r[y]", True, False, ("sum_gconf",), lambda s: s.mean("gconf")),
    Metric(
        "gconf_std", "std_r p_r[y] (ddof 0)", True, True, ("m2_gconf",), lambda s: s.std("gconf")
    ),
    Metric(
        "maxconf_mean",
        "mean_r max_c p_r[c]",
        False,
        False,
        ("sum_maxconf",),
        lambda s: s.mean("maxconf"),
    ),
    Metric(
        "maxconf_std",
        "std_r max_c p_r[c] (ddof 0)",
        False,
        True,
        ("m2_maxconf",),
        lambda s: s.std("maxconf"),
    ),
    Metric(
        "gap_mean",
        "mean_r (max_c p_r[c] - p_r[y])",
        True,
        True,
        ("sum_gap",),
        lambda s: s.mean("gap"),
    ),
    Metric(
        "gap_std",
        "std_r (max_c p_r[c] - p_r[y]) (ddof 0)",
        True,
        True,
        ("m2_gap",),
        lambda s: s.std("gap"),
    ),
    Metric(
        "grank_mean",
        "mean_r #{c : p_r[c] > p_r[y]} (rank of y, 0 = top)",
        True,
        True,
        ("sum_grank",),
        lambda s: s.mean("grank"),
    ),
    Metric(
        "grank_std",
        "std_r #{c : p_r[c] > p_r[y]} (ddof 0)",
        True,
        True,
        ("m2_grank",),
        lambda s: s.std("grank"),
    ),
    Metric(
        "n_distinct_pred",
        "#{argmax_c p_r[c] : r = 1..R}",
        False,
        True,
        ("votes",),
        lambda s: (s["votes"] > 0).sum(axis=1).astype(np.float64),
    ),
    Metric(
        "vote_entropy",
        "-sum_c (n_c/R) ln(n_c/R), n_c = #{r : argmax_c p_r = c}",
        False,
        True,
        ("votes",),
        lambda s: entropy(s["votes"] / s.n_runs, axis=1),
    ),
    Metric(
        "disagreement",
        "1 - sum_c C(n_c,2) / C(R,2) (0 when R = 1)",
        False,
        True,
        ("votes",),
        _disagreement,
    ),
    Metric(
        "variation_ratio",
        "1 - max_c n_c / R",
        False,
        True,
        ("votes",),
        lambda s: 1.0 - s["votes"].max(axis=1) / s.n_runs,
    ),
    Metric(
        "predictive_entropy",
        "H(mean_r p_r), H(p) = -sum_c p[c] ln p[c]",
        False,
        True,
        ("prob_sum",),
        lambda s: s.shared(_predictive_entropy),
    ),
    Metric(
        "expected_entropy",
        "mean_r H(p_r)",
        False,
        True,
        ("entropy_sum",),
        lambda s: s.shared(_expected_entropy),
    ),
    Metric(
        "mutual_information",
        "H(mean_r p_r) - mean_r H(p_r)",
        False,
        True,
        ("prob_sum", "entropy_sum"),
        _mutual_information,
    ),
    Metric(
        "std_pre_labels",
        "std_r argmax_c p_r[c] (ddof 0; the predicted class index as a number, the study's)",
        False,
        True,
        ("votes",),
        _std_pred_label,
    ),
)
"""Registry of per-sample metrics of final predictions, in output column order."""


def _dynamics_mean(name: str, formula: str, higher: bool) -> Metric:
    # Each training-dynamics metric is the mean over runs of one per-run value.
    stat = f"dyn_{name}"
    return Metric(name, formula, True, higher, (stat,), lambda s: s[stat] / s.n_runs)


DYNAMICS_METRICS: dict[str, Metric] = _registry(
    _dynamics_mean("dm_confidence", "mean_r mean_e p_e[y] (Data Maps confidence)", False),
    _dynamics_mean("dm_variability", "mean_r std_e p_e[y] (ddof 0; Data Maps variability)", True),
    _dynamics_mean(
        "dm_correctness", "mean_r mean_e [argmax_c p_e[c] = y] (Data Maps correctness)", False
    ),
    _dynamics_mean(
        "forgetting_events",
        "mean_r #{e : correct at epoch e, wrong at e+1} (Toneva forgetting events)",
        True,
    ),
    _dynamics_mean("never_learnt", "mean_r [wrong at every epoch] (fraction of runs)", True),
)
"""Registry of training-dynamics metrics (train split, when runs recorded per-epoch
predictions), in output column order. Kept apart from :data:`METRICS` so that
:func:`compute_metrics` needs nothing but final probabilities."""

ALL_METRICS: dict[str, Metric] = {**METRICS, **DYNAMICS_METRICS}
"""Every metric: :data:`METRICS` then :data:`DYNAMICS_METRICS`."""


def check_by(by: str) -> None:
    """Refuse a ``--by`` that is no metric."""
    if by not in ALL_METRICS:
        raise unknown_choice("metric", by, ALL_METRICS)


def statistics_of(metrics: Iterable[Metric]) -> list[str]:
    """The statistics ``metrics`` read, in registry order."""
    wanted = {s for m in metrics for s in m.statistics}
    return [s for s in STATISTICS if s in wanted]


def finish(s: Sufficient, names: Sequence[str]) -> pd.DataFrame:
    """The metric columns ``names`` (in that order) finished from ``s``: one float64
    column per metric, one row per sample (RangeIndex)."""
    import pandas as pd

    data = {name: np.asarray(ALL_METRICS[name].finish(s), dtype=np.float64) for name in names}
    return pd.DataFrame(data, index=pd.RangeIndex(s.n), columns=list(names))


def _choose(
    names: Sequence[str] | None, registry: Mapping[str, Metric], what: str = "metric"
) -> list[str]:
    if names is None:
        return list(registry)
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name not in registry:
            raise unknown_choice(what, name, registry)
    wanted = set(names)
    return [name for name in registry if name in wanted]


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Compute per-sample metrics in memory (only the statistics they need).

    Parameters
    ----------
    probs
        Probabilities, shape ``[R, n, C]``.
    labels
        Integer labels, shape ``[n]``.
    names
        Metrics to compute (default: all of :data:`METRICS`). Columns come out in
        registry order.

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
    chosen = _choose(names, METRICS)
    values = RunValues(probs, labels)
    arrays = reduce_runs(values, statistics_of(METRICS[m] for m in chosen))
    return finish(Sufficient(arrays, values.n_runs, values.labels), chosen)


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


def compute_dynamics_metrics(
    dyn_probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Training-dynamics metrics for one chunk of train samples, in memory.

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
    chosen = _choose(names, DYNAMICS_METRICS, "training-dynamics metric")
    dyn, labels = _check_dynamics(dyn_probs, labels)
    arrays = dynamics_sums(iter(dyn), labels, statistics_of(DYNAMICS_METRICS[m] for m in chosen))
    return finish(Sufficient(arrays, dyn.shape[0], labels), chosen)


# ---------------------------------------------------------------- single-model baselines


@dataclass(frozen=True)
class Baseline:
    """A single-model baseline: a suspicion score of each run on its own.

    Attributes
    ----------
    name
        Name in outputs (``baselines-<split>``).
    formula
        One-line plain-text definition of the score.
    uses_label
        Whether it needs the true label (decides its detection scope).
    statistic
        The ``"runs"`` statistic holding each run's value; the score is its negation
        (a low value is suspicious).
    """

    name: str
    formula: str
    uses_label: bool
    statistic: str

    def scores(self, run_values: np.ndarray, in_place: bool = False) -> np.ndarray:
        """Suspicion scores ``[R, n]`` (higher = more suspicious) from the statistic's
        ``[R, n]`` values; ``in_place`` reuses their memory."""
        return np.negative(run_values, out=run_values if in_place else None)


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("neg_gconf", "-p_r[y] of one run", True, "run_gconf"),
        Baseline("neg_maxconf", "-max_c p_r of one run", False, "run_maxconf"),
    )
}
"""Registry of single-model baselines, in output order."""

BASELINE_USES_LABEL: dict[str, bool] = {name: b.uses_label for name, b in BASELINES.items()}
"""Whether each baseline needs the true label (decides its detection scope)."""


def score_baselines(
    per_run: Mapping[str, np.ndarray], in_place: bool = False
) -> dict[str, np.ndarray]:
    """Every baseline's suspicion scores from the ``"runs"`` statistics ``per_run``
    (``{statistic: [R, n]}``); ``in_place`` negates arrays no other baseline reads in
    their own memory (the caller no longer needs them)."""
    readers = Counter(b.statistic for b in BASELINES.values())
    return {
        name: b.scores(per_run[b.statistic], in_place=in_place and readers[b.statistic] == 1)
        for name, b in BASELINES.items()
    }


def baseline_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Suspicion scores of the single-model baselines, per run, in memory.

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
    arrays = reduce_runs(RunValues(probs, labels), [b.statistic for b in BASELINES.values()])
    return score_baselines(arrays, in_place=True)
