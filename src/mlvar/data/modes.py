"""Scenario modes written once for any dataset: ``original``, and the four class modes of
image datasets (CIFAR-10 and digits) with an appearance change.

Class modes (docs/design.md section 4), for a target class ``c`` and a ratio ``a``; the affected
training samples are the first ``floor(a * count)`` training samples of class ``c`` in split
order (validation has already been split off):

- ``holdout``: they are deleted.
- ``holdout-dup``: each is replaced by a copy of a random remaining sample of class ``c``
  (``numpy.random.default_rng(seed)``, drawn with replacement), so class sizes stay equal.
- ``augmentation``: their appearance is changed (CIFAR: grayscale; digits: inversion).
- ``augmentation-all``: the first ``a`` fraction of *every* class is changed.

Affected evaluation samples: the target class's validation and test samples (every mode
with a target class); for the appearance modes a changed copy of the test set is written
as split ``test_gray``, with the same ids and the same affected flags as ``test``, except
``augmentation-all``, where every ``test_gray`` sample is affected and no ``test`` sample is.

Under the study protocol (CIFAR-10 only: the original study's ``prepare_holdout_cifar10.py``)
the change comes first and validation is split off after it: the affected images are the
first ``floor(a * count)`` of the class (of the whole training set for ``augmentation-all``)
in the full training set in file order, validation is ``train_test_split(test_size=0.1,
random_state=69)`` of the changed set (so it holds its share of the changed images, and
none of the removed ones), and both splits keep the order that split gives them.
Affected: the changed images in train and validation, and the class's validation and test
samples (``augmentation-all``: the changed images only, and ``test_gray``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlvar.data import params as p
from mlvar.data.scenario import SplitData
from mlvar.data.spec import BaseData, ModeResult, ModeSpec, Source
from mlvar.errors import MlvarError

CLASS_MODES = ("holdout", "holdout-dup", "augmentation", "augmentation-all")
#: The ratios the study swept in the class modes when ``--ratio`` is not given.
STUDY_RATIOS = "0:0.9:0.1"
APPEARANCE_MODES = ("augmentation", "augmentation-all")
#: The validation share of the training images of the datasets whose modes take
#: ``--val-fraction`` (CIFAR-10 and digits: 10%); 0 is the other value.
VAL_FRACTION = 0.1

Change = Callable[[np.ndarray], np.ndarray]
#: ``split(positions)``: the train and validation positions of a training set, in the order
#: the split gives them (the study protocol's validation split).
StudySplit = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SplitParams(p.Params):
    """``original`` of a dataset whose validation split can be left out."""

    val_fraction: float = p.val_fraction(VAL_FRACTION)


def original_mode(
    description: str,
    study: Callable[[Any, Any], ModeResult] | None = None,
    val_fraction: bool = False,
) -> ModeSpec:
    """The ``original`` mode: the dataset's splits unchanged, described by ``description``;
    ``study`` builds it under the study protocol (None: the study had none); with
    ``val_fraction`` it takes ``--val-fraction`` (:func:`split_index`)."""

    def build(source: Source, params: p.Params) -> ModeResult:
        index, manifest = split_index(source.base, params)
        text = description
        if "val" not in index:
            text += " No validation split: every training image is in train."
        return ModeResult(unchanged_splits(source.base, index), text, manifest)

    params = SplitParams if val_fraction else p.NoParams
    return ModeSpec("original", params, build, summary="nothing changed", study=study)


def split_index(base: BaseData, params: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The split positions of a scenario of ``params``, and its manifest entries: the
    source's (``base.index``, nothing added), or under ``val_fraction`` 0 no ``val``
    split and a ``train`` split of every training image (train and validation positions
    together, in source order), the manifest's ``split`` saying so (``val_size`` 0)."""
    if getattr(params, "val_fraction", VAL_FRACTION) != 0:
        return base.index, {}
    index = {s: pos for s, pos in base.index.items() if s != "val"}
    index["train"] = np.sort(np.concatenate([base.index["train"], base.index["val"]]))
    split = {
        **base.manifest.get("split", {}),
        "val_size": 0.0,
        "train": "every training image, in source order (no validation split)",
    }
    return index, {"split": split}


