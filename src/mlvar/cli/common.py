"""Options, error handling and output shared by the CLI modules."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mlvar.config import Config, load_config
from mlvar.errors import MlvarError


def _width() -> int | None:
    # Piped or redirected output keeps whole tables (rich would assume 80 columns).
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 200


console = Console(width=_width())
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Config file (default: $MLVAR_CONFIG, else ./mlvar.toml if present).",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")
]


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn user errors into one line on stderr and exit code 2; Ctrl-C into 130."""
    try:
        yield
    except MlvarError as exc:
        message = f"Error: {exc.message}"
        if exc.hint:
            message += f" (hint: {exc.hint})"
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted.", markup=False)
        raise typer.Exit(130) from None


def get_config(path: Path | None) -> Config:
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
