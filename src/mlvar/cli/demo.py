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
            help="Your own data instead of digits: a folder of images (<class>/<file> or "
            "<class>/<group>/<file>) or a table file (CSV, TSV, parquet).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="--data: the dataset name to fetch it under (default: from the path).",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            help="--data folder: resize every image to N x N pixels.",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    label: Annotated[
        str | None,
        typer.Option(help="--data table: the label column (required).", show_default=False),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the whole pipeline offline on scikit-learn's digits (about a minute on a CPU),
    or on your own images or table.

    Holds out digit 3 (its coarse class "2-3" keeps only the 2s in training), trains the
    seeds, ranks test samples by variance metrics, scores which metric finds the held-out
    3s, and writes the HTML report. Paths come from the config (default ./mlvar-work/).

    With --data PATH: a folder is fetched as an image folder (its first group held out:
    the first <class>/<group> folder in sorted order; a folder without groups is prepared
    as it is) and trains the small CNN; a file is fetched as a table (its smallest
    tree-leaf cluster held out) and trains the MLP. Re-running reuses what is done.

    Examples:

      mlvar demo

      mlvar demo --runs 32 --json

      mlvar demo --data ~/photos --size 32

      mlvar demo --data patients.csv --label outcome
    """
    with cli_errors():
        from rich.markup import escape

        from mlvar.demo import run_demo
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

            result = run_demo(
                cfg,
                runs=runs,
                step=step,
                progress=on_progress,
                data=data,
                name=name,
                fetch_options={"size": size, "label": label},
            )
    if json_out:
        print_json(result.to_dict())
        return
    s = result.accuracy.summary
    console.print(
        f"Test accuracy over {result.accuracy.n_runs} seeds: "
        f"{s['accuracy']['mean']:.4f} ± {s['accuracy']['std'] or 0:.4f} (std); "
        f"{result.affected}: {_mean(s['acc_affected'])}, others: {_mean(s['acc_unaffected'])}",
        markup=False,
        highlight=False,
    )
    best = result.best_detection(5)
    if best:
        console.print(
            table(
                f"metrics that best find the {result.affected}",
                ["metric", "AUROC", "AP", "P@k"],
                [
                    [r["metric"], r["auroc"], r["average_precision"], r["precision_at_k"]]
                    for r in best
                ],
            )
        )
    console.print(f"Report: [bold]{result.report}[/]")


def _mean(stat: dict) -> str:
    mean = stat.get("mean")
    return "n/a" if mean is None or math.isnan(mean) else f"{mean:.4f}"