def unchanged_splits(
    base: BaseData, index: dict[str, np.ndarray] | None = None
) -> dict[str, SplitData]:
    """Every split of ``base`` (or of the positions ``index``) as it is: nothing affected."""
    return {
        s: SplitData(
            x=base.x[pos],
            y=base.y[pos],
            id=base.ids[pos],
            affected=np.zeros(len(pos), bool),
            group=base.groups[pos],
        )
        for s, pos in (base.index if index is None else index).items()
    }


def n_affected(ratio: float, count: int) -> int:
    """``floor(ratio * count)``, robust to float rounding (0.7 * 10 is 7, not 6)."""
    return min(count, math.floor(ratio * count + 1e-9))


# --------------------------------------------------------------------------- appearance


@dataclass(frozen=True)
class Appearance:
    """An image dataset's appearance change: the function, how the manifest names it, the
    adjective of the descriptions, and the manifest note on ``test_gray``."""

    change: Change
    name: str
    adjective: str
    test_gray: str


def grayscale(x: np.ndarray) -> np.ndarray:
    """3-channel grayscale of uint8 RGB images ``[..., 3]``: ITU-R 601-2 luma, in integers
    exactly as PIL's ``convert("L")`` (and so torchvision's ``Grayscale(3)``) computes it."""
    x32 = x.astype(np.uint32)
    luma = (x32[..., 0] * 19595 + x32[..., 1] * 38470 + x32[..., 2] * 7471 + 0x8000) >> 16
    return np.repeat(luma.astype(np.uint8)[..., None], 3, axis=-1)


def inverter(max_value: int) -> Change:
    """Colour inversion ``max_value - x`` (digits: ``16 - x``)."""

    def invert(x: np.ndarray) -> np.ndarray:
        return (max_value - x.astype(np.int16)).astype(x.dtype)

    return invert


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ClassParams(p.Params):
    """``holdout`` and ``augmentation``: a target class and the fraction of it affected."""

    cls: int = p.class_index(help="the target class index (default 0)")
    ratio: float = p.ratio(
        help="fraction of the class's training samples affected, in [0, 1]", study=STUDY_RATIOS
    )
    val_fraction: float = p.val_fraction(VAL_FRACTION)


@dataclass(frozen=True)
class DuplicateParams(ClassParams):
    """``holdout-dup``: as :class:`ClassParams`, and the seed of the copies' draw."""

    seed: int = p.seed(help="seed of the copies' draw")

    def validate(self, where: p.Where) -> None:
        if self.ratio >= 1.0:
            raise MlvarError(
                "holdout-dup with ratio 1.0 leaves no sample of the class to copy",
                "use a ratio below 1.0, or --mode holdout to delete the whole class",
            )


@dataclass(frozen=True)
class EveryClassParams(p.Params):
    """``augmentation-all``: the fraction of every class changed."""

    ratio: float = p.ratio(
        help="fraction of every class's training samples changed, in [0, 1]", study=STUDY_RATIOS
    )
    val_fraction: float = p.val_fraction(VAL_FRACTION)


# --------------------------------------------------------------------------- the modes


