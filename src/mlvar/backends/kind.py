"""The job-kind protocol: what every kind of backend job (a training pack, an analysis
shard, a saliency shard, ...) tells the backends, so each kind runs on each backend.

A job is described by a JSON *spec* (``kind``, ``job``, ``experiment``, what to compute,
and for an attempt its ``attempt`` number). A kind says

- what the worker reads: an experiment folder (``reads_experiment``: the store's own on a
  shared filesystem, else a copy of :meth:`JobKind.inputs`) and/or the prepared scenario
  (``reads_scenario``);
- how the worker runs it (:meth:`JobKind.run`, ``python -m mlvar.backends.worker``), into
  an output folder of its own;
- what that output is as bytes (:meth:`JobKind.output_files`, for backends without a
  shared filesystem) and how it lands in the store, verified and atomically
  (:meth:`JobKind.land`);
- whether it is done, and what is left to retry (:meth:`JobKind.remaining`), and how its
  failure is reported (:meth:`JobKind.failures`).

The kinds are registered in :mod:`mlvar.backends.kinds`; a new kind is one module with a
subclass of :class:`JobKind` and one line there.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.backends.spec import Job, Submission
from mlvar.backends.transfer import ImportResult
from mlvar.data.arrays import link_arrays, shared_dir
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore

Log = Callable[..., None]
#: The files that mark an output complete: written last, after every file they list.
COMMIT_FILES = ("run.json", "meta.json")


def quiet(*_args: Any, **_kwargs: Any) -> None:
    """A ``log`` that prints nothing (jobs run inside this process)."""


@dataclass
class JobText:
    """How a job presents itself on a cluster (Azure ML display name, description, tags)."""

    title: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)


class JobKind:
    """One kind of backend job (see the module docstring). Subclasses set the class
    attributes and implement the methods that raise ``NotImplementedError``."""

    #: the spec's, the Job's and the Submission's ``kind``
    name: str = ""
    #: the worker reads an experiment folder (``--experiment-dir``)
    reads_experiment: bool = False
    #: the worker reads the prepared scenario (``--data-root`` or ``--scenario-dir``)
    reads_scenario: bool = False
    #: the worker's output option, and the output's name on Azure ML
    out_flag: str = "--out"
    output_name: str = "out"

    # ---------------------------------------------------------------- what a job reads

    def inputs(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Path | bytes]:
        """The files of the experiment folder the job reads, as ``{relative path: source
        file or bytes}`` (shipped to backends without a shared filesystem)."""
        return {}

    def input_group(self, spec: dict[str, Any]) -> str:
        """Name of the input folder jobs with the same :meth:`inputs` share."""
        return str(spec["job"])

    def units(self, spec: dict[str, Any]) -> int:
        """Work units of a job (runs trained; 1 for a shard), for progress. (A job asks for
        the GPUs of one pack whatever its units: :mod:`mlvar.backends.gpus`.)"""
        return 1

    def describe(self, sub: Submission, spec: dict[str, Any]) -> JobText:
        raise NotImplementedError

    # ---------------------------------------------------------------- the worker

    def run(
        self,
        spec: dict[str, Any],
        out: Path,
        experiment_dir: Path | None,
        data_root: Path | None,
        log: Log = print,
    ) -> None:
        """Compute the job into the folder ``out`` (what the worker does). Raises
        :class:`MlvarError` for bad input, anything else for a failure."""
        raise NotImplementedError

    def run_in_store(
        self, spec: dict[str, Any], store: ExperimentStore, data_root: Path | None, work: Path
    ) -> Path | None:
        """Run the job in this process against ``store``; returns the folder to land
        (``None`` when the job wrote into the store itself)."""
        self.run(spec, work, store.root, data_root, quiet)
        return work

    def output_files(self, spec: dict[str, Any], out: Path) -> dict[str, bytes]:
        """The complete part of the output in ``out``, as ``{path relative to out: bytes}``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- landing

    def land(self, out: Path, store: ExperimentStore, spec: dict[str, Any]) -> ImportResult:
        """Move the complete, verified output in ``out`` into the store, atomically."""
        raise NotImplementedError

    def remaining(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The spec of what is still to do (``None``: the job is done)."""
        raise NotImplementedError

    def pending_text(self, left: dict[str, Any], landed: ImportResult | None) -> str:
        """Why a job that ended without an error is not done."""
        raise NotImplementedError

    def failures(self, sub: Submission, job: Job, left: dict[str, Any]) -> list[dict[str, Any]]:
        """The record of a job out of retries (runs by seed, or its shard)."""
        raise NotImplementedError

    def landed(self, store: ExperimentStore, sub: Submission, job: Job) -> list[str]:
        """What of ``job`` is in the store (run ids, or its shard)."""
        raise NotImplementedError

    def empty_result(self) -> ImportResult:
        return ImportResult()


def write_files(files: dict[str, bytes], root: Path) -> None:
    """Write ``{relative path: bytes}`` under ``root``, ``run.json``/``meta.json`` files
    last, refusing any path that would leave ``root``."""
    root = Path(root)
    for rel in sorted(files, key=lambda k: (Path(k).name in COMMIT_FILES, k)):
        parts = Path(rel).parts
        if not parts or rel.startswith(("/", "\\")) or any(p in ("..", "") for p in parts):
            raise MlvarError(f"refusing the path {rel!r} in a job's output", "a bad worker")
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[rel])


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


@contextlib.contextmanager
def scenario_root(
    data_root: Path | None,
    scenario_dir: Path | Sequence[Path] | None,
    scenario: str | Sequence[str],
    array_files: Sequence[Path] = (),
) -> Iterator[Path | None]:
    """A data root holding the prepared scenario ``scenario``: ``data_root``, or one made
    for the scenario folder ``scenario_dir`` itself (an input mount) and the shared arrays
    it reads (``array_files``, input mounts too; without them, those of the folder's own
    data root). A study's job passes several folders and their scenarios' names, in the
    same order."""
    if isinstance(scenario_dir, (str, Path)):
        dirs = [Path(scenario_dir)]
    else:
        dirs = [Path(d) for d in scenario_dir or []]
    names = [scenario] if isinstance(scenario, str) else list(scenario)
    if not dirs:
        yield None if data_root is None else Path(data_root)
        return
    if len(dirs) != len(names):
        raise MlvarError(
            f"{len(dirs)} --scenario-dir for the {len(names)} scenarios of the spec",
            "pass one --scenario-dir per scenario the job reads, in the spec's order",
        )
    if not array_files and len(dirs) == 1:
        with named(dirs[0], names[0]) as folder:
            yield folder.parent
        return
    with tempfile.TemporaryDirectory(prefix="mlvar-data-") as tmp:
        for folder, name in zip(dirs, names, strict=True):
            (Path(tmp) / name).symlink_to(folder.resolve(), target_is_directory=True)
        if array_files:
            link_arrays(shared_dir(tmp), array_files)
        elif shared_dir(dirs[0].resolve().parent).is_dir():  # the folders' own data root's
            shared_dir(tmp).symlink_to(shared_dir(dirs[0].resolve().parent))
        yield Path(tmp)


def worker_command(
    kind: JobKind,
    spec_file: str,
    out: str,
    experiment_dir: str | None = None,
    data_root: str | None = None,
    scenario_dir: str | Sequence[str] | None = None,
    python: str = "python",
    array_files: Sequence[str] = (),
) -> list[str]:
    """The worker's command line for a job of ``kind`` (paths as the job sees them;
    ``scenario_dir``: one folder, or a study's job's several, in its spec's order)."""
    cmd = [python, "-m", "mlvar.backends.worker", spec_file]
    if kind.reads_experiment and experiment_dir is not None:
        cmd += ["--experiment-dir", experiment_dir]
    if kind.reads_scenario and scenario_dir is not None:
        for folder in [scenario_dir] if isinstance(scenario_dir, str) else scenario_dir:
            cmd += ["--scenario-dir", folder]
        for file in array_files:
            cmd += ["--array-file", file]
    if kind.reads_scenario and data_root is not None:
        cmd += ["--data-root", data_root]
    return [*cmd, kind.out_flag, out]


def remove_empty(*folders: Path) -> None:
    """Remove each folder that is empty (in order: children first)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            Path(folder).rmdir()
