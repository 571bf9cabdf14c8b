"""Sharded analysis: partial results over shards of samples and runs, merged exactly.

``mlvar analyze rank EXP --shard i/k [--run-shard j/m]`` computes, for the i-th of k
contiguous blocks of samples and the j-th of m contiguous blocks of runs (runs sorted by
id), the per-sample sufficient statistics of :mod:`mlvar.analysis.partial` and writes
them to ``analysis/shards/<split>/s<i>of<k>-r<j>of<m>/`` (one ``.npy`` per statistic and a
``meta.json``, written last and listing the sha256 of every file, the folder appearing in
one rename). Shards are independent: run them as separate jobs, on separate machines, in
any order (``mlvar submit analyze`` does, on a backend: :mod:`mlvar.backends.shard_jobs`;
:func:`compute_shard` needs only the runs of its own run block).

``mlvar analyze rank EXP --merge`` checks that the shards present form exactly one
complete, non-overlapping set (every i of one k, every j of one m, each run in exactly
one run block, the same runs in every sample block, every file matching the sha256
its ``meta.json`` lists), combines them and writes the same
files as an unsharded ``rank``; detection is computed after merging. Sample shards merge
bit for bit (each sample's values depend only on its own column); run shards combine sums
and squared deviations (Chan et al.), equal to the unsharded result up to float round-off
(about ``R * 1e-16``).

The shard mechanics (parsing ``i/k``, blocks, names, the folder with ``meta.json`` last,
verifying, completeness of a set) are :mod:`mlvar.analysis.sharding`'s, shared with
sharded saliency.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlvar.analysis.conventions import RANKS_MID, check_ranks
from mlvar.analysis.metrics import DYNAMICS_METRICS
from mlvar.analysis.partial import Partial, combine_runs, concat_samples
from mlvar.analysis.service import (
    DEFAULT_RANK_BY,
    Computed,
    Predictions,
    RankResult,
    analysis_dir,
    assemble,
    check_by,
    check_logits_shape,
    chunk_size,
    load_predictions,
)
from mlvar.analysis.sharding import (
    ShardFormat,
    shard_folders,
    shard_name,
    shard_range,
    survey_blocks,
    verify_shard_folder,
    write_shard_folder,
)
from mlvar.analysis.sharding import parse_shard as parse_shard  # re-exported: cli, tests
from mlvar.errors import MlvarError
from mlvar.io import staging_dir
from mlvar.store import DYNAMICS_FILE, ExperimentStore

#: An analysis shard folder: ``meta.json`` names its sample and run blocks and runs.
SHARD_FORMAT = ShardFormat(
    what="a shard's",
    recognises=lambda meta: {"samples", "runs", "run_ids"} <= set(meta),
    files_optional=True,
)


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


def _block_predictions(
    store: ExperimentStore, split: str, block_ids: list[str], dynamics: bool
) -> Predictions:
    """The predictions of the runs ``block_ids`` only, each checked against its sha256
    (only the arrays the shard reads): what a shard job needs, however few runs it holds."""
    samples = store.samples(split)
    found = {r.run_id: r for r in store.runs()}
    missing = [rid for rid in block_ids if rid not in found]
    if missing:
        raise MlvarError(
            f"experiment '{store.name}' lacks run(s) {', '.join(missing[:5])} of this shard",
            "give the shard job every run of its run block",
        )
    runs = [found[rid] for rid in block_ids]
    for run in runs:
        check_logits_shape(store, run, split, len(samples))
        arrays = run.meta.get("arrays", {})
        if dynamics and DYNAMICS_FILE not in arrays:
            raise MlvarError(
                f"run {run.run_id} of '{store.name}' has no training dynamics",
                "give the shard job the runs' train.dynamics.npy",
            )
        bad = [
            name
            for name in run.verify()
            if name == f"{split}.logits.npy" or (dynamics and name == DYNAMICS_FILE)
        ]
        if bad:
            raise MlvarError(
                f"run {run.run_id} of '{store.name}': sha256 mismatch in {', '.join(bad)}",
                "remove or retrain that run",
            )
    return Predictions(store, split, runs, samples, [])


def compute_shard(
    store: ExperimentStore,
    split: str = "test",
    shard: tuple[int, int] = (1, 1),
    run_shard: tuple[int, int] = (1, 1),
    allow_mixed: bool = False,
    chunk: int | None = None,
    run_ids: list[str] | None = None,
    dynamics: bool | None = None,
    ranks: str | None = None,
) -> tuple[Partial, dict[str, Any]]:
    """The partial results of one (sample block, run block) and the shard's ``meta``.

    ``run_ids``: the sorted ids of every run the run blocks split (default: every verified
    finished run of ``store``, checked as ``rank`` checks them). When given, ``store`` needs
    to hold only the runs of block ``run_shard`` (a shard job's copy), and only their
    arrays are verified. ``dynamics``: include training-dynamics sums (default: when every
    run recorded them). ``ranks``: the rank convention the shard is made under, recorded
    in its meta (``"ranks"``) for the merge to check; None records none (any merge
    accepts the shard).
    """
    if ranks is not None:
        check_ranks(ranks)
    (i, k), (j, m) = shard, run_shard
    if run_ids is None:
        preds = load_predictions(store, split, allow_mixed)
        run_ids = [run.run_id for run in preds.runs]
        dynamics = preds.has_dynamics if dynamics is None else dynamics
    else:
        preds = None
    n, r = store.n_samples(split), len(run_ids)
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
    block_ids = list(run_ids[ra:rb])
    if preds is None:
        preds = _block_predictions(store, split, block_ids, bool(dynamics))
        runs = preds.runs
    else:
        runs = preds.runs[ra:rb]
    dynamics = bool(dynamics) and split == "train"
    part = concat_samples([p for _, _, p in preds.partials(runs, a, b, chunk, dynamics=dynamics)])
    meta = {
        "experiment": store.name,
        "split": split,
        "samples": [i, k],
        "runs": [j, m],
        "start": a,
        "stop": b,
        "n_samples": n,
        "n_classes": preds.n_classes,
        "run_ids": block_ids,
        "all_run_ids": list(run_ids),
        "dynamics": part.dynamics is not None,
    }
    if ranks is not None:
        meta["ranks"] = ranks
    return part, meta


def save_shard(
    part: Partial,
    meta: dict[str, Any],
    folder: Path,
    on_file: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``part`` into ``folder``: one ``.npy`` per array, then ``meta.json`` (last)
    listing the sha256 of every array file under ``files``. Returns the meta written.

    ``on_file(name)`` is called after each array file (a testing hook)."""
    arrays = {f"{name}.npy": array for name, array in part.arrays().items()}
    return write_shard_folder(folder, arrays, dict(meta, n_runs=part.n_runs), on_file)


def verify_shard(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """``(meta, "")`` when ``folder`` is a complete shard whose files match the sha256 its
    ``meta.json`` lists, else ``(meta or None, why)``. A shard written before sha256 were
    listed (no ``files``) passes when its meta is readable."""
    return verify_shard_folder(folder, SHARD_FORMAT)


def write_shard(
    store: ExperimentStore,
    split: str = "test",
    shard: tuple[int, int] = (1, 1),
    run_shard: tuple[int, int] = (1, 1),
    allow_mixed: bool = False,
    chunk: int | None = None,
    ranks: str | None = None,
) -> ShardResult:
    """Compute and write the partial results of one (sample block, run block); ``ranks``
    as :func:`compute_shard` records it."""
    part, meta = compute_shard(store, split, shard, run_shard, allow_mixed, chunk, ranks=ranks)
    final = shards_dir(store, split) / shard_name(shard, run_shard)
    with staging_dir(final, replace=True) as tmp:
        save_shard(part, meta, tmp)
    samples = (meta["start"], meta["stop"])
    return ShardResult(store.name, split, shard, run_shard, samples, meta["run_ids"], str(final))


def _read_metas(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for folder in shard_folders(root):
        file = folder / "meta.json"
        if file.is_file():
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
    survey = survey_blocks([(m["samples"], m["runs"]) for _, m in metas])
    ks, ms = survey.counts
    if survey.sizes is None:
        what = []
        if len(ks) > 1:
            what.append(f"samples into {' and '.join(map(str, ks))} blocks")
        if len(ms) > 1:
            what.append(f"runs into {' and '.join(map(str, ms))} blocks")
        raise MlvarError(
            f"the shards of '{name}' ({split}) overlap: they split {' and '.join(what)}",
            f"remove {root} and compute one set of shards",
        )
    k, m = survey.sizes
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
    if survey.repeated:
        i, j = survey.repeated[0]
        raise MlvarError(
            f"the shards of '{name}' ({split}) overlap: more than one folder holds samples "
            f"{i}/{k} runs {j}/{m}",
            f"remove {root} and compute one set of shards",
        )
    missing = survey.missing
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
    ranks: str | None = None,
) -> RankResult:
    """Merge a complete set of shards of ``split`` into the full ranking and detection.

    ``ranks``: the convention of the rank summaries; None takes the one the shards were
    made under (``mid`` when they record none). A convention other than the shards'
    is refused, as are shards made under both.
    """
    check_by(by)
    if ranks is not None:
        check_ranks(ranks)
    samples = store.samples(split)
    k, m, by_key = _check_complete(store, split, _read_metas(shards_dir(store, split)))
    ranks = _merge_ranks(store, split, [meta for _, meta in by_key.values()], ranks)
    for folder, _meta in by_key.values():
        _, why = verify_shard(folder)
        if why:
            raise MlvarError(
                f"shard {folder.name} of '{store.name}' ({split}) is damaged: {why}",
                f"remove {folder} and recompute it",
            )
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
        ranks=ranks,
    )


def _merge_ranks(
    store: ExperimentStore, split: str, metas: list[dict[str, Any]], ranks: str | None
) -> str:
    """The rank convention of a merge: ``ranks``, or the shards' when None; refused when
    it differs from the one the shards record."""
    made = sorted({str(meta["ranks"]) for meta in metas if meta.get("ranks") is not None})
    root = shards_dir(store, split)
    if len(made) > 1:
        raise MlvarError(
            f"the shards of '{store.name}' ({split}) were made under different rank "
            f"conventions ({', '.join(made)})",
            f"remove {root} and compute every shard with the same --ranks",
        )
    if ranks is None:
        return made[0] if made else RANKS_MID
    if made and made[0] != ranks:
        raise MlvarError(
            f"the shards of '{store.name}' ({split}) were made under --ranks {made[0]}, "
            f"not --ranks {ranks}",
            f"merge with --ranks {made[0]}, or recompute the shards with --ranks {ranks}",
        )
    return ranks
