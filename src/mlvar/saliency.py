"""``mlvar analyze saliency`` as a service: attributions across seeds, with their figures,
written as one folder (``<experiment>/analysis/saliency-<split>/``).

The layers meet here. :mod:`mlvar.analysis.saliency` plans, computes and assembles the
arrays and writes the folder, drawing nothing (analysis never imports report);
:mod:`mlvar.report.saliency` draws each sample's strip or chart from those arrays. The
two functions below join them, so the folder, overlays included, is written by one swap
as before: unsharded (:func:`saliency`) and from a complete set of run shards
(:func:`merge_saliency_shards`; the shards themselves hold arrays only and are computed
by :func:`mlvar.analysis.saliency.saliency_shard`, also in a backend's worker).
"""

from __future__ import annotations

import time
from pathlib import Path

from mlvar.analysis.saliency import (
    BATCH_DEFAULT,
    SEEDS_DEFAULT,
    TOP_DEFAULT,
    Progress,
    SaliencyResult,
    assemble,
    combine_saliency_shards,
    compute,
    plan_saliency,
    write_saliency,
)
from mlvar.report.saliency import figures
from mlvar.store import ExperimentStore


def saliency(
    store: ExperimentStore,
    data_root: Path,
    split: str = "test",
    top: int = TOP_DEFAULT,
    seeds: int = SEEDS_DEFAULT,
    by: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH_DEFAULT,
    progress: Progress | None = None,
) -> SaliencyResult:
    """Attributions of the top ``top`` samples by ``by`` and ``top`` random unaffected ones
    (drawn with ``seed``) under the first ``seeds`` verified runs (by run id), for the
    true and each run's predicted class; written to ``analysis/saliency-<split>/`` with
    one figure per sample.

    Image models get GradCAM at ``layer`` (default: the last ``Conv2d``); the MLP gets
    gradient x input (``layer`` must then be None). Everything is checked (arguments,
    runs, weights, scenario, layer) before anything is written; the folder appears
    complete or not at all.
    """
    started = time.perf_counter()
    plan = plan_saliency(store, data_root, split, top, seeds, by, layer, seed, batch_size)
    arrays = compute(store, plan, range(len(plan.runs)), layer, batch_size, progress)
    content = assemble(store, plan, arrays)
    return write_saliency(store, content, figures(content), started)


def merge_saliency_shards(
    store: ExperimentStore, data_root: Path, split: str = "test", layer: str | None = None
) -> SaliencyResult:
    """Combine the shards in ``analysis/saliency-shards/<split>/`` into
    ``analysis/saliency-<split>/``, exactly as :func:`saliency` writes it.

    The shards must form one complete set (every block ``j`` of one ``m``), agree on what
    they explain, and match the store now (the same runs and samples); anything else is
    an error naming the problem, and nothing is written.
    """
    started = time.perf_counter()
    content = combine_saliency_shards(store, data_root, split, layer)
    return write_saliency(store, content, figures(content), started)
