"""CIFAR-100 as 10 superclasses (the original study's "cifar100-cifar10" setup):
``original`` and ``holdout`` of fine classes (docs/design.md section 4).

Of CIFAR-100's 20 coarse classes the 10 of :data:`KEPT_SUPERCLASSES` are kept and
relabelled 0-9; the other images are dropped. ``holdout`` (the default mode with
``--subclass``) removes the first ``floor(ratio * count)`` samples of each named fine class
from train and from validation (each split separately, in original order; ``ratio``
defaults to 1.0). The test split is untouched. Affected: the named fine classes' test
samples, and those left in train and validation when ``ratio < 1`` (so detection can be
scored on every split that holds some, as the study did). ``group`` is the fine class.
``full_val`` is the validation split before anything was held out (the val split of ratio
0, under either protocol), the named fine classes' samples affected.

Under ``--protocol study`` (the original study's ``prepare_holdout_cifar100-cifar10.py``)
train and validation keep the order the split gives them (shuffled), the first
``floor(ratio * count)`` of the named fine classes' samples *together* (a pair pooled) are
removed from each split in that order, and the fine classes' samples left in train and
validation are affected too.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data import params as p
from mlvar.data.modes import (
    FULL_VAL,
    group_counts,
    label_noise_mode,
    n_affected,
    original_mode,
    unchanged_splits,
)
from mlvar.data.scenario import SplitData
from mlvar.data.spec import (
    BaseData,
    DatasetSpec,
    ModeResult,
    ModeSpec,
    Source,
    TrainDefaults,
)
from mlvar.errors import MlvarError

#: The 10 CIFAR-100 superclasses of the original "cifar100-cifar10" setup, in label order.
KEPT_SUPERCLASSES = (
    "aquatic_mammals",
    "fish",
    "flowers",
    "fruit_and_vegetables",
    "insects",
    "medium_mammals",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
)
#: The subclasses of the original study.
STUDY_SUBCLASSES = (
    "ray",
    "mushroom",
    "caterpillar",
    "porcupine",
    "baby",
    "boy+man",
    "girl+woman",
    "boy+girl",
    "man+woman",
)
_SUBCLASS_EXAMPLE = "e.g. --subclass baby or --subclass boy+man"


class Cifar100Data(Source):
    """The fetched CIFAR-100 copy: its names at once, its arrays on first use."""

    def __init__(self, data_root: Path) -> None:
        from mlvar.data import cifar

        super().__init__(data_root)
        self.meta = cifar.load_raw(data_root, "cifar100", arrays=False).source
        missing = [c for c in KEPT_SUPERCLASSES if c not in self.meta["coarse_names"]]
        if missing:
            raise MlvarError(f"the CIFAR-100 copy lacks superclasses {', '.join(missing)}", "")
        self.fine_names: list[str] = list(self.meta["fine_names"])

    def kept_fine_names(self) -> list[str]:
        """The fine classes of the kept superclasses, in label order."""
        coarse = list(self.meta["coarse_names"])
        kept = {coarse.index(c) for c in KEPT_SUPERCLASSES}
        parent = list(self.meta["fine_to_coarse"])
        return [f for i, f in enumerate(self.fine_names) if parent[i] in kept]

    def load(self) -> BaseData:
        from mlvar.data import cifar

        raw = cifar.load_raw(self.data_root, "cifar100")
        a = raw.arrays
        n_train = raw.n_train
        kept_idx = [self.meta["coarse_names"].index(c) for c in KEPT_SUPERCLASSES]
        relabel = np.full(20, -1, dtype=np.int64)
        relabel[kept_idx] = np.arange(len(kept_idx))
        fine = np.concatenate([a["y_train"], a["y_test"]]).astype(np.int64)
        coarse = np.concatenate([a["coarse_train"], a["coarse_test"]]).astype(np.int64)
        labels = relabel[coarse]
        kept = np.flatnonzero(labels[:n_train] >= 0)
        train, val = cifar.split_train(kept)
        test = n_train + np.flatnonzero(labels[n_train:] >= 0)
        base = cifar.scenario_base(
            raw,
            "cifar100",
            labels=labels,
            groups=fine,
            index={"train": train, "val": val, "test": test},
            class_names=list(KEPT_SUPERCLASSES),
            order="file",
            split={"of": "the training images of the kept superclasses, before any holdout"},
            manifest={
                "superclasses": {
                    "kept": list(KEPT_SUPERCLASSES),
                    "coarse_index": kept_idx,
                    "rule": "samples of the other 10 superclasses are dropped",
                },
                "fine_class_names": self.fine_names,
                "group": "fine class (index into fine_class_names)",
            },
        )
        base.extra["relabel"] = relabel
        base.extra["study_index"] = dict(
            zip(("train", "val"), cifar.study_split(kept), strict=True)
        )
        return base


def fetch(data_root: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Fetch CIFAR-100: :func:`mlvar.data.cifar.fetch_cifar` (imported on first use)."""
    from mlvar.data import cifar

    return cifar.fetch_cifar(data_root, "cifar100", **options)


