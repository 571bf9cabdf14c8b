"""``mlvar train``: train N seeded models on each selected prepared scenario."""

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
    plan_table,
    print_json,
    table,
)
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
    NoTrainTtaOpt,
    PackSizeOpt,
    ProtocolOpt,
    RecordDynamicsOpt,
    ScenarioOpt,
    TrainRunsOpt,
    VaryOpt,
    training_overrides,
)
from mlvar.errors import ExitCode

if TYPE_CHECKING:
    from mlvar.train.service import TrainResult
    from mlvar.train.study import StudyPlan, StudyResult


def train(
    dataset: DatasetArg,
    scenario: ScenarioOpt = None,
    runs: TrainRunsOpt = None,
    protocol: ProtocolOpt = None,
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
    no_train_tta: NoTrainTtaOpt = False,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train N seeded copies of a model on each selected scenario (one experiment each);
    finished runs are kept and skipped on re-runs.

    --scenario selects scenario names, modes or globs, comma-separated; without it, every
    prepared scenario of the dataset. With several, the plan is printed first, then one
    progress bar runs over the whole study; an experiment that fails is reported and the
    others go on (exit code 3).

    Examples:

      mlvar train compas --scenario artificial --runs 50   # every ratio

      mlvar train cifar10 --scenario 'cifar10-holdout-dup-*' --runs 8

      mlvar train compas --scenario compas-original,holdout --runs 20

      mlvar train digits --runs 16 --vary init      # only initialisation varies

      mlvar train digits --runs 16 --model cnn      # the small CNN, with augmentation

      mlvar train digits --runs 8 --model mymodels:small_cnn   # your own network

      mlvar train cifar10 --scenario holdout --runs 8 --device cuda --record-dynamics

      mlvar train compas --scenario compas-holdout-cluster5 --runs 20 --engine loop

      mlvar train compas --protocol study --scenario holdout   # the study's recipe, 100 runs

    --protocol study trains the scenarios prepared under the study's protocol with the
    study's recipe (docs/training.md, "The study protocol").
    """
    with cli_errors():
        from mlvar.train import study  # checks the request before it imports torch

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
            no_train_tta=no_train_tta,
            protocol=protocol,
        )
        with ProgressBar(not json_out) as bar:

            def on_progress(done: int, total: int, message: str) -> None:
                bar.update(f"epochs ({message})", done, total)

            def on_plan(plan: StudyPlan) -> None:
                if len(plan.experiments) > 1 and not json_out:
                    console.print(plan_table(plan))
                for note in plan.notes:  # a scenario of another protocol than the recipe's
                    err_console.print(note, markup=False, highlight=False, soft_wrap=True)

            result = study.train_study(
                cfg,
                dataset,
                scenario=scenario,
                runs=runs,
                name=name,
                overrides=overrides,
                force=force,
                progress=on_progress,
                on_plan=on_plan,
            )
    if result.single:  # one scenario: as 'mlvar train' of one experiment always was
        (single,) = result.results.values()
        if json_out:
            print_json(single.to_dict())
        else:
            _print_result(single)
        return
    if json_out:
        print_json(result.to_dict())
    else:
        _print_study(result)
    if result.failed:
        raise typer.Exit(ExitCode.JOB_FAILED)


def _print_study(result: StudyResult) -> None:
    rows = []
    for planned in result.plan.experiments:
        exp = planned.experiment
        if exp in result.failed:
            rows.append([exp, "-", "-", "-", "failed"])
            continue
        res = result.results[exp]
        test = next((r for r in res.accuracy_summary() if r["split"] == "test"), None)
        acc = f"{test['mean']:.4f}" if test else "-"
        rows.append([exp, len(res.trained), len(res.skipped), acc, "ok"])
    console.print(
        table(
            f"{result.plan.dataset} study",
            ["experiment", "trained", "skipped", "test accuracy (trained now)", "state"],
            rows,
        )
    )
    for exp, error in result.failed.items():
        err_console.print(f"{exp} failed: {error}", markup=False, highlight=False, soft_wrap=True)
    ok = len(result.results)
    line = (
        f"Trained {result.trained} run(s), skipped {result.skipped} finished run(s) in "
        f"{ok} experiment(s) ({result.wall_time_s:.1f} s)"
    )
    if result.failed:
        line += f"; {len(result.failed)} of {len(result.plan.experiments)} experiment(s) failed"
    console.print(line + ".")
    runs_root = next(iter(result.results.values())).path.parent if result.results else None
    if runs_root is not None:
        console.print(f"Run store: {runs_root}")


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
