"""Preparing a sweep: every scenario of one mode for several parameter values at once.

Each option of a mode takes one value, a comma-separated list (``0,0.5,1``), and, where
its declaration allows (:class:`mlvar.data.params.Option`), ``start:stop:step`` ranges
(``--ratio 0:0.5:0.1``: 0.0, 0.1, ..., 0.5, computed in decimal so that float steps land
exactly) and keywords the opened source expands (``--cluster all``, ``--subclass study``).
Several swept options give every combination. A required option that is not given is
swept as the study did (its ``study`` value, :meth:`SweepResult.note` says so).

A sweep is checked entirely before its first scenario is written: the values (syntax and
range: no data read, no heavy library imported), every combination (``holdout-dup`` at
ratio 1.0 is refused naming it), the names against the opened source. Then each scenario
not already prepared (all of them with ``force``) is built and written atomically, so a
sweep interrupted midway leaves complete scenarios only, and running it again prepares
the rest. Every member is prepared under one protocol (:mod:`mlvar.data.protocol`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from mlvar.data.params import Option, Params, Where
from mlvar.data.protocol import DEFAULT_PROTOCOL
from mlvar.data.scenario import Scenario, open_scenario
from mlvar.data.spec import DatasetSpec, ModeSpec, Source
from mlvar.errors import MlvarError

#: ``progress(done, total, name)``: called before each scenario is built (and once at the end).
SweepProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Keyword:
    """A keyword value (``all``, ``study``), expanded once the source is open."""

    word: str


@dataclass
class SweepResult:
    """What :func:`prepare_sweep` did.

    ``scenarios`` are every member of the sweep in sweep order, ``prepared`` the names this
    call wrote and ``skipped`` those already there; ``defaulted`` maps each option that was
    not given to the study's value text swept instead (``{"ratio": "0:0.9:0.1"}``);
    ``swept`` maps each option that took several values (or was defaulted) to its values;
    ``protocol`` is the one every member was prepared under.
    """

    dataset: str
    mode: str
    scenarios: list[Scenario]
    prepared: list[str]
    skipped: list[str]
    defaulted: dict[str, str] = field(default_factory=dict)
    swept: dict[str, list[Any]] = field(default_factory=dict)
    protocol: str = DEFAULT_PROTOCOL

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.scenarios]

    def note(self) -> str:
        """One line on the study sweep prepared for options not given ("" when none)."""
        if not self.defaulted:
            return ""
        given = " ".join(f"--{k} {v}" for k, v in self.defaulted.items())
        missing = ", ".join(f"--{k}" for k in self.defaulted)
        n = len(self.scenarios)
        return (
            f"no {missing} given: the study's sweep of {self.dataset} {self.mode}, {given} "
            f"({n} scenario{'s' if n != 1 else ''})"
        )

    def rows(self) -> list[dict[str, Any]]:
        """One row per scenario for a table: ``name``, ``status`` (``prepared`` or
        ``existing``), the swept options' values, and per split its ``total`` and
        ``affected`` sample counts (``<split>`` and ``<split> affected``)."""
        out = []
        for s in self.scenarios:
            row: dict[str, Any] = {
                "name": s.name,
                "status": "prepared" if s.name in self.prepared else "existing",
            }
            params = s.manifest.get("params", {})
            row.update({name: params.get(name) for name in self.swept})
            # In the scenario's split order: a manifest read back has its keys sorted.
            counts = s.manifest.get("counts") or {}
            for split in (split for split in s.splits if split in counts):
                row[split] = counts[split]["total"]
                row[f"{split} affected"] = counts[split]["affected"]
            out.append(row)
        return out


# --------------------------------------------------------------------------- values


def _syntax_hint(name: str, opt: Option) -> str:
    forms = ["separate values by single commas"]
    if opt.ranges:
        forms.append(f"give a range start:stop:step such as --{name} 0:0.5:0.1")
    forms += [f"give --{name} {word}" for word in opt.keywords]
    return ", or ".join(forms)


def expand_range(name: str, text: str) -> list[float]:
    """The values of ``start:stop:step``, stop included when a step lands on it, computed
    in decimal (``0:0.5:0.1`` is exactly 0.0, 0.1, 0.2, 0.3, 0.4, 0.5).

    Raises
    ------
    MlvarError
        Not three numbers, a step that is not positive, or a stop below the start.
    """
    hint = f"e.g. --{name} 0:0.5:0.1 (start:stop:step, stop included)"
    parts = text.split(":")
    if len(parts) != 3:
        raise MlvarError(f"--{name} range '{text}' is not start:stop:step", hint)
    try:
        start, stop, step = (Decimal(part.strip()) for part in parts)
    except InvalidOperation:
        raise MlvarError(f"--{name} range '{text}' has a part that is not a number", hint) from None
    if not all(d.is_finite() for d in (start, stop, step)):
        raise MlvarError(f"--{name} range '{text}' has a part that is not a number", hint)
    if step <= 0:
        raise MlvarError(f"--{name} range '{text}' needs a positive step", hint)
    if stop < start:
        raise MlvarError(f"--{name} range '{text}' is empty: its stop is below its start", hint)
    count = int((stop - start) // step) + 1
    return [float(start + i * step) for i in range(count)]


def parse_values(name: str, opt: Option, given: Any) -> list[Any] | Keyword:
    """The values of one option as given: text (one value, a comma-separated list whose
    items may be ranges where the option takes them, or a keyword), a sequence of values,
    or one value. Values are converted (``from_text``) but not checked.

    Raises
    ------
    MlvarError
        An empty list or list item, a keyword inside a list, or a bad range.
    """
    if isinstance(given, list | tuple):
        if not given:
            raise MlvarError(f"--{name} is an empty list", _syntax_hint(name, opt))
        return list(given)
    if not isinstance(given, str):
        return [given]
    text = given.strip()
    if text in opt.keywords:
        return Keyword(text)
    if not opt.lists:
        return [opt.from_text(text)]
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise MlvarError(f"--{name} '{given}' names no value", _syntax_hint(name, opt))
    if not all(items):
        raise MlvarError(f"--{name} '{given}' has an empty list item", _syntax_hint(name, opt))
    values: list[Any] = []
    for item in items:
        if item in opt.keywords:
            raise MlvarError(
                f"--{name} '{given}' lists the keyword '{item}' with other values",
                f"give --{name} {item} alone",
            )
        if opt.ranges and ":" in item:
            values += expand_range(name, item)
        else:
            values.append(opt.from_text(item))
    return values


def _check_values(name: str, opt: Option, values: Sequence[Any], where: Where) -> list[Any]:
    """Each value checked (the option's own one-line errors), repeats refused."""
    out: list[Any] = []
    for value in values:
        try:
            canonical = opt.check(value, where)
        except MlvarError as exc:
            if len(values) > 1 or not isinstance(value, str) or not opt.keywords:
                raise
            words = " or ".join(f"--{name} {w}" for w in opt.keywords)
            raise MlvarError(
                exc.message, f"{exc.hint}, or {words}" if exc.hint else words
            ) from None
        if canonical in out:
            raise MlvarError(f"--{name} lists {opt.fmt(canonical)} twice", "give each value once")
        out.append(canonical)
    return out


# --------------------------------------------------------------------------- combinations


@dataclass
class _Plan:
    """A checked sweep before the source is read: per option its values (or a keyword)."""

    spec: DatasetSpec
    variant: ModeSpec
    where: Where
    values: dict[str, list[Any] | Keyword]
    defaulted: dict[str, str]

    @property
    def options(self) -> dict[str, Option]:
        return self.variant.params.options()

    def combinations(self) -> list[dict[str, Any]]:
        names = list(self.values)
        lists = [self.values[n] for n in names]
        assert all(isinstance(v, list) for v in lists)
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*lists)]

    def swept(self) -> list[str]:
        """Options shown in labels and tables: several values, or defaulted."""
        return [
            n
            for n, v in self.values.items()
            if n in self.defaulted or isinstance(v, Keyword) or len(v) > 1
        ]

    def label(self, combo: Mapping[str, Any]) -> str:
        swept = self.swept()
        return " ".join(f"--{n} {self.options[n].fmt(combo[n])}" for n in swept if n in combo)

    def parse_all(self) -> list[Params]:
        """Every combination's parameters (missing required options and cross-field checks
        refused, naming the combinations that fail)."""
        return self.each(
            self.combinations(), lambda combo: self.variant.params.parse(combo, self.where)
        )

    def each(self, items: Sequence[Any], fn: Callable[[Any], Any]) -> list[Any]:
        """``fn`` of every item; errors name every failing combination, or are passed on
        unchanged when the sweep has one member."""
        out, failed = [], []
        for item in items:
            try:
                out.append(fn(item))
            except MlvarError as exc:
                if len(items) == 1:
                    raise
                combo = item if isinstance(item, Mapping) else item.manifest()
                failed.append((self.label(combo), exc))
        if failed:
            first = failed[0][1]
            labels = ", ".join(label for label, _ in failed)
            raise MlvarError(
                f"{self.spec.name} mode '{self.variant.name}' cannot prepare {labels} of the "
                f"sweep: {first.message}",
                first.hint,
            )
        return out


