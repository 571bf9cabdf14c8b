"""The backend interface (in the spirit of submitit's Executor and Job) and the one
attempt/retry logic every backend and job kind share.

A :class:`Backend` gets a :class:`JobBatch` (a submission record, the store, the job kind
and one spec per job) and either runs it to the end before :meth:`Backend.submit` returns
(``synchronous``: local, ray) or submits it and returns (aml, slurm), after which
:meth:`Backend.refresh` follows the jobs (``mlvar submit status``) and
:meth:`Backend.download` lands what they wrote (``mlvar submit download``).

Every attempt of a job ends in :func:`finish_attempt`: its output is landed through the
kind (complete, verified, atomic), the kind says what is left, and the job is complete,
tried again (``retries``) or failed with its runs (or shard) named. Backends that run
attempts themselves drive them with :func:`drive`.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from mlvar.backends.kind import JobKind
from mlvar.backends.spec import Job, Submission
from mlvar.backends.transfer import ImportResult
from mlvar.config import Config
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError
from mlvar.io import atomic_write_json, staging_dir
from mlvar.store import ExperimentStore

#: ``progress(done_units, total_units, message)``.
SubmitProgress = Callable[[int, int, str], None]

LOG_TAIL_LINES = 20


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise a one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MlvarError(
            f"the {extra} backend needs the '{module}' package, which is not installed",
            f"install mlvar[{extra}] (pip install 'mlvar[{extra}]')",
        ) from None


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return tail(Path(path).read_text(errors="replace"), lines)
    except OSError:
        return ""


@dataclass
class JobBatch:
    """What a backend is given to run or submit."""

    sub: Submission
    store: ExperimentStore | None  # None only for a dry run of jobs that create it (train)
    kind: JobKind
    specs: dict[str, dict[str, Any]]  # the planned spec of each job, by job name
    scenario: Scenario | None = None  # the prepared scenario the jobs read, if any
    data_root: Path | None = None  # where that scenario is (a filesystem the jobs share)
    device: str = "cpu"  # where the jobs compute ("cuda": GPUs are requested or pinned)
    workers: int | None = None  # local backend: worker processes (--workers)
    # a study: every scenario its jobs read, by name (``scenario`` is the first)
    scenarios: dict[str, Scenario] = field(default_factory=dict)

    def job_scenarios(self, spec: dict[str, Any]) -> list[Scenario]:
        """The prepared scenarios the job ``spec`` reads: the batch's, or in a study
        those the spec (each of its ``parts``) names."""
        if not self.scenarios:
            return [] if self.scenario is None else [self.scenario]
        names = [str(part["scenario"]) for part in spec.get("parts", [spec])]
        return [self.scenarios[name] for name in dict.fromkeys(names)]

    @property
    def base(self) -> Path:
        """``submissions/<id>/`` of the store: the submission's own files."""
        assert self.store is not None
        return self.store.root / "submissions" / self.sub.id


@dataclass
class Attempt:
    """One attempt of a job, as it ended."""

    spec: dict[str, Any]  # what it ran (its runs, its ``attempt`` number)
    out: Path | None  # its output folder to land (None: it wrote into the store itself)
    error: str = ""
    log_tail: str = ""
    fatal: bool = False  # bad input (exit code 2): retrying cannot help


def discard(attempt: Attempt) -> None:
    """Remove an attempt's output folder once :func:`finish_attempt` is done with it."""
    if attempt.out is not None:
        shutil.rmtree(attempt.out, ignore_errors=True)


def start_attempt(job: Job, spec: dict[str, Any]) -> dict[str, Any]:
    """Count a new attempt of ``job``; returns its spec."""
    job.attempts += 1
    job.state = "running"
    return dict(spec, attempt=job.attempts)


def finish_attempt(
    sub: Submission, job: Job, store: ExperimentStore, kind: JobKind, attempt: Attempt
) -> tuple[dict[str, Any] | None, ImportResult]:
    """Land an attempt's output and decide what is left.

    Returns the spec to try again (``None`` when the job is complete or out of
    retries) and what landed. A job out of retries is marked failed with its runs listed
    by seed (or its shard named), its error and its log tail.
    """
    error = attempt.error
    landed = kind.empty_result()
    if attempt.out is not None and Path(attempt.out).exists():
        try:
            landed = kind.land(Path(attempt.out), store, attempt.spec)
        except MlvarError as exc:
            error = error or str(exc)
    left = kind.remaining(store, attempt.spec)
    if left is None:
        job.state, job.error, job.log_tail, job.failed = "complete", "", "", []
        return None, landed
    job.error = error or kind.pending_text(left, landed)
    job.log_tail = attempt.log_tail
    if job.attempts <= sub.retries and not attempt.fatal:
        job.state = "running"
        return left, landed
    job.state = "failed"
    job.failed = kind.failures(sub, job, left)
    return None, landed