def class_modes(
    appearance: Appearance, study_split: StudySplit | None = None
) -> tuple[ModeSpec, ...]:
    """The four class modes of an image dataset whose source's ``base`` holds its images;
    with ``study_split`` (the study's validation split), each under the study protocol too."""

    def build(mode: str) -> Callable[[Source, Any], ModeResult]:
        def run(source: Source, params: Any) -> ModeResult:
            return _class_mode(source, mode, params, appearance)

        return run

    def study(mode: str) -> Callable[[Source, Any], ModeResult] | None:
        if study_split is None:
            return None
        split = study_split

        def run(source: Source, params: Any) -> ModeResult:
            return _study_class_mode(source, mode, params, appearance, split)

        return run

    return (
        ModeSpec(
            "holdout",
            ClassParams,
            build("holdout"),
            summary="deletes the first ratio of a class's training samples",
            example="--cls 3 --ratio 0.5",
            key="cls",
            study=study("holdout"),
        ),
        ModeSpec(
            "holdout-dup",
            DuplicateParams,
            build("holdout-dup"),
            summary="replaces them by copies of the class's other samples",
            study=study("holdout-dup"),
        ),
        ModeSpec(
            "augmentation",
            ClassParams,
            build("augmentation"),
            summary=f"makes them {appearance.adjective}",
            study=study("augmentation"),
        ),
        ModeSpec(
            "augmentation-all",
            EveryClassParams,
            build("augmentation-all"),
            summary=f"makes the first ratio of every class {appearance.adjective}",
            study=study("augmentation-all"),
        ),
    )


def _class_mode(source: Source, mode: str, params: Any, appearance: Appearance) -> ModeResult:
    base = source.base
    cls = getattr(params, "cls", None)
    seed = getattr(params, "seed", 0)
    index, split_manifest = split_index(base, params)
    splits, info, origin = class_mode_splits(
        base.x,
        base.y,
        base.ids,
        base.groups,
        index,
        mode,
        cls,
        params.ratio,
        seed,
        appearance.change,
        len(base.class_names),
    )
    changed = mode in APPEARANCE_MODES
    manifest: dict[str, Any] = {
        "change": {
            "mode": mode,
            "target_class": cls,
            "appearance": appearance.name if changed else None,
            **info,
        },
        **split_manifest,
    }
    if changed:
        manifest["test_gray"] = appearance.test_gray
    cls_name = base.class_names[cls] if cls is not None else None
    description = class_mode_description(mode, cls_name, params.ratio, appearance.adjective, seed)
    if "val" not in index:
        description += " No validation split: every training image is in train."
    return ModeResult(splits, description, manifest, origin)


def class_mode_description(
    mode: str, cls_name: str | None, ratio: float, change: str, seed: int
) -> str:
    """The one-sentence description of a class mode."""
    pct = f"{ratio:.0%}"
    if mode == "holdout":
        return (
            f"Removed the first {pct} of class {cls_name}'s training samples; affected rows "
            f"are its validation and test samples."
        )
    if mode == "holdout-dup":
        return (
            f"Replaced the first {pct} of class {cls_name}'s training samples by copies of "
            f"random remaining samples of the class (seed {seed}); affected rows are the "
            f"copies and the class's validation and test samples."
        )
    if mode == "augmentation":
        return (
            f"Made the first {pct} of class {cls_name}'s training samples {change}; affected "
            f"rows are those and the class's validation and test samples; test_gray is the "
            f"test set made {change}."
        )
    return (
        f"Made the first {pct} of every class's training samples {change}; affected rows are "
        f"those and every sample of test_gray, the test set made {change}."
    )


