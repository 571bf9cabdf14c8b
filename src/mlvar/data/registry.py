"""The datasets mlvar can prepare, and one entry point for fetching and preparing them.

Each dataset is one module that defines its :class:`mlvar.data.spec.DatasetSpec` as
``SPEC``; :data:`BUILTIN` lists those modules, and importing this module registers their
specs in that order (the order the CLI lists them). :func:`mlvar.data.spec.register` adds
any other dataset. Importing this module loads neither pandas, scikit-learn, torch nor
matplotlib: they are imported where data is read or drawn.

User datasets (:mod:`mlvar.data.user`) are the names a user fetched with a *user kind*
(:data:`USER_KINDS`): :func:`get_dataset` resolves a name given a data root, built-in
names first.

Every check on the user's input happens before anything is written, so a bad command
leaves the data root as it was.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data import imagefolder, sweep, table, user
from mlvar.data.params import Option, given_options
from mlvar.data.protocol import DEFAULT_PROTOCOL
from mlvar.data.scenario import Scenario
from mlvar.data.spec import DATASETS, DatasetSpec, register
from mlvar.data.sweep import SweepProgress, SweepResult
from mlvar.errors import MlvarError, unknown_choice

#: The dataset modules of mlvar (``mlvar.data.<name>``), each defining ``SPEC``.
BUILTIN = ("compas", "digits", "cifar10", "cifar100")

for _module in BUILTIN:
    register(importlib.import_module(f"mlvar.data.{_module}").SPEC)

#: User kinds: ``mlvar data fetch KIND --source PATH --name NAME``. ``factory(name, info,
#: folder)`` builds the spec of a user dataset of the kind from its ``source.json``
#: (:mod:`mlvar.data.user`); the spec's ``fetch`` takes the kind's fetch options as
#: keyword arguments.
USER_KINDS: dict[str, Callable[[str, dict, Path], DatasetSpec]] = {
    "table": table.user_spec,
    "imagefolder": imagefolder.user_spec,
}

__all__ = [
    "BUILTIN",
    "DATASETS",
    "USER_KINDS",
    "DatasetSpec",
    "fetch",
    "get_dataset",
    "option_help",
    "prepare",
    "prepare_sweep",
    "register",
    "scenario_info",
    "sweep_help",
]


def get_dataset(dataset: str, data_root: str | os.PathLike | None = None) -> DatasetSpec:
    """Return the spec of ``dataset``: a built-in one, else the user dataset of that name
    fetched into ``data_root``; raise :class:`MlvarError` naming the valid ones."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    info = user.read_info(data_root, dataset) if data_root is not None else None
    if info is None:
        names = [*DATASETS, *(user.user_names(data_root) if data_root is not None else [])]
        if dataset in USER_KINDS:
            raise MlvarError(
                f"{dataset} is a kind of dataset, not a dataset",
                f"fetch your file first: mlvar data fetch {dataset} --source PATH --name NAME; "
                "then use NAME",
            )
        raise unknown_choice("dataset", str(dataset), names)
    factory = USER_KINDS.get(info["kind"])
    if factory is None:
        raise MlvarError(
            f"user dataset '{dataset}' is of kind '{info['kind']}', which this mlvar lacks",
            "kinds: " + ", ".join(USER_KINDS),
        )
    return factory(dataset, info, user.user_dir(data_root, dataset))


def kind_specs() -> dict[str, DatasetSpec]:
    """One spec per user kind, named after the kind (for help texts: their modes and
    options)."""
    return {kind: factory(kind, {"kind": kind}, Path()) for kind, factory in USER_KINDS.items()}


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
    protocol: str = DEFAULT_PROTOCOL,
) -> Scenario:
    """Prepare a scenario of ``dataset`` under ``protocol`` and return it.

    Parameters
    ----------
    data_root
        Data root for the scenario folder (and ``raw/`` for fetched datasets).
    dataset, mode
        Which dataset and scenario mode; ``mode`` defaults to ``original`` (digits and
        cifar100: ``holdout`` when ``subclass`` is given).
    ratio, cluster, subclass, seed, cls
        Mode parameters; one the mode does not take is an error.
    force
        Replace an existing scenario folder instead of refusing.
    protocol
        ``mlvar`` (the default) or ``study``: whose scenario rules (:mod:`mlvar.data.protocol`).

    Raises
    ------
    MlvarError
        Unknown dataset, mode or protocol, bad parameters, missing raw data, or an existing
        scenario without ``force``. Nothing is written in that case.
    """
    given = {"ratio": ratio, "cluster": cluster, "subclass": subclass, "seed": seed, "cls": cls}
    spec = get_dataset(dataset, data_root)
    return spec.prepare(data_root, mode, given_options(given), force=force, protocol=protocol)


