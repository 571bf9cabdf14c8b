"""Prepared scenarios grouped by family: the scenarios of one dataset and mode, and the
parameter values they were prepared with (what ``mlvar data list`` shows).

A study prepares a sweep per family (``mlvar data prepare cifar10 --mode holdout-dup``
writes ten ratios of class 0); listing its scenarios one by one hides that shape, the
families show it: ``cifar10 holdout-dup: cls 0; ratio 0.0, 0.1, ..., 0.9; seed 0`` (10
scenarios). A protocol's scenarios are a family of their own (``compas holdout (study)``,
:mod:`mlvar.data.protocol`). Reads manifests only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from numbers import Real
from pathlib import Path
from typing import Any

from mlvar.data.protocol import DEFAULT_PROTOCOL, protocol_of
from mlvar.data.registry import DATASETS, get_dataset
from mlvar.data.scenario import Scenario, list_scenarios
from mlvar.data.spec import DatasetSpec
from mlvar.errors import MlvarError

#: Values of one parameter listed in full up to this many (evenly spaced numbers are
#: always shortened to ``first, second, ..., last``).
VALUES_SHOWN = 10


@dataclass
class Family:
    """The prepared scenarios of one dataset and mode, prepared under one protocol.

    ``scenarios`` are ordered by their parameter values; ``params`` maps each parameter
    (in the order the mode declares them) to the distinct values prepared, sorted
    (a parameter some scenarios of the family do not take lists the others' values).
    """

    dataset: str
    mode: str
    scenarios: list[Scenario]
    params: dict[str, list[Any]]
    protocol: str = DEFAULT_PROTOCOL

    @property
    def name(self) -> str:
        """``<dataset> <mode>``: ``cifar10 holdout-dup``; another protocol than mlvar's in
        brackets: ``compas holdout (study)``."""
        suffix = "" if self.protocol == DEFAULT_PROTOCOL else f" ({self.protocol})"
        return f"{self.dataset} {self.mode}{suffix}"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.scenarios]

    def values_text(self, limit: int = VALUES_SHOWN) -> str:
        """The parameter values on one line: ``cls 0; ratio 0.0, 0.1, ..., 0.9; seed 0``
        ("" for a mode without parameters)."""
        return "; ".join(
            f"{name} {values_text(values, limit)}" for name, values in self.params.items()
        )


def scenario_families(data_root: str | os.PathLike, dataset: str | None = None) -> list[Family]:
    """The prepared scenarios under ``data_root`` (optionally of one dataset) by family:
    datasets and modes in the order mlvar lists them (others after, by name), each mode's
    mlvar family before its study family."""
    groups: dict[tuple[str, str, str], list[Scenario]] = {}
    for scenario in list_scenarios(Path(data_root), dataset):
        manifest = scenario.manifest
        key = (str(manifest.get("dataset")), str(manifest.get("mode")), protocol_of(manifest))
        groups.setdefault(key, []).append(scenario)
    families = []
    specs = {name: _spec(name, data_root) for name, _, _ in groups}
    ordered = sorted(groups.items(), key=lambda item: _family_order(*item[0], specs[item[0][0]]))
    for (name, mode, protocol), members in ordered:
        options = _option_order(specs[name], mode)
        params: dict[str, set[Any]] = {option: set() for option in options}
        for scenario in members:
            for option, value in (scenario.manifest.get("params") or {}).items():
                values = params.setdefault(option, set())
                if value is not None:
                    values.add(_hashable(value))
        members.sort(
            key=lambda s: [_value_order(s.manifest.get("params", {}).get(p)) for p in params]
        )
        families.append(
            Family(
                dataset=name,
                mode=mode,
                scenarios=members,
                params={p: sorted(v, key=_value_order) for p, v in params.items() if v},
                protocol=protocol,
            )
        )
    return families


def values_text(values: list[Any], limit: int = VALUES_SHOWN) -> str:
    """``0.0, 0.1, ..., 0.9`` for evenly spaced numbers (four or more), every value up
    to ``limit``, else the first ones, ``...``, the last and the count."""
    shown = [_fmt(v) for v in values]
    if len(values) >= 4 and _evenly_spaced(values):
        return f"{shown[0]}, {shown[1]}, ..., {shown[-1]}"
    if len(values) <= limit:
        return ", ".join(shown)
    return f"{', '.join(shown[: limit - 2])}, ..., {shown[-1]} ({len(values)} values)"


def _spec(dataset: str, data_root: str | os.PathLike) -> DatasetSpec | None:
    """The spec of a built-in or user dataset (None for one mlvar does not know)."""
    try:
        return get_dataset(dataset, data_root)
    except MlvarError:
        return None


def _family_order(dataset: str, mode: str, protocol: str, spec: DatasetSpec | None) -> tuple:
    """Built-in datasets in registry order, then the others (user datasets) by name; modes
    in the order the dataset lists them."""
    names = list(DATASETS)
    other = protocol != DEFAULT_PROTOCOL
    first = names.index(dataset) if dataset in DATASETS else len(names)
    if spec is None:
        return (first, dataset, 0, mode, other, protocol)
    modes = list(spec.modes)
    at = modes.index(mode) if mode in modes else len(modes)
    return (first, dataset, at, mode, other, protocol)


def _option_order(spec: DatasetSpec | None, mode: str) -> list[str]:
    """The options of a mode in the order its parameters declare them (a manifest read
    back has its keys sorted)."""
    variants = spec.variants(mode) if spec is not None else []
    return list(dict.fromkeys(name for v in variants for name in v.params.options()))


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _value_order(value: Any) -> tuple:
    """Numbers first (by value), then text, then missing values."""
    if value is None:
        return (2, 0.0, "")
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(str(v) for v in value)
    return str(value)  # floats as Python writes them, the scenario names' way: 0.1, 1.0


def _evenly_spaced(values: list[Any]) -> bool:
    if not all(_is_number(v) for v in values):
        return False
    try:
        exact = [Decimal(repr(v)) for v in values]
    except InvalidOperation:
        return False
    steps = {b - a for a, b in zip(exact, exact[1:], strict=False)}
    return len(steps) == 1
