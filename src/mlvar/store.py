"""The run store: one folder per experiment, one sub-folder per finished run.

::

    <runs_root>/<experiment>/
      experiment.json          dataset, scenario (name, manifest sha256), model, training
                               config, class names, splits
      samples/<split>.parquet  sample_id, label, affected, group: the row order of every
                               run's arrays
      runs/<run-id>/run.json   seed, vary, status="complete", timings, metrics, and the
                               sha256 of each array (written last)
      runs/<run-id>/<split>.logits.npy   [n_samples, n_classes]
      runs/<run-id>/train.dynamics.npy   optional: per-epoch train logits [E, n_train, C]
      runs/<run-id>/model.pt   the trained weights (torch.save of the state_dict; load
                               with torch.load(weights_only=True))

Every file is written atomically and ``run.json`` last, and a run is built in a temporary
folder that is renamed into place in one step, so a run folder without a valid
``run.json`` is an unfinished run (an image run's checkpoint, or a folder of another tool):
it is resumed or removed and redone, never read. Several processes may write one
experiment at once: each run is claimed through a lease (:class:`RunClaims`,
``locks/<run-id>.lock``). The format and these guarantees are documented in
``docs/run-store.md``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlvar.errors import MlvarError, closest
from mlvar.io import (
    _fsync_dir,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    scratch_dir,
    sha256_file,
    staging_dir,
)
from mlvar.lease import Lease

if TYPE_CHECKING:  # pandas and pyarrow load where tables are read or written: opening a
    # store, listing its runs and the CLI's checks of names do without them
    import pandas as pd
    import pyarrow as pa

STORE_FORMAT = 1
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SAMPLE_COLUMNS = ("sample_id", "label", "affected", "group")
RUN_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DYNAMICS_FILE = "train.dynamics.npy"
"""Optional per-epoch train logits of a run, ``[E, n_train, C]`` (float16 or float32)."""
LOCKS_DIR = "locks"
"""``<experiment>/locks/<run-id>.lock``: the lease of a run a process is writing."""
WAIT_POLL_S = 1.0
CLAIMING_POLL_S = 0.02
"""Seconds between two tries for the experiment's claiming lease (held for milliseconds)."""
CLAIMING_LEASE = "claiming.lock"
EXPERIMENT_LEASE = "experiment.lock"
"""The lease a writer holds while it rewrites ``experiment.json`` (adds a split)."""
"""The lease a writer holds while it claims one pack of runs (see :meth:`RunClaims.packs`)."""
"""Seconds between two looks at the runs another process holds."""


def run_id_for(index: int) -> str:
    """The run id of run ``index`` of an mlvar-trained experiment."""
    return f"run-{index:04d}"


