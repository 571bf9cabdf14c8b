"""``mlvar data``: fetch sources, prepare scenarios, inspect them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlvar.cli.common import (
    ConfigOpt,
    JsonOpt,
    ProgressBar,
    cli_errors,
    console,
    get_config,
    print_json,
    table,
)
from mlvar.data import registry
from mlvar.data.scenario import list_scenarios, open_scenario

DATASETS = ", ".join(registry.DATASETS)

app = typer.Typer(
    help="Fetch datasets, prepare scenarios with an injected flaw, and inspect them.",
    no_args_is_help=True,
)


@app.command("fetch", no_args_is_help=True)
def fetch(
    dataset: Annotated[str, typer.Argument(help=f"Dataset: {DATASETS}.", show_default=False)],
    source: Annotated[
        Path | None,
        typer.Option(help="Use this local copy instead of downloading.", show_default=False),
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the checksum (for modified copies).")
    ] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a dataset's source file and verify its checksum.

    Examples:

      mlvar data fetch compas

      mlvar data fetch compas --source ~/Downloads/compas-scores-two-years.csv
    """
    with cli_errors():
        cfg = get_config(config)
        with ProgressBar(not json_out) as bar:

            def on_bytes(done: int, total: int | None) -> None:
                bar.update(f"fetching {dataset}", done, total)

            info = registry.fetch(
                cfg.paths.data_root, dataset, source=source, verify=not no_verify, progress=on_bytes
            )
    if json_out:
        print_json(info)
        return
    rows = [[k, v] for k, v in info.items()]
    console.print(table(f"fetched {dataset}", ["field", "value"], rows))


@app.command("prepare", no_args_is_help=True)
def prepare(
    dataset: Annotated[str, typer.Argument(help=f"Dataset: {DATASETS}.", show_default=False)],
    mode: Annotated[
        str | None,
        typer.Option(
            help="Scenario mode. compas: original, artificial, holdout. digits: original, holdout.",
            show_default=False,
        ),
    ] = None,
    ratio: Annotated[
        float | None,
        typer.Option(
            help="compas artificial: label-flip probability of the added feature, in [0, 0.5]. "
            "digits holdout: fraction of the subclass held out, in [0, 1] (default 1).",
            show_default=False,
        ),
    ] = None,
    cluster: Annotated[
        int | None,
        typer.Option(help="compas holdout: cluster index (0 = smallest).", show_default=False),
    ] = None,
    subclass: Annotated[
        str | None,
        typer.Option(help="digits holdout: the digit (0-9) to hold out.", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="compas artificial: seed of the label flips.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild an existing scenario.")] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Prepare a scenario: a deterministic change to a dataset, with its ground truth.

    Examples:

      mlvar data prepare compas --mode artificial --ratio 0.3

      mlvar data prepare compas --mode holdout --cluster 5

      mlvar data prepare digits --mode holdout --subclass 3
    """
    with cli_errors():
        cfg = get_config(config)
        scenario = registry.prepare(
            cfg.paths.data_root,
            dataset,
            mode=mode,
            ratio=ratio,
            cluster=cluster,
            subclass=subclass,
            seed=seed,
            force=force,
        )
        info = registry.scenario_info(scenario)
    if json_out:
        print_json({"path": str(scenario.path), **info})
        return
    _print_info(info)
    console.print(f"Prepared [bold]{scenario.name}[/] in {scenario.path}")


def _print_info(info: dict) -> None:
    rows = [
        [r["split"], r["class"], r["total"], r["affected"], r["unaffected"]] for r in info["rows"]
    ]
    title = f"{info['name']}: {info.get('description', '')}"
    console.print(table(title, ["split", "class", "total", "affected", "unaffected"], rows))


@app.command("info", no_args_is_help=True)
def info(
    scenario: Annotated[
        str, typer.Argument(help="A prepared scenario's name.", show_default=False)
    ],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Counts per split, class and affected group of a prepared scenario.

    Example: mlvar data info digits-holdout-sub3-r1.0
    """
    with cli_errors():
        cfg = get_config(config)
        found = open_scenario(cfg.paths.data_root, scenario)
        details = registry.scenario_info(found)
    if json_out:
        print_json(details)
        return
    _print_info(details)


@app.command("list")
def list_(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """List the prepared scenarios in the data root.

    Example: mlvar data list --json
    """
    with cli_errors():
        cfg = get_config(config)
        found = list_scenarios(cfg.paths.data_root)
    rows = [
        [s.name, s.dataset, s.mode, s.manifest.get("counts", {}).get("test", {}).get("affected")]
        for s in found
    ]
    if json_out:
        print_json(
            [dict(zip(["name", "dataset", "mode", "test_affected"], r, strict=True)) for r in rows]
        )
        return
    console.print(
        table(
            f"scenarios in {cfg.paths.data_root}",
            ["name", "dataset", "mode", "test affected"],
            rows,
        )
    )
