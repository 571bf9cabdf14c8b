"""Error handling and output shared by the CLI modules (their options are
:mod:`mlvar.cli.options`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from mlvar.errors import ExitCode, MlvarError

if TYPE_CHECKING:  # the config (numpy), rich's tables and progress bars load when used
    from rich.progress import Progress
    from rich.table import Table

    from mlvar.config import Config
    from mlvar.train.study import StudyPlan


def _width() -> int | None:
    # Piped or redirected output keeps whole tables (rich would assume 80 columns).
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 200


console = Console(width=_width())
err_console = Console(stderr=True)

#: Set by ``mlvar --debug``; ``MLVAR_DEBUG=1`` does the same.
debug = False

_DEBUG_HINT = "'mlvar --debug ...' shows the traceback"

#: The OS faults that are the machine's, not mlvar's: one line and exit code 2, with what
#: to do. Any other OSError (a connection refused, say) stays an internal error.
_OS_FAULT_HINTS = {
    errno.ENOSPC: "free space on that filesystem, or write elsewhere, and run it again",
    errno.EDQUOT: "free space within your quota, or write elsewhere, and run it again",
    errno.EACCES: "check the permissions there, or point [paths] or MLVAR_*_ROOT elsewhere",
    errno.EPERM: "check the permissions there, or point [paths] or MLVAR_*_ROOT elsewhere",
    errno.EROFS: "that filesystem is read-only: point [paths] or MLVAR_*_ROOT elsewhere",
    errno.ENOTDIR: "a file is where a folder should be: move it or pick another path",
    errno.EISDIR: "a folder is where a file should be: move it or pick another path",
    errno.EEXIST: "something is in the way there: move it or pick another path",
    errno.ENOTEMPTY: "something is in the way there: move it or pick another path",
    errno.ENOENT: "it vanished while mlvar ran (removed by another process?): run it again",
    errno.ENAMETOOLONG: "pick a shorter path",
    errno.EIO: "the disk or network filesystem failed: check it, then run it again",
    errno.ESTALE: "the network filesystem failed: check it, then run it again",
    errno.EMFILE: "too many open files: raise 'ulimit -n', then run it again",
    errno.ENFILE: "too many open files on this machine: run it again later",
    errno.EFBIG: "the file is too large for that filesystem: write elsewhere",
}


def debug_enabled() -> bool:
    """Whether tracebacks of handled errors are shown (``--debug`` or ``MLVAR_DEBUG``)."""
    return debug or os.environ.get("MLVAR_DEBUG", "").strip().lower() not in ("", "0", "false")


def os_fault_message(exc: OSError) -> tuple[str, str] | None:
    """An OS fault (no space, permission denied, read-only filesystem, ...) as the message
    and hint of its one line, naming the path and the cause; None for other OSErrors."""
    hint = _OS_FAULT_HINTS.get(exc.errno) if exc.errno is not None else None
    if hint is None:
        return None
    cause = exc.strerror or os.strerror(exc.errno)
    where = exc.filename
    if where is None:
        return cause, hint
    return f"{cause}: {os.fsdecode(where)}", hint


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn user errors and OS faults into one line on stderr and exit code 2 (with
    ``--debug``, after the traceback); Ctrl-C into 130.

    This is the one place OS errors become messages: services let them through, naming
    the path (``mlvar.io`` names the final path of a file written atomically).
    """
    try:
        yield
    except MlvarError as exc:
        _one_line(exc.message, exc.hint)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    except OSError as exc:
        fault = os_fault_message(exc)
        if fault is None:
            raise
        message, hint = fault
        _one_line(message, f"{hint}; {_DEBUG_HINT}" if not debug_enabled() else hint)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted.", markup=False)
        raise typer.Exit(ExitCode.INTERRUPTED) from None


def _one_line(message: str, hint: str) -> None:
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)
    line = f"Error: {message}"
    if hint:
        line += f" (hint: {hint})"
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """Print each warning raised inside (e.g. a run skipped for a sha256 mismatch) as one
    ``Warning: ...`` line on stderr, once, before any error message."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        # Replayed after the recording context: inside it, showing a warning would append
        # it to the very list being read, without end.
        seen = set()
        for w in caught:
            text = str(w.message)
            if not issubclass(w.category, UserWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            elif text not in seen:
                seen.add(text)
                err_console.print(
                    f"Warning: {text}",
                    style="yellow",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )


def get_config(path: Path | None) -> Config:
    from mlvar.config import load_config

    return load_config(path)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


class ProgressBar:
    """A rich progress bar on stderr (so ``--json`` output stays clean) that appears on its
    first update: input errors raised before any work print no empty bar."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, description: str, completed: float, total: float | None = None) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)
        self._progress.update(self._task, completed=completed, total=total, description=description)


def table(
    title: str, columns: list[str], rows: list[list[Any]], digits: dict[str, int] | None = None
) -> Table:
    """A rich table: text cells left-aligned, numbers right-aligned, none cut short.

    ``digits`` sets the decimals of float columns by name (default: see :func:`fmt`).
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    digits = digits or {}
    cells = [[fmt(v, digits.get(col)) for col, v in zip(columns, row, strict=True)] for row in rows]
    # A light frame leaves room for the cells: no value is ever cut short.
    # Cells and title are Text, not markup: "p_r[y]" or a label "[x]" must print as is.
    out = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, col in enumerate(columns):
        values = [row[i] for row in rows]
        text = any(isinstance(v, str) for v in values) or not values
        widest = max([len(row[i]) for row in cells], default=0)
        out.add_column(
            col,
            justify="left" if text else "right",
            no_wrap=True,
            min_width=min(widest, 40),
        )
    for row in cells:
        out.add_row(*(Text(c) for c in row))
    return out


def fmt(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if digits is not None:
            return f"{value:.{digits}f}"
        # Scores in [0, 1] need 4 decimals; ranks and counts (half-integers) need 1.
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def plan_table(plan: StudyPlan) -> Table:
    """The plan of a study (``mlvar train`` / ``mlvar submit`` of several scenarios): per
    experiment, the runs asked for, those finished and those to run; then the total."""
    rows: list[list[Any]] = [
        [p.scenario, p.experiment, p.requested, p.finished, p.to_run] for p in plan.experiments
    ]
    rows.append(["total", "", plan.runs_requested, plan.runs_finished, plan.runs_to_train])
    return table(
        f"{plan.dataset} study: {len(plan.experiments)} experiments",
        ["scenario", "experiment", "runs", "finished", "to run"],
        rows,
    )
