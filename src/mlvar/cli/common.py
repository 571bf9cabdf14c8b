"""Options, error handling and output shared by the CLI modules."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlvar.config import Config, load_config
from mlvar.errors import MlvarError

console = Console()
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


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    out = Table(title=title, title_justify="left")
    for col in columns:
        out.add_column(
            col, justify="left" if col in ("split", "class", "metric", "run") else "right"
        )
    for row in rows:
        out.add_row(*[fmt(v) for v in row])
    return out


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)
