"""scikit-learn digits (1,797 8x8 gray images, offline): the demo and test dataset.

Scenarios (docs/design.md section 4):

- ``original``: the 10 digit classes, unchanged.
- ``holdout --subclass d --ratio a``: labels become the 5 coarse classes ``digit // 2``
  (mirroring CIFAR-100 superclasses); the first ``floor(a * count)`` samples of digit ``d``
  are removed from train and from validation (each split separately, in split order). Test
  is untouched; its samples of digit ``d`` are the affected ones.
- ``holdout --cls c``, ``holdout-dup``, ``augmentation``, ``augmentation-all`` (``--ratio a``):
  the CIFAR-10 class modes on the 10 digits (:mod:`mlvar.data.images`), with colour inversion
  ``16 - x`` as the appearance change; ``test_gray`` holds the inverted test set.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mlvar.data import images as image_modes
from mlvar.data.compas import as_int, check_ratio, format_ratio
from mlvar.data.scenario import Scenario, SplitData, write_scenario
from mlvar.errors import MlvarError, unknown_choice

MODES = ("original", "holdout", "holdout-dup", "augmentation", "augmentation-all")
SOURCE_NAME = "sklearn.datasets.load_digits"
TEST_SIZE = 0.3
VAL_SIZE = 0.1
SPLIT_SEED = 69
N_DIGITS = 10
N_COARSE = 5
MAX_VALUE = 16


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray, str]:
    """Return the digit images (uint8 NHWC [n, 8, 8, 1], 0..16), digits (int64) and sha256.

    The checksum is the sha256 of ``data`` (float64, C order) followed by ``target`` (int64),
    exactly as ``load_digits`` returns them, so a changed scikit-learn copy is visible.
    """
    bunch = load_digits()
    data = np.ascontiguousarray(bunch.data, dtype=np.float64)
    target = np.ascontiguousarray(bunch.target, dtype=np.int64)
    digest = hashlib.sha256(data.tobytes() + target.tobytes()).hexdigest()
    images = data.reshape(-1, 8, 8, 1).astype(np.uint8)
    return images, target, digest


def coarse_class_names() -> list[str]:
    """Names of the 5 coarse classes: "0-1", "2-3", ..., "8-9"."""
    return [f"{2 * c}-{2 * c + 1}" for c in range(N_COARSE)]


def _split_indices(digits: np.ndarray) -> dict[str, np.ndarray]:
    """Row positions of train, val and test, stratified on the digit, ``random_state=69``."""
    positions = np.arange(len(digits))
    rest, test = train_test_split(
        positions, test_size=TEST_SIZE, stratify=digits, random_state=SPLIT_SEED
    )
    train, val = train_test_split(
        rest, test_size=VAL_SIZE, stratify=digits[rest], random_state=SPLIT_SEED
    )
    return {"train": np.asarray(train), "val": np.asarray(val), "test": np.asarray(test)}


def _check_subclass(subclass: Any) -> int:
    value = as_int(subclass)
    if value is None or not 0 <= value <= 9:
        raise MlvarError(f"digits subclass {subclass!r} is not a digit 0-9", "e.g. --subclass 3")
    return value


def prepare_digits(
    data_root: str | os.PathLike,
    mode: str = "holdout",
    subclass: int | str | None = None,
    ratio: float | None = 1.0,
    force: bool = False,
    cls: int | str | None = None,
    seed: int = 0,
) -> Scenario:
    """Prepare a digits scenario (no download needed).

    Parameters
    ----------
    data_root
        Data root that receives the scenario folder.
    mode
        ``original``, ``holdout`` (with ``subclass`` or ``cls``), ``holdout-dup``,
        ``augmentation`` or ``augmentation-all``.
    subclass
        Digit 0-9 to hold out of its coarse class (``holdout`` only).
    ratio
        ``holdout --subclass``: fraction in [0, 1] of the digit's train and validation
        samples to remove (None means the default 1.0). Class modes: fraction of the class's
        training samples affected (required).
    force
        Replace an existing scenario folder.
    cls
        Target digit of a class mode (default 0; not for ``augmentation-all``).
    seed
        Seed of the copies' draw (``holdout-dup`` only).

    Returns
    -------
    Scenario
        The written scenario.
    """
    data_root = Path(data_root)
    if mode not in MODES:
        raise unknown_choice("digits mode", str(mode), MODES)
    if mode in image_modes.CLASS_MODES and (mode != "holdout" or cls is not None):
        if subclass is not None:
            raise MlvarError(
                f"digits mode '{mode}' takes no --subclass with --cls"
                if mode == "holdout"
                else f"digits mode '{mode}' takes no --subclass",
                "--subclass D holds out a digit of its coarse class (--mode holdout); "
                "--cls C picks the target class of the class modes",
            )
        return _prepare_class_mode(data_root, mode, cls, ratio, seed, force)
    if cls is not None:
        raise MlvarError(
            f"digits mode '{mode}' takes no --cls",
            "use --mode holdout|holdout-dup|augmentation with --cls",
        )
    if as_int(seed) != 0:
        raise MlvarError(f"digits mode '{mode}' takes no --seed", "only --mode holdout-dup does")
    if mode == "original":
        if subclass is not None:
            raise MlvarError("digits mode 'original' takes no --subclass", "use --mode holdout")
        if ratio is not None and not (
            isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio == 1.0
        ):
            raise MlvarError("digits mode 'original' takes no --ratio", "use --mode holdout")
    else:
        if subclass is None:
            raise MlvarError(
                "digits mode 'holdout' needs --subclass D or --cls C",
                "e.g. --subclass 3 (digit 3 of coarse class 2-3) or --cls 3 --ratio 0.5",
            )
        subclass = _check_subclass(subclass)
        ratio = check_ratio(1.0 if ratio is None else ratio, 0.0, 1.0, "holdout")

    images, digits, digest = load_digit_arrays()
    index = _split_indices(digits)
    ids = np.arange(len(digits), dtype=np.int64)
    params: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    if mode == "original":
        class_names = [str(d) for d in range(N_DIGITS)]
        splits = {
            s: SplitData(
                x=images[idx],
                y=digits[idx],
                id=ids[idx],
                affected=np.zeros(len(idx), dtype=bool),
                group=digits[idx],
            )
            for s, idx in index.items()
        }
        name = "digits-original"
        description = "Unchanged scikit-learn digits with 10 classes; nothing injected."
    else:
        assert isinstance(subclass, int) and isinstance(ratio, float)
        class_names = coarse_class_names()
        removed: dict[str, int] = {}
        for s in ("train", "val"):
            idx = index[s]
            members = np.flatnonzero(digits[idx] == subclass)
            n_remove = math.floor(ratio * len(members))
            removed[s] = n_remove
            index[s] = np.delete(idx, members[:n_remove])
        splits = {
            s: SplitData(
                x=images[idx],
                y=digits[idx] // 2,
                id=ids[idx],
                affected=(digits[idx] == subclass) if s == "test" else np.zeros(len(idx), bool),
                group=digits[idx],
            )
            for s, idx in index.items()
        }
        params = {"subclass": subclass, "ratio": ratio}
        name = f"digits-holdout-sub{subclass}-r{format_ratio(ratio)}"
        extra["group_counts"] = image_modes.group_counts(
            splits, [subclass], {subclass: str(subclass)}
        )
        extra["holdout"] = {
            "subclass": subclass,
            "coarse_class": subclass // 2,
            "removed": removed,
            "rule": "first floor(ratio * count) samples of the digit in split order",
        }
        description = (
            f"Labels are the 5 coarse classes digit // 2; the first {ratio:.0%} of digit "
            f"{subclass}'s train and validation samples were removed; affected rows are its "
            f"test samples."
        )

    manifest: dict[str, Any] = {
        "dataset": "digits",
        "mode": mode,
        "params": params,
        "description": description,
        "source": {"name": SOURCE_NAME, "sha256": digest},
        "class_names": class_names,
        "input": {"kind": "image", "shape": [8, 8, 1], "max_value": MAX_VALUE},
        "group": "digit",
        "split": {
            "test_size": TEST_SIZE,
            "val_size": VAL_SIZE,
            "random_state": SPLIT_SEED,
            "stratify": "digit",
        },
        **extra,
    }
    return write_scenario(data_root, name, manifest, splits, force=force)


def _prepare_class_mode(
    data_root: Path, mode: str, cls: Any, ratio: Any, seed: Any, force: bool
) -> Scenario:
    """The CIFAR-10 class modes on the 10 digits, inversion ``16 - x`` as the change."""
    cls_i, ratio_f, seed_i = image_modes.check_class_mode(
        "digits", mode, cls, ratio, seed, N_DIGITS
    )
    name = image_modes.class_mode_name("digits", mode, cls_i, ratio_f, seed_i)
    if (data_root / name).exists() and not force:
        raise MlvarError(
            f"scenario '{name}' already exists in {data_root}", "pass --force to rebuild it"
        )
    images, digits, digest = load_digit_arrays()
    index = _split_indices(digits)
    ids = np.arange(len(digits), dtype=np.int64)
    invert = image_modes.inverter(MAX_VALUE)
    splits, info = image_modes.class_mode_splits(
        images, digits, ids, digits, index, mode, cls_i, ratio_f or 0.0, seed_i, invert, N_DIGITS
    )
    params: dict[str, Any] = {}
    if cls_i is not None:
        params["cls"] = cls_i
    params["ratio"] = ratio_f
    if mode == "holdout-dup":
        params["seed"] = seed_i
    extra: dict[str, Any] = {
        "change": {
            "mode": mode,
            "target_class": cls_i,
            "appearance": "colour inversion 16 - x"
            if mode in image_modes.APPEARANCE_MODES
            else None,
            **info,
        }
    }
    if mode in image_modes.APPEARANCE_MODES:
        extra["test_gray"] = (
            "the test split colour-inverted (16 - x); named test_gray like CIFAR's grayscale copy"
        )
    manifest: dict[str, Any] = {
        "dataset": "digits",
        "mode": mode,
        "params": params,
        "description": image_modes.class_mode_description(
            mode, str(cls_i) if cls_i is not None else None, ratio_f, "colour-inverted", seed_i
        ),
        "source": {"name": SOURCE_NAME, "sha256": digest},
        "class_names": [str(d) for d in range(N_DIGITS)],
        "input": {"kind": "image", "shape": [8, 8, 1], "max_value": MAX_VALUE},
        "group": "digit",
        "split": {
            "test_size": TEST_SIZE,
            "val_size": VAL_SIZE,
            "random_state": SPLIT_SEED,
            "stratify": "digit",
        },
        **extra,
    }
    return write_scenario(data_root, name, manifest, splits, force=force)
