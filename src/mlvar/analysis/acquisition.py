"""Acquisition strategies of ``mlvar retrain``: which pool samples to add to training
(docs/retrain.md).

A strategy orders the pool, most wanted first; a budget ``b`` (a fraction of the pool in
[0, 1]) adds the first ``k = round_half_up(b x n)`` samples of that order
(:func:`budget_k`). Kinds of strategy:

* ``random``: each run's own random permutation of the pool, drawn from
  ``numpy.random.default_rng(SeedSequence([RANDOM_TAG, seed]))`` with the run's seed:
  reproducible per run and different across runs;
* every metric of :data:`mlvar.analysis.metrics.METRICS`: the pool by that metric computed
  over the pool logits of all runs, oriented as the ranking orients it (higher = more
  suspicious first), so every run adds the same samples;
* the single-model baselines ``neg_maxconf`` and ``neg_gconf``: each run orders the pool by
  its own ``-max_c p_r[c]`` (or ``-p_r[y]``);
* ``std_avg_conf`` (the study's combination): ascending geometric mean
  ``sqrt(rank_std x rank_mean)`` of two 1-based mid-ranks, ``rank_std`` of
  ``maxconf_std`` descending and ``rank_mean`` of ``maxconf_mean`` ascending (tied values
  share the mean of their positions, :func:`mlvar.analysis.detection.average_ranks`);
* the study's other names as aliases: ``std_conf`` = ``maxconf_std``, ``avg_conf`` =
  ``maxconf_mean`` (ascending mean max confidence), ``single_conf`` = ``neg_maxconf``.
  Outputs name the strategy an alias stands for.

Ties (equal scores) are broken by pool position, i.e. the row order of
``samples/<pool>.parquet``, ascending: the order is ``numpy.lexsort((position,
-round(score, 12)))``. Scores are compared rounded to :data:`TIE_DECIMALS` decimals so
that values equal in exact arithmetic but apart in their last bits (the vote entropy of
the same counts in another class order) tie, as documented, instead of being ordered by
round-off.
A strategy that reads the label (``gconf_mean``, ``n_correct``, ``neg_gconf``, ...) is
*label-aware*: allowed, and flagged ``oracle`` in every output, since an acquisition
function cannot know the labels of the samples it has yet to acquire.

This module imports numpy only at import time (the CLI checks ``--by`` and ``--budget``
with it); reading a store's pool (:func:`pool_orders`) loads pandas.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING

import numpy as np

from mlvar.analysis.metrics import BASELINES, METRICS
from mlvar.errors import MlvarError, unknown_choice

if TYPE_CHECKING:
    from mlvar.analysis.service import Predictions

RANDOM = "random"
STD_AVG_CONF = "std_avg_conf"

TIE_DECIMALS = 12
"""Scores equal to this many decimals are ties (broken by pool position)."""

RANDOM_TAG = 0x52455452
"""The fixed tag mixed with a run's seed for its ``random`` order (ASCII ``RETR``), so the
draw differs from every other use of the run's seed."""

DEFAULT_STRATEGIES: tuple[str, ...] = ("random", "maxconf_std", "maxconf_mean", "neg_maxconf")
"""``mlvar retrain --by`` when not given: the strategies of the issue's acceptance runs."""

DEFAULT_BUDGETS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 1.0)
"""``mlvar retrain --budget`` when not given: the study's 0, 1, 2, 5, 10 tenths of the pool."""

ALIASES: dict[str, str] = {
    "std_conf": "maxconf_std",
    "avg_conf": "maxconf_mean",
    "single_conf": "neg_maxconf",
}
"""The study's strategy names that are another strategy of the registry."""

SHARED, PER_RUN = "shared", "per_run"
"""A strategy's ``kind``: one order for every run, or one order per run."""


@dataclass(frozen=True)
class Strategy:
    """An acquisition strategy.

    Attributes
    ----------
    name
        Name in outputs and set folders (``<name>-b<budget>``).
    formula
        One-line definition of the order.
    uses_label
        Whether it reads the pool's labels (an ``oracle`` strategy).
    kind
        ``"shared"`` (one order from all runs' pool predictions, the same for every run)
        or ``"per_run"`` (each run's own order).
    """

    name: str
    formula: str
    uses_label: bool
    kind: str

    @property
    def oracle(self) -> bool:
        """Label-aware: flagged ``oracle`` in outputs."""
        return self.uses_label


