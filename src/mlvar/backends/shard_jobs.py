"""Analysis shards as backend jobs: ``mlvar submit analyze EXPERIMENT --shards K``.

The sharded ``analyze rank`` of :mod:`mlvar.analysis.shards` splits the samples of a split
into K contiguous blocks and the runs (sorted by id) into M blocks; each of the K x M
shards is one job here (the kind :data:`ANALYSIS`):

- the plan (:func:`plan_shards`): the checks ``rank`` makes, then one JSON spec per shard
  (``kind: "analysis"``) naming its sample block, its run block, every run id the blocks
  split, and the ``meta.json`` the shard must come back with (``expect``);
- the worker (:func:`run_shard_job`, run by ``python -m mlvar.backends.worker SPEC.json
  --experiment-dir DIR --out OUT``): it reads an experiment folder that needs to hold only
  ``experiment.json``, ``samples/<split>.parquet`` and the runs of its run block (their
  logits of the split; ``train.dynamics.npy`` for training-dynamics metrics), and writes
  the shard to ``OUT/<shard>/``, ``meta.json`` last with the sha256 of every file;
- what a job reads (:meth:`AnalysisKind.inputs`): shipped as bytes to a Ray task, staged
  as hard links for an Azure ML input;
- landing (:mod:`mlvar.backends.shard_kind`, shared with saliency shards): a shard is
  copied into ``analysis/shards/<split>/`` only when ``meta.json`` is there, every file
  matches its sha256 and the meta is the plan's; it is copied into a temporary folder
  beside the split's folder, verified again and renamed into place, so a partial or
  corrupt shard never lands.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlvar import __version__
from mlvar.analysis.service import load_predictions
from mlvar.analysis.shards import (
    compute_shard,
    save_shard,
    shard_name,
    shard_range,
    shards_dir,
    verify_shard,
)
from mlvar.backends import faults
from mlvar.backends.kind import JobText, Log
from mlvar.backends.shard_kind import (
    ShardKind,
    check_job_input,
    experiment_files,
    run_files,
    shard_labels,
    store_mismatch,
)
from mlvar.backends.spec import SPEC_FORMAT, Job, Submission
from mlvar.errors import MlvarError
from mlvar.io import sha256_file
from mlvar.store import DYNAMICS_FILE, ExperimentStore

KIND = "analysis"
#: The meta.json keys a landed shard must share with its plan.
EXPECT_KEYS = (
    "experiment",
    "split",
    "samples",
    "runs",
    "start",
    "stop",
    "n_samples",
    "n_classes",
    "run_ids",
    "all_run_ids",
    "dynamics",
)


# ------------------------------------------------------------------ the plan


@dataclass
class ShardPlan:
    """K x M shards of one split of an experiment, over a fixed list of runs."""

    experiment: str
    split: str
    shards: int  # K: blocks of samples
    run_shards: int  # M: blocks of runs
    run_ids: list[str]  # every run the run blocks split, sorted
    dynamics: bool
    allow_mixed: bool
    n_samples: int
    n_classes: int
    experiment_sha256: str

    flags = "--shards/--run-shards"

    def blocks(self) -> list[tuple[int, int]]:
        """``(i, j)`` of every shard, sample block major."""
        return [(i, j) for i in range(1, self.shards + 1) for j in range(1, self.run_shards + 1)]

    @property
    def kind(self) -> ShardKind:
        return ANALYSIS

    @property
    def sharding(self) -> str:
        return f"{self.shards} x {self.run_shards}"

    def name(self, i: int, j: int) -> str:
        return shard_name((i, self.shards), (j, self.run_shards))

    def block(self, j: int) -> list[str]:
        a, b = shard_range(j, self.run_shards, len(self.run_ids))
        return self.run_ids[a:b]

    def expected(self, i: int, j: int) -> dict[str, Any]:
        """The ``meta.json`` values (:data:`EXPECT_KEYS`) shard ``(i, j)`` must have."""
        start, stop = shard_range(i, self.shards, self.n_samples)
        return {
            "experiment": self.experiment,
            "split": self.split,
            "samples": [i, self.shards],
            "runs": [j, self.run_shards],
            "start": start,
            "stop": stop,
            "n_samples": self.n_samples,
            "n_classes": self.n_classes,
            "run_ids": self.block(j),
            "all_run_ids": list(self.run_ids),
            "dynamics": self.dynamics,
        }

    def spec(self, i: int, j: int, submission: str) -> dict[str, Any]:
        """The JSON spec of shard ``(i, j)`` (what a worker reads)."""
        return {
            "format": SPEC_FORMAT,
            "kind": KIND,
            "mlvar_version": __version__,
            "submission": submission,
            "job": self.name(i, j),
            "index": self.blocks().index((i, j)),
            "experiment": self.experiment,
            "experiment_sha256": self.experiment_sha256,
            "split": self.split,
            "shard": [i, self.shards],
            "run_shard": [j, self.run_shards],
            "run_ids": list(self.run_ids),
            "dynamics": self.dynamics,
            "allow_mixed": self.allow_mixed,
            "expect": self.expected(i, j),
        }

    def job(self, i: int, j: int) -> Job:
        block = self.block(j)
        return Job(
            name=self.name(i, j),
            kind=KIND,
            shard={
                "samples": f"{i}/{self.shards}",
                "runs": f"{j}/{self.run_shards}",
                "run_ids": [block[0], block[-1]],
            },
        )

    def expects(self) -> dict[str, dict[str, Any]]:
        """The planned meta of every shard, by name."""
        return {self.name(i, j): self.expected(i, j) for i, j in self.blocks()}

    def jobs(self, submission: str) -> list[tuple[Job, dict[str, Any]]]:
        """Every shard's job and spec, in plan order."""
        return [(self.job(i, j), self.spec(i, j, submission)) for i, j in self.blocks()]


