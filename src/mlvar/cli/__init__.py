"""The ``mlvar`` command line: a thin typer shell over the service modules.

Start-up is kept short (``benchmarks/cli_startup.py``, ``tests/test_cli_startup.py``):

* the root app imports typer and rich only; each command's module
  (``mlvar.cli.<name>``, listed in :data:`COMMANDS`) is imported when that command runs or
  a help lists it, with :mod:`mlvar.cli.options`, whose help texts come from the
  registries (numpy at most);
* each command imports its service inside, after the checks that need no data;

so ``--version``, every ``--help`` and the bad-input errors that need no data load no
torch, scikit-learn, matplotlib or pandas.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import typer
import typer.main
from typer.core import TyperGroup

from mlvar import __version__
from mlvar.cli import common
from mlvar.errors import ExitCode

try:  # typer >= 0.20 vendors click
    from typer._click import Command
    from typer._click import exceptions as _click_exc
except ImportError:  # older typer depends on the click package
    from click import Command
    from click import exceptions as _click_exc

#: The commands of ``mlvar`` in the order its help lists them, each defined in the module
#: ``mlvar.cli.<name>``: a group (that module's ``app``) or one command (its function
#: ``<name>``, with these settings). A command's module is imported, and its click
#: command built, only when it runs or a help lists it.
COMMANDS: dict[str, dict[str, Any] | None] = {
    "train": {"no_args_is_help": True},
    "demo": {},
    "data": None,
    "submit": None,
    "analyze": None,
    "retrain": {"no_args_is_help": True},
    "report": None,
}

#: The root app's settings that shape the commands typer builds under it.
_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_show_locals": False,
    "rich_markup_mode": "rich",
}


def _reflow(doc: str) -> str:
    """A docstring as help text: each paragraph on one line, so that the terminal wraps it
    (typer's rich mode keeps the source's line breaks); indented blocks stay as written."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    out = []
    for para in paragraphs:
        lines = para.splitlines()
        if any(line[:1].isspace() for line in lines):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _reflow_help(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = _reflow(command.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


def build_command(name: str) -> Command:
    """The click command of ``mlvar <name>``, built as typer builds it under the root app."""
    module = importlib.import_module(f"{__name__}.{name}")
    holder = typer.Typer(**_SETTINGS)
    settings = COMMANDS[name]
    if settings is None:
        holder.add_typer(module.app, name=name)
    else:
        holder.command(name, **settings)(getattr(module, name))
    _reflow_help(holder)
    return typer.main.get_group(holder).commands[name]


class _LazyCommands(MutableMapping[str, Command]):
    """The root group's commands: every name of :data:`COMMANDS`, each built on first use."""

    def __init__(self) -> None:
        self._built: dict[str, Command] = {}

    def __getitem__(self, name: str) -> Command:
        if name not in self._built:
            if name not in COMMANDS:
                raise KeyError(name)
            self._built[name] = build_command(name)
        return self._built[name]

    def __setitem__(self, name: str, command: Command) -> None:
        raise TypeError("mlvar's commands are listed in mlvar.cli.COMMANDS")

    def __delitem__(self, name: str) -> None:
        raise TypeError("mlvar's commands are listed in mlvar.cli.COMMANDS")

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class _OneLineErrors(TyperGroup):
    """The root group: its commands are built when used (:data:`COMMANDS`); usage errors (a
    bad option value, a missing argument) print one ``Error: ... (hint: ...)`` line and
    exit with :attr:`ExitCode.BAD_INPUT`, like every other user error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands()

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click_exc.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # a bare group or command: its help is the answer
                sys.exit(exc.exit_code)
            where = exc.ctx.command_path if exc.ctx else "mlvar"
            print(f"Error: {exc.format_message()} (hint: see '{where} --help')", file=sys.stderr)
            sys.exit(ExitCode.BAD_INPUT)
        except _click_exc.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("Aborted.", file=sys.stderr)
            sys.exit(ExitCode.INTERNAL)
        sys.exit(code if isinstance(code, int) else ExitCode.OK)


app = typer.Typer(
    cls=_OneLineErrors,
    name="mlvar",
    help=(
        "Measure how much models vary from one random seed to the next, and use that "
        "variance to find flaws in data.\n\n"
        "Typical session: mlvar data prepare digits --mode holdout --subclass 3; "
        "mlvar train digits --runs 16; mlvar analyze rank EXPERIMENT; "
        "mlvar report html EXPERIMENT. Or just: mlvar demo."
    ),
    no_args_is_help=True,
    **_SETTINGS,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlvar {__version__}")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show the traceback of an error (an OS fault, bad input) before its one line "
        "(also MLVAR_DEBUG=1).",
    ),
) -> None:
    """mlvar: seed variance for data debugging."""
    common.debug = debug


def main() -> None:
    """Console-script entry point."""
    app()
