"""Prepared scenarios on disk: ``<data_root>/<name>/manifest.json`` and one ``<split>.npz``
per split. Loading a split (:meth:`Scenario.load`) gives arrays ``x``, ``y`` (int64),
``id`` (int64), ``affected`` (bool) and ``group`` (int64, -1 where a dataset has no groups)
whatever the folder's format:

- format 2 (what ``mlvar data prepare`` writes): each ``<split>.npz`` holds ``y``, ``id``,
  ``affected``, ``group`` and, instead of the images or features, ``x_array`` (int16) and
  ``x_row`` (int64): where each row's ``x`` is, as an index into the manifest's
  ``storage.arrays`` and a row of that array. The arrays are in the data root's shared
  folder (:mod:`mlvar.data.arrays`): the dataset's source, which every scenario of it
  shares, and the rows this scenario changed. The manifest lists the sha256 of every array
  and of every split file, so its own sha256 (the experiment identity) changes whenever the
  data a scenario yields changes.
- format 1 (older folders, and scenarios written without a source, as tests build them):
  each ``<split>.npz`` holds ``x`` itself.

A scenario folder is built under a temporary name and renamed into place, so a folder
under a scenario's name is always complete; the shared arrays it reads are written first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar import __version__
from mlvar.data.arrays import (
    SHARED_DIR,
    ArrayRef,
    SourceRows,
    missing_arrays,
    open_array,
    store_array,
)
from mlvar.errors import MlvarError, closest
from mlvar.io import atomic_write_bytes, dumps_json, load_npz, npz_bytes, staging_dir

#: The format of a folder that holds its arrays itself.
FORMAT_VERSION = 1
#: The format of a folder whose ``x`` is rows of shared arrays.
SHARED_FORMAT_VERSION = 2
SPLIT_ARRAYS = ("x", "y", "id", "affected", "group")
#: What a format-2 split file holds.
SHARED_SPLIT_ARRAYS = ("x_array", "x_row", "y", "id", "affected", "group")


@dataclass
class SplitData:
    """One split of a prepared scenario."""

    x: np.ndarray  # uint8 NHWC images or float32 features
    y: np.ndarray  # int64 labels
    id: np.ndarray  # int64 sample ids, stable across scenarios of one source
    affected: np.ndarray  # bool: the injected change touches this sample
    group: np.ndarray  # int64 subgroup (fine class, cluster); -1 when none

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Scenario:
    """A prepared scenario: its folder and manifest."""

    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256((self.path / "manifest.json").read_bytes()).hexdigest()

    @property
    def data_root(self) -> Path:
        """The data root the scenario is in (where its shared arrays are)."""
        return self.path.parent

    @property
    def format_version(self) -> int:
        return int(self.manifest.get("format_version", FORMAT_VERSION))

    @property
    def arrays(self) -> list[ArrayRef]:
        """The shared arrays the scenario reads (none for a format-1 folder)."""
        storage = self.manifest.get("storage") or {}
        return [ArrayRef.from_manifest(entry) for entry in storage.get("arrays", [])]

    def files(self) -> dict[str, Path]:
        """Every file the scenario reads, by its path relative to the data root: the
        folder's files and the shared arrays (what a backend ships to a job)."""
        out = {f"{self.name}/{p.name}": p for p in sorted(self.path.iterdir()) if p.is_file()}
        for ref in self.arrays:
            out[f"{SHARED_DIR}/{ref.file_name}"] = ref.path(self.data_root)
        return out

    def check_storage(self) -> None:
        """Raise :class:`MlvarError` when a split file or a shared array the scenario reads
        is missing (sizes only; :meth:`load` checks the contents)."""
        files = [self.path / f"{split}.npz" for split in self.splits]
        lost = [file for file in files if not file.is_file()]
        lost += missing_arrays(self.data_root, self.arrays)
        if lost:
            raise MlvarError(
                f"scenario '{self.name}' lacks {', '.join(str(p) for p in lost)}",
                "prepare it again with 'mlvar data prepare ... --force'; a scenario folder "
                f"copied alone needs its data root's {SHARED_DIR}/ folder too",
            )

    def load(self, split: str) -> SplitData:
        """Load one split; raise :class:`MlvarError` if it, or a shared array it reads, is
        missing or not what the scenario was prepared with."""
        if split not in self.splits:
            raise MlvarError(
                f"scenario '{self.name}' has no split '{split}'",
                "valid: " + ", ".join(self.splits),
            )
        file = self.path / f"{split}.npz"
        shared = self.format_version >= SHARED_FORMAT_VERSION
        try:
            if shared:
                self._check_file(file)
            arrays = load_npz(file)
        except (OSError, ValueError) as exc:
            raise MlvarError(
                f"cannot read {file}: {exc}", "prepare the scenario again with --force"
            ) from None
        names = SHARED_SPLIT_ARRAYS if shared else SPLIT_ARRAYS
        missing = [a for a in names if a not in arrays]
        if missing:
            raise MlvarError(
                f"{file} lacks arrays {', '.join(missing)}", "prepare the scenario again"
            )
        if shared:
            arrays["x"] = self._gather_x(split, arrays.pop("x_array"), arrays.pop("x_row"))
        return SplitData(**{a: arrays[a] for a in SPLIT_ARRAYS})

    def _check_file(self, file: Path) -> None:
        expected = (self.manifest.get("storage") or {}).get("files", {}).get(file.name)
        if expected and hashlib.sha256(file.read_bytes()).hexdigest() != expected:
            raise MlvarError(
                f"{file} is not the file scenario '{self.name}' was prepared with "
                "(its sha256 differs)",
                "prepare the scenario again with --force",
            )

    def _gather_x(self, split: str, x_array: np.ndarray, x_row: np.ndarray) -> np.ndarray:
        """A split's ``x`` assembled from the shared arrays its rows are in."""
        layout = self.manifest["storage"]["x"][split]
        refs = self.arrays
        x = np.empty((len(x_row), *layout["shape"][1:]), dtype=np.dtype(layout["dtype"]))
        used = np.unique(x_array)
        if len(used) and not (used[0] >= 0 and used[-1] < len(refs)):
            raise MlvarError(
                f"{self.path / f'{split}.npz'} names arrays the manifest does not list",
                "prepare the scenario again with --force",
            )
        for index in used:
            source = open_array(self.data_root, refs[int(index)], self.name)
            if source.dtype != x.dtype or source.shape[1:] != x.shape[1:]:
                raise MlvarError(
                    f"the shared array {refs[int(index)].path(self.data_root)} does not hold "
                    f"rows of {self.name}'s {split} split",
                    "prepare the scenario again with --force",
                )
            rows = x_array == index
            if rows.all():
                x[:] = source[x_row]
            else:
                x[rows] = source[x_row[rows]]
        return x


