"""The study table: detection summaries of many experiments in one table.

``mlvar analyze rank --merge`` (no experiment) reads the detection results already in
every experiment of the runs root (``analysis/detection-<split>.parquet`` and
``baselines-<split>.parquet``, written by ``mlvar analyze rank``) and writes
``<runs_root>/study.parquet`` and ``study.csv``: one row per experiment x metric (the
registry metrics, then the single-model baselines as ``neg_gconf[median]`` etc.), with the
experiment's dataset, scenario, mode, scenario parameters (one column per parameter:
``ratio``, ``subclass``, ``cluster``, ...), model, number of runs, and AUROC / AP / P@k
and the normalised rank summaries of the affected samples (first, median, mean of the 10
best, mean; each divided by the population). Beside each metric, the single-model
baseline ranked in the same population (``neg_gconf`` for label-aware metrics,
``neg_maxconf`` for the others: same label use, so same scope) with its worst and median
AUROC over runs (``baseline``, ``baseline_worst_auroc``, ``baseline_median_auroc``);
and per experiment the accuracy across seeds from ``analysis/accuracy-<split>.parquet``
(written by ``mlvar analyze accuracy`` and ``mlvar report html``): mean and std (ddof 1)
over runs of the accuracy of all, of the affected and of the unaffected samples
(``acc_mean``, ``acc_std``, ``acc_affected_mean``, ...; NaN when not computed).

Experiments without detection results are computed first with ``compute_missing``
(``--compute-missing``), else listed as skipped; experiments without affected samples
are skipped. ``compute_missing`` also computes missing accuracy results. ``stale`` marks
results (detection or accuracy) computed over other runs than the experiment's current
finished runs.

``split="all"`` (``--split all``) collects every split of each experiment that marks some
of its samples affected (the study scored train and val as well as test), one set of rows
per split (the ``split`` column tells them apart). ``ranks`` chooses the convention of the
rank summaries (:mod:`mlvar.analysis.conventions`): results stored under the other one
are skipped (or recomputed with ``compute_missing``), so a table never mixes them.
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

from mlvar.analysis.conventions import ALL_SPLITS, RANKS_MID, check_ranks
from mlvar.analysis.metrics import ALL_METRICS, BASELINES
from mlvar.analysis.service import (
    DEFAULT_RANK_BY,
    accuracy,
    analysis_dir,
    rank,
    stored_ranks,
    write_table,
)
from mlvar.data.protocol import DEFAULT_PROTOCOL, check_protocol
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, list_experiments

SCORE_KEYS = (
    "auroc",
    "average_precision",
    "precision_at_k",
    "rank_median_norm",
    "rank_first_norm",
    "rank_top10_mean_norm",
    "rank_mean_norm",
)
BASELINE_KEYS = ("baseline", "baseline_worst_auroc", "baseline_median_auroc")
ACCURACY_GROUPS = ("accuracy", "acc_affected", "acc_unaffected")
ACCURACY_KEYS = tuple(
    f"{'acc' if g == 'accuracy' else g}_{stat}" for g in ACCURACY_GROUPS for stat in ("mean", "std")
)
"""``acc_mean``, ``acc_std``, ``acc_affected_mean``, ..., ``acc_unaffected_std``."""
_FIXED = (
    "experiment",
    "dataset",
    "scenario",
    "mode",
    "model",
    "split",
    "n_runs",
    "stale",
    "n_affected",
    "kind",
    "metric",
    "scope",
    "population",
    *SCORE_KEYS,
    *BASELINE_KEYS,
    *ACCURACY_KEYS,
)


@dataclass
class StudyResult:
    """The study table and what was left out of it."""

    runs_root: str
    split: str
    table: pd.DataFrame  # one row per experiment x metric
    skipped: dict[str, str]  # experiment -> why it is not in the table
    computed: list[str]  # experiments whose detection was computed for the table
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs_root": self.runs_root,
            "split": self.split,
            "rows": json.loads(self.table.to_json(orient="records")),
            "skipped": self.skipped,
            "computed": self.computed,
            "files": self.files,
        }

    def per_experiment(self, by: str = DEFAULT_RANK_BY) -> pd.DataFrame:
        """One row per experiment (per experiment and split for ``--split all``):
        ``by``'s scores, the best metric by AUROC and the median single-model
        ``neg_gconf`` baseline (for printing)."""
        rows = []
        for (exp, split), g in self.table.groupby(["experiment", "split"], sort=False):
            metrics = g[g["kind"] == "metric"].set_index("metric")
            base = g[g["metric"] == "neg_gconf[median]"]
            best = metrics["auroc"].idxmax() if metrics["auroc"].notna().any() else None
            first = g.iloc[0]
            rows.append(
                {
                    "experiment": exp,
                    "split": split,
                    "mode": first["mode"],
                    "params": " ".join(f"{k}={v}" for k, v in json.loads(first["params"]).items()),
                    "n_runs": first["n_runs"],
                    "n_affected": first["n_affected"],
                    "auroc": metrics["auroc"].get(by),
                    "average_precision": metrics["average_precision"].get(by),
                    "precision_at_k": metrics["precision_at_k"].get(by),
                    "best_metric": best,
                    "best_auroc": None if best is None else metrics.loc[best, "auroc"],
                    "baseline_auroc": base["auroc"].iloc[0] if len(base) else None,
                    "stale": bool(first["stale"]),
                }
            )
        return pd.DataFrame(rows)


def _read(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def matched_baseline(metric: str) -> str:
    """The single-model baseline ranked in the same population as ``metric``: the first
    of :data:`~mlvar.analysis.metrics.BASELINES` with the same label use."""
    uses_label = ALL_METRICS[metric].uses_label
    return next(name for name, b in BASELINES.items() if b.uses_label == uses_label)


def _baseline_scores(baselines: pd.DataFrame | None) -> dict[str, tuple[float, float]]:
    """Per baseline: its worst (lowest) and median AUROC over runs."""
    if baselines is None:
        return {}
    out = {}
    for name, g in baselines.groupby("baseline", sort=False):
        auroc = g.set_index("stat")["auroc"]
        out[str(name)] = (float(auroc.get("min", np.nan)), float(auroc.get("median", np.nan)))
    return out


def accuracy_columns(store: ExperimentStore, split: str) -> tuple[dict[str, float], list | None]:
    """The :data:`ACCURACY_KEYS` of an experiment from its stored per-run accuracies (NaN
    when there are none) and the run ids they cover (None when there are none)."""
    path = analysis_dir(store) / f"accuracy-{split}.parquet"
    if not path.is_file():
        return dict.fromkeys(ACCURACY_KEYS, float("nan")), None
    per_run = _read(path)
    out = {}
    for group in ACCURACY_GROUPS:
        prefix = "acc" if group == "accuracy" else group
        v = per_run[group].to_numpy(dtype=np.float64) if group in per_run else np.array([])
        v = v[~np.isnan(v)]
        out[f"{prefix}_mean"] = float(v.mean()) if v.size else float("nan")
        out[f"{prefix}_std"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return out, sorted(str(r) for r in per_run["run_id"])


def _experiment_rows(store: ExperimentStore, split: str) -> list[dict[str, Any]]:
    out = analysis_dir(store)
    detection = _read(out / f"detection-{split}.parquet")
    base_file = out / f"baselines-{split}.parquet"
    baselines = _read(base_file) if base_file.is_file() else None
    info_file = out / f"rank-{split}.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    current = sorted(r.run_id for r in store.runs())
    analysed = info.get("run_ids")
    accuracy, accuracy_runs = accuracy_columns(store, split)
    single = _baseline_scores(baselines)

    def beside(baseline: str) -> dict[str, Any]:
        worst, median = single.get(baseline, (float("nan"), float("nan")))
        return {
            "baseline": baseline,
            "baseline_worst_auroc": worst,
            "baseline_median_auroc": median,
        }

    meta = store.meta
    scenario = meta.get("scenario") or {}
    params = scenario.get("params") or {}
    common = {
        "experiment": store.name,
        "dataset": meta.get("dataset"),
        "scenario": scenario.get("name"),
        "mode": scenario.get("mode"),
        "model": meta.get("model"),
        "split": split,
        "n_runs": len(analysed) if analysed is not None else None,
        "stale": analysed is None
        or sorted(analysed) != current
        or (accuracy_runs is not None and accuracy_runs != current),
        "params": json.dumps(params, sort_keys=True),
    } | {f"param:{k}": v for k, v in params.items()}
    common |= accuracy
    rows = []
    for rec in detection.to_dict(orient="records"):
        rows.append(
            common
            | {
                "kind": "metric",
                "metric": rec["metric"],
                "scope": rec["scope"],
                "population": rec["population"],
                "n_affected": rec["n_affected"],
            }
            | {k: rec[k] for k in SCORE_KEYS}
            | (beside(matched_baseline(rec["metric"])) if rec["metric"] in ALL_METRICS else {})
        )
    if baselines is not None:
        for rec in baselines.to_dict(orient="records"):
            rows.append(
                common
                | {
                    "kind": "baseline",
                    "metric": f"{rec['baseline']}[{rec['stat']}]",
                    "scope": rec["scope"],
                    "population": rec["population"],
                    "n_affected": rec["n_affected"],
                }
                | {k: rec[k] for k in SCORE_KEYS}
                | beside(rec["baseline"])
            )
    return rows


def _has_affected(store: ExperimentStore, split: str) -> bool:
    """Whether ``split`` marks some of its samples affected, not all."""
    affected = store.samples(split)["affected"].to_numpy()
    return bool(affected.any() and not affected.all())


def _split_rows(
    store: ExperimentStore, split: str, compute_missing: bool, ranks: str, rerun: str
) -> tuple[list[dict[str, Any]], bool, str]:
    """The study rows of one split of ``store``: ``(rows, computed here, why skipped)``;
    ``rerun`` is the command that computes them."""
    out = analysis_dir(store)
    have = (out / f"detection-{split}.parquet").is_file()
    made = stored_ranks(store, split) if have else ranks
    rerun += f" --ranks {ranks}" if ranks != RANKS_MID or made != ranks else ""
    computed = False
    if not have or made != ranks:
        if not compute_missing:
            if have:
                why = f"detection results made under --ranks {made}"
                return [], False, f"{why} (run '{rerun}', or pass --compute-missing)"
            if (out / f"rank-{split}.parquet").is_file():
                return [], False, "no affected samples"
            return [], False, f"no detection results (run '{rerun}')"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = rank(store, split, ranks=ranks)
        except MlvarError as exc:
            return [], False, exc.message
        if result.detection is None:
            return [], False, "no affected samples"
        computed = True
    if compute_missing and not (out / f"accuracy-{split}.parquet").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accuracy(store, split)  # written to analysis/, read back below
    return _experiment_rows(store, split), computed, ""


def experiment_protocol(meta: dict[str, Any]) -> str:
    """The protocol an experiment follows, from its ``experiment.json``: ``"mlvar"``,
    ``"study"``, or for a scenario of one protocol trained with the other's recipe
    ``"<scenario's> data, <recipe's> recipe"`` (absent records mean mlvar)."""
    recipe = str(meta.get("protocol", DEFAULT_PROTOCOL))
    data = str((meta.get("scenario") or {}).get("protocol", DEFAULT_PROTOCOL))
    return recipe if recipe == data else f"{data} data, {recipe} recipe"


def _check_one_protocol(protocols: dict[str, str], allow_mixed: bool) -> None:
    """Refuse a study table over experiments of different protocols, unless allowed."""
    groups: dict[str, list[str]] = {}
    for name, protocol in protocols.items():
        groups.setdefault(protocol, []).append(name)
    if len(groups) < 2 or allow_mixed:
        return
    parts = []
    for protocol, names in sorted(groups.items()):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        parts.append(f"{protocol} ({len(names)}: {shown})")
    raise MlvarError(
        "the experiments follow different protocols: " + "; ".join(parts),
        "their numbers are not comparable: pass --protocol mlvar or --protocol study for "
        "one protocol's table, or --allow-mixed for one table anyway (a column 'protocol' "
        "says which)",
    )


def study(
    runs_root: Path,
    split: str = "test",
    compute_missing: bool = False,
    write: bool = True,
    ranks: str = RANKS_MID,
    allow_mixed: bool = False,
    protocol: str | None = None,
) -> StudyResult:
    """Collect the detection results of every experiment under ``runs_root``.

    ``split``: one split, or ``"all"`` for every split of each experiment with affected
    samples (some, not all; skipped and computed experiments are then named
    ``"<experiment> (<split>)"``). ``ranks``: the rank convention of the table; results
    stored under the other one are skipped, or recomputed with ``compute_missing``. A
    table under ``"study"`` ends with a column ``ranks``. Experiments of different
    protocols (:func:`experiment_protocol`) are refused before anything is computed or
    written, unless ``allow_mixed``; ``protocol`` keeps only the experiments of that
    protocol (the others are skipped). A table with any experiment not of the ``mlvar``
    protocol has a column ``protocol``.
    """
    check_ranks(ranks)
    if protocol is not None:
        check_protocol(protocol)
    runs_root = Path(runs_root)
    names = list_experiments(runs_root)
    if not names:
        raise MlvarError(
            f"no experiments in {runs_root}",
            "train some with 'mlvar train' or import predictions with 'mlvar analyze import'",
        )
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    computed: list[str] = []
    every = split == ALL_SPLITS
    stores = [ExperimentStore.open(runs_root, name) for name in names]
    made = {store.name: experiment_protocol(store.meta) for store in stores}
    if protocol is not None:
        skipped.update({n: f"protocol '{p}'" for n, p in made.items() if p != protocol})
        stores = [s for s in stores if s.name not in skipped]
        if not stores:
            raise MlvarError(
                f"no experiment in {runs_root} follows protocol '{protocol}'",
                "train some with 'mlvar train DATASET --protocol " + protocol + "'",
            )
    protocols = {s.name: made[s.name] for s in stores if every or split in s.meta.get("splits", [])}
    _check_one_protocol(protocols, allow_mixed)
    for store in stores:
        name = store.name
        if every:
            chosen = [s for s in store.meta.get("splits", []) if _has_affected(store, s)]
            if not chosen:
                skipped[name] = "no affected samples"
                continue
        elif split not in store.meta.get("splits", []):
            skipped[name] = f"no split '{split}'"
            continue
        else:
            chosen = [split]
        for one in chosen:
            label = f"{name} ({one})" if every else name
            rerun = f"mlvar analyze rank {name}" + (f" --split {one}" if every else "")
            got, made, why = _split_rows(store, one, compute_missing, ranks, rerun)
            if why:
                skipped[label] = why
                continue
            if made:
                computed.append(label)
            rows += got
    if not rows:
        option = f" --ranks {ranks}" if ranks != RANKS_MID else ""
        raise MlvarError(
            f"no experiment in {runs_root} has detection results on split '{split}'"
            + (f" under{option}" if option else ""),
            f"run 'mlvar analyze rank EXPERIMENT{option}' first, or pass --compute-missing",
        )
    table = pd.DataFrame(rows, columns=list(dict.fromkeys(k for row in rows for k in row)))
    for key in _FIXED:
        if key not in table:
            table[key] = None  # e.g. no baselines anywhere
    param_cols = sorted(c for c in table.columns if c.startswith("param:"))
    rename = {c: c[6:] if c[6:] not in _FIXED and c[6:] != "params" else c for c in param_cols}
    table = table[[*_FIXED[:6], *param_cols, "params", *_FIXED[6:]]].rename(columns=rename)
    if ranks != RANKS_MID:  # a non-default convention is recorded
        table["ranks"] = ranks
    if set(protocols.values()) != {DEFAULT_PROTOCOL}:  # so is a protocol other than mlvar's
        table["protocol"] = table["experiment"].map(protocols)
    files: list[str] = []
    if write:
        files = write_table(table, runs_root / "study")
    return StudyResult(str(runs_root), split, table, skipped, computed, files)
