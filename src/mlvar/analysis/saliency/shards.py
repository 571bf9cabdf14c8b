"""Saliency sharded by runs: ``mlvar analyze saliency EXP --run-shard j/m``, then
``--merge``.

Every shard plans alike (the same ranking, samples and runs), computes only its block of
runs and writes float32 ``maps.npy`` and/or ``attributions.npy`` ``[n, S_block, 2, ...]``
to ``analysis/saliency-shards/<split>/r<j>of<m>/``, ``meta.json`` last with each file's
sha256 (the shard mechanics of :mod:`mlvar.analysis.sharding`, shared with sharded
analysis). Shards hold arrays only: the figures are drawn once, from the merged
arrays. :func:`combine_saliency_shards` stacks a complete set into the content an
unsharded computation assembles, bit for bit (each run's attributions depend on that run
only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.analysis import sharding
from mlvar.analysis.saliency.compute import Progress, SaliencyArrays, compute
from mlvar.analysis.saliency.content import SaliencyContent, assemble
from mlvar.analysis.saliency.plan import (
    BATCH_DEFAULT,
    SEEDS_DEFAULT,
    TOP_DEFAULT,
    plan_saliency,
)
from mlvar.errors import MlvarError
from mlvar.io import staging_dir
from mlvar.store import ExperimentStore

KIND = "saliency"
ARRAY_FILES = ("maps.npy", "attributions.npy")
#: A saliency shard folder: ``meta.json`` says ``kind: "saliency"``; maps and/or
#: attributions, each listed with its sha256.
SHARD_FORMAT = sharding.ShardFormat(
    what="a saliency shard's",
    recognises=lambda meta: meta.get("kind") == KIND,
    names=frozenset(ARRAY_FILES),
    missing="{name} is missing or does not match its sha256",
    mismatch="{name} is missing or does not match its sha256",
)


def shards_folder(store: ExperimentStore, split: str) -> Path:
    """``analysis/saliency-shards/<split>/``: one ``r<j>of<m>`` folder per run block."""
    return store.root / "analysis" / "saliency-shards" / split


def shard_name(j: int, m: int) -> str:
    """``r<j>of<m>``: the folder of block ``j`` of ``m`` in :func:`shards_folder`."""
    return sharding.shard_name(None, (j, m))


def block_range(j: int, m: int, n_runs: int) -> range:
    """Runs of block ``j`` of ``m`` (1-based, contiguous): ``[(j-1)S/m, jS/m)``."""
    return range(*sharding.shard_range(j, m, n_runs))


@dataclass
class SaliencyShard:
    """One block of runs' attributions, written by :func:`saliency_shard`."""

    path: Path
    shard: tuple[int, int]
    run_ids: list[str]  # the block's runs
    n_samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "run_ids": self.run_ids,
            "n_samples": self.n_samples,
            "seconds": round(self.seconds, 3),
        }


def saliency_shard(
    store: ExperimentStore,
    data_root: Path,
    shard: tuple[int, int],
    split: str = "test",
    top: int = TOP_DEFAULT,
    seeds: int = SEEDS_DEFAULT,
    by: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH_DEFAULT,
    progress: Progress | None = None,
    out: Path | None = None,
) -> SaliencyShard:
    """The attributions of block ``shard = (j, m)`` of the runs a saliency computation
    with these arguments explains, written to ``out`` (default
    ``analysis/saliency-shards/<split>/r<j>of<m>/``); the folder appears in one rename.
    """
    started = time.perf_counter()
    j, m = shard
    if not 1 <= j <= m:
        raise MlvarError(f"--run-shard must be j/m with 1 <= j <= m, got {j}/{m}", "e.g. 1/4")
    plan = plan_saliency(store, data_root, split, top, seeds, by, layer, seed, batch_size)
    if m > len(plan.runs):
        raise MlvarError(
            f"--run-shard {j}/{m}: there are only {len(plan.runs)} runs to explain "
            f"(--seeds {seeds})",
            f"use at most {len(plan.runs)} run blocks",
        )
    block = block_range(j, m, len(plan.runs))
    computed = compute(store, plan, block, layer, batch_size, progress)
    target = Path(out) if out is not None else shards_folder(store, split) / shard_name(j, m)
    named = {"maps.npy": computed.maps, "attributions.npy": computed.attributions}
    arrays = {name: a.astype(np.float32) for name, a in named.items() if a is not None}
    meta = {
        "kind": KIND,
        "experiment": store.name,
        "shard": [j, m],
        "block_run_ids": [plan.runs[i].run_id for i in block],
        "method": computed.method,
        "layer": computed.layer,
        **plan.fingerprint(),
    }
    with staging_dir(target, replace=True) as tmp:
        sharding.write_shard_folder(tmp, arrays, meta)
    return SaliencyShard(
        target, (j, m), meta["block_run_ids"], len(plan.ids), time.perf_counter() - started
    )