def split_counts(split: SplitData, n_classes: int) -> dict[str, Any]:
    """Counts of one split for the manifest: total, per class, affected per class."""
    per_class = np.bincount(split.y, minlength=n_classes)
    affected = np.bincount(split.y[split.affected], minlength=n_classes)
    return {
        "total": int(len(split.y)),
        "affected": int(split.affected.sum()),
        "per_class": [int(c) for c in per_class],
        "affected_per_class": [int(c) for c in affected],
    }


def write_scenario(
    data_root: Path,
    name: str,
    manifest: dict[str, Any],
    splits: dict[str, SplitData],
    force: bool = False,
    source: SourceRows | None = None,
    origin: dict[str, np.ndarray] | None = None,
) -> Scenario:
    """Write a scenario folder atomically and return it.

    ``manifest`` gets ``name``, ``splits``, ``counts``, ``format_version`` and
    ``mlvar_version`` filled in. With ``force`` an existing folder is replaced (the new one
    is complete before the old one is removed); without it an existing folder is an error.

    With ``source`` (the dataset's source arrays) the folder is written in format 2: each
    row's ``x`` is found in the source where it equals it (tried at ``origin[split]``, the
    source position a mode copied the row from, else at the source row of the row's id),
    and only the other rows are stored, as one shared array per split. Without it the
    folder holds its arrays itself (format 1).
    """
    final = Path(data_root) / name
    if final.exists() and not force:
        raise MlvarError(
            f"scenario '{name}' already exists in {data_root}", "pass --force to rebuild it"
        )
    n_classes = len(manifest["class_names"])
    manifest = dict(manifest)
    manifest.update(
        name=name,
        splits=list(splits),
        counts={s: split_counts(d, n_classes) for s, d in splits.items()},
        format_version=FORMAT_VERSION if source is None else SHARED_FORMAT_VERSION,
        mlvar_version=__version__,
    )
    for split, data in splits.items():
        if data.y.dtype != np.int64 or data.id.dtype != np.int64 or data.group.dtype != np.int64:
            raise TypeError(f"{split}: y, id and group must be int64")
        if data.affected.dtype != np.bool_:
            raise TypeError(f"{split}: affected must be bool")
        if not all(len(getattr(data, a)) == len(data.y) for a in SPLIT_ARRAYS):
            raise ValueError(f"{split}: arrays differ in length")
    if source is None:
        files = {
            f"{split}.npz": npz_bytes({a: getattr(data, a) for a in SPLIT_ARRAYS})
            for split, data in splits.items()
        }
    else:
        files = _shared_split_files(Path(data_root), splits, source, origin or {}, manifest)
    with staging_dir(final, replace=force) as tmp:
        for file, data in files.items():
            atomic_write_bytes(tmp / file, data)
        atomic_write_bytes(tmp / "manifest.json", dumps_json(manifest).encode())
    return Scenario(name=name, path=final, manifest=manifest)


