"""``mlvar submit``: train the runs of one experiment per selected scenario (a study), or
compute an experiment's sharded analysis or saliency, or its retraining continuations, on
a backend (local, Ray, Azure ML, Slurm).

``mlvar submit DATASET ...`` is ``mlvar submit run DATASET ...``: the group routes any
first argument that is not a sub-command to ``run``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from mlvar.analysis.acquisition import DEFAULT_BUDGETS, DEFAULT_STRATEGIES, format_budget
from mlvar.analysis.defaults import (
    DEFAULT_RANK_BY,
    SALIENCY_BATCH_DEFAULT,
    SALIENCY_SEEDS_DEFAULT,
    SALIENCY_TOP_DEFAULT,
)
from mlvar.cli.common import (
    ProgressBar,
    cli_errors,
    console,
    err_console,
    get_config,
    plan_table,
    print_json,
    table,
    warnings_to_stderr,
)
from mlvar.cli.options import (
    BACKENDS_HELP,
    BackendOpt,
    BaseSeedOpt,
    BatchSizeOpt,
    CamBatchOpt,
    ConfigOpt,
    DatasetArg,
    DeviceOpt,
    EngineOpt,
    EpochsOpt,
    ExplainSeedsOpt,
    ExplainTopOpt,
    ForceOpt,
    IdOpt,
    JsonOpt,
    LayerOpt,
    LrOpt,
    MergedByOpt,
    ModelOpt,
    NameOpt,
    NoTrainTtaOpt,
    PackSizeOpt,
    PageSeedOpt,
    ProtocolOpt,
    RankByOpt,
    RecordDynamicsOpt,
    RetriesOpt,
    ScenarioOpt,
    ShardWorkersOpt,
    SubmittedExperimentArg,
    TrainRunsOpt,
    VaryOpt,
    training_overrides,
)
from mlvar.errors import ExitCode

if TYPE_CHECKING:
    from mlvar.backends.spec import Job, Submission
    from mlvar.backends.study import StudySubmitResult
    from mlvar.train.study import StudyPlan


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
        "Train the runs of one experiment per selected scenario, or compute an "
        "experiment's sharded analysis (analyze rank) or saliency (analyze saliency), or "
        f"its retraining (retrain), on a backend: {BACKENDS_HELP[:-1]}; then check "
        "and fetch them.\n\n"
        "Examples:\n\n"
        "  mlvar submit digits --runs 16 --backend local\n\n"
        "  mlvar submit compas --scenario artificial --runs 50 --backend ray\n\n"
        "  mlvar submit cifar100 --runs 50 --backend aml --dry-run --out jobs/\n\n"
        "  mlvar submit cifar100 --runs 50 --backend slurm --device cuda\n\n"
        "  mlvar submit analyze EXPERIMENT --shards 4 --run-shards 2 --backend ray\n\n"
        "  mlvar submit saliency EXPERIMENT --run-shards 4 --backend ray\n\n"
        "  mlvar submit retrain EXPERIMENT --pool full_val --by random,maxconf_std --budget 0.1 "
        "--backend ray\n\n"
        "  mlvar submit status EXPERIMENT\n\n"
        "  mlvar submit download EXPERIMENT"
    ),
)


def _service_for(backend: str, module: str = "service") -> ModuleType:
    """The backends' service (or its ``study`` module), once ``backend`` names one: it
    imports the analysis (pandas, and torch to train), so an unknown ``--backend`` is
    refused before, as the service itself would refuse it first."""
    import importlib

    from mlvar.backends.registry import backend_class

    backend_class(backend)
    return importlib.import_module(f"mlvar.backends.{module}")


@app.command("run", no_args_is_help=True)
def run(
    dataset: DatasetArg,
    backend: BackendOpt = "local",
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
    record_dynamics: RecordDynamicsOpt = False,
    no_train_tta: NoTrainTtaOpt = False,
    force: ForceOpt = False,
    runs_per_job: Annotated[
        int | None,
        typer.Option(
            help="Runs packed into one job (default \\[submit] runs_per_job, 8).",
            show_default=False,
        ),
    ] = None,
    retries: RetriesOpt = None,
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
            help="Write the jobs (aml: YAML validated with load_job; slurm: the sbatch "
            "script) and specs to --out; submit nothing.",
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
    """Submit the runs that are not complete yet of one experiment per selected scenario
    (same options as train).

    --scenario selects as in 'mlvar train' (names, modes, globs, comma-separated; default:
    every prepared scenario). A study of several is one submission: the plan is printed
    first; each experiment fills jobs of its own (--runs-per-job) and the runs left over
    share jobs, each run landing in its own experiment. An experiment that fails is
    reported and the others go on (exit code 3).

    Examples:

      mlvar submit digits --runs 16 --backend local

      mlvar submit compas --scenario artificial --runs 50 --backend ray     # every ratio

      mlvar submit cifar100 --runs 50 --backend slurm --device cuda   # every scenario

      mlvar submit cifar100 --runs 50 --backend aml --device cuda

      mlvar submit cifar100 --runs 50 --backend aml --dry-run --out jobs/

      mlvar submit cifar100 --runs 50 --backend slurm --device cuda --runs-per-job 5
    """
    with cli_errors():
        cfg = get_config(config)
        study = _service_for(backend, "study")
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
            no_train_tta=no_train_tta,
            protocol=protocol,
        )
        with ProgressBar(not json_out) as bar:

            def on_progress(done: int, total: int, message: str) -> None:
                bar.update(f"runs ({message})", done, total)

            def on_plan(plan: StudyPlan) -> None:
                if len(plan.experiments) > 1 and not json_out:
                    console.print(plan_table(plan))
                for note in plan.notes:  # a scenario of another protocol than the recipe's
                    err_console.print(note, markup=False, highlight=False, soft_wrap=True)

            studied = study.submit_study(
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
                on_plan=on_plan,
            )
    if studied.single is None:
        _print_study(studied, backend, json_out)
        return
    result = studied.single  # one scenario: as 'mlvar submit' of one experiment always was
    if json_out:
        print_json(result.to_dict())
        return
    if result.dry_run_dir is not None:
        n = len(result.submission.jobs) if result.submission else 0
        console.print(
            f"Dry run: {n} job(s) for {len(result.pending)} run(s) of {result.experiment} "
            f"written to {result.dry_run_dir}{_dry_run_note(backend)}"
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
    if result.submission is not None and not result.synchronous:
        console.print(f"Follow the jobs: mlvar submit status {result.experiment}")
    if result.submission is not None and result.submission.state == "failed":
        raise typer.Exit(ExitCode.JOB_FAILED)


def _print_study(result: StudySubmitResult, backend: str, json_out: bool) -> None:
    """A study's submission: its jobs, what failed, where it is; exit 3 when any failed."""
    sub = result.submission
    if json_out:
        print_json(result.to_dict())
    elif result.dry_run_dir is not None and sub is not None:
        console.print(
            f"Dry run: {len(sub.jobs)} job(s) for {result.plan.runs_requested - result.skipped} "
            f"run(s) of {len(result.pending)} experiment(s) written to {result.dry_run_dir}"
            f"{_dry_run_note(backend)}"
        )
    else:
        if sub is None and not result.failed:
            console.print(f"Nothing to submit: all {result.skipped} run(s) are complete.")
        if sub is not None:
            _print_submission(sub)
        for exp, error in result.failed.items():
            err_console.print(
                f"{exp} failed: {error}", markup=False, highlight=False, soft_wrap=True
            )
        line = f"Submitted {sum(map(len, result.pending.values()))} run(s) of "
        line += f"{len(result.pending)} experiment(s); skipped {result.skipped} complete run(s)"
        if result.failed:
            n = len(result.plan.experiments)
            line += f"; {len(result.failed)} of {n} experiment(s) failed"
        console.print(line + (f" ({result.wall_time_s:.1f} s)." if result.wall_time_s else "."))
        console.print(f"Run store: {result.path}")
        if sub is not None and not result.synchronous:
            console.print(f"Follow the jobs: mlvar submit status {sub.experiment}")
    if result.failed:
        raise typer.Exit(ExitCode.JOB_FAILED)


