"""The folder ``<experiment>/analysis/saliency-<split>/``: what goes in it and writing it.

:func:`assemble` turns a plan and its attributions into a :class:`SaliencyContent` (the
arrays as stored, their summary across runs, the sample index, ``saliency.json``, and
what each sample's figure is drawn from); :func:`write_saliency` writes it with one
figure per sample, which the caller draws (:mod:`mlvar.report.saliency`; the analysis
package draws nothing), as one folder swapped in when complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mlvar.analysis.saliency.compute import GRADCAM, SaliencyArrays, mlp_inputs
from mlvar.analysis.saliency.plan import SaliencyPlan
from mlvar.io import atomic_save_npy, atomic_write_bytes, atomic_write_json, staging_dir
from mlvar.store import ExperimentStore, parquet_bytes

TARGETS = ("true", "predicted")
STATS = ("mean", "std", "max-min")


def folder(store: ExperimentStore, split: str) -> Path:
    """Where the saliency of ``split`` lives: ``<experiment>/analysis/saliency-<split>/``."""
    return store.root / "analysis" / f"saliency-{split}"


@dataclass
class SaliencyResult:
    experiment: str
    split: str
    model: str
    layer: str
    run_ids: list[str]
    samples: pd.DataFrame  # the index (samples.parquet)
    shape: tuple[int, ...]  # (H, W) of every map, or (F,) for tabular attributions
    path: Path  # the folder
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    method: str = GRADCAM
    feature_names: list[str] = field(default_factory=list)  # tabular inputs only

    @property
    def n_seeds(self) -> int:
        return len(self.run_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "split": self.split,
            "model": self.model,
            "method": self.method,
            "layer": self.layer,
            "run_ids": self.run_ids,
            "feature_names": self.feature_names,
            "shape": list(self.shape),
            "path": str(self.path),
            "seconds": round(self.seconds, 3),
            "samples": json.loads(self.samples.to_json(orient="records")),
            "files": self.files,
        }


@dataclass
class SaliencyContent:
    """A saliency folder's content, computed and not yet written.

    ``tabular``: gradient x input per feature (no maps); else maps per pixel. The arrays
    are as stored, except ``attributions``, kept in float64 (float32-exact values) for the
    charts. ``inputs``, ``max_value``, ``run_labels`` and ``wrong`` are what each sample's
    figure is drawn from.
    """

    experiment: str
    split: str
    model: str
    method: str
    layer: str
    run_ids: list[str]
    index: pd.DataFrame  # samples.parquet and samples.json, one row per sample
    meta: dict[str, Any]  # saliency.json
    maps: np.ndarray | None  # float16 [n, S, 2, H, W], or None (tabular)
    stats: np.ndarray  # mean, std, max - min: float16 [n, 3, 2, H, W] or float32 [n, 3, 2, F]
    attributions: np.ndarray | None  # float64 [n, S, 2, F], or None (GradCAM)
    feature_names: list[str]  # tabular inputs only
    inputs: np.ndarray  # per sample: the prepared image, or the MLP's features (tabular)
    max_value: float  # the images' largest value (the manifest's)
    run_labels: list[str]  # "run <index>" per run
    wrong: np.ndarray  # bool [n, S]: the run predicted another class than the label

    @property
    def tabular(self) -> bool:
        return self.maps is None

    @property
    def shape(self) -> tuple[int, ...]:
        """(H, W) of every map, or (F,) of tabular attributions."""
        return tuple(self.meta["shape"])

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``.npy`` files of the folder, as written."""
        attributions = None if self.attributions is None else self.attributions.astype(np.float32)
        if self.tabular:
            return {"attributions.npy": attributions, "stats.npy": self.stats}
        out = {"maps.npy": self.maps, "stats.npy": self.stats}
        if attributions is not None:
            out["attributions.npy"] = attributions
        return out


def summary(values: np.ndarray) -> np.ndarray:
    """Mean, std (ddof 0) and max - min across runs (axis 1): ``[n, 3, ...]``."""
    return np.stack(
        [values.mean(axis=1), values.std(axis=1), values.max(axis=1) - values.min(axis=1)], 1
    )


