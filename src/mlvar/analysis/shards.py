"""Sharded analysis: partial results over shards of samples and runs, merged exactly.

``mlvar analyze rank EXP --shard i/k [--run-shard j/m]`` computes, for the i-th of k
contiguous blocks of samples and the j-th of m contiguous blocks of runs (runs sorted by
id), the per-sample sufficient statistics of :mod:`mlvar.analysis.partial` and writes
them to ``analysis/shards/<split>/s<i>of<k>-r<j>of<m>/`` (one ``.npy`` per statistic and a
``meta.json``, written last, the folder appearing in one rename). Shards are independent:
run them as separate jobs, on separate machines, in any order.

``mlvar analyze rank EXP --merge`` checks that the shards present form exactly one
complete, non-overlapping set (every i of one k, every j of one m, each run in exactly
one run block, the same runs in every sample block), combines them and writes the same
files as an unsharded ``rank``; detection is computed after merging. Sample shards merge
bit for bit (each sample's values depend only on its own column); run shards combine sums
and squared deviations (Chan et al.), equal to the unsharded result up to float round-off
(about ``R * 1e-16``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlvar.analysis.metrics import DYNAMICS_METRICS
from mlvar.analysis.partial import Partial, combine_runs, concat_samples
from mlvar.analysis.service import (
    DEFAULT_RANK_BY,
    Computed,
    RankResult,
    analysis_dir,
    assemble,
    check_by,
    chunk_size,
    load_predictions,
)
from mlvar.errors import MlvarError
from mlvar.io import staging_dir
from mlvar.store import ExperimentStore

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str, option: str = "--shard") -> tuple[int, int]:
    """Parse ``"i/k"`` (1 <= i <= k) into ``(i, k)``."""
    match = _SHARD_RE.match(text or "")
    if match:
        i, k = int(match.group(1)), int(match.group(2))
        if 1 <= i <= k:
            return i, k
    raise MlvarError(
        f"{option} must be i/k with 1 <= i <= k, got '{text}'",
        f"e.g. {option} 2/4 for the second of four contiguous blocks",
    )


def shard_range(i: int, k: int, n: int) -> tuple[int, int]:
    """Rows of block ``i`` of ``k`` (1-based) of ``n`` rows: ``[(i-1)n/k, in/k)``."""
    return (i - 1) * n // k, i * n // k


def shard_name(shard: tuple[int, int], run_shard: tuple[int, int]) -> str:
    return f"s{shard[0]}of{shard[1]}-r{run_shard[0]}of{run_shard[1]}"


def shards_dir(store: ExperimentStore, split: str) -> Path:
    """``analysis/shards/<split>``: where the shards of ``split`` are written."""
    return analysis_dir(store) / "shards" / split


@dataclass
class ShardResult:
    """One written shard."""

    experiment: str
    split: str
    shard: tuple[int, int]
    run_shard: tuple[int, int]
    samples: tuple[int, int]  # [start, stop)
    run_ids: list[str]
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "split": self.split,
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "run_shard": f"{self.run_shard[0]}/{self.run_shard[1]}",
            "samples": list(self.samples),
            "run_ids": self.run_ids,
            "path": self.path,
        }


def write_shard(
    store: ExperimentStore,
    split: str = "test",
    shard: tuple[int, int] = (1, 1),
    run_shard: tuple[int, int] = (1, 1),
    allow_mixed: bool = False,
    chunk: int | None = None,
) -> ShardResult:
    """Compute and write the partial results of one (sample block, run block)."""
    preds = load_predictions(store, split, allow_mixed)
    n, r = len(preds.samples), len(preds.runs)
    (i, k), (j, m) = shard, run_shard
    if k > n:
        raise MlvarError(
            f"cannot split {n} {split} samples into {k} shards", f"use --shard i/K with K <= {n}"
        )
    if m > r:
        raise MlvarError(
            f"cannot split {r} runs into {m} run shards", f"use --run-shard j/M with M <= {r}"
        )
    a, b = shard_range(i, k, n)
    ra, rb = shard_range(j, m, r)
    runs = preds.runs[ra:rb]
    part = concat_samples([p for _, _, p in preds.partials(runs, a, b, chunk)])
    meta = {
        "experiment": store.name,
        "split": split,
        "samples": [i, k],
        "runs": [j, m],
        "start": a,
        "stop": b,
        "n_samples": n,
        "n_classes": preds.n_classes,
        "run_ids": [run.run_id for run in runs],
        "all_run_ids": [run.run_id for run in preds.runs],
        "dynamics": part.dynamics is not None,
    }
    final = shards_dir(store, split) / shard_name(shard, run_shard)
    with staging_dir(final, replace=True) as tmp:
        part.save(tmp, meta)
    return ShardResult(store.name, split, shard, run_shard, (a, b), meta["run_ids"], str(final))


def _read_metas(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            file = folder / "meta.json"
            if folder.is_dir() and file.is_file():
                try:
                    found.append((folder, json.loads(file.read_text())))
                except (OSError, ValueError):
                    raise MlvarError(
                        f"shard {folder} has a corrupt meta.json", "remove it and recompute it"
                    ) from None
    return found


def _check_complete(
    store: ExperimentStore, split: str, metas: list[tuple[Path, dict[str, Any]]]
) -> tuple[int, int, dict[tuple[int, int], tuple[Path, dict[str, Any]]]]:
    root = shards_dir(store, split)
    name = store.name
    if not metas:
        raise MlvarError(
            f"experiment '{name}' has no shards of split '{split}' to merge",
            f"write them with 'mlvar analyze rank {name} --split {split} --shard i/k'",
        )
    ks = sorted({int(m["samples"][1]) for _, m in metas})
    ms = sorted({int(m["runs"][1]) for _, m in metas})
    if len(ks) > 1 or len(ms) > 1:
        what = []
        if len(ks) > 1:
            what.append(f"samples into {' and '.join(map(str, ks))} blocks")
        if len(ms) > 1:
            what.append(f"runs into {' and '.join(map(str, ms))} blocks")
        raise MlvarError(
            f"the shards of '{name}' ({split}) overlap: they split {' and '.join(what)}",
            f"remove {root} and compute one set of shards",
        )
    k, m = ks[0], ms[0]
    n = store.n_samples(split)
    n_classes = len(store.class_names)
    by_key = {}
    for folder, meta in metas:
        if meta.get("n_samples") != n or meta.get("n_classes") != n_classes:
            raise MlvarError(
                f"shard {folder.name} of '{name}' covers {meta.get('n_samples')} samples and "
                f"{meta.get('n_classes')} classes, the experiment has {n} and {n_classes}",
                f"remove {root} and recompute the shards",
            )
        by_key[(int(meta["samples"][0]), int(meta["runs"][0]))] = (folder, meta)
    missing = [(i, j) for i in range(1, k + 1) for j in range(1, m + 1) if (i, j) not in by_key]
    if missing:
        listed = ", ".join(
            f"{i}/{k}" if m == 1 else f"{i}/{k} runs {j}/{m}" for i, j in missing[:5]
        )
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MlvarError(
            f"the shards of '{name}' ({split}) are incomplete: missing {listed}{more}",
            f"compute them with 'mlvar analyze rank {name} --split {split} --shard i/{k}"
            + (f" --run-shard j/{m}'" if m > 1 else "'")
            + ", then merge",
        )
    runs_of_block = []
    for i in range(1, k + 1):
        ids: list[str] = []
        for j in range(1, m + 1):
            ids += by_key[(i, j)][1]["run_ids"]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise MlvarError(
                f"the shards of '{name}' ({split}) overlap: run {dup[0]} is in more than one "
                f"run shard of samples {i}/{k}",
                f"remove {root} and compute one set of shards",
            )
        runs_of_block.append(ids)
        if [(mm["start"], mm["stop"]) for _, mm in (by_key[(i, j)] for j in range(1, m + 1))] != [
            shard_range(i, k, n)
        ] * m:
            raise MlvarError(
                f"shard samples {i}/{k} of '{name}' ({split}) covers other rows than expected",
                f"remove {root} and recompute the shards",
            )
    if any(ids != runs_of_block[0] for ids in runs_of_block):
        raise MlvarError(
            f"the shards of '{name}' ({split}) were computed over different runs "
            f"({len(runs_of_block[0])} runs in samples 1/{k}, other runs elsewhere)",
            f"remove {root} and recompute every shard over the same runs",
        )
    if len({bool(meta.get("dynamics")) for _, meta in metas}) > 1:
        raise MlvarError(
            f"only some shards of '{name}' ({split}) hold training dynamics",
            f"remove {root} and recompute the shards",
        )
    return k, m, by_key


def merge_shards(
    store: ExperimentStore,
    split: str = "test",
    by: str = DEFAULT_RANK_BY,
    chunk: int | None = None,
    write: bool = True,
) -> RankResult:
    """Merge a complete set of shards of ``split`` into the full ranking and detection."""
    check_by(by)
    samples = store.samples(split)
    k, m, by_key = _check_complete(store, split, _read_metas(shards_dir(store, split)))
    run_ids = [rid for j in range(1, m + 1) for rid in by_key[(1, j)][1]["run_ids"]]
    dynamics = bool(by_key[(1, 1)][1].get("dynamics"))
    if by in DYNAMICS_METRICS and not dynamics:
        raise MlvarError(
            f"metric '{by}' needs training dynamics, which the shards of '{store.name}' "
            f"({split}) do not hold",
            "rank by another metric",
        )
    current = sorted(r.run_id for r in store.runs())
    if current != sorted(run_ids):
        warnings.warn(
            f"the shards of {store.name} cover {len(run_ids)} runs; the experiment now has "
            f"{len(current)} finished runs (recompute the shards to include them)",
            stacklevel=2,
        )
    labels = samples["label"].to_numpy()
    n_classes = len(store.class_names)
    step = chunk or chunk_size(m, n_classes, per_sample=2)

    def parts() -> Iterator[tuple[int, int, Partial]]:
        n = len(samples)
        for i in range(1, k + 1):
            start, stop = shard_range(i, k, n)
            loaded = [Partial.load(by_key[(i, j)][0]) for j in range(1, m + 1)]
            for a in range(0, stop - start, step):
                b = min(a + step, stop - start)
                yield start + a, start + b, combine_runs([p.slice(a, b) for p in loaded])
            del loaded

    computed = Computed.collect(parts(), labels)
    return assemble(
        store,
        samples,
        split,
        run_ids,
        by,
        computed,
        write,
        extra_meta={"merged_shards": {"samples": k, "runs": m}},
    )