def _registry() -> dict[str, Strategy]:
    out = {RANDOM: Strategy(RANDOM, "a random permutation per run (its seed)", False, PER_RUN)}
    for m in METRICS.values():
        way = "descending" if m.higher_is_suspicious else "ascending"
        out[m.name] = Strategy(m.name, f"{m.formula}, {way}", m.uses_label, SHARED)
    for b in BASELINES.values():
        out[b.name] = Strategy(b.name, f"{b.formula}, descending", b.uses_label, PER_RUN)
    out[STD_AVG_CONF] = Strategy(
        STD_AVG_CONF,
        "sqrt(rank of maxconf_std descending x rank of maxconf_mean ascending), ascending",
        False,
        SHARED,
    )
    return out


STRATEGIES: dict[str, Strategy] = _registry()
"""Every strategy by name (aliases: :data:`ALIASES`)."""


def resolve_strategy(name: str) -> Strategy:
    """The strategy ``name`` (or the one an alias stands for); :class:`MlvarError` naming
    the nearest names when there is none."""
    name = name.strip()
    if name in ALIASES:
        name = ALIASES[name]
    if name not in STRATEGIES:
        raise unknown_choice("strategy", name, [*STRATEGIES, *ALIASES])
    return STRATEGIES[name]


def parse_strategies(given: str | Sequence[str]) -> list[Strategy]:
    """Strategies from a comma-separated list (or a sequence of names), in the order
    given; an alias and the name it stands for count once.

    Raises
    ------
    MlvarError
        An empty list or item, or an unknown name (the nearest names in the hint).
    """
    items = given.split(",") if isinstance(given, str) else list(given)
    items = [str(item).strip() for item in items]
    hint = "e.g. --by random,maxconf_std (comma-separated, no empty items)"
    if not any(items):
        raise MlvarError("--by names no strategy", hint)
    if not all(items):
        raise MlvarError(f"--by '{','.join(items)}' has an empty list item", hint)
    out: list[Strategy] = []
    for item in items:
        strategy = resolve_strategy(item)
        if strategy not in out:
            out.append(strategy)
    return out


def parse_budgets(given: str | Sequence[float]) -> list[float]:
    """Budgets from a comma-separated list (items may be ``start:stop:step`` ranges, as
    ``mlvar data prepare --ratio`` takes them) or a sequence of numbers: sorted, each once,
    with 0 added (budget 0 is always run: the baseline of every gain).

    Raises
    ------
    MlvarError
        An empty list or item, a value that is no number, or one outside [0, 1].
    """
    hint = "budgets are fractions of the pool in [0, 1], e.g. --budget 0,0.1,0.2,0.5,1.0"
    values: list[Decimal] = []
    if isinstance(given, str):
        items = [item.strip() for item in given.split(",")]
        if not any(items):
            raise MlvarError("--budget names no value", hint)
        if not all(items):
            raise MlvarError(f"--budget '{given}' has an empty list item", hint)
        for item in items:
            if ":" in item:
                from mlvar.data.sweep import expand_range

                values += [Decimal(repr(v)) for v in expand_range("budget", item)]
            else:
                values.append(_decimal(item, hint))
    else:
        values = [_decimal(repr(float(v)), hint) for v in given]
    for v in values:
        if not Decimal(0) <= v <= Decimal(1):
            raise MlvarError(f"--budget {v} is outside [0, 1]", hint)
    return sorted({0.0, *(float(v) for v in values)})


