"""``mlvar report``: static HTML reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlvar.analysis.metrics import METRICS
from mlvar.analysis.service import DEFAULT_RANK_BY
from mlvar.cli.common import ConfigOpt, JsonOpt, cli_errors, console, get_config, print_json
from mlvar.report.html import TOP_DEFAULT, build_report
from mlvar.store import ExperimentStore

app = typer.Typer(help="Write reports of an experiment.", no_args_is_help=True)


@app.command("html", no_args_is_help=True)
def html(
    experiment: Annotated[str, typer.Argument(help="Experiment name.", show_default=False)],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: <reports_root>/<experiment>).", show_default=False
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split to report on.")] = "test",
    top: Annotated[int, typer.Option(min=1, help="Ranked samples to list.")] = TOP_DEFAULT,
    by: Annotated[
        str, typer.Option(help=f"Metric to rank by: {', '.join(METRICS)}.")
    ] = DEFAULT_RANK_BY,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a static HTML page: experiment, accuracy spread, detection table, top samples.

    Opens from disk with no network. Example: mlvar report html compas-original-mlp
    """
    with cli_errors():
        cfg = get_config(config)
        store = ExperimentStore.open(cfg.paths.runs_root, experiment)
        result = build_report(
            store, out or Path(cfg.paths.reports_root) / experiment, split, top, by
        )
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"Report: {result.path}")
