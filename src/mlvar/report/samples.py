"""What the per-sample pages show: their file names, their inputs (image or feature row)
from the prepared scenario, and their predictions across seeds.

A page is written for the top ``K`` ranked samples plus ``K`` random unaffected ones
(seeded), never for the whole split: :func:`mlvar.analysis.selection.choose_samples`,
the choice saliency explains too. Inputs come from the prepared scenario named in
``experiment.json`` when it is in the data root and is the one the runs were trained on
(same manifest sha256); otherwise the pages say why they show no input.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis import service as analysis
from mlvar.analysis.metrics import softmax
from mlvar.data.scenario import SplitData, experiment_scenario
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore


def page_names(sample_ids: pd.Series) -> list[str]:
    """File names of the sample pages (without folder or extension), one per row:
    ``sample-<id>``, or ``row-<n>`` when ids repeat or are not plain integers."""
    ids = [str(s) for s in sample_ids]
    if len(set(ids)) == len(ids) and all(re.fullmatch(r"-?[0-9]+", s) for s in ids):
        return [f"sample-{s}" for s in ids]
    return [f"row-{i}" for i in range(len(ids))]


@dataclass
class Inputs:
    """The scenario inputs of the sampled rows, or why there are none."""

    kind: str | None  # "image", "tabular" or None when unavailable
    reason: str  # why no input is shown ("" when they are)
    rows: dict[int, np.ndarray] = field(default_factory=dict)  # position -> x
    max_value: float = 255.0
    feature_names: list[str] = field(default_factory=list)


def load_inputs(
    store: ExperimentStore, data_root: Path | None, split: str, positions: list[int]
) -> Inputs:
    """The inputs of the samples at ``positions`` (row numbers of the store's split)."""
    if data_root is None:
        return Inputs(None, "no data root was given, so the prepared scenario was not read")
    try:
        scenario = experiment_scenario(Path(data_root), store.name, store.meta)
    except MlvarError as exc:
        return Inputs(None, exc.message)
    name = scenario.name
    manifest = scenario.manifest
    kind = (manifest.get("input") or {}).get("kind")
    if kind not in ("image", "tabular"):
        return Inputs(None, f"the scenario's input kind '{kind}' has no preview")
    try:
        data: SplitData = scenario.load(split)
    except MlvarError as exc:
        return Inputs(None, exc.message)
    ids = store.samples(split)["sample_id"].to_numpy()
    index = pd.Index(data.id)
    if not index.is_unique:
        return Inputs(None, f"sample ids repeat in split '{split}' of scenario '{name}'")
    where = index.get_indexer(ids[positions])
    rows = {p: data.x[w] for p, w in zip(positions, where, strict=True) if w >= 0}
    names = [str(f) for f in manifest.get("feature_names", [])]
    reason = "" if rows else f"none of these samples is in scenario '{name}'"
    max_value = float((manifest.get("input") or {}).get("max_value", 255))
    return Inputs(kind if rows else None, reason, rows, max_value, names)


@dataclass
class SeedPredictions:
    """Class probabilities of the sampled rows under every run."""

    run_ids: list[str]
    seeds: list[Any]
    probs: np.ndarray  # [R, m, C] float64, rows in the order of ``positions``
    positions: list[int]

    def of(self, position: int) -> np.ndarray:
        """``[R, C]`` probabilities of the sample at ``position``."""
        return self.probs[:, self.positions.index(position)]

    @property
    def n_runs(self) -> int:
        return len(self.run_ids)


def seed_predictions(
    store: ExperimentStore,
    split: str,
    positions: list[int],
    preds: analysis.Predictions | None = None,
) -> SeedPredictions:
    """Read the logits of only the rows at ``positions`` from every finished run (those
    of ``preds`` when the caller has loaded and verified them)."""
    if preds is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already reported by the analysis
            preds = analysis.load_predictions(store, split)
    order = sorted(set(positions))
    blocks = []
    for run in preds.runs:
        logits = np.load(run.logits_path(split), mmap_mode="r", allow_pickle=False)
        blocks.append(np.asarray(logits[order], dtype=np.float64))
        del logits
    probs = softmax(np.stack(blocks)) if blocks else np.zeros((0, len(order), 0))
    return SeedPredictions(
        [r.run_id for r in preds.runs], [r.seed for r in preds.runs], probs, order
    )
