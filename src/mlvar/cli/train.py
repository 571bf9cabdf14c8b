"""``mlvar train``: train N seeded models on a prepared scenario."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlvar.cli.common import ProgressBar, cli_errors, console, get_config, print_json, table
from mlvar.cli.options import (
    BaseSeedOpt,
    BatchSizeOpt,
    ConfigOpt,
    DatasetArg,
    DeviceOpt,
    EngineOpt,
    EpochsOpt,
    ForceOpt,
    JsonOpt,
    LrOpt,
    ModelOpt,
    NameOpt,
    PackSizeOpt,
    RecordDynamicsOpt,
    RunsOpt,
    ScenarioOpt,
    VaryOpt,
    training_overrides,
)

if TYPE_CHECKING:
    from mlvar.train.service import TrainResult


def train(
    dataset: DatasetArg,
    scenario: ScenarioOpt = None,
    runs: RunsOpt = 10,
    name: NameOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    engine: EngineOpt = None,
    vary: VaryOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    base_seed: BaseSeedOpt = None,
    pack_size: PackSizeOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Image models on the CPU: processes training runs at once (0: one per "
            "core, the default; 1: one run at a time in this process). Results do not "
            "depend on it.",
            show_default=False,
        ),
    ] = None,
    record_dynamics: RecordDynamicsOpt = False,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train N seeded copies of a model; finished runs are kept and skipped on re-runs.

    Examples:

      mlvar train compas --scenario artificial --runs 50

      mlvar train digits --runs 16 --vary init      # only initialisation varies

      mlvar train digits --runs 16 --model cnn      # the small CNN, with augmentation

      mlvar train cifar10 --scenario holdout --runs 8 --device cuda --record-dynamics

      mlvar train compas --scenario compas-holdout-cluster5 --runs 20 --engine loop
    """
    with cli_errors():
        from mlvar.train import service  # checks the request before it imports torch

        cfg = get_config(config)
        overrides = training_overrides(
            model=model,
            device=device,
            engine=engine,
            vary=vary,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            base_seed=base_seed,
            pack_size=pack_size,
            workers=workers,
            record_dynamics=record_dynamics,
        )
        with ProgressBar(not json_out) as bar:

            def on_progress(done: int, total: int, message: str) -> None:
                bar.update(f"epochs ({message})", done, total)

            result = service.train(
                cfg,
                dataset,
                scenario=scenario,
                runs=runs,
                name=name,
                overrides=overrides,
                force=force,
                progress=on_progress,
            )
    if json_out:
        print_json(result.to_dict())
        return
    _print_result(result)


def _print_result(result: TrainResult) -> None:
    if result.cleaned:
        console.print(f"Removed {len(result.cleaned)} unfinished run folder(s) and retrained them.")
    if result.trained:
        rows = [
            [r["split"], r["runs"], r["mean"], r["std"], r["min"], r["max"]]
            for r in result.accuracy_summary()
        ]
        console.print(
            table(
                f"{result.experiment}: accuracy of the {len(result.trained)} runs trained now",
                ["split", "runs", "mean", "std", "min", "max"],
                rows,
            )
        )
        console.print(
            f"Trained {len(result.trained)} run(s) in {result.wall_time_s:.1f} s "
            f"({result.engine} engine, {result.device})."
        )
    if result.skipped:
        console.print(f"Skipped {len(result.skipped)} finished run(s).")
    console.print(f"Run store: {Path(result.path)}")
