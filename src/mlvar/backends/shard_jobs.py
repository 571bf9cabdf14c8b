"""Analysis shards as backend jobs: ``mlvar submit analyze EXPERIMENT --shards K``.

The sharded ``analyze rank`` of :mod:`mlvar.analysis.shards` splits the samples of a split
into K contiguous blocks and the runs (sorted by id) into M blocks; each of the K x M
shards is one job here. This module holds what every backend shares:

- the plan (:func:`plan_shards`): the checks ``rank`` makes, then one JSON spec per shard
  (``kind: "analysis"``) naming its sample block, its run block, every run id the blocks
  split, and the ``meta.json`` the shard must come back with (``expect``);
- the worker (:func:`run_shard_job`, run by ``python -m mlvar.backends.worker SPEC.json
  --experiment-dir DIR --out OUT``): it reads an experiment folder that needs to hold only
  ``experiment.json``, ``samples/<split>.parquet`` and the runs of its run block (their
  logits of the split; ``train.dynamics.npy`` for training-dynamics metrics), and writes
  the shard to ``OUT/<shard>/``, ``meta.json`` last with the sha256 of every file;
- what a job needs (:func:`input_files`): shipped as bytes to a Ray task, staged as hard
  links for an Azure ML input;
- landing (:func:`land_shard`): a shard is copied into ``analysis/shards/<split>/`` only
  when ``meta.json`` is there, every file matches its sha256 and the meta is the plan's;
  it is copied into a temporary folder beside the others, verified again and renamed
  into place, so a partial or corrupt shard never lands.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
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
from mlvar.backends.spec import SPEC_FORMAT, Job, Submission
from mlvar.backends.transfer import ImportResult, _copy_synced
from mlvar.errors import MlvarError
from mlvar.io import _fsync_dir, sha256_file
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

    def blocks(self) -> list[tuple[int, int]]:
        """``(i, j)`` of every shard, sample block major."""
        return [(i, j) for i in range(1, self.shards + 1) for j in range(1, self.run_shards + 1)]

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


def _matches(meta: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    return [key for key in EXPECT_KEYS if key in expect and meta.get(key) != expect[key]]


def present_shards(store: ExperimentStore, plan: ShardPlan) -> list[str]:
    """The planned shards already in ``analysis/shards/<split>/``, complete, verified and
    computed over the same runs (not resubmitted). Stale or damaged ones are recomputed.

    Raises :class:`MlvarError` when the folder holds shards of another K or M (a merge
    would refuse the mixture), naming them.
    """
    root = shards_dir(store, plan.split)
    names = {plan.name(i, j): plan.expected(i, j) for i, j in plan.blocks()}
    valid, foreign = [], []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith(".") or folder.name in names:
            continue
        if (folder / "meta.json").is_file():
            foreign.append(folder.name)
    if foreign:
        raise MlvarError(
            f"{root} already holds shards of another sharding "
            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}), not "
            f"{plan.shards} x {plan.run_shards}",
            f"submit with the same --shards/--run-shards, or remove {root}",
        )
    for name, expect in names.items():
        folder = root / name
        if folder.is_dir():
            meta, why = verify_shard(folder)
            if meta is not None and not why and meta.get("files") and not _matches(meta, expect):
                valid.append(name)
    return valid


# ------------------------------------------------------------------ what a job needs


def input_files(store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Path | bytes]:
    """What the shard ``spec`` reads, as ``{relative path: source file or bytes}``:
    ``experiment.json``, ``samples/<split>.parquet`` and, for each run of its run block,
    the split's logits (and ``train.dynamics.npy`` with dynamics) plus a ``run.json``
    listing only those arrays (so the copy verifies)."""
    split = spec["split"]
    files: dict[str, Path | bytes] = {
        "experiment.json": store.root / "experiment.json",
        f"samples/{split}.parquet": store.root / "samples" / f"{split}.parquet",
    }
    j, m = spec["run_shard"]
    a, b = shard_range(j, m, len(spec["run_ids"]))
    wanted = {f"{split}.logits.npy"} | ({DYNAMICS_FILE} if spec["dynamics"] else set())
    for run_id in spec["run_ids"][a:b]:
        record = read_run(store.run_dir(run_id))
        if record is None:
            raise MlvarError(
                f"run {run_id} of '{store.name}' is not complete any more",
                "submit the analysis again",
            )
        arrays = {k: v for k, v in record.meta.get("arrays", {}).items() if k in wanted}
        for name in arrays:
            files[f"runs/{run_id}/{name}"] = record.path / name
        meta = dict(record.meta, arrays=arrays)
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        files[f"runs/{run_id}/run.json"] = text.encode()
    return files


def input_bytes(store: ExperimentStore, spec: dict[str, Any]) -> dict[str, bytes]:
    """:func:`input_files` read into memory (what a Ray task is sent)."""
    return {
        rel: src if isinstance(src, bytes) else Path(src).read_bytes()
        for rel, src in input_files(store, spec).items()
    }


def stage_inputs(store: ExperimentStore, spec: dict[str, Any], folder: Path) -> list[str]:
    """Write :func:`input_files` into ``folder`` (hard links where the filesystem allows,
    copies otherwise): an Azure ML job's input folder. Returns the relative paths."""
    written = []
    for rel, src in sorted(input_files(store, spec).items()):
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            target.write_bytes(src)
        else:
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
        written.append(rel)
    return written


