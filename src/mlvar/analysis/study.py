"""The study table: detection summaries of many experiments in one table.

``mlvar analyze rank --merge`` (no experiment) reads the detection results already in
every experiment of the runs root (``analysis/detection-<split>.parquet`` and
``baselines-<split>.parquet``, written by ``mlvar analyze rank``) and writes
``<runs_root>/study.parquet`` and ``study.csv``: one row per experiment x metric (the
registry metrics, then the single-model baselines as ``neg_gconf[median]`` etc.), with the
experiment's dataset, scenario, mode, scenario parameters (one column per parameter:
``ratio``, ``subclass``, ``cluster``, ...), model, number of runs, and AUROC / AP / P@k
and normalised median rank. Experiments without detection results are computed first
with ``compute_missing`` (``--compute-missing``), else listed as skipped; experiments
without affected samples are skipped. ``stale`` marks results computed over other runs
than the experiment's current finished runs.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from mlvar.analysis.service import DEFAULT_RANK_BY, analysis_dir, rank, write_table
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, list_experiments

SCORE_KEYS = ("auroc", "average_precision", "precision_at_k", "rank_median_norm")
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
        """One row per experiment: ``by``'s scores, the best metric by AUROC and the
        median single-model ``neg_gconf`` baseline (for printing)."""
        rows = []
        for exp, g in self.table.groupby("experiment", sort=False):
            metrics = g[g["kind"] == "metric"].set_index("metric")
            base = g[g["metric"] == "neg_gconf[median]"]
            best = metrics["auroc"].idxmax() if metrics["auroc"].notna().any() else None
            first = g.iloc[0]
            rows.append(
                {
                    "experiment": exp,
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


def _experiment_rows(store: ExperimentStore, split: str) -> list[dict[str, Any]]:
    out = analysis_dir(store)
    detection = _read(out / f"detection-{split}.parquet")
    base_file = out / f"baselines-{split}.parquet"
    baselines = _read(base_file) if base_file.is_file() else None
    info_file = out / f"rank-{split}.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    current = sorted(r.run_id for r in store.runs())
    analysed = info.get("run_ids")
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
        "stale": analysed is None or sorted(analysed) != current,
        "params": json.dumps(params, sort_keys=True),
    } | {f"param:{k}": v for k, v in params.items()}
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
            )
    return rows


def study(
    runs_root: Path,
    split: str = "test",
    compute_missing: bool = False,
    write: bool = True,
) -> StudyResult:
    """Collect the detection results of every experiment under ``runs_root``."""
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
    for name in names:
        store = ExperimentStore.open(runs_root, name)
        if split not in store.meta.get("splits", []):
            skipped[name] = f"no split '{split}'"
            continue
        out = analysis_dir(store)
        if not (out / f"detection-{split}.parquet").is_file():
            if (out / f"rank-{split}.parquet").is_file() and not compute_missing:
                skipped[name] = "no affected samples"
                continue
            if not compute_missing:
                skipped[name] = f"no detection results (run 'mlvar analyze rank {name}')"
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = rank(store, split)
            except MlvarError as exc:
                skipped[name] = exc.message
                continue
            if result.detection is None:
                skipped[name] = "no affected samples"
                continue
            computed.append(name)
        rows += _experiment_rows(store, split)
    if not rows:
        raise MlvarError(
            f"no experiment in {runs_root} has detection results on split '{split}'",
            "run 'mlvar analyze rank EXPERIMENT' first, or pass --compute-missing",
        )
    table = pd.DataFrame(rows)
    param_cols = sorted(c for c in table.columns if c.startswith("param:"))
    rename = {c: c[6:] if c[6:] not in _FIXED and c[6:] != "params" else c for c in param_cols}
    table = table[[*_FIXED[:6], *param_cols, "params", *_FIXED[6:]]].rename(columns=rename)
    files: list[str] = []
    if write:
        files = write_table(table, runs_root / "study")
    return StudyResult(str(runs_root), split, table, skipped, computed, files)
