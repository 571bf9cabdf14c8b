"""``mlvar data``: fetch sources, prepare scenarios, inspect them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from mlvar.cli.options import (
    DATASET_NAMES,
    ClsOpt,
    ClusterOpt,
    ConfigOpt,
    GroupOpt,
    JsonOpt,
    ModeOpt,
    PrepareSeedOpt,
    ProtocolOpt,
    RatioOpt,
    SubclassOpt,
)
from mlvar.data import registry
from mlvar.data.protocol import DEFAULT_PROTOCOL

if TYPE_CHECKING:  # the data services (numpy) load inside the commands
    from mlvar.data.families import Family
    from mlvar.data.scenario import Scenario
    from mlvar.data.sweep import SweepResult

app = typer.Typer(
    help="Fetch datasets, prepare scenarios with an injected flaw, and inspect them.",
    no_args_is_help=True,
)


# The registry is loaded for every command's help already (mlvar.cli.options).
FETCHED = ", ".join(name for name, spec in registry.DATASETS.items() if spec.needs_fetch)
USER_KIND_NAMES = ", ".join(registry.USER_KINDS)

#: ``mlvar data fetch`` options of the user kinds (docs/datasets.md, "Your own table"):
#: given ones reach the kind's fetch by name; a kind that takes none of them refuses it.
NameOpt = Annotated[
    str | None,
    typer.Option(
        help="table/imagefolder: the name to record your data under (then: mlvar data "
        "prepare NAME).",
        show_default=False,
    ),
]
LabelOpt = Annotated[
    str | None, typer.Option(help="table: the label column (required).", show_default=False)
]
FeaturesOpt = Annotated[
    str | None,
    typer.Option(
        help="table: the feature columns, comma-separated (default: every column but the "
        "label and the id).",
        show_default=False,
    ),
]
IdOpt = Annotated[
    str | None,
    typer.Option(
        "--id",
        help="table: a column of unique integer ids (default: the row number).",
        show_default=False,
    ),
]
TestFractionOpt = Annotated[
    float | None,
    typer.Option(
        help="table/imagefolder: fraction of rows in test (default 0.165 / 0.3).",
        show_default=False,
    ),
]
ValFractionOpt = Annotated[
    float | None,
    typer.Option(
        help="table/imagefolder: fraction of the other rows in validation (default 0.125 / 0.1).",
        show_default=False,
    ),
]
SplitSeedOpt = Annotated[
    int | None,
    typer.Option(
        help="table/imagefolder: random_state of the stratified split (default 69).",
        show_default=False,
    ),
]


SizeOpt = Annotated[
    int | None,
    typer.Option(
        help="imagefolder: resize every image to N x N pixels (bicubic); without it all "
        "images must be one size.",
        metavar="N",
        show_default=False,
    ),
]
ColorOpt = Annotated[
    str | None,
    typer.Option(help="imagefolder: rgb (default) or gray.", show_default=False),
]


@app.command("fetch", no_args_is_help=True)
def fetch(
    dataset: Annotated[
        str,
        typer.Argument(
            help=f"Dataset ({FETCHED}), or the kind of your own data: {USER_KIND_NAMES}.",
            show_default=False,
        ),
    ],
    source: Annotated[
        Path | None,
        typer.Option(
            help="Use this local copy instead of downloading: compas: the CSV; cifar10/cifar100: "
            "the .tar.gz archive or its extracted folder (torchvision's layout too); table: "
            "your CSV, TSV or parquet file (required); imagefolder: your folder of images, "
            "<class>/<file> or <class>/<group>/<file> (required).",
            show_default=False,
        ),
    ] = None,
    name: NameOpt = None,
    label: LabelOpt = None,
    features: FeaturesOpt = None,
    id_column: IdOpt = None,
    test_fraction: TestFractionOpt = None,
    val_fraction: ValFractionOpt = None,
    split_seed: SplitSeedOpt = None,
    size: SizeOpt = None,
    color: ColorOpt = None,
    no_verify: Annotated[
        bool,
        typer.Option("--no-verify", help="Skip the checksum (for subsampled or modified copies)."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="table/imagefolder: replace a dataset of that --name fetched from other bytes.",
        ),
    ] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a dataset's source file and verify its checksum, or record your own data
    under a name.

    An interrupted CIFAR download resumes when the command is run again. Your own table is
    recorded in the data root (its sha256 kept); fetching the same file again is a no-op.

    Examples:

      mlvar data fetch compas

      mlvar data fetch compas --source ~/Downloads/compas-scores-two-years.csv

      mlvar data fetch cifar10

      mlvar data fetch cifar100 --source ~/torchvision-data

      mlvar data fetch table --source patients.csv --name patients --label outcome

      mlvar data fetch imagefolder --source ~/photos --name photos --size 32
    """
    with cli_errors():
        cfg = get_config(config)
        with ProgressBar(not json_out) as bar:

            def on_bytes(done: int, total: int | None) -> None:
                bar.update(f"fetching {dataset}", done, total)

            info = registry.fetch(
                cfg.paths.data_root,
                dataset,
                source=source,
                verify=not no_verify,
                progress=on_bytes,
                name=name,
                force=force,
                label=label,
                features=features,
                id=id_column,
                test_fraction=test_fraction,
                val_fraction=val_fraction,
                split_seed=split_seed,
                size=size,
                color=color,
            )
    if info.get("warning"):
        err_console.print(f"Warning: {info['warning']}", markup=False, highlight=False)
    if json_out:
        print_json(info)
        return
    rows = [[k, v] for k, v in info.items() if k != "warning"]
    console.print(table(f"fetched {info.get('dataset', dataset)}", ["field", "value"], rows))