def _decimal(text: str, hint: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise MlvarError(f"--budget '{text}' is not a number", hint) from None
    if not value.is_finite():
        raise MlvarError(f"--budget '{text}' is not a number", hint)
    return value


def budget_k(budget: float, n: int) -> int:
    """The samples a budget adds from a pool of ``n``: ``budget x n`` rounded half up
    (computed in decimal from the budget's shortest repr, so 0.1 x 25 = 2.5 gives 3)."""
    exact = Decimal(repr(float(budget))) * n
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def format_budget(budget: float) -> str:
    """A budget as set names spell it: ``0.1``, ``1.0`` (the float's shortest repr)."""
    return repr(float(budget))


def set_name(strategy: str | None, budget: float) -> str:
    """The retraining set of a strategy and budget: ``b0`` for budget 0 (shared by every
    strategy), else ``<strategy>-b<budget>`` (``maxconf_std-b0.1``)."""
    if budget == 0:
        return "b0"
    if strategy is None:
        raise ValueError("a set of budget > 0 needs a strategy")
    return f"{strategy}-b{format_budget(budget)}"


def random_seed_of(run_id: str, seed: int | None) -> int:
    """The seed a run's ``random`` order is drawn with: its training seed, or for a run
    that records none the CRC-32 of its run id."""
    return int(seed) if seed is not None else zlib.crc32(run_id.encode())


def random_order(n: int, seed: int) -> np.ndarray:
    """The ``random`` order of a pool of ``n`` for a run of seed ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([RANDOM_TAG, int(seed)]))
    return rng.permutation(n).astype(np.int64)


def order_by(score: np.ndarray) -> np.ndarray:
    """Pool positions by ``score`` descending (higher = more wanted), ties (equal to
    :data:`TIE_DECIMALS` decimals) by position ascending."""
    score = np.round(np.asarray(score, dtype=np.float64), TIE_DECIMALS)
    return np.lexsort((np.arange(score.size), -score)).astype(np.int64)


def std_avg_conf_score(maxconf_std: np.ndarray, maxconf_mean: np.ndarray) -> np.ndarray:
    """The ``std_avg_conf`` geometric mean of ranks (lower = more wanted)."""
    from mlvar.analysis.detection import average_ranks

    std = np.round(np.asarray(maxconf_std, dtype=np.float64), TIE_DECIMALS)
    mean = np.round(np.asarray(maxconf_mean, dtype=np.float64), TIE_DECIMALS)
    rank_std = average_ranks(std)
    rank_mean = average_ranks(-mean)
    return np.sqrt(rank_std * rank_mean)


def orders(
    strategy: Strategy,
    metrics: Mapping[str, np.ndarray],
    per_run: Mapping[str, np.ndarray],
    seeds: Sequence[int],
) -> np.ndarray:
    """Each run's order of the pool under ``strategy``, ``[R, n]`` int64.

    Parameters
    ----------
    metrics
        Per-sample metric values over all runs, ``{name: [n]}`` (what shared strategies
        read).
    per_run
        The ``"runs"`` statistics, ``{run_gconf|run_maxconf: [R, n]}`` (the baselines').
    seeds
        Each run's ``random`` seed (:func:`random_seed_of`), in run order.
    """
    n_runs = len(seeds)
    if strategy.name == RANDOM:
        n = len(next(iter(metrics.values())))
        return np.stack([random_order(n, s) for s in seeds]) if n_runs else np.zeros((0, n))
    if strategy.kind == PER_RUN:
        baseline = BASELINES[strategy.name]
        scores = baseline.scores(np.asarray(per_run[baseline.statistic], dtype=np.float64))
        return np.stack([order_by(row) for row in scores])
    if strategy.name == STD_AVG_CONF:
        score = -std_avg_conf_score(metrics["maxconf_std"], metrics["maxconf_mean"])
    else:
        score = METRICS[strategy.name].suspicion(metrics[strategy.name])
    return np.repeat(order_by(score)[None, :], n_runs, axis=0)


def pool_orders(preds: Predictions, strategies: Sequence[Strategy]) -> dict[str, np.ndarray]:
    """Every strategy's ``[R, n]`` order of the pool ``preds`` (the verified runs of the
    pool split, in run order), from the stored pool logits."""
    from mlvar.analysis.service import compute

    computed = compute(preds)
    metrics = {c: computed.metrics[c].to_numpy() for c in computed.metrics.columns}
    seeds = [random_seed_of(r.run_id, r.seed) for r in preds.runs]
    return {s.name: orders(s, metrics, computed.per_run, seeds) for s in strategies}