def _shared_split_files(
    data_root: Path,
    splits: dict[str, SplitData],
    source: SourceRows,
    origin: dict[str, np.ndarray],
    manifest: dict[str, Any],
) -> dict[str, bytes]:
    """The format-2 split files (``x`` as rows of shared arrays, the changed rows stored);
    fills in the manifest's ``storage``."""
    refs: list[ArrayRef] = []

    def index_of(ref: ArrayRef) -> int:
        shas = [r.sha256 for r in refs]
        if ref.sha256 in shas:
            return shas.index(ref.sha256)
        refs.append(ref)
        return len(refs) - 1

    files: dict[str, bytes] = {}
    layout: dict[str, dict[str, Any]] = {}
    for split, data in splits.items():
        x = np.asarray(data.x)
        tried = origin[split] if split in origin else source.positions_of(data.id)
        part, row = source.match(x, tried)
        x_array = np.zeros(len(x), dtype=np.int16)
        x_row = row.copy()
        for k in np.unique(part[part >= 0]):
            x_array[part == k] = index_of(source.ref(int(k)))
        new = np.flatnonzero(part < 0)
        if len(new):
            changed = store_array(data_root, x[new], f"the {split} rows this scenario changed")
            x_array[new] = index_of(changed)
            x_row[new] = np.arange(len(new))
        arrays = {"x_array": x_array, "x_row": x_row}
        arrays.update({a: getattr(data, a) for a in SHARED_SPLIT_ARRAYS[2:]})
        files[f"{split}.npz"] = npz_bytes(arrays)
        layout[split] = {"dtype": x.dtype.str, "shape": list(x.shape)}
    manifest["storage"] = {
        "arrays": [ref.manifest() for ref in refs],
        "x": layout,
        "files": {file: hashlib.sha256(data).hexdigest() for file, data in files.items()},
        "rule": "x of row i is storage.arrays[x_array[i]][x_row[i]]; arrays are "
        f"{SHARED_DIR}/<sha256>.npy in the data root",
    }
    return files


def open_scenario(data_root: Path, name: str) -> Scenario:
    """Open the prepared scenario ``name``; raise :class:`MlvarError` if it is not there."""
    path = Path(data_root) / name
    file = path / "manifest.json"
    if not file.is_file():
        known = [s.name for s in list_scenarios(data_root)]
        near = closest(name, known)
        hint = f"did you mean '{near}'?" if near else "run 'mlvar data prepare' first"
        raise MlvarError(f"no prepared scenario '{name}' in {data_root}", hint)
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise MlvarError(
            f"{file} is corrupt: {exc}", "prepare the scenario again with --force"
        ) from None
    return Scenario(name=name, path=path, manifest=manifest)


def experiment_scenario(data_root: Path, experiment: str, meta: dict[str, Any]) -> Scenario:
    """The prepared scenario an experiment's runs were trained on, checked by its manifest.

    ``meta`` is the experiment's ``experiment.json``. Raises :class:`MlvarError` when the
    experiment names no scenario (imported predictions), when the scenario is not in
    ``data_root``, when its manifest sha256 differs from the one recorded at training, or
    when a file or shared array it reads is missing (:meth:`Scenario.check_storage`).
    """
    info = meta.get("scenario") or {}
    name = info.get("name")
    if not name:
        raise MlvarError(
            f"experiment '{experiment}' names no prepared scenario (imported predictions?)",
            "only mlvar-trained experiments have their inputs in a data root",
        )
    try:
        scenario = open_scenario(Path(data_root), str(name))
    except MlvarError:
        raise MlvarError(
            f"the prepared scenario '{name}' is not in the data root {data_root} "
            f"(experiment '{experiment}' was trained on it)",
            "prepare it again with 'mlvar data prepare', or point data_root at it",
        ) from None
    expected = info.get("manifest_sha256")
    if expected and scenario.manifest_sha256 != expected:
        raise MlvarError(
            f"the prepared scenario '{name}' in {data_root} is not the one the runs of "
            f"'{experiment}' were trained on (its manifest changed)",
            "prepare the scenario the runs were trained on",
        )
    scenario.check_storage()
    return scenario


