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
  it is copied into a temporary folder beside the split's folder, verified again and
  renamed into place, so a partial or corrupt shard never lands.

The other kind of shard job, saliency (``mlvar submit saliency``,
:mod:`mlvar.backends.saliency_jobs`), shares this machinery: a :class:`ShardKind` says
how a kind verifies, where it lands, what its jobs read and how its worker computes;
:func:`kind_of` finds the kind of a spec, a plan's ``expect`` or a shard's ``meta.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
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
from mlvar.io import _fsync_dir, read_meta, sha256_file, swap_in
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


@dataclass(frozen=True)
class ShardKind:
    """What differs between the kinds of shard job (``analysis``, ``saliency``)."""

    name: str  # the spec's, the Job's and the Submission's ``kind``
    keys: tuple[str, ...]  # the meta.json keys a landed shard must share with its plan
    verify: Callable[[Path], tuple[dict[str, Any] | None, str]]  # (meta, why not)
    recognises: Callable[[dict[str, Any]], bool]  # whether a meta.json is of this kind
    root: Callable[[ExperimentStore, str], Path]  # where the shards of a split land
    #: the folder a shard (its meta, or a plan's expect) lands in, or why it cannot
    place: Callable[[ExperimentStore, dict[str, Any]], tuple[Path | None, str]]
    #: what a job reads: ``{relative path: source file or bytes}``
    input_files: Callable[[ExperimentStore, dict[str, Any]], dict[str, Path | bytes]]
    #: the worker: ``run(spec, experiment_dir, out, data_root, log)`` -> the shard folder
    run: Callable[..., Path]


def kind_of(record: dict[str, Any] | None) -> ShardKind:
    """The kind of a spec, a plan's ``expect`` or a shard's ``meta.json`` (``analysis``
    unless it says ``kind: "saliency"``)."""
    if (record or {}).get("kind") == "saliency":
        from mlvar.backends.saliency_jobs import SALIENCY

        return SALIENCY
    return ANALYSIS


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

    @property
    def kind(self) -> ShardKind:
        return ANALYSIS

    @property
    def sharding(self) -> str:
        return f"{self.shards} x {self.run_shards}"

    flags = "--shards/--run-shards"

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


def _matches(meta: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    """The keys of its kind in which ``meta`` differs from the plan's ``expect``."""
    return [k for k in kind_of(expect).keys if k in expect and meta.get(k) != expect[k]]


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
    return [name for name, expect in expects.items() if shard_ok(store, expect)]


# ------------------------------------------------------------------ what a job needs


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


def input_files(store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Path | bytes]:
    """What the shard job ``spec`` reads, as ``{relative path: source file or bytes}``.

    An analysis shard: ``experiment.json``, ``samples/<split>.parquet`` and, for each run
    of its run block, the split's logits (and ``train.dynamics.npy`` with dynamics) plus a
    ``run.json`` listing only those arrays (so the copy verifies). A saliency shard: see
    :func:`mlvar.backends.saliency_jobs.input_files`.
    """
    return kind_of(spec).input_files(store, spec)


def _analysis_inputs(store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Path | bytes]:
    split = spec["split"]
    files = experiment_files(store, split)
    j, m = spec["run_shard"]
    a, b = shard_range(j, m, len(spec["run_ids"]))
    wanted = {f"{split}.logits.npy"} | ({DYNAMICS_FILE} if spec["dynamics"] else set())
    for run_id in spec["run_ids"][a:b]:
        files.update(run_files(store, run_id, wanted))
    return files


def input_bytes(store: ExperimentStore, spec: dict[str, Any]) -> dict[str, bytes]:
    """:func:`input_files` read into memory."""
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


def fault(spec: dict[str, Any]) -> str | None:
    """The fault ``MLVAR_WORKER_FAULT`` injects into this shard job (``fail``, ``kill``)."""
    from mlvar.backends.worker import _fault as worker_fault

    found = worker_fault(spec)
    return found[0] if found else None


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


@contextlib.contextmanager
def named(folder: Path, name: str) -> Iterator[Path]:
    """``folder`` under the name ``name``: itself when so named, else a symlink in a
    temporary folder (an Azure ML input mount has a name of its own)."""
    folder = Path(folder)
    if folder.name == name:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="mlvar-named-") as tmp:
        link = Path(tmp) / name
        link.symlink_to(folder.resolve(), target_is_directory=True)
        yield link


def run_job(
    spec: dict[str, Any],
    experiment_dir: Path,
    out: Path,
    data_root: Path | None = None,
    scenario_dir: Path | None = None,
    log: Callable[..., None] = print,
) -> Path:
    """Run the shard job ``spec`` of any kind into ``out/<shard>/``. A kind that reads the
    prepared scenario finds it in ``data_root`` or as the folder ``scenario_dir``."""
    kind = kind_of(spec)
    if scenario_dir is None:
        return kind.run(spec, experiment_dir, out, data_root, log)
    with named(scenario_dir, str(spec.get("scenario", ""))) as folder:
        return kind.run(spec, experiment_dir, out, folder.parent, log)


