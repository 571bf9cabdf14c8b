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

``holdout`` and ``holdout-dup`` also write ``full_val``: the validation split as it was
before anything was held out, i.e. the val split of the same scenario at ratio 0, with the
target class's samples affected. Under the mlvar protocol validation is split off before
the change, so ``full_val`` holds the same rows as ``val``; under the study protocol it is
the study split of the unchanged full training set, so it holds the removed images (and
the originals of those ``holdout-dup`` replaced) that ``val`` lacks.
"""

from __future__ import annotations

import hashlib
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
#: The class modes that hold samples out (and so write :data:`FULL_VAL`).
HOLDOUT_MODES = ("holdout", "holdout-dup")
#: The split of every holdout scenario that holds the validation split as it was before
#: anything was held out (the pool of retraining), the held-out group's samples affected.
FULL_VAL = "full_val"
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
    if mode in HOLDOUT_MODES and "val" in splits:  # --val-fraction 0: no val, no pool
        # Validation was split off before the change and is unchanged: the full
        # validation split is the val split itself (the class's samples affected).
        val = splits["val"]
        splits[FULL_VAL] = SplitData(
            x=val.x, y=val.y, id=val.id, affected=val.affected.copy(), group=val.group
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
    if mode in HOLDOUT_MODES:
        # Validation of the unchanged full training set (the val split of ratio 0: the
        # same split of as many rows), the class's samples affected.
        _, full_rows = split(np.arange(len(full)))
        pos = full[full_rows]
        y = base.y[pos]
        splits[FULL_VAL] = SplitData(
            x=np.ascontiguousarray(base.x[pos]),
            y=y,
            id=base.ids[pos],
            affected=y == cls,
            group=base.groups[pos],
        )
        origin[FULL_VAL] = pos
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


# --------------------------------------------------------------------------- label noise
#
# ``label-noise --ratio a [--cls c | --where EXPR] [--to t] [--seed s]``, a mode of every
# dataset (docs/datasets.md, "Label noise"). The eligible rows are the training rows (in
# split order) of class c (``--cls``), or matching the pandas query EXPR on the dataset's
# raw columns (``--where``, tables only), else every training row; with ``--to t`` the rows
# already labelled t are not eligible. Of the n eligible rows exactly floor(a * n) are
# flipped, drawn by ``rng = numpy.random.default_rng(seed)``: ``rng.permutation(n)[:k]``,
# sorted, picks them (positions into the eligible rows); each gets label t, or (uniform
# noise) ``(y + rng.integers(1, n_classes, size=k)) % n_classes`` drawn next from the same
# rng: uniformly one of the other classes. The flipped training rows are the affected ones;
# validation and test keep their labels and have no affected row. The images or features
# are untouched. The detection target is the train split (``detect_split`` in the manifest).

LABEL_NOISE = "label-noise"
#: The manifest key naming the split whose affected samples a scenario's analysis scores
#: (absent: the test split).
DETECT_SPLIT_KEY = "detect_split"

#: ``frame(source)``: a table's raw columns as a pandas DataFrame, row i = source position i
#: (what ``--where`` queries).
Frame = Callable[[Source], Any]


def _check_query(value: Any, where: p.Where) -> str:
    text = str(value).strip() if isinstance(value, str) else ""
    if not text:
        raise MlvarError(
            f"{where.dataset} --where must be a pandas query, got {value!r}",
            'e.g. --where "age < 30"',
        )
    return text


def _query_tag(expr: str) -> str:
    """``--where`` in scenario names: the first 8 hex digits of the query's sha256."""
    return hashlib.sha256(expr.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class LabelNoiseParams(p.Params):
    """``label-noise``: the class whose labels are flipped (default: every class), the
    class they are flipped to (default: uniformly another), the fraction and the seed."""

    cls: int | None = p.class_index(
        help="flip labels of this class only (default: of every class)", default=None, optional=True
    )
    to: int | None = p.class_index(
        help="flip them to this class (class-conditional noise; default: uniformly to another "
        "class)",
        default=None,
        optional=True,
        flag="to",
    )
    ratio: float = p.ratio(help="fraction of the eligible training labels flipped, in [0, 1]")
    seed: int = p.seed(help="seed of the draw of the flipped rows and their new labels")

    def validate(self, where: p.Where) -> None:
        if self.cls is not None and self.cls == self.to:
            raise MlvarError(
                f"{where.dataset} label-noise --cls {self.cls} --to {self.to} flips nothing",
                "give --to another class than --cls",
            )


@dataclass(frozen=True)
class TableLabelNoiseParams(LabelNoiseParams):
    """``label-noise`` of a table: as :class:`LabelNoiseParams`, and ``--where``."""

    where: str | None = p.option(
        metavar="EXPR",
        check=_check_query,
        help="flip labels of the training rows matching this pandas query only (tables)",
        tag="where",
        omit=None,
        fmt=_query_tag,
        lists=False,  # one query: its commas belong to it
    )

    def validate(self, where: p.Where) -> None:
        super().validate(where)
        if self.cls is not None and self.where is not None:
            raise MlvarError(
                f"{where.dataset} label-noise takes --cls or --where, not both",
                'add the class to the query, e.g. --where "label == 1 and age < 30"',
            )


def label_noise_mode(frame: Frame | None = None) -> ModeSpec:
    """The ``label-noise`` mode of a dataset; ``frame`` (tables) gives the raw columns
    ``--where`` queries (None: the mode takes no ``--where``)."""

    def build(source: Source, params: Any) -> ModeResult:
        return _label_noise(source, params, frame)

    return ModeSpec(
        LABEL_NOISE,
        TableLabelNoiseParams if frame is not None else LabelNoiseParams,
        build,
        summary="flips a seeded fraction of the training labels (the train split is the target)",
        example="--cls 2 --ratio 0.1",
    )


def flip_labels(
    y: np.ndarray, eligible: np.ndarray, ratio: float, n_classes: int, to: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The positions (into ``y``) flipped and their new labels, by the rule of the block
    comment above: ``floor(ratio * len(eligible))`` of the ``eligible`` positions."""
    rng = np.random.default_rng(seed)
    k = n_affected(ratio, len(eligible))
    chosen = np.sort(eligible[rng.permutation(len(eligible))[:k]])
    if to is not None:
        new = np.full(k, to, dtype=np.int64)
    else:
        new = (y[chosen] + rng.integers(1, n_classes, size=k)) % n_classes
    return chosen, new.astype(np.int64)


def _where_rows(source: Source, frame: Frame, expr: str, train_pos: np.ndarray) -> np.ndarray:
    """The training rows (positions into the train split) matching the query ``expr``."""
    rows = frame(source).iloc[train_pos].reset_index(drop=True)
    try:
        matched = rows.query(expr, engine="python")
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a bad query
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MlvarError(
            f"--where '{expr}' is not a valid query of the columns: {first}",
            "columns: " + ", ".join(map(str, rows.columns)),
        ) from None
    if not isinstance(matched, type(rows)):
        raise MlvarError(f"--where '{expr}' does not select rows", 'e.g. --where "age < 30"')
    hits = matched.index.to_numpy(np.int64)
    if not len(hits):
        raise MlvarError(
            f"--where '{expr}' matches no training row", "check the query against the columns"
        )
    if len(hits) == len(rows):
        raise MlvarError(
            f"--where '{expr}' matches every training row",
            "leave out --where to flip labels among all training rows",
        )
    return hits


def _label_noise(source: Source, params: Any, frame: Frame | None) -> ModeResult:
    base = source.base
    n_classes = len(base.class_names)
    splits = unchanged_splits(base)
    train = splits["train"]
    y = train.y
    expr = getattr(params, "where", None)
    if params.cls is not None:
        eligible = np.flatnonzero(y == params.cls)
        of = f"class {base.class_names[params.cls]}"
    elif expr is not None:
        assert frame is not None
        eligible = _where_rows(source, frame, expr, base.index["train"])
        of = f"the training rows matching {expr!r}"
    else:
        eligible = np.arange(len(y))
        of = "every class"
    if params.to is not None:
        eligible = eligible[y[eligible] != params.to]
    chosen, new = flip_labels(y, eligible, params.ratio, n_classes, params.to, params.seed)
    old = y[chosen]
    y_noisy = y.copy()
    y_noisy[chosen] = new
    affected = np.zeros(len(y), bool)
    affected[chosen] = True
    splits["train"] = SplitData(
        x=train.x, y=y_noisy, id=train.id, affected=affected, group=train.group
    )
    pairs = {}
    for a, b in zip(old.tolist(), new.tolist(), strict=True):
        pairs[f"{a}->{b}"] = pairs.get(f"{a}->{b}", 0) + 1
    to_text = f"class {base.class_names[params.to]}" if params.to is not None else "another class"
    noise = {
        "ratio": params.ratio,
        "seed": params.seed,
        "cls": params.cls,
        "to": params.to,
        "where": expr,
        "rule": "floor(ratio * n) of the n eligible training rows (of the class, or matching "
        "--where, else all; without those already of --to), flipped to --to or uniformly "
        "to another class",
        "draw": f"rng = numpy.random.default_rng({params.seed}); rows: "
        "sorted(eligible[rng.permutation(n)[:k]]); "
        + (
            f"labels: {params.to}"
            if params.to is not None
            else "labels: (y + rng.integers(1, n_classes, size=k)) % n_classes"
        ),
        "eligible": int(len(eligible)),
        "flipped": int(len(chosen)),
        "counts": dict(sorted(pairs.items())),
        "ids": train.id[chosen].tolist(),
        "from": old.tolist(),
        "new": new.tolist(),
    }
    description = (
        f"Flipped {params.ratio:.0%} of the training labels of {of} "
        f"({len(chosen)} of {len(eligible)}) to {to_text} (seed {params.seed}); affected rows "
        "are the flipped training samples (detect them on the train split); validation and "
        "test keep their labels."
    )
    manifest = {"label_noise": noise, DETECT_SPLIT_KEY: "train"}
    return ModeResult(splits, description, manifest)