def check_experiment_name(name: str) -> str:
    """Experiment names become folder names: letters, digits, '.', '_' and '-'."""
    if not RUN_ID_RE.match(name) or name in (".", ".."):
        raise MlvarError(
            f"invalid experiment name '{name}'",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


@dataclass
class RunRecord:
    """A finished run: its folder and ``run.json``."""

    run_id: str
    path: Path
    meta: dict[str, Any]

    @property
    def seed(self) -> int | None:
        return self.meta.get("seed")

    def logits_path(self, split: str) -> Path:
        return self.path / f"{split}.logits.npy"

    def verify(self, split: str | None = None) -> list[str]:
        """Names of the arrays (of ``split``, or all) whose sha256 differs from ``run.json``."""
        bad = []
        for name, info in self.meta.get("arrays", {}).items():
            if split is not None and name != f"{split}.logits.npy":
                continue
            file = self.path / name
            if not file.is_file() or sha256_file(file) != info.get("sha256"):
                bad.append(name)
        return bad

    def load_logits(self, split: str, mmap: bool = True) -> np.ndarray:
        """The ``[n, C]`` logits of ``split`` (memory-mapped by default)."""
        return np.load(self.logits_path(split), mmap_mode="r" if mmap else None, allow_pickle=False)

    @property
    def dynamics_path(self) -> Path:
        """``train.dynamics.npy``: per-epoch train logits ``[E, n_train, C]``, if recorded."""
        return self.path / DYNAMICS_FILE

    @property
    def has_dynamics(self) -> bool:
        """Whether ``run.json`` lists per-epoch train logits."""
        return DYNAMICS_FILE in self.meta.get("arrays", {})

    def load_dynamics(self, mmap: bool = True) -> np.ndarray:
        """The ``[E, n_train, C]`` per-epoch train logits (memory-mapped by default)."""
        return np.load(self.dynamics_path, mmap_mode="r" if mmap else None, allow_pickle=False)


def _samples_table(sample_id, label, affected, group) -> pa.Table:
    import pyarrow as pa

    return pa.table(
        {
            "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)),
            "label": pa.array(np.asarray(label, dtype=np.int64)),
            "affected": pa.array(np.asarray(affected, dtype=bool)),
            "group": pa.array(np.asarray(group, dtype=np.int64)),
        }
    )


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class ExperimentStore:
    """One experiment's folder in the run store."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @classmethod
    def create(
        cls,
        runs_root: Path,
        name: str,
        meta: dict[str, Any],
        samples: dict[str, dict[str, np.ndarray]],
    ) -> ExperimentStore:
        """Create the experiment folder atomically with ``experiment.json`` and samples.

        ``samples[split]`` has arrays ``sample_id``, ``label``, ``affected``, ``group``.
        If another process creates the same experiment at the same time, the first to
        rename its folder into place wins and the others get that experiment (open it:
        its ``meta`` may differ from ``meta``; the caller checks the setup).
        """
        check_experiment_name(name)
        root = Path(runs_root) / name
        meta = dict(meta, store_format=STORE_FORMAT, splits=list(samples))
        try:
            with staging_dir(root) as tmp:
                for split, cols in samples.items():
                    table = _samples_table(*(cols[c] for c in SAMPLE_COLUMNS))
                    atomic_write_bytes(tmp / "samples" / f"{split}.parquet", parquet_bytes(table))
                (tmp / "runs").mkdir()
                atomic_write_json(tmp / "experiment.json", meta)
        except OSError as exc:
            # Another process created the experiment first (the rename onto its folder
            # fails): this one is discarded and that one opened; the caller compares setups.
            made = (root / "experiment.json").is_file()
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and made:
                return cls.open(runs_root, name)
            raise
        return cls(root, meta)

    @classmethod
    def open(cls, runs_root: Path, name: str) -> ExperimentStore:
        """Open an existing experiment; raise :class:`MlvarError` if it is not there."""
        root = Path(runs_root) / name
        file = root / "experiment.json"
        if not file.is_file():
            known = list_experiments(runs_root)
            near = closest(name, known)
            if near:
                hint = f"did you mean '{near}'?"
            elif known:
                hint = "experiments here: " + ", ".join(known)
            else:
                hint = "train one with 'mlvar train' or import predictions"
            raise MlvarError(f"unknown experiment '{name}' in {runs_root}", hint)
        try:
            meta = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise MlvarError(
                f"{file} is corrupt: {exc}", "remove the experiment and retrain"
            ) from None
        return cls(root, meta)

    def samples(self, split: str) -> pd.DataFrame:
        """The sample table of ``split`` in the row order of every run's arrays."""
        if split not in self.splits:
            raise MlvarError(
                f"experiment '{self.name}' has no split '{split}'",
                "valid: " + ", ".join(self.splits),
            )
        import pyarrow.parquet as pq

        return pq.read_table(self.root / "samples" / f"{split}.parquet").to_pandas()

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def runs(self, verify: bool = False) -> list[RunRecord]:
        """The finished runs, sorted by run id.

        A folder without a readable ``run.json`` with ``status == "complete"`` is not a
        run, nor is one whose ``run.json`` names a file outside it (skipped with a warning
        that names it: :func:`read_run`). With ``verify``, a run whose arrays fail their
        sha256 is skipped with a warning that names it.
        """
        found = []
        runs_dir = self.root / "runs"
        if not runs_dir.is_dir():
            return []
        for path in sorted(runs_dir.iterdir()):
            record = read_run(path)
            if record is None:
                continue
            if verify:
                bad = record.verify()
                if bad:
                    warnings.warn(
                        f"skipping run {record.run_id} of {self.name}: "
                        f"sha256 mismatch in {', '.join(bad)}",
                        stacklevel=2,
                    )
                    continue
            found.append(record)
        return found

    def unfinished_run_dirs(self) -> list[Path]:
        """Run folders left by a killed process (no complete ``run.json``); another
        process may be writing one now (see :class:`RunClaims`)."""
        runs_dir = self.root / "runs"
        if not runs_dir.is_dir():
            return []
        return [
            p
            for p in sorted(runs_dir.iterdir())
            if p.is_dir() and RUN_ID_RE.match(p.name) and read_run(p) is None
        ]

    def lease(self, run_id: str) -> Lease:
        """The lease of run ``run_id`` (held by whichever process writes that run)."""
        return Lease(self.root / LOCKS_DIR / f"{run_id}.lock")

    def write_run(
        self,
        run_id: str,
        logits: dict[str, np.ndarray],
        meta: dict[str, Any],
        dynamics: np.ndarray | None = None,
        files: dict[str, tuple[bytes, dict[str, Any]]] | None = None,
    ) -> RunRecord:
        """Write one run: every split's logits, then ``run.json`` (status complete) last.

        ``dynamics`` (optional): per-epoch train logits ``[E, n_train, C]``, written as
        ``train.dynamics.npy`` with ``run.json["dynamics_epochs"] = E``. ``files``
        (optional): more files of the run, ``name -> (content, info)``, e.g. the weights
        ``model.pt``; each is listed in ``run.json["arrays"]`` with its sha256 and ``info``.

        The run is built in a temporary folder beside the others and renamed into place
        (:meth:`land_run`), replacing an unfinished folder of the same id (an image run's
        checkpoint) only once it is complete: an error (a full disk) leaves no new folder
        and the old one as it was. Raises :class:`FileExistsError` if the run is complete
        already (or becomes so meanwhile): a complete run is never replaced.
        """
        if not RUN_ID_RE.match(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        path = self.run_dir(run_id)
        if read_run(path) is not None:
            raise _complete_error(self, run_id)
        # Every check before the first byte is written.
        for split, array in logits.items():
            expected = self.n_samples(split)
            if array.ndim != 2 or array.shape[0] != expected:
                raise ValueError(
                    f"{split} logits have shape {array.shape}, expected ({expected}, C)"
                )
        if dynamics is not None:
            expected = self.n_samples("train") if "train" in self.splits else None
            if dynamics.ndim != 3 or dynamics.shape[0] < 1 or dynamics.shape[1] != expected:
                raise ValueError(
                    f"training dynamics have shape {dynamics.shape}, expected "
                    f"(epochs, {expected}, C)"
                )
        taken = {f"{split}.logits.npy" for split in logits} | {DYNAMICS_FILE, "run.json"}
        for name in files or {}:
            if name in taken or not RUN_FILE_RE.match(name):
                raise ValueError(f"invalid run file name {name!r}")
        arrays = {}
        with scratch_dir(path) as tmp:
            for split, array in logits.items():
                name = f"{split}.logits.npy"
                digest = atomic_save_npy(tmp / name, array)
                arrays[name] = {
                    "sha256": digest,
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                }
            if dynamics is not None:
                digest = atomic_save_npy(tmp / DYNAMICS_FILE, dynamics)
                arrays[DYNAMICS_FILE] = {
                    "sha256": digest,
                    "shape": list(dynamics.shape),
                    "dtype": str(dynamics.dtype),
                }
                meta = dict(meta, dynamics_epochs=int(dynamics.shape[0]))
            for name, (content, info) in (files or {}).items():
                atomic_write_bytes(tmp / name, content)
                arrays[name] = {"sha256": hashlib.sha256(content).hexdigest(), **info}
            meta = dict(meta, run_id=run_id, status="complete", arrays=arrays)
            atomic_write_json(tmp / "run.json", meta)
            if not self.land_run(tmp, run_id):
                raise _complete_error(self, run_id)
        return RunRecord(run_id, path, meta)

    def land_run(self, tmp: Path, run_id: str) -> bool:
        """Move the complete run folder ``tmp`` (same filesystem) into place as ``run_id``.

        An unfinished folder of that id is replaced (moved aside, then removed); a complete
        one never is: then ``tmp`` stays where it is and the answer is False. A run lands
        in one rename, so readers see either no run or the whole run.
        """
        final = self.run_dir(run_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            if read_run(final) is not None:
                return False
            old = final.with_name(f".tmp-{run_id}-{secrets.token_hex(4)}-old")
            try:
                os.rename(final, old)
            except FileNotFoundError:
                old = None  # removed meanwhile
        try:
            # Renaming onto a folder that is there again (another writer landed) fails.
            os.rename(tmp, final)
        except OSError as exc:
            if old is not None:  # the unfinished folder goes back, unless a run landed
                with contextlib.suppress(OSError):
                    os.rename(old, final)
                shutil.rmtree(old, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
        return True

    @contextlib.contextmanager
    def holding(self, run_id: str | None = None) -> Iterator[None]:
        """Hold the lease of run ``run_id`` (None: of ``experiment.json``) for the block,
        waiting (polling) while another process holds it; a stale lease is broken."""
        lease = self.lease(run_id) if run_id else Lease(self.root / LOCKS_DIR / EXPERIMENT_LEASE)
        while not lease.acquire():
            time.sleep(WAIT_POLL_S if run_id else CLAIMING_POLL_S)
        try:
            yield
        finally:
            lease.release()

    def add_split(
        self, split: str, samples: dict[str, np.ndarray], meta_updates: dict[str, Any]
    ) -> None:
        """Add the split ``split`` to the experiment: ``samples/<split>.parquet`` (columns
        :data:`SAMPLE_COLUMNS`), then ``experiment.json`` with ``split`` in ``splits`` and
        ``meta_updates`` merged into its dict-valued keys (``external_splits``), each file
        atomically, under the experiment's lease (:meth:`holding`). A split the
        experiment has already is left as it is (the caller checks it holds the same
        data). :attr:`meta` is re-read first, so splits other processes added stay.
        """
        with self.holding():
            self.meta = json.loads((self.root / "experiment.json").read_text())
            if split in self.splits:
                return
            table = _samples_table(*(samples[c] for c in SAMPLE_COLUMNS))
            atomic_write_bytes(self.root / "samples" / f"{split}.parquet", parquet_bytes(table))
            meta = dict(self.meta, splits=[*self.splits, split])
            for key, entries in meta_updates.items():
                meta[key] = {**(meta.get(key) or {}), **entries}
            atomic_write_json(self.root / "experiment.json", meta)
            self.meta = meta

    def add_run_logits(
        self, run_id: str, split: str, logits: np.ndarray, metrics: dict[str, float]
    ) -> RunRecord:
        """Add ``<split>.logits.npy`` to the complete run ``run_id`` (the caller holds its
        lease: :meth:`holding`): the array is written atomically, then ``run.json`` is
        rewritten atomically listing it (sha256, shape, dtype) and ``metrics``. Until
        ``run.json`` is replaced the run is what it was, so a kill in between leaves an
        unlisted file that the next call replaces. Raises :class:`FileExistsError` when
        the run lists that array already, ValueError when the shape does not fit."""
        path = self.run_dir(run_id)
        record = read_run(path)
        if record is None:
            raise ValueError(f"run {run_id} of {self.name} is not complete")
        name = f"{split}.logits.npy"
        if name in record.meta.get("arrays", {}):
            raise FileExistsError(errno.EEXIST, f"run {run_id} has {name} already", str(path))
        expected = (self.n_samples(split), len(self.class_names))
        if logits.shape != expected:
            raise ValueError(f"{split} logits have shape {logits.shape}, expected {expected}")
        digest = atomic_save_npy(path / name, logits)
        info = {"sha256": digest, "shape": list(logits.shape), "dtype": str(logits.dtype)}
        meta = dict(record.meta)
        meta["arrays"] = {**meta.get("arrays", {}), name: info}
        meta["metrics"] = {**meta.get("metrics", {}), **metrics}
        atomic_write_json(path / "run.json", meta)
        return RunRecord(run_id, path, meta)

    def n_samples(self, split: str) -> int:
        """Number of samples of ``split`` (read from the parquet footer)."""
        import pyarrow.parquet as pq

        return pq.read_metadata(self.root / "samples" / f"{split}.parquet").num_rows


class RunClaims:
    """The runs of one experiment this process is writing, each held through its lease.

    Any number of processes (two terminals, Slurm jobs on a shared filesystem) may train
    one experiment at once. Each claims a run before it trains it, by taking the run's
    lease (``locks/<run-id>.lock``, :mod:`mlvar.lease`); only the holder removes or
    resumes the run's unfinished folder. A run another process holds is waited for: it
    ends finished by that process (taken as finished here), or its lease goes stale
    (that process died) and this one claims and trains it. Waiting never happens while
    holding a lease, so two processes cannot wait for each other. Leases still held
    when the ``with`` block ends are released.

    Parameters
    ----------
    store
        The experiment.
    keep
        ``keep(folder)``: whether an unfinished run folder is kept for resuming (an image
        run's checkpoint) rather than removed. Default: removed.
    on_wait
        Called as ``on_wait(run_id, holder)`` (holder ``host:pid``) before each pause
        while every run left is held by another process.
    """

    def __init__(
        self,
        store: ExperimentStore,
        keep: Callable[[Path], bool] | None = None,
        on_wait: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.keep = keep
        self.on_wait = on_wait
        self.finished: list[str] = []  # complete when claimed: another process wrote them
        self.cleaned: list[str] = []  # unfinished folders removed
        self._held: dict[str, Lease] = {}

    def __enter__(self) -> RunClaims:
        return self

    def __exit__(self, *exc: object) -> None:
        for run_id in list(self._held):
            self.release(run_id)

    def claim(self, run_id: str) -> bool | None:
        """Claim ``run_id`` without waiting: True when this process holds it now (what a
        killed writer left of it removed, or kept by ``keep``), False when another process
        holds it, None when it is complete."""
        if run_id in self._held:
            return True
        path = self.store.run_dir(run_id)
        if read_run(path) is not None:
            self._remove_staging(run_id, old_only=True)
            return None
        lease = self.store.lease(run_id)
        if not lease.acquire():
            return False
        if read_run(path) is not None:  # finished by the process that held it just now
            lease.release()
            return None
        self._held[run_id] = lease
        self._remove_staging(run_id)
        if path.is_dir() and not (self.keep is not None and self.keep(path)):
            shutil.rmtree(path)
            self.cleaned.append(run_id)
        return True

    def release(self, run_id: str) -> None:
        """Give up the claim on ``run_id`` (its lease)."""
        lease = self._held.pop(run_id, None)
        if lease is not None:
            lease.release()

    def packs(self, indices: Sequence[int], size: int) -> Iterator[list[int]]:
        """Claim the runs ``indices`` in order and yield them in packs of at most ``size``
        claimed runs, each pack released when the next is asked for.

        Runs another process holds are tried again after the others, and waited for
        (polled every :data:`WAIT_POLL_S` s) once nothing else is left; those it finishes
        are listed in :attr:`finished` and never yielded.
        """
        todo = list(indices)
        while todo:
            pack: list[int] = []
            busy: list[int] = []
            with self._claiming():
                for index in todo:
                    state = self.claim(run_id_for(index)) if len(pack) < size else False
                    if state is None:
                        self.finished.append(run_id_for(index))
                    elif state:
                        pack.append(index)
                    else:
                        busy.append(index)
            todo = busy
            if pack:
                try:
                    yield pack
                finally:
                    for index in pack:
                        self.release(run_id_for(index))
            elif todo:
                if self.on_wait is not None:
                    first = run_id_for(todo[0])
                    self.on_wait(first, self.store.lease(first).holder())
                time.sleep(WAIT_POLL_S)

    @contextlib.contextmanager
    def _claiming(self) -> Iterator[None]:
        """Hold the experiment's claiming lease while one pack is claimed, so that two
        writers starting together do not claim alternate runs: each pack is then the
        same as one writer's (a run's ``pack_size`` does not depend on who else ran)."""
        lease = Lease(self.store.root / LOCKS_DIR / CLAIMING_LEASE)
        while not lease.acquire():
            time.sleep(CLAIMING_POLL_S)
        try:
            yield
        finally:
            lease.release()

    def _remove_staging(self, run_id: str, old_only: bool = False) -> None:
        """Remove the temporary folders of ``run_id`` a killed writer left (only a holder
        of the run's lease writes them; an ``-old`` one is garbage once the run is
        complete)."""
        pattern = re.compile(rf"^\.tmp-{re.escape(run_id)}-[a-z0-9_]{{8}}(-old)?$")
        runs_dir = self.store.root / "runs"
        if not runs_dir.is_dir():
            return
        for path in runs_dir.iterdir():
            match = pattern.match(path.name)
            if match and (match.group(1) or not old_only):
                shutil.rmtree(path, ignore_errors=True)


def _complete_error(store: ExperimentStore, run_id: str) -> FileExistsError:
    return FileExistsError(
        errno.EEXIST,
        f"run {run_id} of {store.name} is already complete",
        str(store.run_dir(run_id)),
    )


def plain_file_name(name: object) -> bool:
    """Whether ``name`` names a file directly inside a folder: no folder part, not ``.``
    or ``..``, nothing absolute (what ``run.json`` may list as a run's arrays)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def inspect_run(path: Path) -> tuple[RunRecord | None, str]:
    """The run in ``path`` and ``""``, or None and why it is not a run.

    Not runs: a folder whose name is not a run id (``.tmp-*``: a run being written), one
    without a complete ``run.json`` (unfinished), and one whose ``run.json`` lists an
    array that is not a plain file name in the folder (``../../x.npy``): it is never
    opened.
    """
    path = Path(path)
    file = path / "run.json"
    if not RUN_ID_RE.match(path.name):
        return None, "not a run folder"
    if not path.is_dir() or not file.is_file():
        return None, "unfinished (no complete run.json)"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError):
        return None, "unfinished (no complete run.json)"
    if not isinstance(meta, dict) or meta.get("status") != "complete":
        return None, "unfinished (no complete run.json)"
    arrays = meta.get("arrays", {})
    if not isinstance(arrays, dict) or not all(isinstance(v, dict) for v in arrays.values()):
        return None, "run.json 'arrays' is not a table of files"
    unsafe = [name for name in arrays if not plain_file_name(name)]
    if unsafe:
        return None, f"run.json lists {unsafe[0]!r}, not a plain file name in the run folder"
    return RunRecord(path.name, path, meta), ""


def read_run(path: Path) -> RunRecord | None:
    """The run in ``path``, or None when it is unfinished (no complete ``run.json``) or not
    a run; one whose ``run.json`` names files outside its folder is skipped with a warning
    that names it (:func:`inspect_run`)."""
    record, why = inspect_run(path)
    if record is None and why.startswith("run.json"):
        warnings.warn(f"skipping run {Path(path).name} ({path}): {why}", stacklevel=2)
    return record


def list_experiments(runs_root: Path) -> list[str]:
    """Names of the experiments under ``runs_root``."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        # not a ``.tmp-*`` folder: an experiment being created
        if RUN_ID_RE.match(p.name) and (p / "experiment.json").is_file()
    )


# ---------------------------------------------------------------- experiment identity

IDENTITY_KEYS: tuple[str, ...] = ("dataset", "scenario.manifest_sha256", "model", "train")
"""The ``experiment.json`` keys (dotted) that make an experiment what it is: runs join an
experiment (trained again under its name, or downloaded from a backend) only when every
one of them agrees."""


def _dotted(meta: Any, key: str) -> Any:
    for part in key.split("."):
        meta = meta.get(part) if isinstance(meta, dict) else None
    return meta


def identity_diffs(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Where two ``experiment.json`` differ in identity (:data:`IDENTITY_KEYS`).

    Returns
    -------
    list[tuple[str, Any, Any]]
        ``(dotted key, old value, new value)``, in key order; a key whose values are both
        dicts (``train``) gives one entry per differing sub-key (``train.epochs``, sorted),
        and a missing key or sub-key reads as None. Empty when the identities agree.
    """
    diffs = []
    for key in IDENTITY_KEYS:
        a, b = _dotted(old, key), _dotted(new, key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                (f"{key}.{k}", a.get(k), b.get(k))
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        else:
            diffs.append((key, a, b))
    return diffs
