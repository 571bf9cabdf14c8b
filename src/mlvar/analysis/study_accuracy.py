"""The study's accuracy analyses across a holdout sweep (``mlvar analyze subclasses``).

The original study held out each of CIFAR-100's 50 kept fine classes ("subclasses") at
ratios 0, 0.1, ..., 1 (one experiment per subclass and ratio) and then

1. took per subclass the mean held-out test accuracy over runs at ratio 0 and its drop at
   ratio 1 (accuracy at 0 minus accuracy at 1), and grouped the subclasses on these two
   unscaled features with ``KMeans(n_clusters=10, random_state=42)`` (scikit-learn's
   default ``n_init`` of the time: 10);
2. per group, pooled the experiments of its subclasses (every ratio) and computed the
   Pearson r (with its p-value) of the mean validation accuracy over runs, and of its std
   over runs (ddof 1), against the mean held-out test accuracy.

The validation accuracy is that of all validation samples (the study's ``val_accu``);
the held-out test accuracy is that of the affected test samples (the held-out fine class).
Per-run accuracies come from each experiment's ``analysis/accuracy-<split>.parquet``
(written by ``mlvar analyze accuracy``) when it covers the experiment's current runs, and
are computed from the stored predictions otherwise.

:func:`subclass_accuracy` writes ``<runs_root>/study-subclasses.{parquet,csv}`` (one row
per subclass) and ``study-correlations.{parquet,csv}`` (one row per group). Where fewer
subclasses than groups have both ratio 0 and ratio 1, it raises
:class:`~mlvar.errors.MlvarError` naming what is missing, before computing or writing
anything.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mlvar.analysis.service import accuracy, analysis_dir, write_table
from mlvar.data.protocol import check_protocol, protocol_of
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, list_experiments

STUDY_GROUPS = 10
"""Groups of subclasses in the study (``KMeans(n_clusters=10)``)."""
KMEANS_SEED = 42
KMEANS_N_INIT = 10
"""scikit-learn's default ``n_init`` when the study ran (it became ``"auto"`` in 1.4)."""
STUDY_SUBCLASS_COUNT = 50
"""The study held out every fine class of the 10 kept CIFAR-100 superclasses."""
HOLDOUT_MODE = "holdout"
TEST_SPLIT = "test"
VAL_SPLIT = "val"


