"""CIFAR-10 scenarios (docs/design.md section 4): ``original`` and the four class modes of
:mod:`mlvar.data.modes`, with 3-channel grayscale as the appearance change.

Built from the arrays :mod:`mlvar.data.cifar` fetched into ``<data_root>/raw/cifar10/``.
Validation is 10% of the training images (not stratified), split before any change, or
none with ``--val-fraction 0`` (``original`` and the class modes: train is then all 50,000
training images, as airbench94 trains); the test split is the official test batch. Under
``--protocol study`` the change comes first and
validation is split off the changed set (:mod:`mlvar.data.modes`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data.modes import (
    Appearance,
    class_modes,
    grayscale,
    label_noise_mode,
    original_mode,
    unchanged_splits,
)
from mlvar.data.spec import BaseData, DatasetSpec, ModeResult, Source, TrainDefaults

N_CLASSES = 10


class Cifar10Data(Source):
    """The fetched CIFAR-10 arrays (memory-mapped)."""

    def __init__(self, data_root: Path) -> None:
        from mlvar.data import cifar

        super().__init__(data_root)
        self.raw = cifar.load_raw(data_root, "cifar10")

    def load(self) -> BaseData:
        from mlvar.data import cifar

        raw, a = self.raw, self.raw.arrays
        n_train, n_test = raw.n_train, len(a["y_test"])
        train, val = cifar.split_train(np.arange(n_train))
        labels = np.concatenate([a["y_train"], a["y_test"]]).astype(np.int64)
        return cifar.scenario_base(
            raw,
            "cifar10",
            labels=labels,
            groups=np.full(len(labels), -1, dtype=np.int64),
            index={"train": train, "val": val, "test": n_train + np.arange(n_test)},
            class_names=list(raw.source["class_names"]),
            order="batch",
            split={"test": "the official test batch"},
            manifest={"group": None},
        )


def _study_split(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from mlvar.data import cifar

    return cifar.study_split(positions)


def _study_original(source: Cifar10Data, params: object) -> ModeResult:
    base = source.base
    train, val = _study_split(np.sort(np.concatenate([base.index["train"], base.index["val"]])))
    index = {"train": train, "val": val, "test": base.index["test"]}
    manifest = {"split": {**base.manifest["split"], "order": "as train_test_split returns it"}}
    description = "Unchanged data, validation in the study's (shuffled) order; nothing injected."
    return ModeResult(unchanged_splits(base, index), description, manifest)


def fetch(data_root: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Fetch CIFAR-10: :func:`mlvar.data.cifar.fetch_cifar` (imported on first use)."""
    from mlvar.data import cifar

    return cifar.fetch_cifar(data_root, "cifar10", **options)


GRAYSCALE = Appearance(
    change=grayscale,
    name="3-channel grayscale, ITU-R 601-2 luma as PIL convert('L')",
    adjective="grayscale",
    test_gray="the test split converted to 3-channel grayscale",
)

SPEC = DatasetSpec(
    name="cifar10",
    description="CIFAR-10 (32x32 colour images, 10 classes, 50,000 + 10,000)",
    input_kind="image",
    mode_specs=(
        original_mode(
            "Unchanged data; nothing injected.", study=_study_original, val_fraction=True
        ),
        *class_modes(GRAYSCALE, study_split=_study_split),
        label_noise_mode(),
    ),
    open=Cifar10Data,
    fetch=fetch,
    needs_fetch=True,
    train=TrainDefaults("airbench"),
    n_classes=N_CLASSES,
)
MODES = SPEC.modes