# ------------------------------------------------------------------ the worker


def _fault(spec: dict[str, Any]) -> str | None:
    from mlvar.backends.worker import _fault as worker_fault

    found = worker_fault(spec)
    return found[0] if found else None


def run_shard_job(
    spec: dict[str, Any], experiment_dir: Path, out: Path, log: Callable[..., None] = print
) -> Path:
    """Compute the shard ``spec`` from ``experiment_dir`` into ``out/<shard>/``.

    ``experiment_dir`` is an experiment folder (the store's own, or a copy holding only
    the runs of the shard's run block). Raises :class:`MlvarError` when its
    ``experiment.json`` is not the one the spec was planned on, or a run is missing or
    fails its sha256.
    """
    if spec.get("kind") != KIND:
        raise MlvarError(f"the spec is of kind {spec.get('kind')!r}", f"expected '{KIND}'")
    experiment_dir = Path(experiment_dir)
    file = experiment_dir / "experiment.json"
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
    store = ExperimentStore(experiment_dir, json.loads(file.read_text()))
    fault = _fault(spec)
    if fault == "fail":
        raise RuntimeError(f"injected failure in shard {spec['job']}")
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
        if fault == "kill":
            log(f"injected kill in shard {spec['job']} after {name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

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


def collect_shard(folder: Path) -> dict[str, bytes]:
    """The files of a shard folder (whatever is there) as ``{name: bytes}``."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def write_shard_files(files: dict[str, bytes], folder: Path) -> None:
    """Write :func:`collect_shard`'s output into ``folder`` (``meta.json`` last)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: (n == "meta.json", n)):
        if "/" in name or "\\" in name or name.startswith("."):
            raise MlvarError(f"refusing the file name {name!r} in a task's output", "a bad worker")
        (folder / name).write_bytes(files[name])


# ------------------------------------------------------------------ landing


def shard_ok(store: ExperimentStore, expect: dict[str, Any]) -> bool:
    """Whether the shard ``expect`` describes is in the store, complete and verified."""
    i, k = expect["samples"]
    j, m = expect["runs"]
    folder = shards_dir(store, expect["split"]) / shard_name((i, k), (j, m))
    if not folder.is_dir():
        return False
    meta, why = verify_shard(folder)
    return meta is not None and not why and bool(meta.get("files")) and not _matches(meta, expect)


def land_shard(folder: Path, store: ExperimentStore, expect: dict[str, Any] | None) -> str:
    """Copy the shard in ``folder`` into ``analysis/shards/<split>/`` atomically.

    Returns ``""`` when it landed, else why not. The shard must be complete (``meta.json``
    listing the sha256 of every file, each matching) and, with ``expect``, have the
    planned meta; without, it must at least be of this experiment and match its samples
    and classes (``--merge`` checks the rest). It is copied into a ``.tmp-*`` folder beside
    the others, verified again and renamed into place, replacing a stale shard of the same
    name only then.
    """
    folder = Path(folder)
    meta, why = verify_shard(folder)
    if meta is None or why:
        return why
    if not meta.get("files"):
        return "meta.json lists no sha256 of its files"
    if expect is not None:
        diffs = _matches(meta, expect)
        if diffs:
            return f"meta.json differs from the plan in {', '.join(diffs)}"
    split = meta.get("split")
    if meta.get("experiment") != store.name:
        return f"a shard of experiment {meta.get('experiment')!r}, not '{store.name}'"
    if split not in store.splits:
        return f"a shard of unknown split {split!r}"
    if meta.get("n_samples") != store.n_samples(split) or meta.get("n_classes") != len(
        store.class_names
    ):
        return "covers another number of samples or classes than the experiment"
    try:
        (i, k), (j, m) = meta["samples"], meta["runs"]
        name = shard_name((int(i), int(k)), (int(j), int(m)))
    except (TypeError, ValueError):
        return "meta.json names no shard"
    final = shards_dir(store, split) / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)
        for file in meta["files"]:
            _copy_synced(folder / file, tmp / file)
        _copy_synced(folder / "meta.json", tmp / "meta.json")  # last, as the writer does
        copy, why = verify_shard(tmp)
        if copy is None or why:
            return f"the copy failed verification ({why})"
        if final.exists():
            old = tmp.with_name(tmp.name + "-old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        return ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_shard_folders(source: Path) -> list[Path]:
    """Folders under ``source`` (itself included) holding a shard's ``meta.json``."""
    source = Path(source)
    found = []
    for file in sorted(source.rglob("meta.json")) if source.is_dir() else []:
        if any(part.startswith(".") for part in file.relative_to(source).parts[:-1]):
            continue
        try:
            meta = json.loads(file.read_text())
        except (OSError, ValueError):
            found.append(file.parent)  # rejected (and reported) by land_shard
            continue
        if isinstance(meta, dict) and "samples" in meta and "runs" in meta:
            found.append(file.parent)
    return found


def import_shards(
    source: Path,
    store: ExperimentStore,
    expect: dict[str, dict[str, Any]] | None = None,
) -> ImportResult:
    """Land every shard found under ``source`` (a worker's output, a downloaded job
    output, a folder copied by hand). ``expect``: the planned meta by shard name."""
    result = ImportResult(kind="shards")
    for folder in find_shard_folders(source):
        want = (expect or {}).get(folder.name)
        if want is not None and shard_ok(store, want):
            result.skipped.append(folder.name)
            continue
        why = land_shard(folder, store, want)
        if why:
            result.rejected[folder.name] = why
        else:
            result.imported.append(folder.name)
    return result


def finish_shard_attempt(
    sub: Submission,
    job: Job,
    store: ExperimentStore,
    spec: dict[str, Any],
    output: Path | None,
    error: str,
    log_tail: str,
) -> bool:
    """Land an attempt's shard (when it wrote one) and decide what is left.

    Returns True when the job should be tried again. A job out of retries is marked
    failed with its shard named.
    """
    why = ""
    expect = spec["expect"]
    if output is not None and Path(output).is_dir() and not shard_ok(store, expect):
        why = land_shard(Path(output), store, expect)
    if shard_ok(store, expect):
        job.state, job.error, job.log_tail, job.failed = "complete", "", "", []
        return False
    job.error = error or (f"shard not landed: {why}" if why else "shard not written")
    job.log_tail = log_tail
    if job.attempts <= sub.retries:
        job.state = "running"
        return True
    job.state = "failed"
    job.failed = [{"shard": job.name} | {k: job.shard.get(k) for k in ("samples", "runs")}]
    return False
