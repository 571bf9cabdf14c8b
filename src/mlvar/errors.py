"""Error types and exit codes shared by every module.

Services raise :class:`MlvarError` for anything the user can fix (bad input, missing
files, wrong checksum, malformed config). The CLI turns it into a one-line message with
a hint and :attr:`ExitCode.BAD_INPUT`; a backend job that failed after its retries is
:attr:`ExitCode.JOB_FAILED`; any other exception is an internal error
(:attr:`ExitCode.INTERNAL`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of ``mlvar`` (and of ``python -m mlvar.backends.worker``)."""

    OK = 0
    INTERNAL = 1  # a bug, or a fault mlvar did not foresee (traceback shown)
    BAD_INPUT = 2  # bad input, a missing file, an OS fault: one line naming it and a hint
    JOB_FAILED = 3  # a backend job failed after its retries (its log tail is printed)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


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