def prepare_sweep(
    data_root: str | os.PathLike,
    dataset: str,
    mode: str | None = None,
    force: bool = False,
    progress: SweepProgress | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    **given: Any,
) -> SweepResult:
    """Prepare a sweep of scenarios of ``dataset``: :func:`mlvar.data.sweep.prepare_sweep`.

    Parameters
    ----------
    data_root, dataset, mode
        As :func:`prepare`.
    force
        Rebuild members already prepared (they are skipped otherwise).
    progress
        ``progress(done, total, name)`` before each scenario is built.
    protocol
        ``mlvar`` (the default) or ``study``: whose scenario rules every member follows.
    **given
        The options as typed, by option name (``ratio="0:0.5:0.1"``, ``cluster="all"``,
        ``subclass="study"``, ``cls="0,3"``, ``seed="0"``), or values; None (and seed 0)
        means not given. A required option not given is swept as the study did.

    Raises
    ------
    MlvarError
        Unknown dataset, mode or option; a bad value, list or range; a combination that
        cannot be prepared (naming it); missing raw data; or, for a single scenario given
        in full, an existing one without ``force``. Nothing is written in that case.
    """
    spec = get_dataset(dataset, data_root)
    return sweep.prepare_sweep(
        spec,
        data_root,
        mode,
        given_options(given),
        force=force,
        progress=progress,
        protocol=protocol,
    )


def sweep_help(option: str) -> str:
    """What ``--<option>`` of ``mlvar data prepare`` takes besides one value (a list, and
    ranges and keywords where declared) and, per mode, the study's sweep prepared when it
    is omitted: ``Several values: a comma-separated list or a range start:stop:step.
    Omitted: compas artificial: 0:0.5:0.1; cifar10/digits holdout, ...: 0:0.9:0.1.``"""
    forms = ["a comma-separated list"]
    studies: dict[str, dict[str, list[str]]] = {}
    for spec in [*DATASETS.values(), *kind_specs().values()]:
        for m in spec.mode_specs:
            opt = m.params.options().get(option)
            if opt is None:
                continue
            if opt.ranges and "a range start:stop:step" not in forms:
                forms.append("a range start:stop:step")
            forms += [f"'{word}'" for word in opt.keywords if f"'{word}'" not in forms]
            if opt.required and opt.study is not None:
                label = m.name if len(spec.variants(m.name)) == 1 else f"{m.name} --{m.key}"
                studies.setdefault(opt.study, {}).setdefault(spec.name, []).append(label)
    listed = f"{', '.join(forms[:-1])} or {forms[-1]}" if len(forms) > 1 else forms[0]
    text = f"Several values: {listed}."
    if studies:
        parts = [f"{where}: {values}" for where, values in _by_modes(studies)]
        text += " Omitted, the study's sweep: " + "; ".join(parts) + "."
    return text


def _by_modes(per_text: dict[str, dict[str, list[str]]]) -> list[tuple[str, str]]:
    """``(where, text)`` for each text's ``{dataset: [modes]}``, datasets with the same
    modes joined: ``("cifar10/digits holdout, holdout-dup", text)``."""
    out = []
    for text, per_dataset in per_text.items():
        groups: dict[tuple[str, ...], list[str]] = {}
        for name, modes in per_dataset.items():
            groups.setdefault(tuple(modes), []).append(name)
        out += [(f"{'/'.join(names)} {', '.join(modes)}", text) for modes, names in groups.items()]
    return out


def fetch(
    data_root: str | os.PathLike,
    dataset: str,
    source: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
    name: str | None = None,
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Fetch a dataset's raw files into ``data_root`` (download or copy ``source``), or
    record ``source`` as the user dataset ``name`` of the user kind ``dataset``.

    Returns an info dict (``dataset``, ``path``, ``sha256``, ``rows``, ``verified``, ...).
    Datasets that ship with a library need no fetch; their info says so and nothing is
    written. ``options`` (None: not given) are a user kind's own (``label``, ...);
    ``force`` replaces a user dataset fetched from other bytes.
    """
    given = {key: value for key, value in options.items() if value is not None}
    if dataset not in USER_KINDS:
        spec = get_dataset(dataset)
        extra = [f"--{key.replace('_', '-')}" for key in given]
        extra += ["--name"] * (name is not None) + ["--force"] * force
        if extra:
            raise MlvarError(
                f"{dataset} takes no {extra[0]}",
                f"{extra[0]} is for your own data: mlvar data fetch {'|'.join(USER_KINDS)}",
            )
        return spec.fetch(data_root, source=source, verify=verify, progress=progress)
    if name is None:
        raise MlvarError(f"{dataset} needs --name NAME", "the name you will prepare it under")
    user.check_name(name, [*DATASETS, *USER_KINDS])
    spec = USER_KINDS[dataset](
        name, {"kind": dataset, "name": name}, user.user_dir(data_root, name)
    )
    taken = inspect.signature(spec.fetch).parameters
    for key in given:
        if key not in taken:
            raise MlvarError(
                f"{dataset} takes no --{key.replace('_', '-')}", "see mlvar data fetch --help"
            )
    return spec.fetch(
        data_root, source=source, verify=verify, progress=progress, force=force, **given
    )


def option_help(option: str) -> str:
    """The ``--<option>`` help of ``mlvar data prepare``, from every mode that takes it:
    ``compas artificial: label-flip probability ... . cifar10/digits holdout, ...: ...``."""
    by_help: dict[str, dict[str, list[str]]] = {}
    for spec in [*DATASETS.values(), *kind_specs().values()]:
        for m in spec.mode_specs:
            opt: Option | None = m.params.options().get(option)
            if opt is None:
                continue
            # Name the variant only where two variants of the mode take the option.
            takers = [v for v in spec.variants(m.name) if option in v.params.options()]
            label = m.name if len(takers) == 1 else f"{m.name} --{m.key}"
            modes = by_help.setdefault(opt.help, {}).setdefault(spec.name, [])
            modes.append(label)
    return " ".join(f"{where}: {text}." for where, text in _by_modes(by_help))


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