def _check_count(value: int, option: str, most: int, what: str) -> None:
    if value > most:
        raise MlvarError(
            f"cannot split {most} {what} into {value} blocks ({option} {value})",
            f"use {option} with at most {most}",
        )


def plan_shards(
    store: ExperimentStore,
    split: str = "test",
    shards: int = 1,
    run_shards: int = 1,
    allow_mixed: bool = False,
) -> ShardPlan:
    """Check the experiment as ``analyze rank`` does and plan ``shards x run_shards`` jobs.

    Raises :class:`MlvarError` for an unknown split, no finished runs, mixed training
    configurations (without ``allow_mixed``), or K/M out of range (``1 <= K <= samples``,
    ``1 <= M <= runs``).
    """
    for value, option in ((shards, "--shards"), (run_shards, "--run-shards")):
        if value < 1:
            raise MlvarError(f"{option} must be at least 1, got {value}", f"e.g. {option} 4")
    if split not in store.splits:
        raise MlvarError(
            f"experiment '{store.name}' has no split '{split}'",
            "valid: " + ", ".join(store.splits),
        )
    preds = load_predictions(store, split, allow_mixed)
    n, r = len(preds.samples), len(preds.runs)
    _check_count(shards, "--shards", n, f"{split} samples")
    _check_count(run_shards, "--run-shards", r, "runs")
    return ShardPlan(
        experiment=store.name,
        split=split,
        shards=shards,
        run_shards=run_shards,
        run_ids=[run.run_id for run in preds.runs],
        dynamics=preds.has_dynamics,
        allow_mixed=allow_mixed,
        n_samples=n,
        n_classes=preds.n_classes,
        experiment_sha256=sha256_file(store.root / "experiment.json"),
    )


# ------------------------------------------------------------------ the worker


