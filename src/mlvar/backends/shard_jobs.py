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
- landing (:meth:`ShardKind.land_folder`): a shard is copied into
  ``analysis/shards/<split>/`` only when ``meta.json`` is there, every file matches its
  sha256 and the meta is the plan's; it is copied into a temporary folder beside the
  split's folder, verified again and renamed into place, so a partial or corrupt shard
  never lands.

:class:`ShardKind` holds what every kind of shard job shares (landing, the done check,
the failure record); saliency shards (:mod:`mlvar.backends.saliency_jobs`) are the other
subclass.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlvar import __version__
from mlvar.analysis.service import DEFAULT_RANK_BY, load_predictions
from mlvar.analysis.shards import (
    compute_shard,
    merge_shards,
    save_shard,
    shard_name,
    shard_range,
    shards_dir,
    verify_shard,
)
from mlvar.backends import faults
from mlvar.backends.kind import JobKind, JobText, Log, Merged
from mlvar.backends.spec import SPEC_FORMAT, Job, Submission
from mlvar.backends.transfer import ImportResult, _copy_synced
from mlvar.errors import MlvarError
from mlvar.io import _fsync_dir, sha256_file, swap_in
from mlvar.store import DYNAMICS_FILE, ExperimentStore, read_run

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


class ShardKind(JobKind):
    """A job that writes one shard folder (``OUT/<shard>/``, ``meta.json`` last listing
    the sha256 of every file), landed under a folder of the experiment's ``analysis/``."""

    reads_experiment = True
    output_name = "shards"
    #: the meta.json keys a landed shard must share with its plan
    keys: tuple[str, ...] = ()

    # -- what differs between shard kinds

    def verify(self, folder: Path) -> tuple[dict[str, Any] | None, str]:
        """``(meta, "")`` for a complete shard folder whose files match their sha256,
        else ``(meta or None, why not)``."""
        raise NotImplementedError

    def recognises(self, meta: dict[str, Any]) -> bool:
        """Whether a ``meta.json`` is of this kind."""
        raise NotImplementedError

    def root(self, store: ExperimentStore, split: str) -> Path:
        """Where the shards of a split land."""
        raise NotImplementedError

    def place(self, store: ExperimentStore, meta: dict[str, Any]) -> tuple[Path | None, str]:
        """The folder a shard (its meta, or a plan's expect) lands in, or why it cannot."""
        raise NotImplementedError

    # -- shared

    def input_group(self, spec: dict[str, Any]) -> str:
        j, m = spec["run_shard"]
        return f"r{j}of{m}"  # the K shards of a run block read the same files

    def _diffs(self, meta: dict[str, Any], expect: dict[str, Any]) -> list[str]:
        return [k for k in self.keys if k in expect and meta.get(k) != expect[k]]

    def shard_ok(self, store: ExperimentStore, expect: dict[str, Any]) -> bool:
        """Whether the shard ``expect`` describes is in the store, complete and verified."""
        folder, _ = self.place(store, expect)
        if folder is None or not folder.is_dir():
            return False
        meta, why = self.verify(folder)
        return (
            meta is not None
            and not why
            and bool(meta.get("files"))
            and not self._diffs(meta, expect)
        )

    def land_folder(
        self, folder: Path, store: ExperimentStore, expect: dict[str, Any] | None
    ) -> str:
        """Copy the shard in ``folder`` into the store atomically; ``""`` when it landed,
        else why not.

        The shard must be complete (``meta.json`` listing the sha256 of every file, each
        matching) and, with ``expect``, have the planned meta; without, at least be of
        this experiment (:meth:`place` says). It is copied into a ``.tmp-*`` folder beside
        the split's folder, verified again and renamed into place, replacing a stale
        shard of the same name only then.
        """
        folder = Path(folder)
        meta, why = self.verify(folder)
        if meta is None or why:
            return why
        if not meta.get("files"):
            return "meta.json lists no sha256 of its files"
        if expect is not None:
            diffs = self._diffs(meta, expect)
            if diffs:
                return f"meta.json differs from the plan in {', '.join(diffs)}"
        final, why = self.place(store, meta)
        if final is None:
            return why
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent.parent))
        try:
            os.chmod(tmp, 0o755)
            for file in meta["files"]:
                _copy_synced(folder / file, tmp / file)
            _copy_synced(folder / "meta.json", tmp / "meta.json")  # last, as the writer does
            copy, why = self.verify(tmp)
            if copy is None or why:
                return f"the copy failed verification ({why})"
            swap_in(tmp, final)
            _fsync_dir(final.parent)
            return ""
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def output_files(self, spec: dict[str, Any], out: Path) -> dict[str, bytes]:
        folder = Path(out) / spec["job"]
        if not folder.is_dir():
            return {}
        return {
            f"{spec['job']}/{p.name}": p.read_bytes()
            for p in sorted(folder.iterdir())
            if p.is_file()
        }

    def land(self, out: Path, store: ExperimentStore, spec: dict[str, Any]) -> ImportResult:
        result = self.empty_result()
        name, expect = spec["job"], spec["expect"]
        folders = [p.parent for p in sorted(Path(out).rglob("meta.json")) if p.parent.name == name]
        folder = folders[0] if folders else Path(out) / name
        if not folder.is_dir():
            return result
        if self.shard_ok(store, expect):
            result.skipped.append(name)
            return result
        why = self.land_folder(folder, store, expect)
        if why:
            result.rejected[name] = why
        else:
            result.imported.append(name)
        return result

    def remaining(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Any] | None:
        return None if self.shard_ok(store, spec["expect"]) else spec

    def pending_text(self, left: dict[str, Any], landed: ImportResult | None) -> str:
        why = "; ".join(landed.rejected.values()) if landed is not None else ""
        return f"shard not landed: {why}" if why else "shard not written"

    def failures(self, sub: Submission, job: Job, left: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"shard": job.name} | {k: job.shard[k] for k in ("samples", "runs") if k in job.shard}
        ]

    def landed(self, store: ExperimentStore, sub: Submission, job: Job) -> list[str]:
        return (
            [job.name] if (self.root(store, sub.split) / job.name / "meta.json").is_file() else []
        )

    def empty_result(self) -> ImportResult:
        return ImportResult(kind="shards")


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