def _dry_run_note(backend: str) -> str:
    from mlvar.backends.registry import BACKENDS

    note = BACKENDS[backend].dry_run_note
    return f" ({note})" if note else ""


def _print_submission(sub: Submission) -> None:
    if sub.kind == "saliency":
        title = f"saliency submission {sub.id} ({sub.backend}, {sub.split}): {sub.state}"
        columns = ["shard", "runs", "state", "attempts", "ref"]
        rows = [
            [
                j.name,
                "{} ({})".format(j.shard.get("runs", "-"), "..".join(j.shard.get("run_ids", []))),
                j.state,
                j.attempts,
                j.ref or "-",
            ]
            for j in sub.jobs
        ]
    elif sub.kind == "retrain":
        title = f"retrain submission {sub.id} ({sub.backend}, pool {sub.split}): {sub.state}"
        columns = ["job", "set", "runs", "state", "attempts", "ref"]
        rows = [
            [
                j.name,
                j.shard.get("set", "-"),
                j.shard.get("runs", "-"),
                j.state,
                j.attempts,
                j.ref or "-",
            ]
            for j in sub.jobs
        ]
    elif sub.kind == "analysis":
        title = f"analysis submission {sub.id} ({sub.backend}, {sub.split}): {sub.state}"
        columns = ["shard", "samples", "runs", "state", "attempts", "ref"]
        rows = [
            [
                j.name,
                j.shard.get("samples", "-"),
                "{} ({})".format(j.shard.get("runs", "-"), "..".join(j.shard.get("run_ids", []))),
                j.state,
                j.attempts,
                j.ref or "-",
            ]
            for j in sub.jobs
        ]
    else:
        title = f"submission {sub.id} ({sub.backend}): {sub.state}"
        columns = ["job", "runs", "state", "attempts", "ref"]
        rows = [[j.name, _runs_text(j), j.state, j.attempts, j.ref or "-"] for j in sub.jobs]
    console.print(table(title, columns, rows))
    for job in sub.jobs:
        if job.state == "failed":
            what = ", ".join(
                f"{f.get('experiment', '') and f['experiment'] + '/'}{f['run_id']} "
                f"(seed {f['seed']})"
                if "run_id" in f
                else f"shard {f['shard']}"
                for f in job.failed
            )
            console.print(f"[red]{job.name} failed after {job.attempts} attempt(s)[/red]: {what}")
            console.print(f"  {job.error}", markup=False, highlight=False)
            if job.log_tail:
                console.print(job.log_tail, markup=False, highlight=False)