def list_scenarios(data_root: Path, dataset: str | None = None) -> list[Scenario]:
    """Every prepared scenario under ``data_root`` (optionally of one dataset), by name."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        file = path / "manifest.json"
        if path.name.startswith(".") or not file.is_file():
            continue
        try:
            manifest = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if dataset is None or manifest.get("dataset") == dataset:
            found.append(Scenario(name=path.name, path=path, manifest=manifest))
    return found


def resolve_scenario(data_root: Path, dataset: str, scenario: str | None) -> Scenario:
    """Find the scenario a ``--scenario`` value means for ``dataset``.

    It may be a folder name, or a mode when exactly one prepared scenario of the dataset
    has that mode, or None when the dataset has exactly one prepared scenario.
    """
    candidates = list_scenarios(data_root, dataset)
    names = [s.name for s in candidates]
    if scenario is None:
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise MlvarError(
                f"no prepared scenario of dataset '{dataset}' in {data_root}",
                f"run 'mlvar data prepare {dataset}' first",
            )
        raise MlvarError(
            f"dataset '{dataset}' has {len(candidates)} prepared scenarios",
            "pick one with --scenario: " + ", ".join(names),
        )
    for s in candidates:
        if s.name == scenario:
            return s
    by_mode = [s for s in candidates if s.mode == scenario]
    if len(by_mode) == 1:
        return by_mode[0]
    if len(by_mode) > 1:
        raise MlvarError(
            f"several prepared '{dataset}' scenarios have mode '{scenario}'",
            "pick one by name: " + ", ".join(s.name for s in by_mode),
        )
    near = closest(scenario, names)
    hint = (
        f"did you mean '{near}'?"
        if near
        else (
            "candidates: " + ", ".join(names)
            if names
            else f"run 'mlvar data prepare {dataset}' first"
        )
    )
    raise MlvarError(f"no prepared '{dataset}' scenario '{scenario}' in {data_root}", hint)


def split_source(
    data_root: Path, experiment: str, meta: dict[str, Any], split: str
) -> tuple[Scenario, str]:
    """The prepared scenario and split whose data (``x``, ``y``, ``id``, ``affected``) the
    stored split ``split`` of an experiment holds.

    ``meta`` is the experiment's ``experiment.json``. A split ``mlvar analyze predict``
    added (listed in ``meta["external_splits"]``) comes from the scenario recorded there,
    checked by its manifest sha256; any other split is the experiment's own scenario's
    (:func:`experiment_scenario`). Raises :class:`MlvarError` when the experiment has no
    such split, or its scenario is missing or changed.
    """
    splits = list(meta.get("splits", []))
    if split not in splits:
        raise MlvarError(
            f"experiment '{experiment}' has no split '{split}'",
            "valid: " + ", ".join(splits) + "; add one with 'mlvar analyze predict'",
        )
    external = (meta.get("external_splits") or {}).get(split)
    if not external:
        return experiment_scenario(data_root, experiment, meta), split
    name = str(external.get("scenario", ""))
    try:
        scenario = open_scenario(Path(data_root), name)
    except MlvarError:
        raise MlvarError(
            f"the prepared scenario '{name}' is not in the data root {data_root} "
            f"(split '{split}' of experiment '{experiment}' was predicted on it)",
            "prepare it again with 'mlvar data prepare', or point data_root at it",
        ) from None
    if scenario.manifest_sha256 != external.get("manifest_sha256"):
        raise MlvarError(
            f"the prepared scenario '{name}' in {data_root} is not the one split '{split}' "
            f"of experiment '{experiment}' was predicted on (its manifest changed)",
            "prepare the scenario the split was predicted on",
        )
    scenario.check_storage()
    return scenario, str(external["split"])