def run_shard_job(spec: dict[str, Any], experiment_dir: Path, out: Path, log: Log = print) -> Path:
    """Compute the analysis shard ``spec`` from ``experiment_dir`` into ``out/<shard>/``.

    ``experiment_dir`` is an experiment folder (the store's own, or a copy holding only
    the runs of the shard's run block). Raises :class:`MlvarError` when its
    ``experiment.json`` is not the one the spec was planned on, or a run is missing or
    fails its sha256.
    """
    experiment_dir = Path(experiment_dir)
    store = ExperimentStore(experiment_dir, check_job_input(spec, experiment_dir, KIND))
    target = {spec["index"]: f"shard {spec['job']}"}
    faults.before_work(spec, target)
    part, meta = compute_shard(
        store,
        spec["split"],
        tuple(spec["shard"]),
        tuple(spec["run_shard"]),
        allow_mixed=bool(spec.get("allow_mixed")),
        run_ids=list(spec["run_ids"]),
        dynamics=bool(spec["dynamics"]),
    )
    meta["experiment"] = spec["experiment"]

    def on_file(name: str) -> None:
        faults.during_work(spec, {spec["index"]: f"shard {spec['job']} after {name}"}, log)

    folder = Path(out) / spec["job"]
    if folder.exists():
        shutil.rmtree(folder)
    save_shard(part, meta, folder, on_file)
    log(
        f"wrote shard {spec['job']}: samples {meta['start']}..{meta['stop'] - 1}, "
        f"{len(meta['run_ids'])} runs",
        flush=True,
    )
    return folder


# ------------------------------------------------------------------ the kind


class AnalysisKind(ShardKind):
    """One (sample block, run block) shard of ``analyze rank``."""

    name = KIND
    keys = EXPECT_KEYS

    def verify(self, folder: Path) -> tuple[dict[str, Any] | None, str]:
        return verify_shard(folder)

    def recognises(self, meta: dict[str, Any]) -> bool:
        return "samples" in meta and "runs" in meta

    def root(self, store: ExperimentStore, split: str) -> Path:
        return shards_dir(store, split)

    def place(self, store: ExperimentStore, meta: dict[str, Any]) -> tuple[Path | None, str]:
        """``analysis/shards/<split>/s<i>of<k>-r<j>of<m>/``, when the shard is of this
        experiment and covers its samples and classes."""
        why = store_mismatch(store, meta)
        if why:
            return None, why
        split = meta["split"]
        if meta.get("n_samples") != store.n_samples(split) or meta.get("n_classes") != len(
            store.class_names
        ):
            return None, "covers another number of samples or classes than the experiment"
        try:
            (i, k), (j, m) = meta["samples"], meta["runs"]
            name = shard_name((int(i), int(k)), (int(j), int(m)))
        except (TypeError, ValueError):
            return None, "meta.json names no shard"
        return shards_dir(store, split) / name, ""

    def inputs(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Path | bytes]:
        """``experiment.json``, ``samples/<split>.parquet`` and, for each run of the run
        block, the split's logits (and ``train.dynamics.npy`` with dynamics) plus a
        ``run.json`` listing only those arrays (so the copy verifies)."""
        split = spec["split"]
        files = experiment_files(store, split)
        j, m = spec["run_shard"]
        a, b = shard_range(j, m, len(spec["run_ids"]))
        wanted = {f"{split}.logits.npy"} | ({DYNAMICS_FILE} if spec["dynamics"] else set())
        for run_id in spec["run_ids"][a:b]:
            files.update(run_files(store, run_id, wanted))
        return files

    def describe(self, sub: Submission, spec: dict[str, Any]) -> JobText:
        name = spec["job"]
        (i, k), (j, m) = spec["shard"], spec["run_shard"]
        expect = spec["expect"]
        block = expect["run_ids"]
        return JobText(
            title=f"{sub.experiment} analysis {name}",
            description=(
                f"mlvar: analyze rank {sub.experiment} --split {spec['split']} --shard "
                f"{i}/{k} --run-shard {j}/{m} (samples {expect['start']}.."
                f"{expect['stop'] - 1}, runs {block[0]}..{block[-1]})"
            ),
            labels=shard_labels(sub, spec),
        )

    def compute(self, spec: dict, exp: Path, out: Path, data: Path | None, log: Log) -> Path:
        return run_shard_job(spec, exp, out, log)


ANALYSIS = AnalysisKind()
