"""Scenario parameters: one frozen dataclass per scenario mode, whose fields are the options
the mode takes.

Each field carries an :class:`Option` in its metadata: how the value is checked, whether it
is required, its default, how it is written in the mode's usage line, in the ``--help`` text
and in scenario names. :meth:`Params.parse` turns the options a user gave into a validated
instance, with the one-line errors ``mlvar data prepare`` prints; nothing here reads data or
imports numpy, so bad input is refused before anything is loaded.

The field builders (:func:`ratio`, :func:`seed`, :func:`class_index`, :func:`integer`)
are shared by every dataset, so a mode written once (for example label noise) takes the
same options, checked the same way, everywhere.

Sweeps are part of the declarations too (:mod:`mlvar.data.sweep` reads them): every option
takes a comma-separated list; an option may take ``start:stop:step`` ranges (``ranges``,
the ratios) and keywords that the opened source expands (``keywords``: ``--cluster all``,
``--subclass study``); and a required option may name the study's own sweep (``study``),
prepared when the option is not given.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Self

from mlvar.errors import MlvarError


@dataclass(frozen=True)
class Where:
    """What a check reports about: the dataset, the mode, and its number of classes when that
    is known without reading data (None otherwise)."""

    dataset: str
    mode: str
    n_classes: int | None = None


Check = Callable[[Any, Where], Any]
#: ``expand(source, where)``: the values a keyword stands for, from the opened source.
Expand = Callable[[Any, Where], list[Any]]


@dataclass(frozen=True)
class Option:
    """How one parameter is given (``--<field name> METAVAR``), checked and shown.

    ``check(value, where)`` returns the canonical value or raises :class:`MlvarError`.
    A required option that is missing is refused with ``missing_hint``; an optional one
    takes ``default`` (already canonical). ``tag`` is the option's part of scenario names
    (``-<tag><value>``; None: not in the name), left out when the value equals ``omit``.

    Sweeps (:mod:`mlvar.data.sweep`): ``from_text`` turns one typed value into what
    ``check`` takes; ``ranges`` allows ``start:stop:step``; ``keywords`` maps a word to
    the function that lists its values once the source is open; ``study`` is the value
    text swept when this required option is not given (the study's own sweep); ``lists``
    False: a typed value is one value even with commas in it (``--where "x in [1, 2]"``).
    """

    metavar: str
    check: Check
    help: str
    required: bool = False
    default: Any = None
    missing_hint: str = ""
    tag: str | None = None
    omit: Any = ()
    fmt: Callable[[Any], str] = str
    from_text: Callable[[str], Any] = str
    ranges: bool = False
    keywords: Mapping[str, Expand] = field(default_factory=dict)
    study: str | None = None
    lists: bool = True


def option(**kwargs: Any) -> Any:
    """A dataclass field described by an :class:`Option` (keyword arguments as there)."""
    opt = Option(**kwargs)
    return dataclasses.field(default=opt.default, metadata={"option": opt})


class Params:
    """Base of the parameter dataclasses (subclasses are ``@dataclass(frozen=True)``)."""

    @classmethod
    def options(cls) -> dict[str, Option]:
        """The options of this mode, in field order."""
        return {f.name: f.metadata["option"] for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls, given: dict[str, Any], where: Where) -> Self:
        """Check the given options (only those of this class) and build the parameters.

        Raises
        ------
        MlvarError
            A required option is missing, or a value is out of range.
        """
        options = cls.options()
        # The values given are checked before a missing one is reported.
        values = {
            name: opt.check(given[name], where) for name, opt in options.items() if name in given
        }
        for name, opt in options.items():
            if name in values:
                continue
            if opt.required:
                raise MlvarError(
                    f"{where.dataset} mode '{where.mode}' needs --{name}", opt.missing_hint
                )
            values[name] = opt.default
        params = cls(**values)
        params.validate(where)
        return params

    @classmethod
    def usage(cls, required: tuple[str, ...] = ()) -> str:
        """The options as a usage line: ``--ratio A [--seed S]`` (``required``: options to
        show as required even though they have a default)."""
        parts = []
        for name, opt in cls.options().items():
            text = f"--{name} {opt.metavar}"
            parts.append(text if opt.required or name in required else f"[{text}]")
        return " ".join(parts)

    def validate(self, where: Where) -> None:
        """Checks that involve several fields (none by default)."""

    def resolve(self, source: Any) -> Self:
        """The parameters made canonical with the dataset's metadata (unchanged by default).

        Called once the dataset's source is open, before the scenario name is formed.
        """
        return self

    def manifest(self) -> dict[str, Any]:
        """The manifest's ``params``: every field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def name_parts(self) -> str:
        """This mode's part of the scenario name: ``-<tag><value>`` per tagged field."""
        parts = []
        for name, opt in self.options().items():
            value = getattr(self, name)
            if opt.tag is not None and value != opt.omit:
                parts.append(f"-{opt.tag}{opt.fmt(value)}")
        return "".join(parts)


@dataclass(frozen=True)
class NoParams(Params):
    """A mode that takes no options (``original``)."""


def given_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options a call actually gave: those not None, and a seed other than 0 (the
    command line's default seed means "not given")."""
    return {
        name: value
        for name, value in options.items()
        if value is not None and not (name == "seed" and as_int(value) == 0)
    }


# --------------------------------------------------------------------------- value checks


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is an integer (or a string of digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):  # numpy registers its integers here
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def check_ratio(ratio: Any, lo: float, hi: float, what: str) -> float:
    """Return ``ratio`` as a float in [lo, hi] or raise :class:`MlvarError` naming the range."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise MlvarError(
            f"{what} ratio must be a number, got {ratio!r}", f"use a value in [{lo}, {hi}]"
        )
    value = float(ratio)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise MlvarError(f"{what} ratio {ratio} is out of range", f"use a value in [{lo}, {hi}]")
    return value


def format_ratio(ratio: float) -> str:
    """How a ratio appears in scenario names: Python's shortest float repr (0.3, 1.0)."""
    return repr(float(ratio))


def _check_seed(value: Any, where: Where) -> int:
    seed_int = as_int(value)
    if seed_int is None or seed_int < 0:
        raise MlvarError(f"seed must be a non-negative integer, got {value!r}", "e.g. --seed 0")
    return seed_int


def _check_class(value: Any, where: Where) -> int:
    n = where.n_classes
    cls = as_int(value)
    if cls is None or (n is not None and not 0 <= cls < n):
        span = f"0-{n - 1}" if n is not None else "from 0"
        raise MlvarError(
            f"{where.dataset} class {value!r} is not a class index {span}", "e.g. --cls 0"
        )
    return cls


# --------------------------------------------------------------------------- field builders


def ratio_from_text(text: str) -> Any:
    """A typed ratio as a float (``"0.3"`` -> 0.3, the double nearest the decimal), or the
    text itself when it is not a number (the check then names it)."""
    try:
        return float(Decimal(text.strip()))
    except (InvalidOperation, ValueError):
        return text


def ratio(
    lo: float = 0.0,
    hi: float = 1.0,
    *,
    help: str,
    default: float | None = None,
    tag: str = "r",
    study: str | None = None,
) -> Any:
    """A fraction in [lo, hi] (``--ratio A``); required unless it has a default. Takes
    ranges; ``study`` is the sweep prepared when it is required and not given."""

    def check(value: Any, where: Where) -> float:
        return check_ratio(value, lo, hi, where.mode)

    return option(
        metavar="A",
        check=check,
        help=help,
        required=default is None,
        default=default,
        missing_hint=f"use a value in [{lo:g}, {hi:g}]",
        tag=tag,
        fmt=format_ratio,
        from_text=ratio_from_text,
        ranges=True,
        study=study,
    )


def seed(*, help: str) -> Any:
    """A non-negative seed (``--seed S``, default 0; ``-s<seed>`` in names unless 0)."""
    return option(metavar="S", check=_check_seed, help=help, default=0, tag="s", omit=0)


def _all_classes(source: Any, where: Where) -> list[int]:
    n = where.n_classes if where.n_classes is not None else len(source.base.class_names)
    return list(range(n))


def class_index(*, help: str, default: int | None = 0) -> Any:
    """A class index 0..n-1 (``--cls C``, ``--cls all`` sweeps every class), ``-cls<c>`` in
    names."""
    return option(
        metavar="C",
        check=_check_class,
        help=help,
        required=default is None,
        default=default,
        missing_hint="e.g. --cls 0",
        tag="cls",
        keywords={"all": _all_classes},
    )


def integer(
    name: str,
    metavar: str,
    *,
    help: str,
    example: int = 0,
    tag: str,
    keywords: Mapping[str, Expand] | None = None,
    study: str | None = None,
) -> Any:
    """A required integer option whose range only the data knows (``--cluster K``);
    ``keywords`` (``all``) and ``study`` as in :class:`Option`."""

    def check(value: Any, where: Where) -> int:
        number = as_int(value)
        if number is None:
            raise MlvarError(
                f"{name} must be an integer, got {value!r}", f"e.g. --{name} {example}"
            )
        return number

    return option(
        metavar=metavar,
        check=check,
        help=help,
        required=True,
        missing_hint=f"e.g. --{name} {example}",
        tag=tag,
        keywords=dict(keywords or {}),
        study=study,
    )
