"""Prepared scenarios on disk: ``<data_root>/<name>/manifest.json`` and one ``<split>.npz``
per split with arrays ``x``, ``y`` (int64), ``id`` (int64), ``affected`` (bool) and
``group`` (int64, -1 where a dataset has no groups).

A scenario folder is built under a temporary name and renamed into place, so a folder
under a scenario's name is always complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar import __version__
from mlvar.errors import MlvarError, closest
from mlvar.io import atomic_write_bytes, dumps_json, load_npz, npz_bytes, staging_dir

FORMAT_VERSION = 1
SPLIT_ARRAYS = ("x", "y", "id", "affected", "group")


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

    def load(self, split: str) -> SplitData:
        """Load one split; raise :class:`MlvarError` if it is missing or corrupt."""
        if split not in self.splits:
            raise MlvarError(
                f"scenario '{self.name}' has no split '{split}'",
                "valid: " + ", ".join(self.splits),
            )
        file = self.path / f"{split}.npz"
        try:
            arrays = load_npz(file)
        except (OSError, ValueError) as exc:
            raise MlvarError(
                f"cannot read {file}: {exc}", "prepare the scenario again with --force"
            ) from None
        missing = [a for a in SPLIT_ARRAYS if a not in arrays]
        if missing:
            raise MlvarError(
                f"{file} lacks arrays {', '.join(missing)}", "prepare the scenario again"
            )
        return SplitData(**{a: arrays[a] for a in SPLIT_ARRAYS})


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
) -> Scenario:
    """Write a scenario folder atomically and return it.

    ``manifest`` gets ``name``, ``splits``, ``counts``, ``format_version`` and
    ``mlvar_version`` filled in. With ``force`` an existing folder is replaced (the new one
    is complete before the old one is removed); without it an existing folder is an error.
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
        format_version=FORMAT_VERSION,
        mlvar_version=__version__,
    )
    for split, data in splits.items():
        if data.y.dtype != np.int64 or data.id.dtype != np.int64 or data.group.dtype != np.int64:
            raise TypeError(f"{split}: y, id and group must be int64")
        if data.affected.dtype != np.bool_:
            raise TypeError(f"{split}: affected must be bool")
        if not all(len(getattr(data, a)) == len(data.y) for a in SPLIT_ARRAYS):
            raise ValueError(f"{split}: arrays differ in length")
    with staging_dir(final, replace=force) as tmp:
        for split, data in splits.items():
            arrays = {a: getattr(data, a) for a in SPLIT_ARRAYS}
            atomic_write_bytes(tmp / f"{split}.npz", npz_bytes(arrays))
        atomic_write_bytes(tmp / "manifest.json", dumps_json(manifest).encode())
    return Scenario(name=name, path=final, manifest=manifest)


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
    ``data_root``, or when its manifest sha256 differs from the one recorded at training.
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
