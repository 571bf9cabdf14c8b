"""The ``mlvar`` command line: a thin typer shell over the service modules.

Building the app imports typer, rich, the CLI's modules and the registries their help
lists (numpy at most); each command imports its service when it runs, so ``--help``,
``--version`` and the bad-input errors that need no data load no torch, scikit-learn,
matplotlib or pandas (``benchmarks/cli_startup.py``, ``tests/test_cli_startup.py``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from mlvar import __version__
from mlvar.cli import analyze, common, data, demo, report, submit, train
from mlvar.errors import ExitCode

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as _click_exc
except ImportError:  # older typer depends on the click package
    from click import exceptions as _click_exc


class _OneLineErrors(TyperGroup):
    """The root group: usage errors (a bad option value, a missing argument) print one
    ``Error: ... (hint: ...)`` line and exit with :attr:`ExitCode.BAD_INPUT`, like every
    other user error."""

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
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
app.add_typer(data.app, name="data")
app.command("train", no_args_is_help=True)(train.train)
app.add_typer(submit.app, name="submit")
app.add_typer(analyze.app, name="analyze")
app.add_typer(report.app, name="report")
app.command("demo")(demo.demo)


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


_reflow_help(app)


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