# --------------------------------------------------------------------------- holdout


def parse_subclasses(value: str, raw_source: dict[str, Any]) -> list[int]:
    """Fine-class indices of ``NAME[+NAME...]``, sorted; each must belong to a kept superclass.

    Raises
    ------
    MlvarError
        An unknown name, one of a dropped superclass, or a repeated name; the hint lists
        close valid names.
    """
    fine_names: list[str] = list(raw_source["fine_names"])
    coarse_names: list[str] = list(raw_source["coarse_names"])
    fine_to_coarse: list[int] = list(raw_source["fine_to_coarse"])
    kept = {coarse_names.index(c) for c in KEPT_SUPERCLASSES if c in coarse_names}
    valid = [f for i, f in enumerate(fine_names) if fine_to_coarse[i] in kept]
    out = []
    for part in value.split("+"):
        name = part.strip()
        near = _near(name, valid)
        if name not in fine_names:
            raise MlvarError(f"unknown CIFAR-100 fine class '{name}'", near)
        idx = fine_names.index(name)
        parent = fine_to_coarse[idx]
        if parent not in kept:
            owner = coarse_names[parent] if parent >= 0 else "none in this copy"
            raise MlvarError(
                f"CIFAR-100 fine class '{name}' belongs to superclass '{owner}', which the "
                "10-superclass setup drops",
                near,
            )
        if idx in out:
            raise MlvarError(f"cifar100 subclass '{name}' is given twice", "e.g. boy+man")
        out.append(idx)
    return sorted(out)


