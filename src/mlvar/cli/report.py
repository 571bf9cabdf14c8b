"""``mlvar report``: static HTML reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlvar.analysis.metrics import METRICS
from mlvar.analysis.service import DEFAULT_RANK_BY
from mlvar.cli.common import ConfigOpt, JsonOpt, cli_errors, console, get_config, print_json
from mlvar.errors import MlvarError
from mlvar.report.html import TOP_DEFAULT, build_report
from mlvar.store import ExperimentStore, list_experiments

app = typer.Typer(help="Write reports of an experiment.", no_args_is_help=True)


@app.command("html")
def html(
    experiment: Annotated[
        str | None,
        typer.Argument(help="Experiment name (leave out with --study).", show_default=False),
    ] = None,
    study: Annotated[
        bool,
        typer.Option(
            "--study",
            help="Report the study table across every experiment instead (<reports_root>/study).",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: <reports_root>/<experiment>, or "
            "<reports_root>/study with --study).",
            show_default=False,
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split to report on.")] = "test",
    top: Annotated[
        int,
        typer.Option(
            min=1,
            help="Top-ranked samples that get a page (plus as many random unaffected ones).",
        ),
    ] = TOP_DEFAULT,
    by: Annotated[
        str, typer.Option(help=f"Metric to rank by: {', '.join(METRICS)}.")
    ] = DEFAULT_RANK_BY,
    compute_missing: Annotated[
        bool,
        typer.Option(
            "--compute-missing",
            help="With --study: rank experiments that have no detection results yet.",
        ),
    ] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a static HTML report folder that opens from disk with no network.

    For one experiment: accuracy spread, detection table, ROC curves, AUROC against the
    number of runs, a sortable and filterable ranking and one page per top sample. With
    --study (no experiment): the study table across experiments.

    Example: mlvar report html digits-holdout-sub3-r1.0-mlp --top 20
    """
    with cli_errors():
        cfg = get_config(config)
        if study:
            from mlvar.report.study import build_study_report

            if experiment is not None:
                raise MlvarError(
                    "--study reports every experiment, so it takes no experiment name",
                    f"run 'mlvar report html {experiment}' or 'mlvar report html --study'",
                )
            result = build_study_report(
                cfg.paths.runs_root,
                out or Path(cfg.paths.reports_root) / "study",
                split,
                by,
                compute_missing,
            )
        else:
            if experiment is None:
                known = list_experiments(cfg.paths.runs_root)
                listed = (
                    f" (experiments: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''})"
                )
                raise MlvarError(
                    "name the experiment to report on, or pass --study",
                    "e.g. 'mlvar report html EXPERIMENT'"
                    + (listed if known else "")
                    + ", or 'mlvar report html --study' for the study table",
                )
            store = ExperimentStore.open(cfg.paths.runs_root, experiment)
            if out is None and experiment == "study":
                # <reports_root>/study is the study report's folder: neither may replace
                # the other without being asked.
                raise MlvarError(
                    "the report of an experiment named 'study' would replace the study "
                    "report in <reports_root>/study",
                    "pass --out DIR for this experiment's report",
                )
            result = build_report(
                store,
                out or Path(cfg.paths.reports_root) / experiment,
                split,
                top,
                by,
                data_root=Path(cfg.paths.data_root),
            )
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"Report: {result.path}")
