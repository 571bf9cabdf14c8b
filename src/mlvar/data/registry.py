"""The datasets mlvar can prepare, and one entry point for fetching and preparing them.

Every check on the user's input happens before anything is written, so a bad command
leaves the data root as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data import cifar, compas, digits, images
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError, unknown_choice

PrepareFn = Callable[..., Scenario]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its scenario modes, whether it must be fetched, and how to prepare it.

    ``prepare`` is called as
    ``prepare(data_root, mode, ratio, cluster, subclass, seed, force, cls)`` with a mode
    already validated; it rejects parameters the mode does not take.
    """

    name: str
    modes: tuple[str, ...]
    needs_fetch: bool
    description: str
    prepare: PrepareFn


def _reject(dataset: str, mode: str, **given: Any) -> None:
    """Raise for the first parameter the mode does not take (given = not None / non-zero)."""
    for option, value in given.items():
        if value is not None and not (option == "seed" and value == 0):
            raise MlvarError(
                f"{dataset} mode '{mode}' takes no --{option}",
                f"valid options for {dataset}: " + _OPTIONS[dataset],
            )


_OPTIONS = {
    "compas": "--mode artificial --ratio A [--seed S] | --mode holdout --cluster K",
    "digits": "--mode holdout --subclass D [--ratio A] | --mode holdout|holdout-dup|augmentation "
    "--cls C --ratio A [--seed S] | --mode augmentation-all --ratio A",
    "cifar10": "--mode holdout|holdout-dup|augmentation --ratio A [--cls C] [--seed S] "
    "| --mode augmentation-all --ratio A",
    "cifar100": "--subclass NAME[+NAME] [--ratio A]",
}


def _prepare_compas(
    data_root: Path,
    mode: str,
    ratio: float | None,
    cluster: int | None,
    subclass: Any,
    seed: int,
    force: bool,
    cls: Any = None,
) -> Scenario:
    _reject("compas", mode, subclass=subclass, cls=cls)
    return compas.prepare_compas(
        data_root, mode, ratio=ratio, cluster=cluster, seed=seed, force=force
    )


def _prepare_digits(
    data_root: Path,
    mode: str,
    ratio: float | None,
    cluster: int | None,
    subclass: Any,
    seed: int,
    force: bool,
    cls: Any = None,
) -> Scenario:
    _reject("digits", mode, cluster=cluster)
    if mode not in ("holdout-dup",):
        _reject("digits", mode, seed=seed)
    if mode == "original":
        _reject("digits", mode, subclass=subclass, ratio=ratio, cls=cls)
    return digits.prepare_digits(
        data_root, mode, subclass=subclass, ratio=ratio, force=force, cls=cls, seed=seed
    )


def _prepare_cifar10(
    data_root: Path,
    mode: str,
    ratio: float | None,
    cluster: int | None,
    subclass: Any,
    seed: int,
    force: bool,
    cls: Any = None,
) -> Scenario:
    _reject("cifar10", mode, cluster=cluster, subclass=subclass)
    return cifar.prepare_cifar10(data_root, mode, cls=cls, ratio=ratio, seed=seed, force=force)


def _prepare_cifar100(
    data_root: Path,
    mode: str,
    ratio: float | None,
    cluster: int | None,
    subclass: Any,
    seed: int,
    force: bool,
    cls: Any = None,
) -> Scenario:
    _reject("cifar100", mode, cluster=cluster, cls=cls, seed=seed)
    return cifar.prepare_cifar100(data_root, mode, subclass=subclass, ratio=ratio, force=force)


DATASETS: dict[str, DatasetSpec] = {
    "compas": DatasetSpec(
        name="compas",
        modes=compas.MODES,
        needs_fetch=True,
        description="ProPublica COMPAS two-year recidivism (tabular, 2 classes, 6,172 rows)",
        prepare=_prepare_compas,
    ),
    "digits": DatasetSpec(
        name="digits",
        modes=digits.MODES,
        needs_fetch=False,
        description="scikit-learn digits (8x8 gray images, 1,797 samples; ships offline)",
        prepare=_prepare_digits,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        modes=cifar.CIFAR10_MODES,
        needs_fetch=True,
        description="CIFAR-10 (32x32 colour images, 10 classes, 50,000 + 10,000)",
        prepare=_prepare_cifar10,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        modes=cifar.CIFAR100_MODES,
        needs_fetch=True,
        description="CIFAR-100 as 10 superclasses (32x32 colour images, 25,000 + 5,000)",
        prepare=_prepare_cifar100,
    ),
}


def get_dataset(dataset: str) -> DatasetSpec:
    """Return the spec of ``dataset`` or raise :class:`MlvarError` naming the valid ones."""
    if dataset not in DATASETS:
        raise unknown_choice("dataset", str(dataset), DATASETS)
    return DATASETS[dataset]


def default_mode(dataset: str, subclass: Any = None) -> str:
    """The mode used when none is given: digits or cifar100 with a subclass is ``holdout``."""
    if dataset in ("digits", "cifar100") and subclass is not None:
        return "holdout"
    return "original"


