"""Analysis of a run store: accuracy across seeds, per-sample metrics, ranking, detection.

Reads stored predictions only (never models). Logits are memory-mapped and processed in
chunks of samples, so memory stays bounded by ``runs x chunk x classes``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.accuracy import accuracy_summary
from mlvar.analysis.detection import detect, detect_baselines
from mlvar.analysis.metrics import METRICS, baseline_scores, compute_metrics, softmax
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from mlvar.store import ExperimentStore, RunRecord, parquet_bytes

DEFAULT_RANK_BY = "gconf_mean"
CHUNK = 8192  # samples per chunk when streaming over memory-mapped logits


@dataclass
class Predictions:
    """The runs of one split, ready to stream: records, sample table, class names."""

    store: ExperimentStore
    split: str
    runs: list[RunRecord]
    samples: pd.DataFrame
    skipped: list[str]  # runs left out (failed sha256)

    @property
    def labels(self) -> np.ndarray:
        return self.samples["label"].to_numpy()

    @property
    def affected(self) -> np.ndarray:
        return self.samples["affected"].to_numpy()

    def chunks(self, size: int = CHUNK):
        """Yield ``(start, stop, probs [R, chunk, C])``, probabilities in float64."""
        arrays = [r.load_logits(self.split) for r in self.runs]
        n = len(self.samples)
        for start in range(0, n, size):
            stop = min(start + size, n)
            logits = np.stack([a[start:stop] for a in arrays]).astype(np.float64)
            yield start, stop, softmax(logits)


def _identity(run: RunRecord) -> str:
    cfg = dict(run.meta.get("config", {}))
    for key in ("engine", "device", "pack_size"):
        cfg.pop(key, None)
    return json.dumps(cfg, sort_keys=True)


def load_predictions(store: ExperimentStore, split: str, allow_mixed: bool = False) -> Predictions:
    """The verified finished runs of ``split``.

    Raises :class:`MlvarError` when there is no finished run, or when runs were trained
    with different configurations (unless ``allow_mixed``).
    """
    samples = store.samples(split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = store.runs(verify=True)
    skipped = [str(w.message) for w in caught]
    for message in skipped:
        warnings.warn(message, stacklevel=2)
    if not runs:
        raise MlvarError(
            f"experiment '{store.name}' has no finished runs",
            f"train some with 'mlvar train {store.meta.get('dataset', 'DATASET')} --runs N'",
        )
    configs = {}
    for run in runs:
        configs.setdefault(_identity(run), []).append(run.run_id)
    if len(configs) > 1 and not allow_mixed:
        groups = "; ".join(f"{ids[0]}..({len(ids)} runs)" for ids in configs.values())
        raise MlvarError(
            f"experiment '{store.name}' mixes runs trained with {len(configs)} different "
            f"configurations ({groups})",
            "analyse them separately, or pass --allow-mixed",
        )
    n_classes = len(store.class_names)
    for run in runs:
        shape = run.meta.get("arrays", {}).get(f"{split}.logits.npy", {}).get("shape")
        if shape != [len(samples), n_classes]:
            raise MlvarError(
                f"run {run.run_id} of '{store.name}' has {split} logits of shape {shape}, "
                f"expected [{len(samples)}, {n_classes}]",
                "remove or retrain that run",
            )
    return Predictions(store, split, runs, samples, skipped)


def _analysis_dir(store: ExperimentStore) -> Path:
    return store.root / "analysis"


def _write_table(df: pd.DataFrame, path_stem: Path) -> None:
    import pyarrow as pa

    atomic_write_bytes(
        path_stem.with_suffix(".parquet"),
        parquet_bytes(pa.Table.from_pandas(df, preserve_index=False)),
    )
    atomic_write_text(path_stem.with_suffix(".csv"), df.to_csv(index=False))


@dataclass
class RankResult:
    """Per-sample metrics ranked, and how well each metric finds the affected samples."""

    experiment: str
    split: str
    n_runs: int
    by: str
    ranking: pd.DataFrame  # one row per sample, most suspicious first
    detection: pd.DataFrame | None  # one row per metric (None when nothing is affected)
    baselines: pd.DataFrame | None  # single-model baselines, min/median/max over runs
    files: list[str]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        ranking = self.ranking if top is None else self.ranking.head(top)
        return {
            "experiment": self.experiment,
            "split": self.split,
            "n_runs": self.n_runs,
            "by": self.by,
            "ranking": json.loads(ranking.to_json(orient="records")),
            "detection": None
            if self.detection is None
            else json.loads(self.detection.to_json(orient="records")),
            "baselines": None
            if self.baselines is None
            else json.loads(self.baselines.to_json(orient="records")),
            "files": self.files,
        }


def rank(
    store: ExperimentStore,
    split: str = "test",
    by: str = DEFAULT_RANK_BY,
    allow_mixed: bool = False,
    chunk: int = CHUNK,
    write: bool = True,
) -> RankResult:
    """Compute every metric for every sample of ``split``, rank, and score detection.

    The ranking sorts samples by ``by``'s suspicion (higher = more suspicious first),
    ties in sample order. Results are written to ``<experiment>/analysis/`` as parquet and
    CSV (``rank-<split>``, ``detection-<split>``, ``baselines-<split>``).
    """
    if by not in METRICS:
        raise unknown_choice("metric", by, METRICS)
    preds = load_predictions(store, split, allow_mixed)
    labels = preds.labels
    parts, base_parts, votes = [], [], []
    for start, stop, probs in preds.chunks(chunk):
        parts.append(compute_metrics(probs, labels[start:stop]))
        base_parts.append(baseline_scores(probs, labels[start:stop]))
        counts = np.zeros((stop - start, probs.shape[2]), dtype=np.int64)
        np.add.at(counts, (np.arange(stop - start)[None, :], probs.argmax(axis=2)), 1)
        votes.append(counts)
    metrics = pd.concat(parts, ignore_index=True)
    vote_counts = np.concatenate(votes)
    class_names = store.class_names
    table = preds.samples.copy()
    table.insert(2, "label_name", [class_names[i] for i in labels])
    majority = vote_counts.argmax(axis=1)
    table["majority_pred"] = majority
    table["majority_name"] = [class_names[i] for i in majority]
    table["votes"] = [" ".join(map(str, row)) for row in vote_counts]
    table = pd.concat([table, metrics], axis=1)
    order = np.argsort(-METRICS[by].suspicion(metrics[by].to_numpy()), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))

    affected = preds.affected
    detection = baselines = None
    if affected.any() and not affected.all():
        detection = detect(metrics, labels, affected)
        base = {k: np.concatenate([b[k] for b in base_parts], axis=1) for k in base_parts[0]}
        baselines = detect_baselines(base, labels, affected)
    files = []
    if write:
        out = _analysis_dir(store)
        _write_table(table, out / f"rank-{split}")
        files += [f"rank-{split}.parquet", f"rank-{split}.csv"]
        if detection is not None:
            _write_table(detection, out / f"detection-{split}")
            _write_table(baselines, out / f"baselines-{split}")
            files += [f"detection-{split}.{e}" for e in ("parquet", "csv")]
            files += [f"baselines-{split}.{e}" for e in ("parquet", "csv")]
        files = [str(out / f) for f in files]
    return RankResult(store.name, split, len(preds.runs), by, table, detection, baselines, files)


@dataclass
class AccuracyResult:
    """Accuracy of every run on one split and its spread across seeds."""

    experiment: str
    split: str
    n_runs: int
    per_run: pd.DataFrame  # one row per run: run_id, seed, accuracy, per class, groups
    summary: dict[str, dict[str, float]]  # column -> mean/std/min/max/ci_low/ci_high/n
    expected_seed_std: float
    observed_seed_std: float
    class_names: list[str]
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "split": self.split,
            "n_runs": self.n_runs,
            "per_run": json.loads(self.per_run.to_json(orient="records")),
            "summary": self.summary,
            "expected_seed_std": self.expected_seed_std,
            "observed_seed_std": self.observed_seed_std,
            "class_names": self.class_names,
            "files": self.files,
        }


def accuracy(
    store: ExperimentStore,
    split: str = "test",
    allow_mixed: bool = False,
    chunk: int = CHUNK,
    write: bool = True,
) -> AccuracyResult:
    """Accuracy per run, per class and per affected group, with its spread over seeds."""
    preds = load_predictions(store, split, allow_mixed)
    pred_parts = []
    for _start, _stop, probs in preds.chunks(chunk):
        pred_parts.append(probs.argmax(axis=2))
    pred = np.concatenate(pred_parts, axis=1)
    n_classes = len(store.class_names)
    out = accuracy_summary(pred, preds.labels, preds.affected, n_classes)
    per_run = out["per_run"].reset_index(drop=True)
    per_run.insert(0, "run_id", [r.run_id for r in preds.runs])
    per_run.insert(1, "seed", [r.seed for r in preds.runs])
    summary = {k: {kk: _clean(vv) for kk, vv in v.items()} for k, v in out["summary"].items()}
    files = []
    if write:
        base = _analysis_dir(store)
        _write_table(per_run, base / f"accuracy-{split}")
        atomic_write_json(
            base / f"accuracy-{split}.json",
            {
                "summary": summary,
                "expected_seed_std": _clean(out["expected_seed_std"]),
                "observed_seed_std": _clean(out["observed_seed_std"]),
            },
        )
        files = [str(base / f"accuracy-{split}.{e}") for e in ("parquet", "csv", "json")]
    return AccuracyResult(
        store.name,
        split,
        len(preds.runs),
        per_run,
        summary,
        _clean(out["expected_seed_std"]),
        _clean(out["observed_seed_std"]),
        store.class_names,
        files,
    )


def _clean(value: Any) -> Any:
    """NaN becomes None so that JSON output stays valid."""
    if isinstance(value, float | np.floating) and np.isnan(value):
        return None
    if isinstance(value, np.floating | np.integer):
        return value.item()
    return value
