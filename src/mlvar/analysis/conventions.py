"""The analysis conventions a command can choose, in a module that imports nothing heavy.

mlvar's defaults and the original study's conventions side by side (docs/metrics.md,
"Study conventions"); the CLI checks a choice with these before it opens an experiment.

* Rank summaries of the affected samples (``--ranks``): ``mid``, 1-based ranks in which
  tied samples share the mean of their positions (mlvar's default); ``study``, 0-based
  positions in the order the study sorted by (``numpy.argsort`` of the metric, reversed
  for a metric where high is suspicious).
* The runs of the AUROC-against-runs curve (``analyze curve --design``): ``random``,
  random subsets of 1, 2, 4, ... runs (mlvar's default); ``prefix``, nested prefixes of
  the first ``step``, ``2 step``, ... runs in run order (the study's).

A file written under a non-default convention records it (a ``ranks`` or ``design``
column, a key of ``rank-<split>.json``); files without it were written under the default,
as every file written before the conventions existed.
"""

from __future__ import annotations

from mlvar.errors import MlvarError, unknown_choice

RANKS_MID = "mid"
RANKS_STUDY = "study"
RANK_CONVENTIONS = (RANKS_MID, RANKS_STUDY)
"""``--ranks`` choices; the first is the default."""

DESIGN_RANDOM = "random"
DESIGN_PREFIX = "prefix"
CURVE_DESIGNS = (DESIGN_RANDOM, DESIGN_PREFIX)
"""``analyze curve --design`` choices; the first is the default."""

PREFIX_STEP_DEFAULT = 10
"""``--step`` of the prefix design: the study's 10, 20, ..., 100 runs."""

ALL_SPLITS = "all"
"""``--split all`` of the study table: every split with affected samples."""


def check_ranks(ranks: str) -> str:
    """``ranks`` when it is a rank convention, else :class:`MlvarError`."""
    if ranks not in RANK_CONVENTIONS:
        raise unknown_choice("rank convention", ranks, RANK_CONVENTIONS)
    return ranks


def check_design(design: str, step: int | None = None) -> int | None:
    """Check a curve design and its step; return the step to use (None for ``random``)."""
    if design not in CURVE_DESIGNS:
        raise unknown_choice("curve design", design, CURVE_DESIGNS)
    if design == DESIGN_RANDOM:
        if step is not None:
            raise MlvarError(
                "--step applies only to --design prefix",
                "pass --design prefix --step N, or leave --step out",
            )
        return None
    step = PREFIX_STEP_DEFAULT if step is None else step
    if step < 1:
        raise MlvarError(f"--step must be at least 1, got {step}", "use e.g. --step 10")
    return step
