"""Which prepared scenarios a ``--scenario`` value selects: the scenarios of a study.

``mlvar train`` and ``mlvar submit`` train every scenario :func:`select_scenarios`
returns, one experiment each; the single-scenario commands (``analyze``, ``report``) use
:func:`mlvar.data.scenario.resolve_scenario`.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from mlvar.data.protocol import protocol_of
from mlvar.data.scenario import Scenario, list_scenarios
from mlvar.errors import MlvarError, closest

#: Characters that make a ``--scenario`` term a glob (fnmatch on folder names).
GLOB_CHARS = "*?["


def natural_key(name: str) -> list[tuple[int, float, str]]:
    """Sort key that orders the numbers in a name by value: ``cluster2`` before
    ``cluster10``, ``r0.5`` before ``r0.55``."""
    return [
        (0, float(part), "") if i % 2 else (1, 0.0, part)
        for i, part in enumerate(_NUMBER.split(name))
        if part
    ]


_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


def select_scenarios(
    data_root: Path, dataset: str, scenario: str | None, protocol: str | None = None
) -> list[Scenario]:
    """The prepared scenarios of ``dataset`` that ``scenario`` selects, in order.

    ``scenario`` is a comma-separated list of terms; each is a scenario folder name, a
    mode (every prepared scenario of the dataset with that mode) or a glob on folder
    names (``'cifar10-holdout-dup-*'``). ``None`` selects every prepared scenario of the
    dataset. With ``protocol``, modes, globs and ``None`` select only the scenarios
    prepared under that protocol (:func:`mlvar.data.protocol.protocol_of`); a full
    folder name is taken as given, whatever its protocol. The result follows the terms'
    order (each term's matches by name, numbers by value: ``cluster2`` before
    ``cluster10``), without repeats. Raises :class:`MlvarError`
    when the dataset has no prepared scenario (of the protocol), the value is empty, or
    a term selects nothing.
    """
    every = sorted(list_scenarios(data_root, dataset), key=lambda s: natural_key(s.name))
    candidates = [s for s in every if protocol is None or protocol_of(s.manifest) == protocol]
    if not candidates and (scenario is None or not every):
        of = f" of protocol '{protocol}'" if protocol is not None and every else ""
        flag = f" --protocol {protocol}" if of else ""
        raise MlvarError(
            f"no prepared scenario of dataset '{dataset}'{of} in {data_root}",
            f"run 'mlvar data prepare {dataset}{flag}' first",
        )
    if scenario is None:
        return candidates
    terms = [t.strip() for t in scenario.split(",")]
    if not any(terms):
        raise MlvarError(
            f"--scenario {scenario!r} names no scenario",
            "give names, modes or globs, separated by commas",
        )
    # Named in the errors when the protocol left scenarios out.
    of = f" of protocol '{protocol}'" if len(candidates) < len(every) else ""
    chosen: dict[str, Scenario] = {}
    by_name = {s.name: s for s in every}
    for term in filter(None, terms):
        named = [by_name[term]] if term in by_name else None
        for found in named or _matches(candidates, dataset, data_root, term, protocol, of):
            chosen.setdefault(found.name, found)
    return list(chosen.values())


def _matches(
    candidates: list[Scenario],
    dataset: str,
    data_root: Path,
    term: str,
    protocol: str | None = None,
    of: str = "",
) -> list[Scenario]:
    """The candidates one term selects: its folder, its mode, or its glob's matches
    (``of``: the words naming the protocol that filtered them, for the errors)."""
    if not candidates:  # the dataset has scenarios, none of the protocol
        raise MlvarError(
            f"no prepared '{dataset}' scenario{of} in {data_root}, so none is '{term}'",
            f"prepare one with 'mlvar data prepare {dataset} --protocol {protocol}'",
        )
    names = [s.name for s in candidates]
    exact = [s for s in candidates if s.name == term]
    if exact:
        return exact
    if any(c in term for c in GLOB_CHARS):
        found = [s for s in candidates if fnmatch.fnmatchcase(s.name, term)]
        if found:
            return found
        raise MlvarError(
            f"--scenario '{term}' matches no prepared '{dataset}' scenario{of} in {data_root}",
            "prepared: " + ", ".join(names),
        )
    by_mode = [s for s in candidates if s.mode == term]
    if by_mode:
        return by_mode
    near = closest(term, names + sorted({s.mode for s in candidates}))
    hint = f"did you mean '{near}'?" if near else "prepared: " + ", ".join(names)
    raise MlvarError(f"no prepared '{dataset}' scenario '{term}'{of} in {data_root}", hint)