def assemble(store: ExperimentStore, plan: SaliencyPlan, arrays: SaliencyArrays) -> SaliencyContent:
    """The folder's content for the plan's samples under all its runs (``arrays`` of every
    run, in plan order)."""
    split, top, by, seed, model_name = plan.split, plan.top, plan.by, plan.seed, plan.model_name
    runs, rows, chosen, ids = plan.runs, plan.rows, plan.chosen, plan.ids
    positions, x_raw, labels, preds = plan.positions, plan.x_raw, plan.labels, plan.preds
    manifest = plan.scenario.manifest
    maps, attributions = arrays.maps, arrays.attributions
    if attributions is not None:  # float32-exact values; summaries in float64 either way
        attributions = attributions.astype(np.float64)
    tabular = maps is None
    if tabular:
        stats = summary(attributions)  # [n, 3, 2, F]
        spread = stats[:, 1].mean(axis=-1)  # [n, 2]: mean over features of the std
    else:
        stats = summary(maps)  # [n, 3, 2, H, W]
        spread = stats[:, 1].mean(axis=(-2, -1))
    index = pd.DataFrame(
        {
            "sample_id": ids,
            "position": positions.astype(np.int64),
            "rank": chosen["rank"].to_numpy(dtype=np.int64),
            "kind": ["top" if r < top else "random unaffected" for r in rows],
            "affected": chosen["affected"].to_numpy(dtype=bool),
            "label": labels,
            "label_name": chosen["label_name"].astype(str).to_numpy(),
            "pred": [p.tolist() for p in preds.T],
            "n_correct": (preds == labels[None, :]).sum(axis=0).astype(np.int64),
            "spread_true": spread[:, 0].astype(np.float64),
            "spread_pred": spread[:, 1].astype(np.float64),
            "overlay": [f"overlays/{i}.png" for i in ids],
        }
    )
    feature_names: list[str] = []
    if tabular:
        n_feat = attributions.shape[-1]
        given = [str(f) for f in manifest.get("feature_names", [])]
        feature_names = [given[i] if i < len(given) else f"feature {i}" for i in range(n_feat)]
        for t, target in enumerate(("true", "pred")):
            index[f"attr_{target}_mean"] = [r.tolist() for r in stats[:, 0, t]]
            index[f"attr_{target}_std"] = [r.tolist() for r in stats[:, 1, t]]
    shape = list(attributions.shape[-1:]) if tabular else list(maps.shape[-2:])
    meta = {
        "experiment": store.name,
        "split": split,
        "method": arrays.method,
        "input": "tabular" if tabular else "image",
        "model": model_name,
        "layer": arrays.layer,
        "run_ids": [r.run_id for r in runs],
        "by": by,
        "top": top,
        "seed": seed,
        "n_samples": len(ids),
        "shape": shape,
        "targets": list(TARGETS),
        "stats": list(STATS),
    }
    if tabular:
        meta["feature_names"] = feature_names
        meta["attributions"] = (
            "float32 [n_samples, runs, target, features]: gradient x input of the "
            "target's logit (sums to logit - its value at input 0 for a linear model)"
        )
    else:
        meta["maps"] = "float16 [n_samples, runs, target, H, W]; each map scaled to [0, 1]"
        if attributions is not None:
            meta["attributions"] = (
                "float32 [n_samples, runs, target, features]: signed gradient x "
                "input of the flattened image (maps: |.| summed over channels)"
            )
    return SaliencyContent(
        experiment=store.name,
        split=split,
        model=model_name,
        method=arrays.method,
        layer=arrays.layer,
        run_ids=[r.run_id for r in runs],
        index=index,
        meta=meta,
        maps=None if tabular else maps.astype(np.float16),
        stats=stats.astype(np.float32 if tabular else np.float16),
        attributions=attributions,
        feature_names=feature_names,
        inputs=mlp_inputs(x_raw, manifest) if tabular else x_raw,
        max_value=float((manifest.get("input") or {}).get("max_value", 255)),
        run_labels=[f"run {r.meta.get('run_index', k)}" for k, r in enumerate(runs)],
        wrong=(preds != labels[None, :]).T,
    )


def write_saliency(
    store: ExperimentStore,
    content: SaliencyContent,
    figures: Iterable[bytes],
    started: float | None = None,
) -> SaliencyResult:
    """Write ``analysis/saliency-<split>/``: the arrays, ``overlays/<sample_id>.png`` from
    ``figures`` (one PNG per sample, in the index's order), ``samples.parquet``,
    ``samples.json`` and ``saliency.json``, as one folder swapped in when complete.
    ``started``: a ``time.perf_counter()`` the result's ``seconds`` count from."""
    started = time.perf_counter() if started is None else started
    out_dir = folder(store, content.split)
    index = content.index
    arrays = content.arrays()
    with staging_dir(out_dir, replace=True) as tmp:
        for name, array in arrays.items():
            atomic_save_npy(tmp / name, array)
        for sample_id, png in zip(index["sample_id"], figures, strict=True):
            atomic_write_bytes(tmp / "overlays" / f"{sample_id}.png", png)
        table = pa.Table.from_pandas(index, preserve_index=False)  # pred: list<int64>
        atomic_write_bytes(tmp / "samples.parquet", parquet_bytes(table))
        atomic_write_json(tmp / "samples.json", json.loads(index.to_json(orient="records")))
        atomic_write_json(tmp / "saliency.json", content.meta)
    names = [n for n in ("maps.npy", "attributions.npy") if n in arrays]
    names += ["stats.npy", "samples.parquet", "samples.json", "saliency.json"]
    return SaliencyResult(
        store.name,
        content.split,
        content.model,
        content.layer,
        list(content.run_ids),
        index,
        content.shape,
        out_dir,
        [str(out_dir / f) for f in names] + [str(out_dir / "overlays")],
        time.perf_counter() - started,
        method=content.method,
        feature_names=content.feature_names,
    )
