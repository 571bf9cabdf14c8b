"""What a dataset is to mlvar: one :class:`DatasetSpec` per dataset module, registered in
:data:`DATASETS` (by :mod:`mlvar.data.registry`), which drives preparing, fetching, the
CLI's hints and the training defaults.

Preparing a scenario (:meth:`DatasetSpec.prepare`) goes the same way for every dataset:

1. the mode and its options are checked against the mode's parameter dataclass
   (:mod:`mlvar.data.params`) without reading any data;
2. the dataset's source is opened (light: a missing fetch is reported here), the
   parameters are made canonical with its metadata, and the scenario name is formed;
3. an existing scenario of that name is refused unless ``force``;
4. the mode builds the splits from the source, and the scenario is written atomically,
   sharing the source's unchanged data with every other scenario of the data root
   (:mod:`mlvar.data.arrays`).

A protocol (:mod:`mlvar.data.protocol`) picks whose scenario rules a mode follows: its
``build`` (``mlvar``, the default) or its ``study`` build (the original study's rules, where
the study had the mode). A ``study`` scenario's name ends in ``-study`` and its manifest
records ``"protocol": "study"``; an ``mlvar`` one is written exactly as before protocols.

Nothing is written before step 4, so a bad command leaves the data root as it was.
:mod:`mlvar.data.sweep` prepares many scenarios of one mode the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data.arrays import SourceRows
from mlvar.data.params import Params, Where, flag
from mlvar.data.protocol import DEFAULT_PROTOCOL, check_protocol, name_suffix
from mlvar.data.scenario import Scenario, SplitData, write_scenario
from mlvar.errors import MlvarError, unknown_choice

FetchFn = Callable[..., dict[str, Any]]


@dataclass
class BaseData:
    """A dataset's samples before any change, by source position: what every mode reads.

    ``x`` is indexable by an array of positions (an array, a memory map, or a view over
    several); ``index`` maps each split to its positions in split order. ``manifest`` holds
    the dataset's own manifest entries (source, class names, input, split recipe, ...);
    ``extra`` what the dataset's own modes read besides (COMPAS: the unstandardised
    features).
    """

    x: Any
    y: np.ndarray
    ids: np.ndarray
    groups: np.ndarray
    index: dict[str, np.ndarray]
    class_names: list[str]
    manifest: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def x_parts(self) -> list[Any]:
        """``x`` as the arrays laid end to end that it indexes (``x.parts`` where it is a
        view over several, else ``x`` itself): what scenarios share."""
        return list(getattr(self.x, "parts", None) or [self.x])


class Source:
    """An opened dataset: light metadata at once, the samples (:meth:`load`) on first use.

    A dataset module subclasses it; ``__init__`` raises :class:`MlvarError` when the data is
    not there (with the hint to fetch it).
    """

    def __init__(self, data_root: Path) -> None:
        self.data_root = Path(data_root)

    def load(self) -> BaseData:
        """Read the samples (override)."""
        raise NotImplementedError

    @cached_property
    def base(self) -> BaseData:
        """The samples, read once."""
        return self.load()

    @cached_property
    def rows(self) -> SourceRows:
        """The samples as shared arrays of the data root (each stored on first use)."""
        base = self.base
        return SourceRows(self.data_root, base.x_parts(), base.ids, "the source's samples")


@dataclass
class ModeResult:
    """What a mode built: the splits, the one-sentence description, manifest entries, and
    per split (where it helps) the source position each row's ``x`` was copied from
    (``origin``; otherwise a row is looked up by its id): rows equal to a source row are
    stored as a reference to it."""

    splits: dict[str, SplitData]
    description: str
    manifest: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ModeSpec:
    """One scenario mode, or one variant of a mode that takes different options.

    ``build(source, params)`` returns a :class:`ModeResult`; ``study`` is the same under the
    original study's rules (None: the study had no such scenario). Variants share ``name``;
    the one whose ``key`` option is given is used (``digits --mode holdout`` takes
    ``--subclass`` or ``--cls``). ``summary`` says in a few words what the mode changes;
    ``example`` is a valid set of options.
    """

    name: str
    params: type[Params]
    build: Callable[[Any, Any], ModeResult]
    summary: str
    example: str = ""
    key: str | None = None
    study: Callable[[Any, Any], ModeResult] | None = None

    def builder(self, protocol: str) -> Callable[[Any, Any], ModeResult]:
        """The build of ``protocol`` (checked by :meth:`DatasetSpec.check_protocol`)."""
        if protocol == DEFAULT_PROTOCOL:
            return self.build
        assert self.study is not None, f"mode {self.name} has no {protocol} build"
        return self.study

    def key_usage(self) -> str:
        """The key option as typed: ``--subclass D``."""
        return f"--{self.key} {self.params.options()[str(self.key)].metavar}"


@dataclass(frozen=True)
class TrainDefaults:
    """The model a dataset trains by default and the training values it sets on top of
    that model's own defaults (``--model`` switches to another model's defaults)."""

    model: str = "mlp"
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    Parameters
    ----------
    name, description
        The dataset argument of the CLI and one line about it.
    input_kind
        ``tabular`` or ``image``: which models can read it.
    mode_specs
        Its modes (and variants), in the order the CLI lists them.
    open
        ``open(data_root)``: the dataset's :class:`Source`.
    fetch
        ``fetch(data_root, source=None, verify=True, progress=None)``: the info dict of
        ``mlvar data fetch``.
    needs_fetch
        False for data that ships with a library (its ``fetch`` writes nothing).
    train
        Training defaults.
    n_classes
        Number of classes when known without data (bounds ``--cls``).
    implied_modes
        Option -> mode used when ``--mode`` is not given but that option is.
    """

    name: str
    description: str
    input_kind: str
    mode_specs: tuple[ModeSpec, ...]
    open: Callable[[Path], Source]
    fetch: FetchFn
    needs_fetch: bool
    train: TrainDefaults = field(default_factory=TrainDefaults)
    n_classes: int | None = None
    implied_modes: Mapping[str, str] = field(default_factory=dict)

    @property
    def modes(self) -> tuple[str, ...]:
        """The mode names, in order."""
        return tuple(dict.fromkeys(m.name for m in self.mode_specs))

    def variants(self, mode: str) -> list[ModeSpec]:
        return [m for m in self.mode_specs if m.name == mode]

    def default_mode(self, given: Mapping[str, Any]) -> str:
        """The mode used without ``--mode``: implied by an option given, else ``original``."""
        for option, mode in self.implied_modes.items():
            if option in given:
                return mode
        return "original"

    # ------------------------------------------------------------------ hints

    def usage(self) -> str:
        """Every mode's options: ``--mode original | --mode artificial --ratio A ...``."""
        lines: dict[str, list[str]] = {}
        for m in self.mode_specs:
            # A variant's key selects it: required, even when it has a default.
            keys = (m.key,) if m.key and len(self.variants(m.name)) > 1 else ()
            modes = lines.setdefault(m.params.usage(required=keys), [])
            if m.name not in modes:
                modes.append(m.name)
        return " | ".join(f"--mode {'|'.join(modes)} {u}".rstrip() for u, modes in lines.items())

    def _takes_no(self, mode: str, option: str) -> MlvarError:
        takers = [
            m for m in self.modes if any(option in v.params.options() for v in self.variants(m))
        ]
        if takers:
            hint = f"only --mode {'|'.join(takers)} " + ("does" if len(takers) == 1 else "do")
        else:
            hint = f"valid options for {self.name}: {self.usage()}"
        return MlvarError(f"{self.name} mode '{mode}' takes no {flag(option)}", hint)

    def _variant(self, mode: str, given: Mapping[str, Any], sweep: bool) -> ModeSpec:
        variants = self.variants(mode)
        if len(variants) == 1:
            return variants[0]
        chosen = [v for v in variants if v.key in given]
        if len(chosen) > 1:
            raise MlvarError(
                f"{self.name} mode '{mode}' takes no --{chosen[0].key} with --{chosen[1].key}",
                "; ".join(f"{v.key_usage()} {v.summary}" for v in variants),
            )
        if not chosen and sweep and variants[0].params.options()[str(variants[0].key)].study:
            return variants[0]  # a sweep without a key: the first variant's study sweep
        if not chosen:
            raise MlvarError(
                f"{self.name} mode '{mode}' needs {' or '.join(v.key_usage() for v in variants)}",
                "e.g. " + " or ".join(v.example for v in variants),
            )
        return chosen[0]

    @property
    def protocols(self) -> tuple[str, ...]:
        """The protocols some mode of the dataset can be prepared under."""
        studied = any(m.study is not None for m in self.mode_specs)
        return (DEFAULT_PROTOCOL, "study") if studied else (DEFAULT_PROTOCOL,)

    def check_protocol(self, variant: ModeSpec, protocol: str) -> str:
        """``protocol`` if ``variant`` can be prepared under it; raise
        :class:`MlvarError` if the protocol is unknown or the study had no such scenario."""
        if check_protocol(protocol) == DEFAULT_PROTOCOL or variant.study is not None:
            return protocol
        if len(self.protocols) == 1:
            raise MlvarError(
                f"{self.name} has no {protocol} protocol: the original study prepared no "
                f"{self.name} scenarios",
                "prepare it under --protocol mlvar (the default)",
            )
        studied = [m.name for m in self.mode_specs if m.study is not None]
        raise MlvarError(
            f"{self.name} mode '{variant.name}' has no {protocol} protocol: the original study "
            "had no such scenario",
            f"--protocol {protocol} takes --mode {'|'.join(dict.fromkeys(studied))}",
        )

    def check_val_fraction(self, variant: ModeSpec, fractions: list[Any], protocol: str) -> None:
        """Refuse a ``--val-fraction`` other than the default under a protocol other than
        mlvar's (the study's split is the study's), before any data is read."""
        option = variant.params.options().get("val_fraction")
        if option is None or protocol == DEFAULT_PROTOCOL:
            return
        for fraction in fractions:
            if fraction != option.default:
                raise MlvarError(
                    f"--val-fraction {fraction:g} is not the {protocol} protocol's split (it "
                    "splits validation off as the study did)",
                    f"prepare it under --protocol {DEFAULT_PROTOCOL}",
                )

    def where(self, mode: str) -> Where:
        """What the checks of ``mode``'s options report about."""
        return Where(self.name, mode, self.n_classes)

    # ------------------------------------------------------------------ preparing

    def select(self, mode: str | None, given: Mapping[str, Any], sweep: bool = False) -> ModeSpec:
        """The mode (or variant) the options ``given`` (by option name) select, refusing
        options it takes not; no value is checked. A sweep (``sweep``) without the key
        option of a mode with variants gets the first variant when its key option names the
        study's sweep (digits ``holdout``: every digit)."""
        if mode is None:
            mode = self.default_mode(given)
        if mode not in self.modes:
            raise unknown_choice(f"{self.name} mode", str(mode), self.modes)
        taken = {name for v in self.variants(mode) for name in v.params.options()}
        for option in given:
            if option not in taken:
                raise self._takes_no(mode, option)
        variant = self._variant(mode, given, sweep)
        for option in given:
            if option not in variant.params.options():
                raise self._takes_no(mode, option)
        return variant

    def check(
        self, mode: str | None, given: Mapping[str, Any], protocol: str = DEFAULT_PROTOCOL
    ) -> tuple[ModeSpec, Params]:
        """Check a mode, its options and the protocol without reading data: the mode and
        the parameters.

        ``given`` holds the options the user gave (by option name). Raises
        :class:`MlvarError` naming the first problem.
        """
        variant = self.select(mode, given)
        self.check_protocol(variant, protocol)
        params = variant.params.parse(dict(given), self.where(variant.name))
        self.check_val_fraction(variant, [getattr(params, "val_fraction", None)], protocol)
        return variant, params

    def prepare(
        self,
        data_root: str | os.PathLike,
        mode: str | None = None,
        given: Mapping[str, Any] | None = None,
        force: bool = False,
        protocol: str = DEFAULT_PROTOCOL,
    ) -> Scenario:
        """Prepare a scenario under ``protocol`` and return it.

        Raises
        ------
        MlvarError
            Bad mode, options or protocol, missing raw data, or an existing scenario
            without ``force``. Nothing is written in that case.
        """
        variant, params = self.check(mode, given or {}, protocol)
        data_root = Path(data_root)
        source = self.open(data_root)
        params = params.resolve(source)
        name = self.scenario_name(variant, params, protocol)
        if (data_root / name).exists() and not force:
            raise MlvarError(
                f"scenario '{name}' already exists in {data_root}", "pass --force to rebuild it"
            )
        return self.build(source, variant, params, force=force, protocol=protocol)

    def scenario_name(
        self, variant: ModeSpec, params: Params, protocol: str = DEFAULT_PROTOCOL
    ) -> str:
        """``<dataset>-<mode><parameter parts><protocol suffix>``:
        ``cifar10-holdout-cls0-r0.5``, ``cifar10-holdout-cls0-r0.5-study``."""
        return f"{self.name}-{variant.name}{params.name_parts()}{name_suffix(protocol)}"

    def build(
        self,
        source: Source,
        variant: ModeSpec,
        params: Params,
        force: bool,
        protocol: str = DEFAULT_PROTOCOL,
    ) -> Scenario:
        """Build the scenario of checked, resolved ``params`` from an open ``source`` under
        ``protocol`` and write it into the source's data root."""
        result = variant.builder(protocol)(source, params)
        manifest = {
            "dataset": self.name,
            "mode": variant.name,
            "params": params.manifest(),
            "description": result.description,
            **source.base.manifest,
            **result.manifest,
        }
        if protocol != DEFAULT_PROTOCOL:  # an mlvar manifest stays as it was before protocols
            manifest["protocol"] = protocol
        name = self.scenario_name(variant, params, protocol)
        return write_scenario(
            source.data_root,
            name,
            manifest,
            result.splits,
            force=force,
            source=source.rows,
            origin=result.origin,
        )


#: The registered datasets, in registration order (see :mod:`mlvar.data.registry`).
DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to :data:`DATASETS` and return it.

    Raises
    ------
    ValueError
        The name is taken, or a mode has variants without a key option.
    """
    if spec.name in DATASETS:
        raise ValueError(f"dataset '{spec.name}' is registered twice")
    for m in spec.mode_specs:
        if len(spec.variants(m.name)) > 1 and m.key not in m.params.options():
            raise ValueError(f"{spec.name} mode '{m.name}': a variant needs a key option")
    DATASETS[spec.name] = spec
    return spec