def _runs_text(job: Job) -> str:
    """A training job's runs: its indices, or per experiment for a study's job."""
    if not job.parts:
        return ",".join(map(str, job.run_indices))
    return "; ".join(
        f"{p['experiment']}: {','.join(map(str, p['run_indices']))}" for p in job.parts
    )


@app.command("status", no_args_is_help=True)
def status(
    experiment: SubmittedExperimentArg,
    submission_id: IdOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a submission's jobs (training packs, analysis or saliency shards) and their
    states (Azure ML and Slurm jobs are refreshed; a Slurm job that ended with results
    missing is resubmitted while it has retries left).

    Examples:

      mlvar submit status digits-holdout-sub3-r1.0-mlp

      mlvar submit status cifar100-subclass-baby-r1.0-airbench --id 20250101T120000Z-aml-1a2b
    """
    with cli_errors():
        from mlvar.backends import service

        sub = service.status(get_config(config), experiment, submission_id)
    if json_out:
        print_json(sub.to_dict())
        return
    _print_submission(sub)


@app.command("download", no_args_is_help=True)
def download(
    experiment: SubmittedExperimentArg,
    submission_id: IdOpt = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Import a worker's output folder (a run store, or analysis or saliency "
            "shard folders) copied by hand, instead of the submission's Azure ML outputs.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy finished runs (or shards) into the run store: only complete runs whose arrays
    match their sha256 land, each atomically; complete runs already there are never
    overwritten. Shards land in analysis/shards/<split>/ (saliency shards in
    analysis/saliency-shards/<split>/) under the same rules, and a submission whose shards
    are all present is merged; continued runs of 'submit retrain' land in
    retrain/<set>/, and the summary is written once every job is complete.

    Examples:

      mlvar submit download cifar100-subclass-baby-r1.0-airbench

      mlvar submit download digits-holdout-sub3-r1.0-mlp --from ./job-output/
    """
    with cli_errors():
        from mlvar.backends import service

        res = service.download(get_config(config), experiment, submission_id, source)
    if json_out:
        print_json(res.to_dict())
        return
    what = "shard" if res.kind == "shards" else "run"
    console.print(
        f"Imported {len(res.imported)} {what}(s); {len(res.skipped)} already complete; "
        f"{len(res.rejected)} rejected."
    )
    for name, why in res.rejected.items():
        console.print(f"  rejected {name}: {why}", markup=False, highlight=False)
    if res.ranking:
        console.print(f"Merged the shards: ranking in {res.ranking}")
    elif res.merged and res.kind == "shards":
        console.print(f"Merged the saliency shards into {res.merged}")
    elif res.merged:
        console.print(f"Wrote the retraining summary {res.merged}")


@app.command("analyze", no_args_is_help=True)
def analyze(
    experiment: SubmittedExperimentArg,
    backend: BackendOpt = "local",
    shards: Annotated[
        int,
        typer.Option(
            "--shards",
            help="K: contiguous blocks of the split's samples, one job each (1..samples).",
        ),
    ] = 1,
    run_shards: Annotated[
        int,
        typer.Option(
            "--run-shards",
            help="M: blocks of the runs (sorted by id); K x M jobs in all (1..runs).",
        ),
    ] = 1,
    split: Annotated[str, typer.Option(help="Split to rank.")] = "test",
    by: MergedByOpt = DEFAULT_RANK_BY,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge/--no-merge",
            help="Merge the shards once all are present (as 'mlvar analyze rank --merge').",
        ),
    ] = True,
    allow_mixed: Annotated[
        bool,
        typer.Option(
            "--allow-mixed", help="Analyse runs trained with different configurations together."
        ),
    ] = False,
    retries: RetriesOpt = None,
    workers: ShardWorkersOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Write the jobs (aml: YAML validated with load_job, and the inputs; "
            "slurm: the sbatch script) and specs to --out; submit nothing.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder of --dry-run (default ./mlvar-jobs/<experiment>-<split>).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compute 'mlvar analyze rank' of an experiment as K x M shard jobs on a backend.

    Each job computes one block of samples (--shards K) over one block of runs
    (--run-shards M); its shard lands in analysis/shards/<split>/ only when complete and
    sha256-verified. Shards already there are not resubmitted. Once all are present they
    are merged into analysis/rank-<split>.* (as 'mlvar analyze rank --merge'); aml and
    slurm jobs run remotely: 'mlvar submit download' lands and merges them.

    Examples:

      mlvar submit analyze digits-holdout-sub3-r1.0-mlp --shards 3 --run-shards 2

      mlvar submit analyze cifar100-subclass-baby-r1.0-airbench --shards 8 --backend ray

      mlvar submit analyze cifar100-subclass-baby-r1.0-airbench --shards 8 --backend aml

      mlvar submit analyze EXPERIMENT --shards 4 --backend aml --dry-run --out jobs/
    """
    with cli_errors(), ProgressBar(not json_out) as bar:
        cfg = get_config(config)
        service = _service_for(backend)

        def on_progress(done: int, total: int, message: str) -> None:
            bar.update(f"shards ({message})", done, total)

        result = service.submit_analysis(
            cfg,
            experiment,
            backend=backend,
            shards=shards,
            run_shards=run_shards,
            split=split,
            by=by,
            merge=merge,
            allow_mixed=allow_mixed,
            retries=retries,
            workers=workers,
            dry_run=dry_run,
            out=out,
            progress=on_progress,
        )
    if json_out:
        print_json(result.to_dict())
        return
    n = shards * run_shards
    if result.dry_run_dir is not None:
        console.print(
            f"Dry run: {len(result.pending)} shard job(s) of {n} for {result.experiment} "
            f"({split}) written to {result.dry_run_dir}{_dry_run_note(backend)}"
        )
        return
    _print_shard_outcome(result, n)
    if result.merged is not None:
        console.print(
            f"Merged {n} shard(s) over {result.merged.n_runs} runs: ranking by "
            f"{result.merged.by} in {result.ranking}"
        )
    _after_shards(result, experiment)


@app.command("saliency", no_args_is_help=True)
def saliency(
    experiment: SubmittedExperimentArg,
    backend: BackendOpt = "local",
    run_shards: Annotated[
        int,
        typer.Option(
            "--run-shards",
            help="M: blocks of the runs explained (the first --seeds by run id), one job "
            "each (1..runs explained).",
        ),
    ] = 1,
    split: Annotated[str, typer.Option(help="Split whose samples to explain.")] = "test",
    top: ExplainTopOpt = SALIENCY_TOP_DEFAULT,
    seeds: ExplainSeedsOpt = SALIENCY_SEEDS_DEFAULT,
    by: RankByOpt = DEFAULT_RANK_BY,
    layer: LayerOpt = None,
    seed: PageSeedOpt = 0,
    batch_size: CamBatchOpt = SALIENCY_BATCH_DEFAULT,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge/--no-merge",
            help="Merge the shards once all are present (as 'mlvar analyze saliency --merge').",
        ),
    ] = True,
    retries: RetriesOpt = None,
    workers: ShardWorkersOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Write the jobs (aml: YAML validated with load_job, the inputs and the "
            "scenario's data asset; slurm: the sbatch script) and specs to --out; submit "
            "nothing.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder of --dry-run (default ./mlvar-jobs/<experiment>-saliency).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compute 'mlvar analyze saliency' of an experiment as M jobs on a backend, one per
    block of the runs explained (--run-shards M).

    Each job reads the split's logits of every run (for the ranking), the model.pt of its
    runs and the prepared scenario, and writes their attributions; its shard lands in
    analysis/saliency-shards/<split>/r<j>of<m>/ only when complete and sha256-verified.
    Shards already there are not resubmitted. Once all are present they are merged into
    analysis/saliency-<split>/ (as 'mlvar analyze saliency --merge'), the same files an
    unsharded run writes; aml and slurm jobs run remotely: 'mlvar submit download' lands
    and merges them.

    Examples:

      mlvar submit saliency digits-holdout-sub3-r1.0-cnn --run-shards 2

      mlvar submit saliency cifar100-subclass-baby-r1.0-airbench --run-shards 4 --backend ray

      mlvar submit saliency EXPERIMENT --run-shards 4 --backend aml --dry-run --out jobs/
    """
    with cli_errors(), warnings_to_stderr(), ProgressBar(not json_out) as bar:
        cfg = get_config(config)
        service = _service_for(backend)

        def on_progress(done: int, total: int, message: str) -> None:
            bar.update(f"saliency shards ({message})", done, total)

        result = service.submit_saliency(
            cfg,
            experiment,
            backend=backend,
            run_shards=run_shards,
            split=split,
            top=top,
            seeds=seeds,
            by=by,
            layer=layer,
            seed=seed,
            batch_size=batch_size,
            merge=merge,
            retries=retries,
            workers=workers,
            dry_run=dry_run,
            out=out,
            progress=on_progress,
        )
    if json_out:
        print_json(result.to_dict())
        return
    if result.dry_run_dir is not None:
        console.print(
            f"Dry run: {len(result.pending)} saliency job(s) of {run_shards} for "
            f"{result.experiment} ({split}) written to {result.dry_run_dir}"
            f"{_dry_run_note(backend)}"
        )
        return
    _print_shard_outcome(result, run_shards)
    if result.merged is not None:
        merged = result.merged
        console.print(
            f"Merged {run_shards} saliency shard(s) ({merged.method}, {len(merged.samples)} "
            f"samples under {merged.n_seeds} runs) into {merged.path}"
        )
    _after_shards(result, experiment)


@app.command("retrain", no_args_is_help=True)
def retrain(
    experiment: SubmittedExperimentArg,
    pool: Annotated[
        str,
        typer.Option(help="The split whose samples are acquired (as 'mlvar retrain --pool')."),
    ] = "full_val",
    by: Annotated[
        str,
        typer.Option(
            "--by", help="Strategies, comma-separated (as 'mlvar retrain --by'; see its --help)."
        ),
    ] = ",".join(DEFAULT_STRATEGIES),
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            help="Fractions of the pool to add (as 'mlvar retrain --budget'); budget 0 is "
            "always run.",
        ),
    ] = ",".join(format_budget(b) for b in DEFAULT_BUDGETS),
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Continuation epochs (default: the recipe's continuation length).",
            show_default=False,
        ),
    ] = None,
    from_scratch: Annotated[
        bool,
        typer.Option(
            "--from-scratch", help="Retrain each run from its seed instead of its weights."
        ),
    ] = False,
    runs: Annotated[
        str | None,
        typer.Option(
            help="Runs to continue: N (the first N by run id) or run ids, comma-separated "
            "(default: all).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    backend: BackendOpt = "local",
    runs_per_job: Annotated[
        int | None,
        typer.Option(
            help="Runs of one set per job (default \\[submit] runs_per_job).", show_default=False
        ),
    ] = None,
    retries: RetriesOpt = None,
    workers: ShardWorkersOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Write the jobs (aml: YAML validated with load_job, the inputs and the "
            "scenario's data asset; slurm: the sbatch script) and specs to --out; submit "
            "nothing.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder of --dry-run (default ./mlvar-jobs/<experiment>-retrain).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the continuations of 'mlvar retrain' as jobs on a backend: one job per
    retraining set (b0, <strategy>-b<budget>) x pack of --runs-per-job runs.

    The request is checked exactly as 'mlvar retrain' checks it. Each job continues its
    runs from their saved weights with the pool samples its set adds; the continued runs
    land in <experiment>/retrain/<set>/ only when complete and sha256-verified. Runs
    already there are not resubmitted. selected.parquet is written at submit; once every
    job is complete, summary.{parquet,csv} is written from the stored sets (aml and slurm
    jobs run remotely: 'mlvar submit download' lands the runs and writes it).

    Examples:

      mlvar submit retrain digits-holdout-sub3-r1.0-cnn --by random,maxconf_std --budget 0.1,0.5

      mlvar submit retrain EXPERIMENT --backend ray --runs-per-job 4

      mlvar submit retrain EXPERIMENT --backend aml --dry-run --out jobs/
    """
    with cli_errors(), warnings_to_stderr():
        from mlvar.analysis.acquisition import parse_budgets, parse_strategies
        from mlvar.cli.retrain import parse_runs

        strategies = parse_strategies(by)
        budgets = parse_budgets(budget)
        chosen_runs = parse_runs(runs)
        cfg = get_config(config)
        service = _service_for(backend, "retrain_submit")
        with ProgressBar(not json_out) as bar:

            def on_progress(done: int, total: int, message: str) -> None:
                bar.update(f"retrain runs ({message})", done, total)

            result = service.submit_retrain(
                cfg,
                experiment,
                pool=pool,
                strategies=[s.name for s in strategies],
                budgets=budgets,
                epochs=epochs,
                from_scratch=from_scratch,
                runs=chosen_runs,
                device=device,
                backend=backend,
                runs_per_job=runs_per_job,
                retries=retries,
                workers=workers,
                dry_run=dry_run,
                out=out,
                progress=on_progress,
            )
    if json_out:
        print_json(result.to_dict())
    elif result.dry_run_dir is not None:
        n = len(result.submission.jobs) if result.submission else 0
        runs_n = sum(map(len, result.pending.values()))
        console.print(
            f"Dry run: {n} retrain job(s) for {runs_n} run(s) in {len(result.pending)} set(s) "
            f"of {result.experiment} written to {result.dry_run_dir}{_dry_run_note(backend)}"
        )
        return
    else:
        _print_retrain_outcome(result)
    sub = result.submission
    if sub is not None and sub.state == "failed":
        raise typer.Exit(ExitCode.JOB_FAILED)


def _print_retrain_outcome(result: Any) -> None:
    sub = result.submission
    done = sum(map(len, result.skipped.values()))
    if sub is None:
        console.print(
            f"Nothing to submit: all {done} run(s) of {len(result.sets)} set(s) are complete."
        )
    else:
        _print_submission(sub)
        if done:
            console.print(f"Skipped {done} complete run(s).")
        if result.wall_time_s:
            console.print(f"Took {result.wall_time_s:.1f} s.")
    console.print(f"Retraining: {result.path}")
    if result.summary is not None:
        console.print(
            f"Wrote the summary of {len(result.summary)} row(s); statistics: "
            f"mlvar analyze retrain {result.experiment}",
            markup=False,
        )
    elif sub is not None and not result.synchronous:
        console.print(
            f"Follow the jobs: mlvar submit status {result.experiment}; then "
            f"'mlvar submit download {result.experiment}' lands the runs and writes the summary"
        )


def _print_shard_outcome(result: Any, n: int) -> None:
    if result.submission is None:
        console.print(f"Nothing to submit: all {n} shard(s) are present.")
    else:
        _print_submission(result.submission)
        if result.skipped:
            console.print(f"Skipped {len(result.skipped)} shard(s) already present.")
        if result.wall_time_s:
            console.print(f"Took {result.wall_time_s:.1f} s.")
    console.print(f"Shards: {result.path}")


def _after_shards(result: Any, experiment: str) -> None:
    sub = result.submission
    if sub is not None and not result.synchronous and sub.state != "failed":
        console.print(f"Fetch and merge the shards later: mlvar submit download {experiment}")
    if sub is not None and sub.state == "failed":
        raise typer.Exit(ExitCode.JOB_FAILED)