@dataclass
class SubclassAccuracyResult:
    """Per experiment, per subclass and per group: the study's accuracy analyses."""

    runs_root: str
    dataset: str
    n_groups: int
    points: pd.DataFrame  # one row per experiment (subclass x ratio)
    subclasses: pd.DataFrame  # one row per subclass with ratios 0 and 1: features, group
    correlations: pd.DataFrame  # one row per group: Pearson r and p
    notes: list[str]  # what was left out, and how this differs from the study's sweep
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        def rows(df: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(df.to_json(orient="records"))

        return {
            "runs_root": self.runs_root,
            "dataset": self.dataset,
            "n_groups": self.n_groups,
            "points": rows(self.points),
            "subclasses": rows(self.subclasses),
            "correlations": rows(self.correlations),
            "notes": self.notes,
            "files": self.files,
        }


def _stored_accuracy(store: ExperimentStore, split: str, run_ids: list[str]) -> pd.DataFrame | None:
    """The stored per-run accuracies of ``split`` if they cover exactly ``run_ids``."""
    path = analysis_dir(store) / f"accuracy-{split}.parquet"
    if not path.is_file():
        return None
    per_run = pq.read_table(path).to_pandas()
    return per_run if sorted(str(r) for r in per_run["run_id"]) == run_ids else None


def _per_run(store: ExperimentStore, split: str, write: bool) -> pd.DataFrame:
    """Per-run accuracies of ``split``: stored ones when current, else computed (and
    stored with ``write``, as ``mlvar analyze accuracy`` stores them)."""
    run_ids = sorted(r.run_id for r in store.runs())
    stored = _stored_accuracy(store, split, run_ids)
    if stored is not None:
        return stored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accuracy(store, split, write=write).per_run


def _mean_std(values: pd.Series) -> tuple[float, float]:
    v = values.to_numpy(dtype=np.float64)
    v = v[~np.isnan(v)]
    mean = float(v.mean()) if v.size else float("nan")
    return mean, float(v.std(ddof=1)) if v.size > 1 else float("nan")


def holdout_experiments(
    runs_root: Path, dataset: str, model: str | None = None, protocol: str | None = None
) -> list[dict[str, Any]]:
    """The holdout experiments of ``dataset`` under ``runs_root`` with a ``subclass`` and a
    ``ratio`` parameter (optionally of one model and protocol), from their metadata only.

    Raises
    ------
    MlvarError
        None found, or two experiments hold out the same subclass at the same ratio.
    """
    found = []
    seen: dict[tuple[str, float], str] = {}
    for name in list_experiments(runs_root):
        meta = ExperimentStore.open(runs_root, name).meta
        scenario = meta.get("scenario") or {}
        params = scenario.get("params") or {}
        if (
            meta.get("dataset") != dataset
            or scenario.get("mode") != HOLDOUT_MODE
            or "subclass" not in params
            or "ratio" not in params
        ):
            continue
        made_under = protocol_of(meta) if "protocol" in meta else protocol_of(scenario)
        if (model is not None and meta.get("model") != model) or (
            protocol is not None and made_under != protocol
        ):
            continue
        key = (str(params["subclass"]), float(params["ratio"]))
        if key in seen:
            raise MlvarError(
                f"experiments '{seen[key]}' and '{name}' both hold out {dataset} subclass "
                f"'{key[0]}' at ratio {key[1]:g}",
                "choose one series with --model or --protocol",
            )
        seen[key] = name
        found.append(
            {
                "experiment": name,
                "subclass": key[0],
                "ratio": key[1],
                "model": meta.get("model"),
                "protocol": made_under,
            }
        )
    if not found:
        holdouts = subclass_holdout_datasets()
        if dataset in holdouts:
            hint = (
                f"prepare and train a sweep, e.g. 'mlvar data prepare {dataset} --subclass all "
                f"--ratio 0:1:0.1' and 'mlvar train {dataset} --scenario holdout'"
            )
        else:
            hint = (
                f"'{dataset}' has no subclass holdout; the analyses read one of "
                + ", ".join(holdouts)
                + " (--dataset)"
            )
        raise MlvarError(
            f"no {dataset} holdout experiments with a subclass and a ratio in {runs_root}", hint
        )
    return found


def subclass_holdout_datasets() -> list[str]:
    """The datasets whose ``holdout`` mode takes ``--subclass`` and ``--ratio``."""
    from mlvar.data.registry import DATASETS

    return [
        name
        for name, spec in DATASETS.items()
        if any(
            {"subclass", "ratio"} <= set(m.params.options()) for m in spec.variants(HOLDOUT_MODE)
        )
    ]


def missing_ratios(found: list[dict[str, Any]], n_groups: int) -> str | None:
    """Why ``found`` cannot be grouped into ``n_groups`` (None when it can): the subclasses
    lacking ratio 0 or ratio 1 and how many more complete ones are needed."""
    ratios: dict[str, set[float]] = {}
    for e in found:
        ratios.setdefault(e["subclass"], set()).add(e["ratio"])
    complete = [s for s, r in ratios.items() if {0.0, 1.0} <= r]
    if len(complete) >= n_groups:
        return None
    lacking = [
        f"{s} (no ratio {' or '.join(f'{a:g}' for a in (0.0, 1.0) if a not in r)})"
        for s, r in sorted(ratios.items())
        if not {0.0, 1.0} <= r
    ]
    return (
        f"grouping into {n_groups} groups needs at least {n_groups} subclasses with both ratio "
        f"0 and ratio 1; {len(complete)} have both"
        + (f", {len(lacking)} lack one: {', '.join(lacking)}" if lacking else "")
        + f"; {n_groups - len(complete)} more needed"
    )


def group_subclasses(features: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The study's KMeans on ``[accuracy at ratio 0, drop at ratio 1]`` (unscaled): the
    group of each row and the groups' centres."""
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=n_groups, random_state=KMEANS_SEED, n_init=KMEANS_N_INIT)
    labels = kmeans.fit_predict(features)
    return labels, kmeans.cluster_centers_


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """Pearson r and its two-sided p over the pairs where both are finite (NaN when fewer
    than 2 pairs or a constant side), and the number of pairs."""
    from scipy import stats

    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), n
    r, p = stats.pearsonr(x, y)
    return float(r), float(p), n


