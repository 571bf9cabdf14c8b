"""``mlvar demo``: the whole pipeline on digits, offline, or on your own data (``--data``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from mlvar.cli.common import (
    ProgressBar,
    cli_errors,
    console,
    err_console,
    get_config,
    print_json,
    table,
)
from mlvar.cli.options import ConfigOpt, JsonOpt
from mlvar.demo import DEMO_RUNS


def demo(
    runs: Annotated[int, typer.Option(help="Seeds to train.")] = DEMO_RUNS,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Your own data instead of digits: a CSV, TSV or parquet table (with --label), "
            "or a folder of images (<class>/<file> or <class>/<group>/<file>), recorded under "
            "its file or folder name.",
            show_default=False,
        ),
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="--data table: its label column.", show_default=False)
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="--data table: the subgroup to hold out, a pandas expression (default: "
            "decision-tree cluster 0).",
            show_default=False,
        ),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option(
            help="--data folder: the group folder to hold out (default: the first, in sorted "
            "class/group order).",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            help="--data folder: resize every image to N x N pixels (needed when their sizes "
            "differ).",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the whole pipeline offline on scikit-learn's digits (about a minute on a CPU).

    Holds out digit 3 (its coarse class "2-3" keeps only the 2s in training), trains the
    seeds, ranks test samples by variance metrics, scores which metric finds the held-out
    3s, and writes the HTML report. Paths come from the config (default ./mlvar-work/).
    With --data, the same on your table: recorded (mlvar data fetch table), the --where
    subgroup held out (or decision-tree cluster 0), the MLP trained; or on your folder of
    images: recorded (mlvar data fetch imagefolder), the --group folder held out (or the
    first group; a folder without groups is used as it is), the small CNN trained, GradCAM
    in the report.

    Examples:

      mlvar demo

      mlvar demo --runs 32 --json

      mlvar demo --data patients.csv --label outcome --where "age > 80"

      mlvar demo --data ~/photos --size 32
    """
    with cli_errors():
        from rich.markup import escape

        from mlvar.demo import run_data_demo, run_demo
        from mlvar.io import check_writable

        cfg = get_config(config)
        for root in (cfg.paths.data_root, cfg.paths.runs_root, cfg.paths.reports_root):
            check_writable(root)  # a root it cannot write fails before any work
        with ProgressBar(not json_out) as bar:

            def step(message: str) -> None:
                if not json_out:
                    # A user's path or group name is text, not markup.
                    err_console.print(f"[bold]mlvar demo[/]: {escape(message)}")

            def on_progress(done: int, total: int, message: str) -> None:
                bar.update(f"epochs ({message})", done, total)

            if data is None:
                result = run_demo(cfg, runs=runs, step=step, progress=on_progress)
            else:
                options = {"label": label, "where": where, "group": group, "size": size}
                result = run_data_demo(
                    cfg, data, options, runs=runs, step=step, progress=on_progress
                )
    if json_out:
        print_json(result.to_dict())
        return
    s = result.accuracy.summary
    held_out = "held-out 3s" if data is None else "affected"
    console.print(
        f"Test accuracy over {result.accuracy.n_runs} seeds: "
        f"{s['accuracy']['mean']:.4f} ± {s['accuracy']['std'] or 0:.4f} (std); "
        f"{held_out}: {_mean(s['acc_affected'])}, others: {_mean(s['acc_unaffected'])}"
    )
    best = result.best_detection(5)
    if best:
        console.print(
            table(
                "metrics that best find the "
                + ("held-out 3s" if data is None else "affected samples"),
                ["metric", "AUROC", "AP", "P@k"],
                [
                    [r["metric"], r["auroc"], r["average_precision"], r["precision_at_k"]]
                    for r in best
                ],
            )
        )
    console.print(f"Report: [bold]{result.report}[/]")


def _mean(stat: dict) -> str:
    """A mean accuracy, or n/a where no test sample is in the group (nothing affected)."""
    mean = stat.get("mean")
    return "n/a" if mean is None or math.isnan(mean) else f"{mean:.4f}"
