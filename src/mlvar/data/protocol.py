"""Protocols: whose conventions a scenario, a recipe and an analysis follow.

``mlvar`` (the default) is mlvar's own; ``study`` reproduces the original Model
Variability study exactly (its scenario rules, training recipes and analysis conventions;
``docs/fidelity.md`` compares them decision by decision). A scenario records the protocol
it was prepared under in its manifest (``"protocol"``; absent means ``mlvar``), and the
names of ``study`` scenarios and experiments carry it (:func:`name_suffix`), so that both
coexist in one data root and one run store.
"""

from __future__ import annotations

from typing import Any

from mlvar.errors import unknown_choice

PROTOCOLS: dict[str, str] = {
    "mlvar": "mlvar's own conventions (the default)",
    "study": "the original Model Variability study's conventions, exactly (docs/fidelity.md)",
}
DEFAULT_PROTOCOL = "mlvar"
STUDY = "study"


def check_protocol(name: str) -> str:
    """Return ``name`` if it is a protocol; raise :class:`~mlvar.errors.MlvarError` if not."""
    if name not in PROTOCOLS:
        raise unknown_choice("protocol", name, PROTOCOLS)
    return name


def name_suffix(protocol: str) -> str:
    """What a scenario's name gains under ``protocol``: ``""`` for mlvar, ``"-study"``."""
    return "" if check_protocol(protocol) == DEFAULT_PROTOCOL else f"-{protocol}"


def protocol_of(manifest: dict[str, Any]) -> str:
    """The protocol a scenario manifest (or run/experiment metadata) records."""
    return str(manifest.get("protocol", DEFAULT_PROTOCOL))


def protocol_help() -> str:
    """The ``--protocol`` option's help text."""
    return "Conventions: " + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()) + "."
