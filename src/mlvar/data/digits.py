"""scikit-learn digits (1,797 8x8 gray images, offline): the demo and test dataset.

Scenarios (docs/design.md section 4):

- ``original``: the 10 digit classes, unchanged.
- ``holdout --subclass d --ratio a``: labels become the 5 coarse classes ``digit // 2``
  (mirroring CIFAR-100 superclasses); the first ``floor(a * count)`` samples of digit ``d``
  are removed from train and from validation (each split separately, in split order). Test
  is untouched; its samples of digit ``d`` are the affected ones. ``full_val`` is the
  validation split before the removal (the val split of ratio 0), digit ``d`` affected.
- ``holdout --cls c``, ``holdout-dup``, ``augmentation``, ``augmentation-all`` (``--ratio a``):
  the CIFAR-10 class modes on the 10 digits (:mod:`mlvar.data.modes`), with colour inversion
  ``16 - x`` as the appearance change; ``test_gray`` holds the inverted test set.

``original`` and the class modes take ``--val-fraction 0``: no validation split, its samples
in train (in source order).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlvar.data import params as p
from mlvar.data.modes import (
    FULL_VAL,
    Appearance,
    class_modes,
    group_counts,
    inverter,
    label_noise_mode,
    original_mode,
)
from mlvar.data.scenario import Scenario, SplitData
from mlvar.data.spec import (
    BaseData,
    DatasetSpec,
    ModeResult,
    ModeSpec,
    Source,
    TrainDefaults,
)
from mlvar.errors import MlvarError

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
    from sklearn.datasets import load_digits

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
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(digits))
    rest, test = train_test_split(
        positions, test_size=TEST_SIZE, stratify=digits, random_state=SPLIT_SEED
    )
    train, val = train_test_split(
        rest, test_size=VAL_SIZE, stratify=digits[rest], random_state=SPLIT_SEED
    )
    return {"train": np.asarray(train), "val": np.asarray(val), "test": np.asarray(test)}


class DigitsSource(Source):
    """scikit-learn's copy: nothing to fetch."""

    def load(self) -> BaseData:
        images, digits, digest = load_digit_arrays()
        manifest = {
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
        }
        return BaseData(
            x=images,
            y=digits,
            ids=np.arange(len(digits), dtype=np.int64),
            groups=digits,
            index=_split_indices(digits),
            class_names=[str(d) for d in range(N_DIGITS)],
            manifest=manifest,
        )


def fetch_digits(
    data_root: str | os.PathLike,
    source: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Nothing to fetch: the digits ship with scikit-learn. Writes nothing; returns its info."""
    if source is not None:
        raise MlvarError("digits takes no --source", "digits ships with scikit-learn")
    _, target, digest = load_digit_arrays()
    return {
        "dataset": "digits",
        "path": None,
        "sha256": digest,
        "rows": int(len(target)),
        "verified": True,
        "source": SOURCE_NAME,
        "action": "nothing to fetch: ships with scikit-learn",
    }


# --------------------------------------------------------------------------- subclass holdout


def _check_digit(value: Any, where: p.Where) -> int:
    digit = p.as_int(value)
    if digit is None or not 0 <= digit <= 9:
        raise MlvarError(f"digits subclass {value!r} is not a digit 0-9", "e.g. --subclass 3")
    return digit


@dataclass(frozen=True)
class SubclassParams(p.Params):
    subclass: int = p.option(
        metavar="D",
        check=_check_digit,
        help="the digit (0-9) to hold out of its coarse class",
        required=True,
        missing_hint="e.g. --subclass 3",
        tag="sub",
        keywords={"all": lambda source, where: list(range(N_DIGITS))},
        study="all",
    )
    ratio: float = p.ratio(
        help="fraction of the digit's train and validation samples held out, in [0, 1] (default 1)",
        default=1.0,
    )


def _subclass_holdout(source: DigitsSource, params: SubclassParams) -> ModeResult:
    base = source.base
    digits, subclass, ratio = base.y, params.subclass, params.ratio
    index = dict(base.index)
    removed: dict[str, int] = {}
    for s in ("train", "val"):
        idx = index[s]
        members = np.flatnonzero(digits[idx] == subclass)
        n_remove = math.floor(ratio * len(members))
        removed[s] = n_remove
        index[s] = np.delete(idx, members[:n_remove])
    splits = {
        s: SplitData(
            x=base.x[idx],
            y=digits[idx] // 2,
            id=base.ids[idx],
            affected=(digits[idx] == subclass) if s == "test" else np.zeros(len(idx), bool),
            group=digits[idx],
        )
        for s, idx in index.items()
    }
    # The pool of retraining: validation before anything was held out (the val split of
    # ratio 0), the digit's samples affected.
    full = base.index["val"]
    splits[FULL_VAL] = SplitData(
        x=base.x[full],
        y=digits[full] // 2,
        id=base.ids[full],
        affected=digits[full] == subclass,
        group=digits[full],
    )
    manifest = {
        "class_names": coarse_class_names(),
        "group_counts": group_counts(splits, [subclass], {subclass: str(subclass)}),
        "holdout": {
            "subclass": subclass,
            "coarse_class": subclass // 2,
            "removed": removed,
            "rule": "first floor(ratio * count) samples of the digit in split order",
        },
    }
    description = (
        f"Labels are the 5 coarse classes digit // 2; the first {ratio:.0%} of digit "
        f"{subclass}'s train and validation samples were removed; affected rows are its "
        f"test samples."
    )
    return ModeResult(splits, description, manifest)


# --------------------------------------------------------------------------- the spec

INVERSION = Appearance(
    change=inverter(MAX_VALUE),
    name="colour inversion 16 - x",
    adjective="colour-inverted",
    test_gray="the test split colour-inverted (16 - x); named test_gray like CIFAR's grayscale "
    "copy",
)

SPEC = DatasetSpec(
    name="digits",
    description="scikit-learn digits (8x8 gray images, 1,797 samples; ships offline)",
    input_kind="image",
    mode_specs=(
        original_mode(
            "Unchanged scikit-learn digits with 10 classes; nothing injected.", val_fraction=True
        ),
        ModeSpec(
            "holdout",
            SubclassParams,
            _subclass_holdout,
            summary="holds out a digit of its coarse class (5 classes digit // 2)",
            example="--subclass 3 (digit 3 of coarse class 2-3)",
            key="subclass",
        ),
        *class_modes(INVERSION),
        label_noise_mode(),
    ),
    open=DigitsSource,
    fetch=fetch_digits,
    needs_fetch=False,
    train=TrainDefaults("mlp", {"epochs": 30, "lr": 3e-3, "batch_size": 64}),
    n_classes=N_DIGITS,
    implied_modes={"subclass": "holdout"},
)
MODES = SPEC.modes


def prepare_digits(
    data_root: str | os.PathLike,
    mode: str = "holdout",
    subclass: int | str | None = None,
    ratio: float | None = None,
    force: bool = False,
    cls: int | str | None = None,
    seed: int = 0,
) -> Scenario:
    """Prepare a digits scenario (``mlvar.data.registry.prepare`` for ``digits``)."""
    given = {"ratio": ratio, "subclass": subclass, "seed": seed, "cls": cls}
    return SPEC.prepare(data_root, mode, p.given_options(given), force=force)
