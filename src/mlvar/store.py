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

Every file is written atomically and ``run.json`` last, so a run folder without a valid
``run.json`` is an unfinished run: it is removed and redone, never read. The format is
documented in ``docs/run-store.md``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlvar.errors import MlvarError, closest
from mlvar.io import (
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    sha256_file,
    staging_dir,
)

STORE_FORMAT = 1
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SAMPLE_COLUMNS = ("sample_id", "label", "affected", "group")
RUN_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DYNAMICS_FILE = "train.dynamics.npy"
"""Optional per-epoch train logits of a run, ``[E, n_train, C]`` (float16 or float32)."""


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
    return pa.table(
        {
            "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)),
            "label": pa.array(np.asarray(label, dtype=np.int64)),
            "affected": pa.array(np.asarray(affected, dtype=bool)),
            "group": pa.array(np.asarray(group, dtype=np.int64)),
        }
    )


def parquet_bytes(table: pa.Table) -> bytes:
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
        """
        check_experiment_name(name)
        root = Path(runs_root) / name
        meta = dict(meta, store_format=STORE_FORMAT, splits=list(samples))
        with staging_dir(root) as tmp:
            for split, cols in samples.items():
                table = _samples_table(*(cols[c] for c in SAMPLE_COLUMNS))
                atomic_write_bytes(tmp / "samples" / f"{split}.parquet", parquet_bytes(table))
            (tmp / "runs").mkdir()
            atomic_write_json(tmp / "experiment.json", meta)
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
        return pq.read_table(self.root / "samples" / f"{split}.parquet").to_pandas()

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def runs(self, verify: bool = False) -> list[RunRecord]:
        """The finished runs, sorted by run id.

        A folder without a readable ``run.json`` with ``status == "complete"`` is not a
        run. With ``verify``, a run whose arrays fail their sha256 is skipped with a
        warning that names it.
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
        """Run folders left by a killed process (no complete ``run.json``)."""
        runs_dir = self.root / "runs"
        if not runs_dir.is_dir():
            return []
        return [p for p in sorted(runs_dir.iterdir()) if p.is_dir() and read_run(p) is None]

    def write_run(
        self,
        run_id: str,
        logits: dict[str, np.ndarray],
        meta: dict[str, Any],
        dynamics: np.ndarray | None = None,
        files: dict[str, tuple[bytes, dict[str, Any]]] | None = None,
        keep_folder: bool = False,
    ) -> RunRecord:
        """Write one run: every split's logits, then ``run.json`` (status complete) last.

        ``dynamics`` (optional): per-epoch train logits ``[E, n_train, C]``, written as
        ``train.dynamics.npy`` with ``run.json["dynamics_epochs"] = E``. ``files``
        (optional): more files of the run, ``name -> (content, info)``, e.g. the weights
        ``model.pt``; each is listed in ``run.json["arrays"]`` with its sha256 and ``info``.
        Any earlier unfinished folder of the same id is replaced, unless ``keep_folder``:
        then the run is written into it and its other files (an image run's checkpoint)
        stay for the caller to remove once ``run.json`` is there.
        """
        if not RUN_ID_RE.match(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        path = self.run_dir(run_id)
        if path.exists():
            if read_run(path) is not None:
                raise FileExistsError(f"run {run_id} of {self.name} is already complete")
            if not keep_folder:
                shutil.rmtree(path)
        arrays = {}
        for split, array in logits.items():
            expected = self.n_samples(split)
            if array.ndim != 2 or array.shape[0] != expected:
                raise ValueError(
                    f"{split} logits have shape {array.shape}, expected ({expected}, C)"
                )
            name = f"{split}.logits.npy"
            digest = atomic_save_npy(path / name, array)
            arrays[name] = {"sha256": digest, "shape": list(array.shape), "dtype": str(array.dtype)}
        if dynamics is not None:
            expected = self.n_samples("train") if "train" in self.splits else None
            if dynamics.ndim != 3 or dynamics.shape[0] < 1 or dynamics.shape[1] != expected:
                raise ValueError(
                    f"training dynamics have shape {dynamics.shape}, expected "
                    f"(epochs, {expected}, C)"
                )
            digest = atomic_save_npy(path / DYNAMICS_FILE, dynamics)
            arrays[DYNAMICS_FILE] = {
                "sha256": digest,
                "shape": list(dynamics.shape),
                "dtype": str(dynamics.dtype),
            }
            meta = dict(meta, dynamics_epochs=int(dynamics.shape[0]))
        for name, (content, info) in (files or {}).items():
            if name in arrays or name == "run.json" or not RUN_FILE_RE.match(name):
                raise ValueError(f"invalid run file name {name!r}")
            atomic_write_bytes(path / name, content)
            arrays[name] = {"sha256": hashlib.sha256(content).hexdigest(), **info}
        meta = dict(meta, run_id=run_id, status="complete", arrays=arrays)
        atomic_write_json(path / "run.json", meta)
        return RunRecord(run_id, path, meta)

    def n_samples(self, split: str) -> int:
        """Number of samples of ``split`` (read from the parquet footer)."""
        return pq.read_metadata(self.root / "samples" / f"{split}.parquet").num_rows


def read_run(path: Path) -> RunRecord | None:
    """The run in ``path``, or None when it is unfinished (no complete ``run.json``)."""
    file = path / "run.json"
    if not path.is_dir() or not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("status") != "complete":
        return None
    return RunRecord(path.name, path, meta)


def list_experiments(runs_root: Path) -> list[str]:
    """Names of the experiments under ``runs_root``."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "experiment.json").is_file())


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