def verify_saliency_shard(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """``(meta, "")`` for a complete saliency shard whose files match their sha256."""
    return sharding.verify_shard_folder(folder, SHARD_FORMAT)


def _read_set(store: ExperimentStore, split: str) -> list[tuple[Path, dict[str, Any]]]:
    """The verified shards of ``split``, one complete set of blocks, sorted by block."""
    root = shards_folder(store, split)
    found = sharding.shard_folders(root)
    if not found:
        raise MlvarError(
            f"no saliency shards of split '{split}' in {root}",
            f"compute them first: mlvar analyze saliency {store.name} --run-shard j/m",
        )
    metas = []
    for folder_ in found:
        meta, why = verify_saliency_shard(folder_)
        if why:
            raise MlvarError(
                f"saliency shard {folder_.name} of '{store.name}' is not usable: {why}",
                "recompute it (mlvar analyze saliency --run-shard j/m) or remove it",
            )
        metas.append((folder_, meta))
    survey = sharding.survey_blocks([(tuple(meta["shard"]),) for _, meta in metas])
    if survey.sizes is None:
        raise MlvarError(
            f"saliency shards of '{store.name}' mix block counts {survey.counts[0]}",
            f"keep one set in {root}",
        )
    (m,) = survey.sizes
    if not survey.complete:
        missing = [j for (j,) in survey.missing]
        repeated = f"; blocks {[j for (j,) in survey.repeated]} repeat" if survey.repeated else ""
        raise MlvarError(
            f"saliency shards of '{store.name}': blocks {missing} of {m} are missing{repeated}",
            f"compute them: mlvar analyze saliency {store.name} --run-shard j/{m}",
        )
    return sorted(metas, key=lambda fm: int(fm[1]["shard"][0]))


def combine_saliency_shards(
    store: ExperimentStore, data_root: Path, split: str = "test", layer: str | None = None
) -> SaliencyContent:
    """The content of ``analysis/saliency-<split>/`` from the shards in
    ``analysis/saliency-shards/<split>/``, exactly as an unsharded computation assembles
    it; nothing is written.

    The shards must form one complete set (every block ``j`` of one ``m``), agree on what
    they explain, and match the store now (the same runs and samples: the plan is redone
    and compared); anything else is an error naming the problem.
    """
    metas = _read_set(store, split)
    m = len(metas)
    first = metas[0][1]
    keys = ("split", "by", "top", "seed", "seeds", "model", "run_ids", "sample_ids", "method")
    keys += ("layer",)  # GradCAM at one layer: shards of another --layer do not mix
    for folder_, meta in metas[1:]:
        differs = [k for k in keys if meta.get(k) != first.get(k)]
        if differs:
            raise MlvarError(
                f"saliency shards {metas[0][0].name} and {folder_.name} of '{store.name}' "
                f"explain different things ({', '.join(differs)})",
                f"recompute the shards with the same arguments, or remove "
                f"{shards_folder(store, split)}",
            )
    plan = plan_saliency(
        store,
        data_root,
        split,
        first["top"],
        first["seeds"],
        first["by"],
        layer if layer is not None else (None if first["model"] == "mlp" else first["layer"]),
        first["seed"],
        BATCH_DEFAULT,
    )
    now = plan.fingerprint()
    differs = [k for k in now if now[k] != first.get(k)]
    if differs:
        raise MlvarError(
            f"the saliency shards of '{store.name}' were computed on other runs or samples "
            f"than the store holds now ({', '.join(differs)})",
            "recompute the shards",
        )
    for (_, meta), j in zip(metas, range(1, m + 1), strict=True):
        expected = [plan.runs[i].run_id for i in block_range(j, m, len(plan.runs))]
        if meta.get("block_run_ids") != expected:
            raise MlvarError(
                f"saliency shard r{j}of{m} of '{store.name}' holds runs "
                f"{meta.get('block_run_ids')}, expected {expected}",
                "recompute that shard",
            )

    def stacked(name: str) -> np.ndarray | None:
        if name not in first["files"]:
            return None
        return np.concatenate([np.load(f / name, allow_pickle=False) for f, _ in metas], axis=1)

    arrays = SaliencyArrays(
        str(first["method"]), str(first["layer"]), stacked("maps.npy"), stacked("attributions.npy")
    )
    return assemble(store, plan, arrays)
