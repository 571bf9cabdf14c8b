"""What one saliency computation explains, fixed before anything is computed.

:func:`plan_saliency` checks the arguments, the runs and the prepared scenario, ranks the
split over every verified run, picks the samples (the top ``K`` and ``K`` random
unaffected ones: :func:`mlvar.analysis.selection.choose_samples`, the report's choice)
and the runs to explain (the first ``S`` by run id), with the samples' inputs and each
run's predicted class. Every shard of a sharded computation plans alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis import service as analysis
from mlvar.analysis.defaults import (
    SALIENCY_BATCH_DEFAULT,
    SALIENCY_SEEDS_DEFAULT,
    SALIENCY_TOP_DEFAULT,
)
from mlvar.analysis.selection import choose_samples
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, RunRecord
from mlvar.train.trained import WEIGHTS_FILE

TOP_DEFAULT = SALIENCY_TOP_DEFAULT
SEEDS_DEFAULT = SALIENCY_SEEDS_DEFAULT
BATCH_DEFAULT = SALIENCY_BATCH_DEFAULT


@dataclass
class SaliencyPlan:
    """What one saliency computation explains, under which runs: fixed by the store, the
    ranking and the arguments, so every shard of a sharded saliency plans the same."""

    split: str
    by: str
    top: int
    seed: int
    seeds: int
    model_name: str
    runs: list[RunRecord]  # the first `seeds` verified runs, by run id
    rows: list[int]  # ranking rows of the samples
    chosen: pd.DataFrame  # those ranking rows
    ids: np.ndarray  # their sample ids
    positions: np.ndarray  # their row numbers in the split
    x_raw: np.ndarray  # their inputs, as prepared
    scenario: Any
    labels: np.ndarray  # [n]
    preds: np.ndarray  # [S, n]: each run's predicted class
    ranked_run_ids: list[str] = field(default_factory=list)  # every run the ranking used

    def fingerprint(self) -> dict[str, Any]:
        """What shards must agree on to be merged."""
        return {
            "split": self.split,
            "by": self.by,
            "top": self.top,
            "seed": self.seed,
            "seeds": self.seeds,
            "model": self.model_name,
            "run_ids": [r.run_id for r in self.runs],
            "sample_ids": [int(i) for i in self.ids],
        }


def scenario_rows(
    store: ExperimentStore, data_root: Path, split: str, sample_ids: np.ndarray
) -> tuple[np.ndarray, Any]:
    """The raw inputs of ``sample_ids`` (in that order) and the prepared scenario the runs
    were trained on (checked by its manifest sha256)."""
    from mlvar.data.scenario import experiment_scenario

    scenario = experiment_scenario(Path(data_root), store.name, store.meta)
    name = scenario.name
    data = scenario.load(split)
    index = pd.Index(data.id)
    where = index.get_indexer(sample_ids) if index.is_unique else np.full(len(sample_ids), -1)
    if (where < 0).any():
        raise MlvarError(
            f"split '{split}' of scenario '{name}' lacks {int((where < 0).sum())} of the "
            "chosen samples (or repeats sample ids)",
            "prepare the scenario the runs were trained on",
        )
    return data.x[where], scenario


def input_kind(scenario: Any) -> str:
    """``image`` or ``tabular``: the kind of the scenario's inputs."""
    return str((scenario.manifest.get("input") or {}).get("kind", "tabular"))


def _check_runs(store: ExperimentStore, runs: list[RunRecord]) -> None:
    missing = [r.run_id for r in runs if WEIGHTS_FILE not in r.meta.get("arrays", {})]
    if missing:
        model = store.meta.get("model", "?")
        raise MlvarError(
            f"runs of experiment '{store.name}' (model {model}) saved no model weights "
            f"({WEIGHTS_FILE}; {missing[0]} and {len(missing) - 1} more), so there is "
            "nothing to attribute",
            "retrain them with this mlvar (runs save model.pt), e.g. under a new --name",
        )


def plan_saliency(
    store: ExperimentStore,
    data_root: Path,
    split: str = "test",
    top: int = TOP_DEFAULT,
    seeds: int = SEEDS_DEFAULT,
    by: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH_DEFAULT,
) -> SaliencyPlan:
    """What a saliency computation (and every saliency shard) explains, with the checks
    they make before computing (arguments, runs, weights listed, scenario): the ranking's
    runs, the chosen samples and the runs to explain, with their inputs. Nothing is
    computed or written."""
    from mlvar.train.models import IMAGE_MODELS

    by = by or analysis.DEFAULT_RANK_BY
    analysis.check_by(by)
    if top < 1:
        raise MlvarError(f"--top must be at least 1, got {top}", "use e.g. 10")
    if seeds < 1:
        raise MlvarError(f"--seeds must be at least 1, got {seeds}", "use e.g. 8")
    if batch_size < 1:
        raise MlvarError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. 64")
    from mlvar.recipes import is_custom

    model_name = str(store.meta.get("model", "?"))
    if model_name not in (*IMAGE_MODELS, "mlp") and not is_custom(model_name):
        raise MlvarError(
            f"experiment '{store.name}' has model '{model_name}', which mlvar cannot load",
            "saliency needs runs trained by mlvar: mlp, " + ", ".join(IMAGE_MODELS),
        )
    if model_name == "mlp" and layer is not None:
        raise MlvarError(
            f"--layer applies to GradCAM, but experiment '{store.name}' has an MLP "
            "(gradient x input attributes to the inputs)",
            "leave out --layer",
        )
    # The verified runs (a run whose arrays or weights fail their sha256 is left out with
    # a warning, as by every analysis) and the ranking over all of them.
    preds_all = analysis.load_predictions(store, split)
    samples = preds_all.samples
    run_ids_all = [r.run_id for r in preds_all.runs]
    computed = analysis.compute(preds_all)
    ranked = analysis.assemble(store, samples, split, run_ids_all, by, computed, write=False)
    runs = sorted(preds_all.runs, key=lambda r: r.run_id)[:seeds]
    _check_runs(store, runs)

    # The samples: top K by `by` and K random unaffected (the report's choice).
    ranking = ranked.ranking
    position_of = pd.Index(samples["sample_id"])
    if not position_of.is_unique:
        raise MlvarError(f"sample ids repeat in split '{split}' of '{store.name}'", "")
    rows = choose_samples(ranking, top, seed)
    chosen = ranking.iloc[rows].reset_index(drop=True)
    ids = chosen["sample_id"].to_numpy(dtype=np.int64)
    positions = position_of.get_indexer(ids)
    x_raw, scenario = scenario_rows(store, data_root, split, ids)
    kind = input_kind(scenario)
    if is_custom(model_name) and kind != "image":
        raise MlvarError(
            f"experiment '{store.name}' has the custom model {model_name} on {kind} inputs: "
            "mlvar explains custom models with GradCAM, which needs images",
            "train a custom model on an image dataset to get GradCAM maps",
        )
    if model_name != "mlp" and kind != "image":
        raise MlvarError(
            f"scenario '{scenario.name}' holds {kind} inputs: GradCAM needs images",
            "train an image model (e.g. 'mlvar train digits --model cnn')",
        )
    labels = chosen["label"].to_numpy(dtype=np.int64)
    preds = np.stack(
        [np.asarray(r.load_logits(split)[positions]).argmax(axis=1) for r in runs]
    ).astype(np.int64)  # [S, n]
    return SaliencyPlan(
        split,
        by,
        top,
        seed,
        seeds,
        model_name,
        runs,
        rows,
        chosen,
        ids,
        positions,
        x_raw,
        scenario,
        labels,
        preds,
        ranked_run_ids=run_ids_all,
    )
