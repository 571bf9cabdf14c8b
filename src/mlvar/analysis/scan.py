"""Accuracy, ranking and the runs curve of one experiment from one scan of its logits.

``mlvar report html`` shows all three; computed apart they read every run's logits
three times and the curve recomputes the per-run values of each run once per subset it
is in (for 100 runs, 7 times over). :func:`scan_experiment` reads each chunk of samples
once, computes its per-run values once (:class:`~mlvar.analysis.metrics.RunValues`) and
derives from them every run's predicted classes (accuracy), the statistics over all runs
(the ranking) and those over each subset of runs of the curve
(:class:`~mlvar.analysis.curve.SubsetScan`). The results are those of
:func:`~mlvar.analysis.service.accuracy`, :func:`~mlvar.analysis.service.rank` and
:func:`~mlvar.analysis.curve.runs_curve`, bit for bit (the tests compare), and accuracy
and ranking are written as those functions write them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mlvar.analysis import curve as curves
from mlvar.analysis import service
from mlvar.analysis.conventions import RANKS_MID
from mlvar.analysis.metrics import RunValues, reduce_runs
from mlvar.analysis.partial import Partial
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore


@dataclass
class ExperimentScan:
    """What :func:`scan_experiment` computed."""

    accuracy: service.AccuracyResult
    ranked: service.RankResult
    curve: curves.CurveResult | None  # None when there is nothing to score (``curve_note``)
    curve_note: str = ""
    predictions: service.Predictions | None = None  # the verified runs that were read


def scan_experiment(
    store: ExperimentStore,
    split: str = "test",
    by: str = service.DEFAULT_RANK_BY,
    curve_subsets: int = 5,
    curve_seed: int = 0,
    chunk: int | None = None,
    write: bool = True,
    write_curve: bool = False,
    ranks: str = RANKS_MID,
) -> ExperimentScan:
    """Accuracy, ranking and runs curve of ``split`` (see the module doc).

    ``ranks``: the rank convention of the detection's rank summaries (as
    ``mlvar analyze rank --ranks``).

    ``write``: write accuracy and ranking to ``analysis/`` (as ``mlvar analyze accuracy``
    and ``mlvar analyze rank`` do); ``write_curve``: also the curve. The curve is left out
    (``curve`` None, ``curve_note`` says why) when no sample or every sample is affected.
    Training-dynamics metrics (train split of runs that recorded them) are computed by the
    three functions one after the other.
    """
    service.check_by(by)
    if curve_subsets < 1:
        raise MlvarError(f"--subsets must be at least 1, got {curve_subsets}", "use e.g. 5")
    preds = service.load_predictions(store, split)
    service._check_by_available(by, preds)
    affected = preds.affected
    note = "" if affected.any() and not affected.all() else "nothing to detect"
    if preds.has_dynamics:
        done = _apart(store, split, by, curve_subsets, curve_seed, chunk, write, write_curve, ranks)
        done.predictions = preds
        return done
    plan = curves.curve_plan(len(preds.runs), curve_subsets, curve_seed) if not note else []
    # The set of all runs is the last subset of the plan: its metrics and detection are
    # the ranking's own, so it is not scanned twice.
    everything = plan[-1] if plan and len(plan[-1][2]) == len(preds.runs) else None
    if everything is not None:
        plan = plan[:-1]
    batches = curves.curve_batches(preds, plan) if plan else []
    subsets = curves.SubsetScan(preds, batches[0]) if batches else None
    labels = preds.labels
    n_runs = len(preds.runs)
    pred = np.empty((n_runs, len(labels)), dtype=np.int64)

    def parts() -> Iterator[tuple[int, int, Partial]]:
        for a, b, probs in preds.chunks(chunk):
            values = RunValues(probs, labels[a:b])
            part = Partial.from_arrays(n_runs, reduce_runs(values))  # as from_probs
            pred[:, a:b] = values.preds
            if subsets is not None:
                subsets.add(a, b, values)
            yield a, b, part

    computed = service.Computed.collect(parts(), labels)
    accuracy = service.accuracy_of(preds, pred, write)
    run_ids = [r.run_id for r in preds.runs]
    ranked = service.assemble(
        store, preds.samples, split, run_ids, by, computed, write, preds.skipped, ranks=ranks
    )
    if note:
        return ExperimentScan(accuracy, ranked, None, note, preds)
    rows = subsets.rows() if subsets is not None else []
    for batch in batches[1:]:
        rows += curves.scan_subsets(preds, batch, chunk).rows()
    if everything is not None:
        rows += curves.detection_rows(preds, everything, ranked.detection)
    result = curves.curve_result(preds, curve_subsets, curve_seed, rows, write_curve)
    return ExperimentScan(accuracy, ranked, result, "", preds)


def _apart(
    store: ExperimentStore,
    split: str,
    by: str,
    curve_subsets: int,
    curve_seed: int,
    chunk: int | None,
    write: bool,
    write_curve: bool,
    ranks: str = RANKS_MID,
) -> ExperimentScan:
    accuracy = service.accuracy(store, split, chunk=chunk, write=write)
    ranked = service.rank(store, split, by, chunk=chunk, write=write, ranks=ranks)
    if ranked.detection is None:
        return ExperimentScan(accuracy, ranked, None, "nothing to detect")
    result = curves.runs_curve(
        store, split, curve_subsets, curve_seed, chunk=chunk, write=write_curve
    )
    return ExperimentScan(accuracy, ranked, result)
