"""Import predictions made elsewhere into a run store (``mlvar analyze import``).

The input folder holds one ``<run-name>.npy`` per run (``[n, C]`` logits, or
probabilities with ``probs=True``), ``labels.npy`` (``[n]`` integers), and optionally
``affected.npy`` (``[n]`` bool or 0/1) and ``ids.npy`` (``[n]`` unique integers; default
``0..n-1``). Every other ``.npy`` is a run. The result is an ordinary experiment:
``experiment.json`` with dataset ``"imported"``, one split, and per run a ``run.json``
with ``config = {"source": "import"}`` (so the runs count as one configuration) and the
seed parsed from the run name's trailing digits (``seed7`` -> 7), else ``null``.

Logits are stored unchanged. Probabilities are stored as log-probabilities
``ln(max(p, tiny))`` (float64 when the input is float64, else float32; ``tiny`` is that
type's smallest normal number, so an exact 0 becomes about ``1e-38``): the analysis
applies softmax, which gives back ``p / sum(p)``, the input to within float32 rounding.

Everything is checked before anything is written, and the experiment is built in a
temporary folder renamed into place at the end: on any error nothing is written.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar import __version__
from mlvar.errors import MlvarError
from mlvar.store import RUN_ID_RE, ExperimentStore, check_experiment_name

RESERVED = ("labels", "affected", "ids")
_TRAILING_INT = re.compile(r"(\d+)$")
_ROWS = 65536  # rows per block when checking values


@dataclass
class ImportResult:
    experiment: str
    path: str
    split: str
    runs: list[str]
    n_samples: int
    n_classes: int
    n_affected: int
    probs: bool
    replaced: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def seed_from_name(name: str) -> int | None:
    """The trailing integer of a run name (``run-0007`` -> 7), else None."""
    match = _TRAILING_INT.search(name)
    return int(match.group(1)) if match else None


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MlvarError(
            f"{path} is not a readable .npy array: {exc}", "save it with numpy.save"
        ) from None


def _check_values(path: Path, array: np.ndarray, probs: bool) -> None:
    """Finite values; with ``probs`` non-negative rows summing to 1, block by block."""
    tol = 1e-2 if array.dtype.itemsize < 4 else 1e-3
    for start in range(0, array.shape[0], _ROWS):
        block = np.asarray(array[start : start + _ROWS], dtype=np.float64)
        bad = ~np.isfinite(block)
        if bad.any():
            row = start + int(np.argwhere(bad)[0][0])
            raise MlvarError(
                f"{path.name} holds NaN or infinite values (first in row {row})",
                "export finite logits or probabilities",
            )
        if probs:
            if (block < 0).any():
                row = start + int(np.argwhere(block < 0)[0][0])
                raise MlvarError(
                    f"{path.name} holds negative probabilities (first in row {row})",
                    "pass logits without --probs, or export probabilities",
                )
            sums = block.sum(axis=1)
            off = np.abs(sums - 1.0) > tol
            if off.any():
                row = int(np.argmax(off))
                raise MlvarError(
                    f"{path.name}: probabilities of row {start + row} sum to "
                    f"{sums[row]:.6g}, not 1 (tolerance {tol:g})",
                    "these look like logits: import them without --probs",
                )


def _stored(array: np.ndarray, probs: bool) -> np.ndarray:
    if not probs:
        return np.asarray(array)
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    p = np.asarray(array, dtype=dtype)
    return np.log(np.maximum(p, np.finfo(dtype).tiny))


def import_predictions(
    source: Path,
    runs_root: Path,
    name: str,
    split: str = "test",
    probs: bool = False,
    class_names: list[str] | None = None,
    force: bool = False,
) -> ImportResult:
    """Import the predictions in ``source`` as experiment ``name`` (see module doc)."""
    source = Path(source)
    check_experiment_name(name)
    if not RUN_ID_RE.match(split):
        raise MlvarError(f"invalid split name '{split}'", "use e.g. test, val or train")
    if not source.is_dir():
        raise MlvarError(f"{source} is not a folder", "pass the folder holding the .npy files")
    runs_root = Path(runs_root)
    exists = (runs_root / name).exists()
    if exists and not force:
        raise MlvarError(
            f"experiment '{name}' already exists in {runs_root}",
            "choose another --name, or pass --force to replace it",
        )
    labels_file = source / "labels.npy"
    if not labels_file.is_file():
        raise MlvarError(
            f"{source} has no labels.npy", "save the true labels as labels.npy ([n] integers)"
        )
    labels = np.asarray(_load(labels_file))
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise MlvarError(
            f"labels.npy must be a 1-D integer array, got shape {labels.shape} dtype "
            f"{labels.dtype}",
            "save one integer class index per sample",
        )
    n = labels.shape[0]
    if n == 0:
        raise MlvarError("labels.npy is empty", "export at least one sample")
    affected = np.zeros(n, dtype=bool)
    if (source / "affected.npy").is_file():
        raw = np.asarray(_load(source / "affected.npy"))
        if raw.shape != (n,):
            raise MlvarError(
                f"affected.npy has shape {raw.shape}, labels.npy has shape {labels.shape}",
                "save one affected flag per sample",
            )
        if raw.dtype != bool and not (
            np.issubdtype(raw.dtype, np.number) and np.isin(raw, [0, 1]).all()
        ):
            raise MlvarError(
                "affected.npy must hold booleans or 0/1", "save a bool array, one per sample"
            )
        affected = raw.astype(bool)
    ids = np.arange(n, dtype=np.int64)
    if (source / "ids.npy").is_file():
        raw = np.asarray(_load(source / "ids.npy"))
        if raw.shape != (n,):
            raise MlvarError(
                f"ids.npy has shape {raw.shape}, labels.npy has shape {labels.shape}",
                "save one integer id per sample",
            )
        if not np.issubdtype(raw.dtype, np.integer) or np.unique(raw).size != n:
            raise MlvarError("ids.npy must hold unique integers", "save one distinct id per sample")
        ids = raw.astype(np.int64)
    run_files = sorted(p for p in source.glob("*.npy") if p.is_file() and p.stem not in RESERVED)
    if not run_files:
        raise MlvarError(
            f"{source} holds no run files",
            "save one <run-name>.npy of [n, C] logits (or probabilities) per run",
        )
    first_shape = None
    arrays = {}
    for path in run_files:
        if not RUN_ID_RE.match(path.stem):
            raise MlvarError(
                f"run file name '{path.name}' is not a valid run name",
                "use letters, digits, '.', '_' and '-', starting with a letter or digit",
            )
        array = _load(path)
        if array.ndim != 2 or array.shape[0] != n:
            raise MlvarError(
                f"{path.name} has shape {array.shape}, but labels.npy has shape {labels.shape}",
                f"each run file must be [{n}, C]: one row per label",
            )
        if first_shape is None:
            first_shape = (run_files[0].name, array.shape)
        elif array.shape != first_shape[1]:
            raise MlvarError(
                f"{path.name} has shape {array.shape}, but {first_shape[0]} has shape "
                f"{first_shape[1]}",
                "every run must predict the same samples and classes",
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise MlvarError(f"{path.name} has dtype {array.dtype}", "save float16/32/64 logits")
        _check_values(path, array, probs)
        arrays[path.stem] = path
    n_classes = first_shape[1][1]
    if n_classes < 1:
        raise MlvarError("the run files have no classes", "save [n, C] arrays with C >= 1")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise MlvarError(
            f"labels.npy holds labels {labels.min()}..{labels.max()}, but the runs have "
            f"{n_classes} classes",
            f"labels must lie in [0, {n_classes - 1}]",
        )
    if class_names is None:
        class_names = [f"class_{i}" for i in range(n_classes)]
    elif len(class_names) != n_classes:
        raise MlvarError(
            f"--class-names gives {len(class_names)} names, but the runs have {n_classes} classes",
            "give one comma-separated name per class",
        )

    meta = {
        "name": name,
        "dataset": "imported",
        "scenario": {
            "name": name,
            "mode": "imported",
            "params": {},
            "description": f"predictions imported from {source}",
        },
        "model": "imported",
        "train": {},
        "class_names": list(class_names),
        "input": {},
        "source": {"path": str(source.resolve()), "probs": probs},
        "created_by": __version__,
    }
    samples = {
        split: {
            "sample_id": ids,
            "label": labels.astype(np.int64),
            "affected": affected,
            "group": np.full(n, -1, dtype=np.int64),
        }
    }
    runs_root.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".tmp-import-{name}-", dir=runs_root))
    try:
        store = ExperimentStore.create(tmp_root, name, meta, samples)
        for run_id, path in arrays.items():
            array = _stored(_load(path), probs)
            store.write_run(
                run_id,
                {split: array},
                {
                    "seed": seed_from_name(run_id),
                    "config": {"source": "import"},
                    "source_file": path.name,
                },
            )
        final = runs_root / name
        if exists:
            old = tmp_root / ".old"
            os.replace(final, old)
            try:
                os.replace(tmp_root / name, final)
            except BaseException:
                os.replace(old, final)
                raise
        else:
            os.replace(tmp_root / name, final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return ImportResult(
        name,
        str(runs_root / name),
        split,
        list(arrays),
        n,
        n_classes,
        int(affected.sum()),
        probs,
        exists,
    )
