"""``mlvar report``: static HTML reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlvar.analysis.defaults import DEFAULT_RANK_BY, DEFAULT_SPLIT, detect_split
from mlvar.cli.common import ProgressBar, cli_errors, console, get_config, print_json
from mlvar.cli.options import ConfigOpt, DetectSplitOpt, JsonOpt, ReportByOpt
from mlvar.errors import MlvarError
from mlvar.report.defaults import TOP_DEFAULT

app = typer.Typer(help="Write reports of an experiment.", no_args_is_help=True)


@app.command("html")
def html(
    experiment: Annotated[
        str | None,
        typer.Argument(
            help="Experiment name; leave out for one site of every experiment.",
            show_default=False,
        ),
    ] = None,
    study: Annotated[
        bool,
        typer.Option(
            "--study",
            help="Only the study table across experiments (<reports_root>/study).",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: <reports_root>/<experiment>; "
            "<reports_root>/study with --study; <reports_root> for the site).",
            show_default=False,
        ),
    ] = None,
    split: DetectSplitOpt = None,
    top: Annotated[
        int,
        typer.Option(
            min=1,
            help="Top-ranked samples that get a page (plus as many random unaffected ones).",
        ),
    ] = TOP_DEFAULT,
    by: ReportByOpt = DEFAULT_RANK_BY,
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
    number of runs, a sortable and filterable ranking and one page per top sample.

    With no experiment: one site for all of them, each experiment's report in
    <reports_root>/<experiment>/ and the study table as <reports_root>/index.html,
    linking them. With --study: only the study table, in <reports_root>/study/.

    Example: mlvar report html digits-holdout-sub3-r1.0-mlp --top 20
    """
    with cli_errors():
        from mlvar.io import check_writable

        cfg = get_config(config)
        check_writable(out or cfg.paths.reports_root)  # before the analysis it may write
        site_split = split or DEFAULT_SPLIT
        if study:
            if experiment is not None:
                raise MlvarError(
                    "--study reports every experiment, so it takes no experiment name",
                    f"run 'mlvar report html {experiment}' or 'mlvar report html --study'",
                )
            from mlvar.report.study import build_study_report

            result = build_study_report(
                cfg.paths.runs_root,
                out or Path(cfg.paths.reports_root) / "study",
                site_split,
                by,
                compute_missing,
            )
        elif experiment is None:
            from mlvar.report.study import build_site

            with ProgressBar(not json_out) as bar:
                site = build_site(
                    cfg.paths.runs_root,
                    out or Path(cfg.paths.reports_root),
                    Path(cfg.paths.data_root),
                    site_split,
                    by,
                    top,
                    progress=lambda done, total, name: bar.update("reports", done, total),
                )
            if json_out:
                print_json(site.to_dict())
                return
            for name, why in site.skipped.items():
                console.print(f"no report of {name}: {why}", style="yellow", markup=False)
            console.print(
                f"Site: {site.path} (study table of {site.n_study} experiment(s); "
                f"{len(site.reports)} report(s))",
                markup=False,
            )
            return
        else:
            from mlvar.store import ExperimentStore

            store = ExperimentStore.open(cfg.paths.runs_root, experiment)
            split = split or detect_split(store.meta)
            if out is None and experiment == "study":
                # <reports_root>/study is the study report's folder: neither may replace
                # the other without being asked.
                raise MlvarError(
                    "the report of an experiment named 'study' would replace the study "
                    "report in <reports_root>/study",
                    "pass --out DIR for this experiment's report",
                )
            from mlvar.report.html import build_report  # pandas: once the experiment is found

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
