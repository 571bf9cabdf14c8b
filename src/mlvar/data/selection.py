"""Which prepared scenarios a ``--scenario`` value selects: the scenarios of a study.

``mlvar train`` and ``mlvar submit`` train every scenario :func:`select_scenarios`
returns, one experiment each; the single-scenario commands (``analyze``, ``report``) use
:func:`mlvar.data.scenario.resolve_scenario`.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from mlvar.data.scenario import Scenario, list_scenarios
from mlvar.errors import MlvarError, closest

#: Characters that make a ``--scenario`` term a glob (fnmatch on folder names).
GLOB_CHARS = "*?["


def select_scenarios(data_root: Path, dataset: str, scenario: str | None) -> list[Scenario]:
    """The prepared scenarios of ``dataset`` that ``scenario`` selects, in order.

    ``scenario`` is a comma-separated list of terms; each is a scenario folder name, a
    mode (every prepared scenario of the dataset with that mode) or a glob on folder
    names (``'cifar10-holdout-dup-*'``). ``None`` selects every prepared scenario of the
    dataset. The result follows the terms' order (each term's matches by name), without
    repeats. Raises :class:`MlvarError` when the dataset has no prepared scenario, the
    value is empty, or a term selects nothing.
    """
    candidates = list_scenarios(data_root, dataset)
    if not candidates:
        raise MlvarError(
            f"no prepared scenario of dataset '{dataset}' in {data_root}",
            f"run 'mlvar data prepare {dataset}' first",
        )
    if scenario is None:
        return candidates
    terms = [t.strip() for t in scenario.split(",")]
    if not any(terms):
        raise MlvarError(
            f"--scenario {scenario!r} names no scenario",
            "give names, modes or globs, separated by commas",
        )
    chosen: dict[str, Scenario] = {}
    for term in filter(None, terms):
        for found in _matches(candidates, dataset, data_root, term):
            chosen.setdefault(found.name, found)
    return list(chosen.values())


def _matches(
    candidates: list[Scenario], dataset: str, data_root: Path, term: str
) -> list[Scenario]:
    """The candidates one term selects: its folder, its mode, or its glob's matches."""
    names = [s.name for s in candidates]
    exact = [s for s in candidates if s.name == term]
    if exact:
        return exact
    if any(c in term for c in GLOB_CHARS):
        found = [s for s in candidates if fnmatch.fnmatchcase(s.name, term)]
        if found:
            return found
        raise MlvarError(
            f"--scenario '{term}' matches no prepared '{dataset}' scenario in {data_root}",
            "prepared: " + ", ".join(names),
        )
    by_mode = [s for s in candidates if s.mode == term]
    if by_mode:
        return by_mode
    near = closest(term, names + sorted({s.mode for s in candidates}))
    hint = f"did you mean '{near}'?" if near else "prepared: " + ", ".join(names)
    raise MlvarError(f"no prepared '{dataset}' scenario '{term}' in {data_root}", hint)