def subclass_accuracy(
    runs_root: Path,
    dataset: str = "cifar100",
    n_groups: int = STUDY_GROUPS,
    model: str | None = None,
    protocol: str | None = None,
    write: bool = True,
) -> SubclassAccuracyResult:
    """The study's accuracy analyses over the holdout sweep of ``dataset`` in ``runs_root``.

    ``n_groups``: KMeans groups (the study: 10). ``model``/``protocol``: keep one series of
    experiments. ``write``: write the two tables under ``runs_root`` and store accuracies
    computed here in the experiments' ``analysis/`` (as ``mlvar analyze accuracy`` would);
    without it nothing is written.

    Raises
    ------
    MlvarError
        No such experiments, duplicates, or fewer than ``n_groups`` subclasses with both
        ratio 0 and ratio 1 (nothing is computed or written then).
    """
    if n_groups < 1:
        raise MlvarError(f"--groups must be at least 1, got {n_groups}", "the study used 10")
    if protocol is not None:
        check_protocol(protocol)
    runs_root = Path(runs_root)
    found = holdout_experiments(runs_root, dataset, model, protocol)
    why = missing_ratios(found, n_groups)
    if why:
        hint = "train the missing scenarios"
        if n_groups > 1:
            hint += ", or pass --groups K for fewer groups"
        raise MlvarError(why, hint)
    rows = []
    notes: list[str] = []
    for e in found:
        store = ExperimentStore.open(runs_root, e["experiment"])
        splits = store.meta.get("splits", [])
        if TEST_SPLIT not in splits:
            notes.append(f"{e['experiment']}: no {TEST_SPLIT} split, left out")
            continue
        try:
            test = _per_run(store, TEST_SPLIT, write)
            val = _per_run(store, VAL_SPLIT, write) if VAL_SPLIT in splits else None
        except MlvarError as exc:  # e.g. no finished runs yet
            notes.append(f"{e['experiment']}: left out ({exc.message})")
            continue
        heldout_mean, heldout_std = _mean_std(test["acc_affected"])
        other_mean, _ = _mean_std(test["acc_unaffected"])
        val_mean = val_std = float("nan")
        if val is not None:
            val_mean, val_std = _mean_std(val["accuracy"])
        else:
            notes.append(f"{e['experiment']}: no {VAL_SPLIT} split (no validation accuracy)")
        rows.append(
            e
            | {
                "n_runs": len(test),
                "val_acc_mean": val_mean,
                "val_acc_std": val_std,
                "heldout_acc_mean": heldout_mean,
                "heldout_acc_std": heldout_std,
                "other_acc_mean": other_mean,
            }
        )
    why = missing_ratios(rows, n_groups)
    if why:  # some experiments were left out
        raise MlvarError(f"{why} ({'; '.join(notes)})", "train the missing scenarios")
    points = pd.DataFrame(rows).sort_values(["subclass", "ratio"], kind="stable")
    points = points.reset_index(drop=True)
    subclasses = _subclass_table(points, dataset)
    labels, centres = group_subclasses(
        subclasses[["acc_ratio0", "drop"]].to_numpy(dtype=np.float64), n_groups
    )
    subclasses["group"] = labels.astype(np.int64)
    points["group"] = points["subclass"].map(dict(zip(subclasses["subclass"], labels, strict=True)))
    points["group"] = points["group"].astype("Int64")
    correlations = _correlations(points, subclasses, centres)
    left_out = sorted(set(points["subclass"]) - set(subclasses["subclass"]))
    if left_out:
        notes.append(f"not grouped (no ratio 0 or no ratio 1): {', '.join(left_out)}")
    if len(subclasses) < STUDY_SUBCLASS_COUNT:
        notes.append(
            f"{len(subclasses)} subclasses grouped; the study grouped all "
            f"{STUDY_SUBCLASS_COUNT} kept fine classes of CIFAR-100"
        )
    files: list[str] = []
    if write:
        files += write_table(subclasses, runs_root / "study-subclasses")
        files += write_table(correlations, runs_root / "study-correlations")
    return SubclassAccuracyResult(
        str(runs_root), dataset, n_groups, points, subclasses, correlations, notes, files
    )


def _subclass_table(points: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per subclass with both ratio 0 and ratio 1: its held-out accuracy at each,
    the drop and the number of ratios it was trained at."""
    rows = []
    for subclass, g in points.groupby("subclass", sort=True):
        at = g.set_index("ratio")
        if 0.0 not in at.index or 1.0 not in at.index:
            continue
        acc0 = float(at.at[0.0, "heldout_acc_mean"])
        acc1 = float(at.at[1.0, "heldout_acc_mean"])
        rows.append(
            {
                "dataset": dataset,
                "subclass": subclass,
                "n_ratios": len(g),
                "acc_ratio0": acc0,
                "acc_ratio1": acc1,
                "drop": acc0 - acc1,
                "experiment_ratio0": at.at[0.0, "experiment"],
                "experiment_ratio1": at.at[1.0, "experiment"],
            }
        )
    return pd.DataFrame(rows)


def _correlations(
    points: pd.DataFrame, subclasses: pd.DataFrame, centres: np.ndarray
) -> pd.DataFrame:
    """Per group: over the experiments of its subclasses (every ratio), Pearson r and p of
    the mean and of the std of validation accuracy against the held-out test accuracy."""
    rows = []
    for group in range(len(centres)):
        members = subclasses.loc[subclasses["group"] == group, "subclass"].tolist()
        one = points[points["group"] == group]
        y = one["heldout_acc_mean"].to_numpy(dtype=np.float64)
        r_mean, p_mean, n_mean = _pearson(one["val_acc_mean"].to_numpy(dtype=np.float64), y)
        r_std, p_std, n_std = _pearson(one["val_acc_std"].to_numpy(dtype=np.float64), y)
        rows.append(
            {
                "group": group,
                "subclasses": " ".join(members),
                "n_subclasses": len(members),
                "n_experiments": len(one),
                "centre_acc_ratio0": float(centres[group, 0]),
                "centre_drop": float(centres[group, 1]),
                "r_val_mean": r_mean,
                "p_val_mean": p_mean,
                "n_val_mean": n_mean,
                "r_val_std": r_std,
                "p_val_std": p_std,
                "n_val_std": n_std,
            }
        )
    return pd.DataFrame(rows)