def _near(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    if close:
        return "close valid names: " + ", ".join(close)
    return "valid names: " + ", ".join(sorted(valid))


def _check_subclass(value: Any, where: p.Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MlvarError(f"cifar100 subclass {value!r} is not a fine class name", _SUBCLASS_EXAMPLE)
    return value


@dataclass(frozen=True)
class HoldoutParams(p.Params):
    subclass: str = p.option(
        metavar="NAME[+NAME]",
        check=_check_subclass,
        help="a fine class of a kept superclass, or a +-joined pair (baby, boy+man)",
        required=True,
        missing_hint=_SUBCLASS_EXAMPLE,
        tag="",
        keywords={
            "study": lambda source, where: list(STUDY_SUBCLASSES),
            "all": lambda source, where: source.kept_fine_names(),
        },
        study="study",
    )
    ratio: float = p.ratio(
        help="fraction of the fine classes' train and validation samples held out, in [0, 1] "
        "(default 1)",
        default=1.0,
    )

    def resolve(self, source: Cifar100Data) -> HoldoutParams:
        """The fine classes checked against the copy's names, spelled in label order."""
        subs = parse_subclasses(self.subclass, source.meta)
        return dataclasses.replace(self, subclass="+".join(source.fine_names[f] for f in subs))


def _held_out_names(source: Cifar100Data, subs: list[int]) -> tuple[list[str], list[str]]:
    """The names of the fine classes ``subs`` and of their superclasses (sorted)."""
    relabel = source.base.extra["relabel"]
    superclasses = {KEPT_SUPERCLASSES[int(relabel[source.meta["fine_to_coarse"][f]])] for f in subs}
    return [source.fine_names[f] for f in subs], sorted(superclasses)


def _holdout_splits(
    base: BaseData, index: dict[str, np.ndarray], subs: list[int]
) -> dict[str, SplitData]:
    """The splits at ``index`` (positions into ``base``), with the samples of the fine
    classes ``subs`` affected wherever they are left."""
    fine = base.groups
    sub_mask = np.isin(fine, subs)
    return {
        s: SplitData(
            x=base.x[pos], y=base.y[pos], id=base.ids[pos], affected=sub_mask[pos], group=fine[pos]
        )
        for s, pos in index.items()
    }


def _holdout(source: Cifar100Data, params: HoldoutParams) -> ModeResult:
    base = source.base
    fine, ratio, fine_names = base.groups, params.ratio, source.fine_names
    subs = parse_subclasses(params.subclass, source.meta)
    # The full validation split: val before anything was held out.
    index = {**base.index, FULL_VAL: base.index["val"]}
    removed: dict[str, dict[str, int]] = {}
    for s in ("train", "val"):
        pos = index[s]
        drop = []
        removed[s] = {}
        for f in subs:
            members = np.flatnonzero(fine[pos] == f)
            k = n_affected(ratio, len(members))
            removed[s][fine_names[f]] = int(k)
            drop.append(members[:k])
        index[s] = np.delete(pos, np.concatenate(drop))
    splits = _holdout_splits(base, index, subs)
    sub_names, superclasses = _held_out_names(source, subs)
    manifest = {
        "holdout": {
            "subclasses": sub_names,
            "superclasses": superclasses,
            "removed": removed,
            "rule": "first floor(ratio * count) samples of each fine class, in original order, "
            "from train and from validation separately",
        },
        "group_counts": group_counts(splits, subs, {f: fine_names[f] for f in subs}),
    }
    description = (
        f"Removed the first {ratio:.0%} of fine class {' and '.join(sub_names)} from train "
        f"and validation; affected rows are its samples left in train and validation, and "
        f"its test samples."
    )
    return ModeResult(splits, description, manifest)


def _study_index(base: BaseData) -> dict[str, np.ndarray]:
    return {**base.extra["study_index"], "test": base.index["test"]}


def _study_split_manifest(base: BaseData) -> dict[str, Any]:
    return {**base.manifest["split"], "order": "as train_test_split returns it"}


def _study_original(source: Cifar100Data, params: p.NoParams) -> ModeResult:
    base = source.base
    description = (
        "CIFAR-100 as 10 superclasses, unchanged, validation in the study's (shuffled) order; "
        "nothing injected."
    )
    manifest = {"split": _study_split_manifest(base)}
    return ModeResult(unchanged_splits(base, _study_index(base)), description, manifest)


def _study_holdout(source: Cifar100Data, params: HoldoutParams) -> ModeResult:
    base = source.base
    fine, ratio, fine_names = base.groups, params.ratio, source.fine_names
    subs = parse_subclasses(params.subclass, source.meta)
    index = {**_study_index(base), FULL_VAL: base.extra["study_index"]["val"]}
    removed: dict[str, int] = {}
    for s in ("train", "val"):
        pos = index[s]
        # The fine classes pooled, in the split's order.
        members = np.flatnonzero(np.isin(fine[pos], subs))
        k = n_affected(ratio, len(members))
        removed[s] = int(k)
        index[s] = np.delete(pos, members[:k])
    splits = _holdout_splits(base, index, subs)
    sub_names, superclasses = _held_out_names(source, subs)
    manifest = {
        "holdout": {
            "subclasses": sub_names,
            "superclasses": superclasses,
            "removed": removed,
            "rule": "first floor(ratio * count) samples of the fine classes together, in the "
            "split's order, from train and from validation separately; those left are affected",
        },
        "group_counts": group_counts(splits, subs, {f: fine_names[f] for f in subs}),
        "split": _study_split_manifest(base),
    }
    description = (
        f"Removed the first {ratio:.0%} of fine class {' and '.join(sub_names)} (together, in "
        f"the split's order) from train and validation; affected rows are its samples left in "
        f"every split."
    )
    return ModeResult(splits, description, manifest)


# --------------------------------------------------------------------------- the spec

SPEC = DatasetSpec(
    name="cifar100",
    description="CIFAR-100 as 10 superclasses (32x32 colour images, 25,000 + 5,000)",
    input_kind="image",
    mode_specs=(
        original_mode(
            "CIFAR-100 as 10 superclasses, unchanged; nothing injected.", study=_study_original
        ),
        ModeSpec(
            "holdout",
            HoldoutParams,
            _holdout,
            summary="holds out fine classes of their superclasses",
            study=_study_holdout,
        ),
        label_noise_mode(),
    ),
    open=Cifar100Data,
    fetch=fetch,
    needs_fetch=True,
    train=TrainDefaults("airbench"),
    n_classes=len(KEPT_SUPERCLASSES),
    implied_modes={"subclass": "holdout"},
)
MODES = SPEC.modes
