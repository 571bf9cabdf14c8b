"""scikit-learn digits (1,797 8x8 gray images, offline): the demo and test dataset.

Scenarios (DESIGN section 4):

- ``original``: the 10 digit classes, unchanged.
- ``holdout --subclass d --ratio a``: labels become the 5 coarse classes ``digit // 2``
  (mirroring CIFAR-100 superclasses); the first ``floor(a * count)`` samples of digit ``d``
  are removed from train and from validation (each split separately, in split order). Test
  is untouched; its samples of digit ``d`` are the affected ones.
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

from mlvar.data.compas import as_int, check_ratio, format_ratio
from mlvar.data.scenario import Scenario, SplitData, write_scenario
from mlvar.errors import MlvarError, unknown_choice

MODES = ("original", "holdout")
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
) -> Scenario:
    """Prepare a digits scenario (no download needed).

    Parameters
    ----------
    data_root
        Data root that receives the scenario folder.
    mode
        ``original`` or ``holdout``.
    subclass
        Digit 0-9 to hold out (``holdout`` only, required there).
    ratio
        Fraction in [0, 1] of the digit's train and validation samples to remove
        (``holdout`` only; None means the default 1.0).
    force
        Replace an existing scenario folder.

    Returns
    -------
    Scenario
        The written scenario.
    """
    data_root = Path(data_root)
    if mode not in MODES:
        raise unknown_choice("digits mode", str(mode), MODES)
    if mode == "original":
        if subclass is not None:
            raise MlvarError("digits mode 'original' takes no --subclass", "use --mode holdout")
        if ratio is not None and not (
            isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio == 1.0
        ):
            raise MlvarError("digits mode 'original' takes no --ratio", "use --mode holdout")
    else:
        if subclass is None:
            raise MlvarError("digits mode 'holdout' needs --subclass", "e.g. --subclass 3 (0-9)")
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