def class_mode_splits(
    images: Any,
    labels: np.ndarray,
    ids: np.ndarray,
    groups: np.ndarray,
    index: dict[str, np.ndarray],
    mode: str,
    cls: int | None,
    ratio: float,
    seed: int,
    change: Change,
    n_classes: int,
) -> tuple[dict[str, SplitData], dict[str, Any], dict[str, np.ndarray]]:
    """Build the splits of a class mode, a manifest section describing the change, and the
    source position each training row's image is copied from (``holdout-dup``'s copies are
    other samples' images).

    ``images``/``labels``/``ids``/``groups`` are indexed by source position (``images`` may
    be a memory map); ``index`` maps ``train``, ``val``, ``test`` to positions in split order
    (no ``val``: a scenario without a validation split).
    """
    assert mode in CLASS_MODES
    train_pos = index["train"]
    x_train = np.ascontiguousarray(images[train_pos])
    y_train = labels[train_pos]
    affected = np.zeros(len(train_pos), dtype=bool)
    keep = np.ones(len(train_pos), dtype=bool)
    origin = np.asarray(train_pos, dtype=np.int64).copy()
    info: dict[str, Any] = {
        "rule": "first floor(ratio * count) training samples of the class in split order",
    }
    targets = list(range(n_classes)) if mode == "augmentation-all" else [cls]
    per_class: dict[str, int] = {}
    for c in targets:
        members = np.flatnonzero(y_train == c)
        k = n_affected(ratio, len(members))
        chosen = members[:k]
        per_class[str(c)] = int(k)
        if mode == "holdout":
            keep[chosen] = False
        elif mode == "holdout-dup":
            remaining = members[k:]
            if k and not len(remaining):
                raise MlvarError(
                    f"holdout-dup of class {c} with ratio {ratio} leaves no sample to copy",
                    "use a ratio below 1.0 (holdout deletes the whole class)",
                )
            rng = np.random.default_rng(seed)
            picks = remaining[rng.integers(0, len(remaining), size=k)] if k else chosen
            x_train[chosen] = x_train[picks]
            origin[chosen] = origin[picks]
            affected[chosen] = True
            info["copies"] = {
                "ids": ids[train_pos[chosen]].tolist(),
                "source_ids": ids[train_pos[picks]].tolist(),
                "draw": f"numpy.random.default_rng({seed}).integers over the remaining samples",
            }
        else:
            x_train[chosen] = change(x_train[chosen])
            affected[chosen] = True
    info["affected_train_per_class" if mode != "holdout" else "removed_train_per_class"] = per_class
    splits = {
        "train": SplitData(
            x=x_train[keep],
            y=y_train[keep],
            id=ids[train_pos][keep],
            affected=affected[keep],
            group=groups[train_pos][keep],
        )
    }
    for s in ("val", "test"):
        if s not in index:
            continue
        pos = index[s]
        y = labels[pos]
        flags = np.zeros(len(pos), bool) if mode == "augmentation-all" else y == cls
        splits[s] = SplitData(
            x=np.ascontiguousarray(images[pos]), y=y, id=ids[pos], affected=flags, group=groups[pos]
        )
    if mode in APPEARANCE_MODES:
        test = splits["test"]
        flags = np.ones(len(test), bool) if mode == "augmentation-all" else test.affected.copy()
        splits["test_gray"] = SplitData(
            x=change(test.x), y=test.y, id=test.id, affected=flags, group=test.group
        )
    return splits, info, {"train": origin[keep]}


# --------------------------------------------------------------------------- study protocol