@app.command("prepare", no_args_is_help=True)
def prepare(
    dataset: Annotated[
        str,
        typer.Argument(
            help=f"Dataset: {DATASET_NAMES}, or the name you fetched your own data under.",
            show_default=False,
        ),
    ],
    mode: ModeOpt = None,
    ratio: RatioOpt = None,
    cluster: ClusterOpt = None,
    subclass: SubclassOpt = None,
    cls: ClsOpt = None,
    group: GroupOpt = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="Your table's holdout: the subgroup, a pandas expression over its columns "
            "(one value; commas belong to it).",
            show_default=False,
        ),
    ] = None,
    seed: PrepareSeedOpt = "0",
    protocol: ProtocolOpt = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Rebuild existing scenarios (a sweep skips them otherwise)."),
    ] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Prepare scenarios: deterministic changes to a dataset, with their ground truth.

    One value per option prepares one scenario. A list or range prepares a sweep (every
    combination); an option the mode needs that is left out is swept as the study did.
    Everything is checked before the first scenario is written; a sweep skips the
    scenarios already prepared. --protocol study follows the original study's scenario
    rules exactly (names end in -study; docs/datasets.md, Protocols).

    Examples:

      mlvar data prepare compas --mode artificial --ratio 0.3

      mlvar data prepare compas --mode artificial

      mlvar data prepare compas --mode holdout --cluster all

      mlvar data prepare cifar10 --mode holdout-dup --ratio 0:0.5:0.1 --cls 0

      mlvar data prepare cifar100 --subclass study

      mlvar data prepare digits --mode augmentation --cls 3,5 --ratio 0.5,1

      mlvar data prepare compas --mode holdout --cluster all --protocol study

      mlvar data prepare patients --mode holdout --where "age > 80" --ratio 0.5,1

      mlvar data prepare patients --mode cluster --cluster all

      mlvar data prepare photos --mode holdout --group indoor,night --ratio 0.5,1
    """
    with cli_errors():
        cfg = get_config(config)
        with ProgressBar(not json_out) as bar:

            def on_scenario(done: int, total: int, name: str) -> None:
                if total > 1:  # one scenario is quick: no bar
                    bar.update(f"preparing {name}" if name else "prepared", done, total)

            result = registry.prepare_sweep(
                cfg.paths.data_root,
                dataset,
                mode=mode,
                force=force,
                progress=on_scenario,
                ratio=ratio,
                cluster=cluster,
                subclass=subclass,
                cls=cls,
                group=group,
                where=where,
                seed=seed,
                protocol=cfg.protocol.name if protocol is None else protocol,
            )
        if len(result.scenarios) == 1 and not result.defaulted:
            scenario = result.scenarios[0]
            details = registry.scenario_info(scenario)
    if len(result.scenarios) == 1 and not result.defaulted:
        if json_out:
            print_json({"path": str(scenario.path), **details})
            return
        _print_info(details)
        console.print(f"Prepared [bold]{scenario.name}[/] in {scenario.path}")
        return
    _print_sweep(result, cfg.paths.data_root, json_out)


def _print_sweep(result: SweepResult, data_root: Path, json_out: bool) -> None:
    rows = result.rows()
    if json_out:
        print_json(
            {
                "dataset": result.dataset,
                "mode": result.mode,
                "protocol": result.protocol,
                "data_root": str(data_root),
                "defaulted": result.defaulted,
                "note": result.note(),
                "prepared": result.prepared,
                "skipped": result.skipped,
                "scenarios": rows,
            }
        )
        return
    note = result.note()
    if note:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    # Parameter values as typed (0.1, not 0.1000); counts as numbers.
    cells = [
        [
            str(row[c]) if c in result.swept and row.get(c) is not None else row.get(c)
            for c in columns
        ]
        for row in rows
    ]
    under = "" if result.protocol == DEFAULT_PROTOCOL else f" ({result.protocol})"
    title = f"{result.dataset} {result.mode}{under}: {len(rows)} scenarios in {data_root}"
    console.print(table(title, columns, cells))
    skipped = f", skipped {len(result.skipped)} already prepared" if result.skipped else ""
    console.print(f"Prepared {len(result.prepared)} of {len(rows)} scenarios{skipped}.")


def _print_info(info: dict) -> None:
    rows = [
        [r["split"], r["class"], r["total"], r["affected"], r["unaffected"]] for r in info["rows"]
    ]
    title = f"{info['name']}: {info.get('description', '')}"
    console.print(table(title, ["split", "class", "total", "affected", "unaffected"], rows))
    if info.get("groups"):
        group_rows = [[g["split"], g["group"], g["total"], g["affected"]] for g in info["groups"]]
        console.print(table("affected groups", ["split", "group", "total", "affected"], group_rows))


@app.command("info", no_args_is_help=True)
def info(
    scenario: Annotated[
        str, typer.Argument(help="A prepared scenario's name.", show_default=False)
    ],
    sheet: Annotated[
        Path | None,
        typer.Option(
            help="Also write a PNG contact sheet of affected and unaffected samples here.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Counts per split, class and affected group of a prepared scenario.

    Examples:

      mlvar data info digits-holdout-sub3-r1.0

      mlvar data info cifar10-augmentation-cls0-r0.5 --sheet sheet.png
    """
    with cli_errors():
        from mlvar.data.scenario import open_scenario

        cfg = get_config(config)
        found = open_scenario(cfg.paths.data_root, scenario)
        details = registry.scenario_info(found)
        if sheet is not None:
            from mlvar.report.contact_sheet import write_contact_sheet  # matplotlib

            details["sheet"] = write_contact_sheet(found, sheet)["path"]
    if json_out:
        print_json(details)
        return
    _print_info(details)
    if sheet is not None:
        console.print(f"Wrote contact sheet {details['sheet']}")