def prepare(
    data_root: str | os.PathLike,
    dataset: str,
    mode: str | None = None,
    ratio: float | None = None,
    cluster: int | None = None,
    subclass: int | str | None = None,
    seed: int = 0,
    force: bool = False,
    cls: int | str | None = None,
) -> Scenario:
    """Prepare a scenario of ``dataset`` and return it.

    Parameters
    ----------
    data_root
        Data root for the scenario folder (and ``raw/`` for fetched datasets).
    dataset, mode
        Which dataset and scenario mode; ``mode`` defaults to ``original`` (digits:
        ``holdout`` when ``subclass`` is given).
    ratio, cluster, subclass, seed, cls
        Mode parameters; one the mode does not take is an error.
    force
        Replace an existing scenario folder instead of refusing.

    Raises
    ------
    MlvarError
        Unknown dataset or mode, bad parameters, missing raw data, or an existing scenario
        without ``force``. Nothing is written in that case.
    """
    spec = get_dataset(dataset)
    if mode is None:
        mode = default_mode(dataset, subclass)
    if mode not in spec.modes:
        raise unknown_choice(f"{dataset} mode", str(mode), spec.modes)
    return spec.prepare(Path(data_root), mode, ratio, cluster, subclass, seed, force, cls)


def fetch(
    data_root: str | os.PathLike,
    dataset: str,
    source: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Fetch a dataset's raw files into ``data_root`` (download or copy ``source``).

    Returns an info dict (``dataset``, ``path``, ``sha256``, ``rows``, ``verified``, ...).
    Datasets that ship with a library need no fetch; their info says so and nothing is
    written.
    """
    spec = get_dataset(dataset)
    if dataset == "compas":
        return compas.fetch_compas(data_root, source=source, verify=verify, progress=progress)
    if dataset in cifar.SOURCES:
        return cifar.fetch_cifar(
            data_root, dataset, source=source, verify=verify, progress=progress
        )
    assert not spec.needs_fetch
    if source is not None:
        raise MlvarError(f"{dataset} takes no --source", f"{dataset} ships with scikit-learn")
    _, target, digest = digits.load_digit_arrays()
    return {
        "dataset": dataset,
        "path": None,
        "sha256": digest,
        "rows": int(len(target)),
        "verified": True,
        "source": digits.SOURCE_NAME,
        "action": "nothing to fetch: ships with scikit-learn",
    }


def scenario_info(scenario: Scenario) -> dict[str, Any]:
    """Summarise a scenario's splits for a table.

    Returns
    -------
    dict
        ``name``, ``dataset``, ``mode``, ``params``, ``description``, ``class_names``,
        ``splits`` (per split: ``total``, ``affected``, ``unaffected`` and ``per_class``
        mapping each class name to its ``total`` / ``affected`` / ``unaffected`` counts)
        and ``rows`` (the same per split and class, flattened: one dict per row), and
        ``groups``: one row (``split``, ``group``, ``total``, ``affected``) per split and
        affected subgroup (a held-out fine class or digit), empty where there are none.
    """
    class_names = scenario.class_names
    counts = scenario.manifest.get("counts") or {}
    splits: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for split in scenario.splits:
        if split in counts:
            per_class = list(counts[split]["per_class"])
            affected = list(counts[split]["affected_per_class"])
        else:
            # Older manifests without counts: count from the arrays.
            data = scenario.load(split)
            per_class = np.bincount(data.y, minlength=len(class_names)).tolist()
            affected = np.bincount(data.y[data.affected], minlength=len(class_names)).tolist()
        by_class = {}
        for name, total, aff in zip(class_names, per_class, affected, strict=True):
            entry = {"total": int(total), "affected": int(aff), "unaffected": int(total - aff)}
            by_class[name] = entry
            rows.append({"split": split, "class": name, **entry})
        total_all, affected_all = int(sum(per_class)), int(sum(affected))
        splits[split] = {
            "total": total_all,
            "affected": affected_all,
            "unaffected": total_all - affected_all,
            "per_class": by_class,
        }
    groups = [
        {"split": split, "group": group, "total": int(c["total"]), "affected": int(c["affected"])}
        for split, per_group in (scenario.manifest.get("group_counts") or {}).items()
        for group, c in per_group.items()
    ]
    return {
        "name": scenario.name,
        "dataset": scenario.dataset,
        "mode": scenario.mode,
        "params": dict(scenario.manifest.get("params", {})),
        "description": scenario.manifest.get("description", ""),
        "class_names": class_names,
        "splits": splits,
        "rows": rows,
        "groups": groups,
    }


def contact_sheet(scenario: Scenario, path: str | os.PathLike, per_row: int = 8) -> dict[str, Any]:
    """Write a PNG contact sheet of a scenario's affected and unaffected samples to ``path``.

    Returns ``path`` and the titles of the sheet's rows. A scenario without images is an
    :class:`MlvarError`, and nothing is written then.
    """
    return images.write_contact_sheet(scenario, path, per_row=per_row)