def _study_class_mode(
    source: Source, mode: str, params: Any, appearance: Appearance, split: StudySplit
) -> ModeResult:
    """A class mode under the study protocol (see the module docstring)."""
    base = source.base
    cls = getattr(params, "cls", None)
    seed = getattr(params, "seed", 0)
    # The full training set in file order: the study changed it before any split.
    full = np.sort(np.concatenate([base.index["train"], base.index["val"]]))
    y_full = base.y[full]
    every = mode == "augmentation-all"
    targets = np.arange(len(full)) if every else np.flatnonzero(y_full == cls)
    k = n_affected(params.ratio, len(targets))
    chosen, remaining = targets[:k], targets[k:]
    # Per row of the changed set: the sample it is (index into ``full``), the image it
    # shows, and whether it was changed.
    sample = np.arange(len(full))
    info: dict[str, Any] = {
        "rule": "first floor(ratio * count) of "
        + ("all training images" if mode == "augmentation-all" else "the class's training images")
        + " in the full training set in file order, changed before validation is split off",
    }
    if mode == "holdout":
        sample = np.delete(sample, chosen)
    shown = sample.copy()
    changed = np.zeros(len(sample), bool)
    if mode == "holdout-dup":
        if k and not len(remaining):
            raise MlvarError(
                f"holdout-dup of class {cls} with ratio {params.ratio} leaves no sample to copy",
                "use a ratio below 1.0 (holdout deletes the whole class)",
            )
        rng = np.random.default_rng(seed)
        picks = remaining[rng.integers(0, len(remaining), size=k)] if k else chosen
        shown[chosen] = picks
        info["copies"] = {
            "ids": base.ids[full[chosen]].tolist(),
            "source_ids": base.ids[full[picks]].tolist(),
            "draw": f"numpy.random.default_rng({seed}).integers over the remaining samples "
            "(the study drew with random.choice, unseeded)",
        }
    if mode != "holdout":
        changed[chosen] = True
    per_class = np.bincount(y_full[chosen], minlength=len(base.class_names))
    key = "removed_train_per_class" if mode == "holdout" else "affected_train_per_class"
    info[key] = {str(c): int(n) for c, n in enumerate(per_class) if cls is None or c == cls}
    train_rows, val_rows = split(np.arange(len(sample)))
    splits: dict[str, SplitData] = {}
    origin: dict[str, np.ndarray] = {}
    for s, rows in (("train", train_rows), ("val", val_rows)):
        pos, image_pos = full[sample[rows]], full[shown[rows]]
        x = np.ascontiguousarray(base.x[image_pos])
        flags = changed[rows].copy()
        if mode in APPEARANCE_MODES and flags.any():
            x[flags] = appearance.change(x[flags])
        y = base.y[pos]
        if s == "val" and cls is not None:
            flags |= y == cls
        splits[s] = SplitData(x=x, y=y, id=base.ids[pos], affected=flags, group=base.groups[pos])
        origin[s] = image_pos
    info["changed_in"] = {
        s: int(changed[rows].sum()) for s, rows in (("train", train_rows), ("val", val_rows))
    }
    test = base.index["test"]
    y_test = base.y[test]
    splits["test"] = SplitData(
        x=np.ascontiguousarray(base.x[test]),
        y=y_test,
        id=base.ids[test],
        affected=np.zeros(len(test), bool) if cls is None else y_test == cls,
        group=base.groups[test],
    )
    changes = mode in APPEARANCE_MODES
    manifest: dict[str, Any] = {
        "change": {
            "mode": mode,
            "target_class": cls,
            "appearance": appearance.name if changes else None,
            **info,
        },
        "split": {
            **base.manifest["split"],
            "of": "the changed training set",
            "order": "as train_test_split returns it",
        },
    }
    if changes:
        test_split = splits["test"]
        flags = np.ones(len(test), bool) if cls is None else test_split.affected.copy()
        splits["test_gray"] = SplitData(
            x=appearance.change(test_split.x),
            y=test_split.y,
            id=test_split.id,
            affected=flags,
            group=test_split.group,
        )
        manifest["test_gray"] = (
            f"{appearance.test_gray} (an mlvar addition: the study wrote no such copy)"
        )
    cls_name = base.class_names[cls] if cls is not None else None
    description = _study_description(mode, cls_name, params.ratio, appearance.adjective, seed)
    return ModeResult(splits, description, manifest, origin)


def _study_description(
    mode: str, cls_name: str | None, ratio: float, change: str, seed: int
) -> str:
    of = "all training images" if cls_name is None else f"class {cls_name}'s training images"
    did = {
        "holdout": "Removed",
        "holdout-dup": f"Replaced by copies of random remaining images of the class (seed {seed})",
        "augmentation": f"Made {change}",
        "augmentation-all": f"Made {change}",
    }[mode]
    flagged = "the changed images" if mode != "holdout" else ""
    if cls_name is not None:
        flagged += (" and " if flagged else "") + "the class's validation and test samples"
    extra = f"; test_gray is the test set made {change}" if mode in APPEARANCE_MODES else ""
    return (
        f"{did} the first {ratio:.0%} of {of} (full training set, file order), then split off "
        f"validation; affected rows are {flagged}{extra}."
    )


def group_counts(
    splits: dict[str, SplitData], groups: list[int], names: dict[int, str]
) -> dict[str, dict[str, dict[str, int]]]:
    """Per split, total and affected counts of each group in ``groups`` (manifest section)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for s, data in splits.items():
        out[s] = {
            names[g]: {
                "total": int((data.group == g).sum()),
                "affected": int((data.affected & (data.group == g)).sum()),
            }
            for g in groups
        }
    return out