@app.command("list")
def list_(
    flat: Annotated[
        bool,
        typer.Option("--flat", help="One row per scenario instead of one per family."),
    ] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the prepared scenarios in the data root, by family (dataset and mode) with the
    parameter values prepared; --flat lists each scenario. --json prints one record per
    scenario (with its family and parameters).

    Examples:

      mlvar data list

      mlvar data list --flat

      mlvar data list --json
    """
    with cli_errors():
        from mlvar.data.families import scenario_families

        cfg = get_config(config)
        families = scenario_families(cfg.paths.data_root)
    root = cfg.paths.data_root
    if json_out:
        print_json(
            [
                {
                    "name": s.name,
                    "dataset": s.dataset,
                    "mode": s.mode,
                    "protocol": family.protocol,
                    "test_affected": _test_affected(s),
                    "family": family.name,
                    "params": s.manifest.get("params", {}),
                }
                for family in families
                for s in family.scenarios
            ]
        )
        return
    if flat:
        rows = [
            [s.name, s.dataset, s.mode, _params_text(s, family), _test_affected(s)]
            for family in families
            for s in family.scenarios
        ]
        columns = ["name", "dataset", "mode", "parameters", "test affected"]
        console.print(table(f"scenarios in {root}", columns, rows))
        return
    rows = [[f.name, len(f.scenarios), f.values_text()] for f in families]
    n = sum(len(f.scenarios) for f in families)
    console.print(
        table(
            f"{n} scenario{'s' if n != 1 else ''} in {root}, by family",
            ["family", "scenarios", "parameter values"],
            rows,
        )
    )


def _test_affected(scenario: Scenario) -> int | None:
    return scenario.manifest.get("counts", {}).get("test", {}).get("affected")


def _params_text(scenario: Scenario, family: Family) -> str:
    params = scenario.manifest.get("params") or {}
    return ", ".join(f"{k} {params[k]}" for k in family.params if params.get(k) is not None)