def run_shard_job(
    spec: dict[str, Any], experiment_dir: Path, out: Path, log: Callable[..., None] = print
) -> Path:
    """Compute the analysis shard ``spec`` from ``experiment_dir`` into ``out/<shard>/``.

    ``experiment_dir`` is an experiment folder (the store's own, or a copy holding only
    the runs of the shard's run block). Raises :class:`MlvarError` when its
    ``experiment.json`` is not the one the spec was planned on, or a run is missing or
    fails its sha256.
    """
    experiment_dir = Path(experiment_dir)
    store = ExperimentStore(experiment_dir, check_job_input(spec, experiment_dir, KIND))
    fault_ = fault(spec)
    if fault_ == "fail":
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
        if fault_ == "kill":
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


def _run_analysis(
    spec: dict[str, Any],
    experiment_dir: Path,
    out: Path,
    _data_root: Path | None,
    log: Callable[..., None],
) -> Path:
    return run_shard_job(spec, experiment_dir, out, log)


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


def _analysis_place(store: ExperimentStore, meta: dict[str, Any]) -> tuple[Path | None, str]:
    """Where an analysis shard lands: ``analysis/shards/<split>/s<i>of<k>-r<j>of<m>/``, when
    it is of this experiment and covers its samples and classes."""
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


def store_mismatch(store: ExperimentStore, meta: dict[str, Any]) -> str:
    """Why a shard's meta is not of this experiment and one of its splits ("" if it is)."""
    if meta.get("experiment") != store.name:
        return f"a shard of experiment {meta.get('experiment')!r}, not '{store.name}'"
    if meta.get("split") not in store.splits:
        return f"a shard of unknown split {meta.get('split')!r}"
    return ""


def _is_analysis_meta(meta: dict[str, Any]) -> bool:
    return "samples" in meta and "runs" in meta


def shard_ok(store: ExperimentStore, expect: dict[str, Any]) -> bool:
    """Whether the shard ``expect`` describes is in the store, complete and verified."""
    kind = kind_of(expect)
    folder, _ = kind.place(store, expect)
    if folder is None or not folder.is_dir():
        return False
    meta, why = kind.verify(folder)
    return meta is not None and not why and bool(meta.get("files")) and not _matches(meta, expect)


def _read_meta(folder: Path) -> dict[str, Any]:
    meta, _ = read_meta(folder)
    return meta if isinstance(meta, dict) else {}


def land_shard(folder: Path, store: ExperimentStore, expect: dict[str, Any] | None) -> str:
    """Copy the shard in ``folder`` into the store atomically (an analysis shard into
    ``analysis/shards/<split>/``, a saliency shard into ``analysis/saliency-shards/<split>/``).

    Returns ``""`` when it landed, else why not. The shard must be complete (``meta.json``
    listing the sha256 of every file, each matching) and, with ``expect``, have the
    planned meta; without, it must at least be of this experiment (an analysis shard: and
    match its samples and classes; the merge checks the rest). It is copied into a
    ``.tmp-*`` folder beside the split's folder, verified again and renamed into place,
    replacing a stale shard of the same name only then.
    """
    folder = Path(folder)
    kind = kind_of(expect if expect is not None else _read_meta(folder))
    meta, why = kind.verify(folder)
    if meta is None or why:
        return why
    if not meta.get("files"):
        return "meta.json lists no sha256 of its files"
    if expect is not None:
        diffs = _matches(meta, expect)
        if diffs:
            return f"meta.json differs from the plan in {', '.join(diffs)}"
    final, why = kind.place(store, meta)
    if final is None:
        return why
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent.parent))
    try:
        os.chmod(tmp, 0o755)
        for file in meta["files"]:
            _copy_synced(folder / file, tmp / file)
        _copy_synced(folder / "meta.json", tmp / "meta.json")  # last, as the writer does
        copy, why = kind.verify(tmp)
        if copy is None or why:
            return f"the copy failed verification ({why})"
        swap_in(tmp, final)
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
        if isinstance(meta, dict) and kind_of(meta).recognises(meta):
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
    job.failed = [
        {"shard": job.name} | {k: job.shard[k] for k in ("samples", "runs") if k in job.shard}
    ]
    return False


ANALYSIS = ShardKind(
    name=KIND,
    keys=EXPECT_KEYS,
    verify=verify_shard,
    recognises=_is_analysis_meta,
    root=shards_dir,
    place=_analysis_place,
    input_files=_analysis_inputs,
    run=_run_analysis,
)
