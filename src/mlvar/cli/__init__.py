"""The ``mlvar`` command line: a thin typer shell over the service modules."""

from __future__ import annotations

import typer

from mlvar import __version__
from mlvar.cli import analyze, data, demo, report, train

app = typer.Typer(
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
app.add_typer(analyze.app, name="analyze")
app.add_typer(report.app, name="report")
app.command("demo")(demo.demo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlvar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """mlvar: seed variance for data debugging."""


def main() -> None:
    """Console-script entry point."""
    app()