def present_shards(store: ExperimentStore, plan: Any) -> list[str]:
    """The planned shards already landed, complete, verified and computed over the same
    runs (not resubmitted). Stale or damaged ones are recomputed.

    ``plan``: a :class:`ShardPlan` or a saliency plan (``kind``, ``split``, ``expects()``,
    ``sharding``, ``flags``). Raises :class:`MlvarError` when the folder holds shards of
    another sharding (a merge would refuse the mixture), naming them.
    """
    root = plan.kind.root(store, plan.split)
    expects = plan.expects()
    foreign = [
        folder.name
        for folder in (sorted(root.iterdir()) if root.is_dir() else [])
        if folder.is_dir()
        and not folder.name.startswith(".")
        and folder.name not in expects
        and (folder / "meta.json").is_file()
    ]
    if foreign:
        raise MlvarError(
            f"{root} already holds shards of another sharding "
            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}), not "
            f"{plan.sharding}",
            f"submit with the same {plan.flags}, or remove {root}",
        )
    return [name for name, expect in expects.items() if plan.kind.shard_ok(store, expect)]


# ------------------------------------------------------------------ what a job reads


def experiment_files(store: ExperimentStore, split: str) -> dict[str, Path | bytes]:
    """``experiment.json`` and ``samples/<split>.parquet``: what every shard job reads."""
    return {
        "experiment.json": store.root / "experiment.json",
        f"samples/{split}.parquet": store.root / "samples" / f"{split}.parquet",
    }


def run_files(
    store: ExperimentStore, run_id: str, listed: set[str], shipped: set[str] | None = None
) -> dict[str, Path | bytes]:
    """The files of run ``run_id`` a job reads: its ``run.json`` rewritten to list only the
    arrays in ``listed`` (so the copy verifies), and those of them in ``shipped`` (default:
    all listed)."""
    record = read_run(store.run_dir(run_id))
    if record is None:
        raise MlvarError(
            f"run {run_id} of '{store.name}' is not complete any more", "submit the jobs again"
        )
    arrays = {k: v for k, v in record.meta.get("arrays", {}).items() if k in listed}
    files: dict[str, Path | bytes] = {
        f"runs/{run_id}/{name}": record.path / name
        for name in arrays
        if shipped is None or name in shipped
    }
    text = json.dumps(dict(record.meta, arrays=arrays), indent=2, sort_keys=True) + "\n"
    files[f"runs/{run_id}/run.json"] = text.encode()
    return files


# ------------------------------------------------------------------ the worker


def check_job_input(spec: dict[str, Any], experiment_dir: Path, kind: str) -> dict[str, Any]:
    """The ``experiment.json`` of a shard job's ``experiment_dir``, after checking the spec
    is of ``kind`` and the file is the one the spec was planned on."""
    if spec.get("kind") != kind:
        raise MlvarError(f"the spec is of kind {spec.get('kind')!r}", f"expected '{kind}'")
    file = Path(experiment_dir) / "experiment.json"
    if not file.is_file():
        raise MlvarError(
            f"{experiment_dir} holds no experiment.json",
            "point --experiment-dir at the experiment folder (or a shard job's input)",
        )
    got, want = sha256_file(file), spec.get("experiment_sha256")
    if want and got != want:
        raise MlvarError(
            f"{file} has sha256 {got[:12]}, the spec was planned on {want[:12]}",
            "give the job the experiment it was submitted for",
        )
    return json.loads(file.read_text())


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


def store_mismatch(store: ExperimentStore, meta: dict[str, Any]) -> str:
    """Why a shard's meta is not of this experiment and one of its splits ("" if it is)."""
    if meta.get("experiment") != store.name:
        return f"a shard of experiment {meta.get('experiment')!r}, not '{store.name}'"
    if meta.get("split") not in store.splits:
        return f"a shard of unknown split {meta.get('split')!r}"
    return ""


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

    def run(
        self,
        spec: dict[str, Any],
        out: Path,
        experiment_dir: Path | None,
        data_root: Path | None,
        log: Log = print,
    ) -> None:
        if experiment_dir is None:
            raise MlvarError("an analysis job needs --experiment-dir", "see --help")
        run_shard_job(spec, experiment_dir, out, log)

    def merge(self, store: ExperimentStore, sub: Submission, data_root: Path) -> Merged:
        """``analyze rank --merge`` of the landed shards, ranked by the submission's
        ``by``; ``ranking`` is the ranking's parquet file."""
        result = merge_shards(store, sub.split, by=sub.options.get("by", DEFAULT_RANK_BY))
        found = next((f for f in result.files if f.endswith(".parquet")), None)
        ranking = found or str(store.root / "analysis" / f"rank-{sub.split}.parquet")
        return Merged(result, str(ranking), str(ranking))


def shard_labels(sub: Submission, spec: dict[str, Any]) -> dict[str, str]:
    """The labels (Azure ML tags) of a shard job."""
    return {
        "mlvar_kind": spec["kind"],
        "mlvar_experiment": sub.experiment,
        "mlvar_submission": sub.id,
        "mlvar_split": spec["split"],
        "mlvar_shard": spec["job"],
    }


ANALYSIS = AnalysisKind()
