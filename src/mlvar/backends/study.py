"""``mlvar submit DATASET --scenario ...``: submit a study (one experiment per selected
scenario) as one submission on a backend.

:func:`submit_study` checks the whole request first (:func:`mlvar.train.study.plan_study`:
the scenarios, the config, each experiment's setup; nothing is written for bad input),
creates each experiment as ``mlvar train`` would, and packs the runs that are not
complete with :func:`mlvar.backends.train_jobs.study_packs`: each experiment fills jobs of
its own, and the runs left over share jobs, so the study takes the fewest jobs. A job of
several experiments trains each from its own scenario and lands each run in its own
experiment, verified and atomically, as every job does. The record is saved in the
folder of every experiment of the study (``mlvar submit status/download EXPERIMENT``
works from any of them); the submission's files (logs, work folders, Azure ML jobs) live
in the first experiment's folder.

An experiment that cannot be set up (its scenario's data damaged) or whose runs fail
is reported in :attr:`StudySubmitResult.failed` and the others go on. A study of one
scenario is :func:`mlvar.backends.service.submit` itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.backends.backend import JobBatch, SubmitProgress
from mlvar.backends.registry import get_backend
from mlvar.backends.service import SubmitResult, check_runs_per_job, retries_for, run_batch, submit
from mlvar.backends.spec import Job, Submission, new_submission_id
from mlvar.backends.train_jobs import TRAIN, missing_runs, pack_spec, study_packs, with_parts
from mlvar.config import Config
from mlvar.store import ExperimentStore, list_experiments, run_id_for
from mlvar.train.study import StudyPlan, one_line, plan_study


@dataclass
class StudySubmitResult:
    """What :func:`submit_study` did."""

    plan: StudyPlan
    backend: str
    path: Path  # the runs root
    single: SubmitResult | None = None  # a study of one scenario: submit()'s result
    submission: Submission | None = None
    pending: dict[str, list[int]] = field(default_factory=dict)  # experiment -> runs submitted
    failed: dict[str, str] = field(default_factory=dict)  # experiment -> its error, one line
    dry_run_dir: Path | None = None
    files: list[str] = field(default_factory=list)  # dry run: files written
    wall_time_s: float = 0.0
    synchronous: bool = True

    @property
    def skipped(self) -> int:
        """Runs complete before the submission (not resubmitted), in the experiments that
        could be set up."""
        return sum(
            p.requested - len(self.pending.get(p.experiment, []))
            for p in self.plan.experiments
            if p.experiment in self.pending or p.experiment not in self.failed
        )

    def to_dict(self) -> dict[str, Any]:
        if self.single is not None:
            return self.single.to_dict()
        return {
            "plan": self.plan.to_dict(),
            "backend": self.backend,
            "path": str(self.path),
            "submission": self.submission.to_dict() if self.submission else None,
            "pending": {e: [run_id_for(i) for i in v] for e, v in self.pending.items()},
            "failed": self.failed,
            "dry_run_dir": str(self.dry_run_dir) if self.dry_run_dir else None,
            "files": self.files,
            "wall_time_s": self.wall_time_s,
        }


def submit_study(
    config: Config,
    dataset: str,
    scenario: str | None = None,
    runs: int | None = 10,
    backend: str = "local",
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    dry_run: bool = False,
    out: Path | None = None,
    runs_per_job: int | None = None,
    retries: int | None = None,
    workers: int | None = None,
    submission_id: str | None = None,
    progress: SubmitProgress | None = None,
    on_plan: Callable[[StudyPlan], None] | None = None,
) -> StudySubmitResult:
    """Submit runs ``0 .. runs-1`` of every experiment of a study that are not complete.

    ``scenario`` selects the scenarios as :func:`mlvar.data.selection.select_scenarios`
    (None: every prepared scenario of the dataset; of the protocol in
    ``overrides["protocol"]``, else the config's); ``runs`` None means the protocol's
    default run count; the other parameters are those of
    :func:`mlvar.backends.service.submit`. ``on_plan(plan)`` is called with the checked
    :class:`~mlvar.train.study.StudyPlan` before anything is written; ``progress`` gets
    ``(runs done, runs, message)`` over the whole submission, the message naming the
    job's experiments. Bad input raises :class:`MlvarError` before anything is written.
    """
    be = get_backend(backend, config)
    runs_per_job = check_runs_per_job(config, runs_per_job)
    retries = retries_for(config, retries)
    plan = plan_study(config, dataset, scenario, runs, name, overrides, force)
    plan.notes += be.plan_notes(plan.cfg.device, workers)
    runs = plan.runs  # None: the protocol's default
    runs_root = Path(config.paths.runs_root)
    if len(plan.experiments) == 1:
        if on_plan is not None:
            on_plan(plan)
        single = submit(
            config,
            dataset,
            plan.scenarios[0].name,
            runs,
            backend,
            name,
            overrides,
            force,
            dry_run,
            out,
            runs_per_job,
            retries,
            workers,
            submission_id,
            progress,
        )
        return StudySubmitResult(plan, backend, runs_root, single=single)
    be.check(dry_run=dry_run, device=plan.cfg.device)
    if on_plan is not None:
        on_plan(plan)
    sub_id = submission_id or new_submission_id(backend)
    result = StudySubmitResult(plan, backend, runs_root, synchronous=be.synchronous)
    if dry_run:
        existing = set(list_experiments(runs_root))
        for planned in plan.experiments:
            indices = list(range(runs))
            if planned.experiment in existing and not force:
                indices = missing_runs(ExperimentStore.open(runs_root, planned.experiment), indices)
            if indices:
                result.pending[planned.experiment] = indices
        if not result.pending:
            return result
        batch = _batch(config, plan, result.pending, None, sub_id, backend, runs_per_job, retries)
        batch.workers = workers
        target = Path(out) if out is not None else Path("mlvar-jobs") / f"{dataset}-study"
        result.dry_run_dir, result.files = target, be.write_dry_run(batch, target)
        result.submission = batch.sub
        return result

    from mlvar.train.service import train  # torch: training only

    with be.session():
        started = time.perf_counter()
        stores: dict[str, ExperimentStore] = {}
        for planned in plan.experiments:
            # Create (or check) each experiment exactly as 'mlvar train' does, training nothing.
            try:
                train(
                    config,
                    dataset,
                    planned.scenario,
                    runs,
                    planned.experiment,
                    overrides,
                    force,
                    run_indices=[],
                )
            except Exception as exc:  # noqa: BLE001 - reported, and the other experiments go on
                result.failed[planned.experiment] = one_line(exc)
                continue
            store = ExperimentStore.open(runs_root, planned.experiment)
            stores[planned.experiment] = store
            indices = missing_runs(store, list(range(runs)))
            if indices:
                result.pending[planned.experiment] = indices
        if not result.pending:
            return result
        home = stores[next(iter(result.pending))]
        batch = _batch(config, plan, result.pending, home, sub_id, backend, runs_per_job, retries)
        batch.workers = workers
        result.submission = batch.sub
        run_batch(be, batch, _naming(batch, progress))
        result.wall_time_s = time.perf_counter() - started
    for job in batch.sub.jobs:
        if job.state == "failed":
            for exp in sorted({f.get("experiment", "") for f in job.failed} - {""}):
                result.failed.setdefault(exp, f"{job.name}: {' '.join(job.error.split())}")
    return result


def _batch(
    config: Config,
    plan: StudyPlan,
    pending: dict[str, list[int]],
    home: ExperimentStore | None,
    sub_id: str,
    backend: str,
    runs_per_job: int,
    retries: int,
) -> JobBatch:
    """The submission of the runs ``pending`` (by experiment) and its jobs' specs."""
    scenarios = {p.experiment: s for p, s in zip(plan.experiments, plan.scenarios, strict=True)}
    first = next(iter(pending))
    sub = Submission(
        id=sub_id,
        backend=backend,
        experiment=first,
        dataset=plan.dataset,
        scenario=scenarios[first].name,
        runs=plan.experiments[0].requested,
        base_seed=plan.cfg.base_seed,
        runs_per_job=runs_per_job,
        retries=retries,
        experiments=list(pending),
    )
    specs = {}
    for k, parts in enumerate(study_packs(pending, runs_per_job)):
        job = Job(
            name=f"pack-{k:03d}",
            run_indices=parts[0][1] if len(parts) == 1 else [],
            parts=[{"experiment": exp, "run_indices": list(idx)} for exp, idx in parts],
        )
        sub.jobs.append(job)
        specs[job.name] = with_parts(
            [pack_spec(scenarios[exp], plan.cfg, exp, idx, job.name, sub_id) for exp, idx in parts]
        )
    used = {scenarios[e].name: scenarios[e] for e in pending}
    return JobBatch(
        sub,
        home,
        TRAIN,
        specs,
        scenarios[first],
        Path(config.paths.data_root),
        plan.cfg.device,
        scenarios=used,
    )


def _naming(batch: JobBatch, progress: SubmitProgress | None) -> SubmitProgress | None:
    """``progress`` with each job's message naming the experiments it trains."""
    if progress is None:
        return None
    names = {j.name: ", ".join(p["experiment"] for p in j.parts) for j in batch.sub.jobs}

    def relay(done: int, total: int, message: str) -> None:
        job = message.split(" ", 1)[0]
        progress(done, total, f"{names[job]}: {message}" if job in names else message)

    return relay
