"""Error types shared by every service module.

Services raise :class:`MlvarError` for anything the user can fix (bad input, missing
files, wrong checksum, malformed config). The CLI turns it into a one-line message with
a hint and exit code 2; any other exception is an internal error (exit code 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MlvarError(Exception):
    """A problem the user can fix: printed as one line with a hint, exit code 2.

    Parameters
    ----------
    message
        What is wrong, naming the offending value.
    hint
        What to do about it.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


def closest(name: str, choices: Iterable[str]) -> str | None:
    """Return the valid choice nearest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> MlvarError:
    """Build the error for a name that is not one of ``choices``."""
    choices = sorted(choices)
    near = closest(name, choices)
    hint = f"did you mean '{near}'? " if near else ""
    return MlvarError(f"unknown {kind} '{name}'", hint + "valid: " + ", ".join(choices))
