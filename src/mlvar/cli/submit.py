"""``mlvar submit``: train an experiment's runs on a backend (local, Ray, Azure ML).

``mlvar submit DATASET ...`` is ``mlvar submit run DATASET ...``: the group routes any
first argument that is not a sub-command to ``run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mlvar.backends import service
from mlvar.backends.spec import Submission
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
from mlvar.cli.train import (
    BaseSeedOpt,
    BatchSizeOpt,
    DatasetArg,
    DeviceOpt,
    EngineOpt,
    EpochsOpt,
    ForceOpt,
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


class _DefaultRun(TyperGroup):
    """Route ``mlvar submit DATASET ...`` to ``mlvar submit run DATASET ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help=(
        "Train an experiment's runs on a backend: local (in process or worker processes), "
        "ray (local instance or cluster) or aml (Azure ML jobs); then check and fetch them.\n\n"
        "Examples:\n\n"
        "  mlvar submit digits --runs 16 --backend local\n\n"
        "  mlvar submit cifar100 --runs 50 --backend aml --dry-run --out jobs/\n\n"
        "  mlvar submit status EXPERIMENT\n\n"
        "  mlvar submit download EXPERIMENT"
    ),
)


@app.command("run", no_args_is_help=True)
def run(
    dataset: DatasetArg,
    backend: Annotated[
        str, typer.Option(help="local, ray or aml (Azure ML).", show_default=True)
    ] = "local",
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
    record_dynamics: RecordDynamicsOpt = False,
    force: ForceOpt = False,
    runs_per_job: Annotated[
        int | None,
        typer.Option(
            help="Runs packed into one job (default [submit] runs_per_job, 8).", show_default=False
        ),
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option(
            help="Extra attempts of a failing job (default [submit] retries, 2).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="local: worker processes (0: in process; default: in process on "
            "CPU, one per GPU on CUDA).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Write the jobs (aml: YAML validated with load_job) "
            "and specs to --out; submit nothing.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder of --dry-run (default ./mlvar-jobs/<experiment>).", show_default=False
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Submit the runs of an experiment that are not complete yet (same options as train).

    Examples:

      mlvar submit digits --runs 16 --backend local

      mlvar submit compas --scenario artificial --runs 50 --backend ray

      mlvar submit cifar100 --runs 50 --backend aml --device cuda

      mlvar submit cifar100 --runs 50 --backend aml --dry-run --out jobs/
    """
    with cli_errors():
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
            record_dynamics=record_dynamics,
        )
        with ProgressBar(not json_out) as bar:

            def on_progress(done: int, total: int, message: str) -> None:
                bar.update(f"runs ({message})", done, total)

            result = service.submit(
                cfg,
                dataset,
                scenario=scenario,
                runs=runs,
                backend=backend,
                name=name,
                overrides=overrides,
                force=force,
                dry_run=dry_run,
                out=out,
                runs_per_job=runs_per_job,
                retries=retries,
                workers=workers,
                progress=on_progress,
            )
    if json_out:
        print_json(result.to_dict())
        return
    if result.dry_run_dir is not None:
        n = len(result.submission.jobs) if result.submission else 0
        console.print(
            f"Dry run: {n} job(s) for {len(result.pending)} run(s) of {result.experiment} "
            f"written to {result.dry_run_dir}"
            + (" (validated with load_job)" if backend == "aml" else "")
        )
        return
    if result.submission is None:
        console.print(f"Nothing to submit: all {len(result.skipped)} run(s) are complete.")
    else:
        _print_submission(result.submission)
        if result.skipped:
            console.print(f"Skipped {len(result.skipped)} complete run(s).")
        if result.wall_time_s:
            console.print(f"Took {result.wall_time_s:.1f} s.")
    console.print(f"Run store: {result.path}")
    if result.submission is not None and result.submission.state == "failed":
        raise typer.Exit(1)


def _print_submission(sub: Submission) -> None:
    rows = [
        [j.name, ",".join(map(str, j.run_indices)), j.state, j.attempts, j.ref or "-"]
        for j in sub.jobs
    ]
    console.print(
        table(
            f"submission {sub.id} ({sub.backend}): {sub.state}",
            ["job", "runs", "state", "attempts", "ref"],
            rows,
        )
    )
    for job in sub.jobs:
        if job.state == "failed":
            seeds = ", ".join(f"{f['run_id']} (seed {f['seed']})" for f in job.failed)
            console.print(f"[red]{job.name} failed after {job.attempts} attempt(s)[/red]: {seeds}")
            console.print(f"  {job.error}", markup=False, highlight=False)
            if job.log_tail:
                console.print(job.log_tail, markup=False, highlight=False)


ExperimentArg = Annotated[str, typer.Argument(help="Experiment name.", show_default=False)]
IdOpt = Annotated[
    str | None,
    typer.Option("--id", help="Submission id (default: the latest).", show_default=False),
]


@app.command("status", no_args_is_help=True)
def status(
    experiment: ExperimentArg,
    submission_id: IdOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a submission's jobs and their states (Azure ML jobs are refreshed).

    Examples:

      mlvar submit status digits-holdout-sub3-r1.0-mlp

      mlvar submit status cifar100-subclass-baby-r1.0-airbench --id 20250101T120000Z-aml-1a2b
    """
    with cli_errors():
        sub = service.status(get_config(config), experiment, submission_id)
    if json_out:
        print_json(sub.to_dict())
        return
    _print_submission(sub)


@app.command("download", no_args_is_help=True)
def download(
    experiment: ExperimentArg,
    submission_id: IdOpt = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Import a worker's output folder (a run store) copied by "
            "hand, instead of the submission's Azure ML outputs.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy finished runs into the run store: only complete runs whose arrays match their
    sha256 land, each atomically; complete runs already there are never overwritten.

    Examples:

      mlvar submit download cifar100-subclass-baby-r1.0-airbench

      mlvar submit download digits-holdout-sub3-r1.0-mlp --from ./job-output/
    """
    with cli_errors():
        res = service.download(get_config(config), experiment, submission_id, source)
    if json_out:
        print_json({"imported": res.imported, "skipped": res.skipped, "rejected": res.rejected})
        return
    console.print(
        f"Imported {len(res.imported)} run(s); {len(res.skipped)} already complete; "
        f"{len(res.rejected)} rejected."
    )
    for run_id, why in res.rejected.items():
        console.print(f"  rejected {run_id}: {why}", markup=False, highlight=False)