def plan_sweep(
    spec: DatasetSpec,
    mode: str | None,
    given: Mapping[str, Any],
    protocol: str = DEFAULT_PROTOCOL,
) -> _Plan:
    """Check a sweep's mode, option values and protocol without reading data."""
    variant = spec.select(mode, given, sweep=True)
    spec.check_protocol(variant, protocol)
    where = spec.where(variant.name)
    values: dict[str, list[Any] | Keyword] = {}
    defaulted: dict[str, str] = {}
    for name, opt in variant.params.options().items():
        if name in given:
            values[name] = parse_values(name, opt, given[name])
        elif opt.required and opt.study is not None:
            values[name] = parse_values(name, opt, opt.study)
            defaulted[name] = opt.study
        else:
            continue
        if not isinstance(values[name], Keyword):
            values[name] = _check_values(name, opt, values[name], where)  # type: ignore[arg-type]
    return _Plan(spec, variant, where, values, defaulted)


# --------------------------------------------------------------------------- preparing


def prepare_sweep(
    spec: DatasetSpec,
    data_root: str | os.PathLike,
    mode: str | None = None,
    given: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: SweepProgress | None = None,
    protocol: str = DEFAULT_PROTOCOL,
) -> SweepResult:
    """Prepare every scenario of a sweep of ``spec`` under ``protocol`` (see the module
    docstring).

    ``given`` maps option names to what was typed (text) or to values. A sweep of one
    scenario with nothing defaulted is one ``mlvar data prepare``: an existing scenario is
    refused without ``force``, as :meth:`DatasetSpec.prepare` does; in a larger sweep it is
    skipped.

    Raises
    ------
    MlvarError
        Bad mode, option, value, range, combination or protocol, missing raw data, or (one
        scenario) an existing scenario without ``force``. Nothing is written in that case.
    """
    data_root = Path(data_root)
    plan = plan_sweep(spec, mode, given or {}, protocol)
    keywords = {n: v for n, v in plan.values.items() if isinstance(v, Keyword)}
    if not keywords:
        plan.parse_all()  # combinations refused before the source is even opened
    source = spec.open(data_root)
    for name, keyword in keywords.items():
        opt = plan.options[name]
        expanded = opt.keywords[keyword.word](source, plan.where)
        if not expanded:
            raise MlvarError(
                f"--{name} {keyword.word} names no value in this {spec.name} data",
                f"give --{name} values instead",
            )
        plan.values[name] = _check_values(name, opt, expanded, plan.where)
    parsed = plan.parse_all()
    members = plan.each(parsed, lambda params: params.resolve(source))
    names = [spec.scenario_name(plan.variant, params, protocol) for params in members]
    _refuse_repeats(plan, parsed, names)
    single = len(members) == 1 and not plan.defaulted
    existing = {n for n in names if (data_root / n).exists()}
    in_the_way = [n for n in existing if not (data_root / n / "manifest.json").is_file()]
    if in_the_way and not force:
        raise MlvarError(
            f"{data_root / in_the_way[0]} is in the way: it is not a prepared scenario",
            "move it away, or pass --force to replace it",
        )
    if single and existing and not force:
        raise MlvarError(
            f"scenario '{names[0]}' already exists in {data_root}", "pass --force to rebuild it"
        )
    todo = [(n, p) for n, p in zip(names, members, strict=True) if force or n not in existing]
    scenarios = _build(spec, plan.variant, source, todo, force, progress, protocol)
    result = SweepResult(
        dataset=spec.name,
        mode=plan.variant.name,
        scenarios=[scenarios[n] if n in scenarios else open_scenario(data_root, n) for n in names],
        prepared=[n for n, _ in todo],
        skipped=[n for n in names if n not in scenarios],
        defaulted=dict(plan.defaulted),
        swept={n: [getattr(p, n) for p in members] for n in plan.swept()},
        protocol=protocol,
    )
    return result


def _refuse_repeats(plan: _Plan, parsed: list[Params], names: list[str]) -> None:
    """Two combinations (as given) that name one scenario (``boy+man`` and ``man+boy``)
    are refused."""
    seen: dict[str, Params] = {}
    for params, name in zip(parsed, names, strict=True):
        if name in seen:
            raise MlvarError(
                f"{plan.label(seen[name].manifest())} and {plan.label(params.manifest())} are "
                f"the same scenario '{name}'",
                "give each value once",
            )
        seen[name] = params


def _build(
    spec: DatasetSpec,
    variant: ModeSpec,
    source: Source,
    todo: list[tuple[str, Params]],
    force: bool,
    progress: SweepProgress | None,
    protocol: str,
) -> dict[str, Scenario]:
    built = {}
    for done, (name, params) in enumerate(todo):
        if progress is not None:
            progress(done, len(todo), name)
        built[name] = spec.build(source, variant, params, force=force, protocol=protocol)
    if progress is not None and todo:
        progress(len(todo), len(todo), "")
    return built