def drive(
    batch: JobBatch,
    launch: Callable[[Job, dict[str, Any]], None],
    next_ended: Callable[[], tuple[Job, Attempt]],
    progress: SubmitProgress | None,
) -> None:
    """Run every job of ``batch`` to its end: ``launch(job, spec)`` starts an attempt,
    ``next_ended()`` waits for one to end; each ended attempt goes through
    :func:`finish_attempt` (its output folder removed then), and a job with runs left is
    launched again. The record is saved after every attempt."""
    sub, store, kind = batch.sub, batch.store, batch.kind
    assert store is not None
    units = {j.name: kind.units(batch.specs[j.name]) for j in sub.jobs}
    total, done, running = sum(units.values()), 0, 0
    for job in sub.jobs:
        launch(job, start_attempt(job, batch.specs[job.name]))
        running += 1
    sub.save(store.root)
    while running:
        job, attempt = next_ended()
        running -= 1
        try:
            again, _ = finish_attempt(sub, job, store, kind, attempt)
        finally:
            discard(attempt)
        if again is not None:
            launch(job, start_attempt(job, again))
            running += 1
        elif job.state == "complete":
            done += units[job.name]
        sub.save(store.root)
        if progress:
            progress(done, total, f"{job.name} {job.state}")


def write_specs(sub: Submission, specs: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """The plainest dry run: ``submission.json`` and one JSON spec per job."""
    with staging_dir(Path(out), replace=True) as tmp:
        atomic_write_json(tmp / "submission.json", sub.to_dict())
        for name, spec in specs.items():
            atomic_write_json(tmp / "specs" / f"{name}.json", spec)
    return ["submission.json"] + [f"specs/{n}.json" for n in specs]


class Backend:
    """Where ``mlvar submit`` runs its jobs. One subclass per backend, registered by
    name in :mod:`mlvar.backends.registry`; a subclass sets the class attributes and
    overrides what differs.

    Parameters
    ----------
    config
        The resolved configuration (its ``[backend.<name>]`` table and ``[submit]``).
    """

    name: ClassVar[str] = ""
    #: one line for ``--backend``'s help
    summary: ClassVar[str] = ""
    #: results landed before :meth:`submit` returns (else: follow with status/download)
    synchronous: ClassVar[bool] = True
    #: what a dry run adds to the plan, for the CLI ("" for nothing)
    dry_run_note: ClassVar[str] = ""

    def __init__(self, config: Config) -> None:
        self.config = config

    def check(self, dry_run: bool, device: str = "cpu") -> None:
        """Refuse, with one line, what would make the submission fail: a missing extra
        or setting, a cluster that does not answer. Writes nothing."""

    def plan_notes(self, device: str, workers: int | None) -> list[str]:
        """Lines to show with the plan of a submission computing on ``device`` with
        ``--workers`` ``workers`` (the local backend: how its workers share the GPUs)."""
        return []

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around :meth:`submit`, :meth:`refresh` and :meth:`download`: connect and
        disconnect (a Ray instance, an Azure ML client)."""
        yield

    def write_dry_run(self, batch: JobBatch, out: Path) -> list[str]:
        """Write what would be submitted to ``out`` (replacing it); returns the files
        written (relative). The store is not touched."""
        return write_specs(batch.sub, batch.specs, out)

    def submit(self, batch: JobBatch, progress: SubmitProgress | None = None) -> None:
        """Run (synchronous) or submit (asynchronous) every job of ``batch``, recording
        their states, attempts and references in ``batch.sub``."""
        raise NotImplementedError

    def refresh(self, sub: Submission, store: ExperimentStore) -> None:
        """Update the jobs' states from the cluster (asynchronous backends)."""

    def download(self, sub: Submission, store: ExperimentStore) -> ImportResult:
        """Land what the jobs wrote that is not in the store yet; a synchronous backend
        landed everything as it finished, so this lists what is there."""
        from mlvar.backends.kinds import kind_of

        kind = kind_of({"kind": sub.kind})
        result = kind.empty_result()
        result.skipped = [name for job in sub.jobs for name in kind.landed(store, sub, job)]
        return result
