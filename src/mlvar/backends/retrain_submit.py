"""``mlvar submit retrain``: the continuations of ``mlvar retrain`` as jobs on a backend.

:func:`submit_retrain` takes the arguments of :func:`mlvar.retrain.service.retrain` and
checks them with the same :func:`~mlvar.retrain.service.plan_retrain` (bad input is
refused exactly as ``mlvar retrain`` refuses it, before anything is written). Then it
writes ``retrain/selected.parquet``, creates each set's store
(:func:`mlvar.train.continuation.open_target_store`) and submits one job per set x pack
of ``runs_per_job`` runs not yet complete in that set (:mod:`mlvar.backends.retrain_jobs`),
all sets in one submission recorded in ``<experiment>/submissions/``. Synchronous
backends (local, ray) land every run before it returns, and ``retrain/summary.*`` is then
rewritten from the stored sets, as ``mlvar retrain`` writes it; for asynchronous ones
(aml, slurm) :func:`mlvar.backends.service.download` lands the runs and writes the summary
once every job is complete.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlvar.analysis.acquisition import DEFAULT_BUDGETS, DEFAULT_STRATEGIES
from mlvar.backends.backend import JobBatch, SubmitProgress
from mlvar.backends.registry import get_backend
from mlvar.backends.retrain_jobs import (
    RETRAIN,
    pending_runs,
    pool_scenarios,
    retrain_jobs,
    write_retrain_summary,
)
from mlvar.backends.service import check_runs_per_job, retries_for, run_batch
from mlvar.backends.spec import Submission, new_submission_id
from mlvar.config import Config
from mlvar.retrain.service import DEFAULT_POOL, plan_retrain

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class RetrainSubmitResult:
    """What :func:`submit_retrain` did."""

    experiment: str
    backend: str
    pool: str
    path: Path  # <experiment>/retrain/
    sets: list[str] = field(default_factory=list)  # every set of the request, b0 first
    submission: Submission | None = None
    pending: dict[str, list[str]] = field(default_factory=dict)  # set -> runs submitted
    skipped: dict[str, list[str]] = field(default_factory=dict)  # set -> complete runs
    dry_run_dir: Path | None = None
    files: list[str] = field(default_factory=list)  # dry run: files written; else results
    summary: pd.DataFrame | None = None  # every job complete: the summary written
    wall_time_s: float = 0.0
    synchronous: bool = True  # the backend landed the runs before returning

    def to_dict(self) -> dict[str, Any]:
        from mlvar.analysis.retrain import json_records

        return {
            "experiment": self.experiment,
            "backend": self.backend,
            "pool": self.pool,
            "path": str(self.path),
            "sets": self.sets,
            "submission": self.submission.to_dict() if self.submission else None,
            "pending": self.pending,
            "skipped": self.skipped,
            "dry_run_dir": str(self.dry_run_dir) if self.dry_run_dir else None,
            "files": self.files,
            "summary": json_records(self.summary),
            "wall_time_s": self.wall_time_s,
        }


def submit_retrain(
    config: Config,
    experiment: str,
    pool: str = DEFAULT_POOL,
    strategies: str | Sequence[str] = DEFAULT_STRATEGIES,
    budgets: str | Sequence[float] = DEFAULT_BUDGETS,
    epochs: int | None = None,
    from_scratch: bool = False,
    runs: int | Sequence[str] | None = None,
    device: str | None = None,
    backend: str = "local",
    runs_per_job: int | None = None,
    retries: int | None = None,
    workers: int | None = None,
    dry_run: bool = False,
    out: Path | None = None,
    submission_id: str | None = None,
    progress: SubmitProgress | None = None,
) -> RetrainSubmitResult:
    """Run the continuations of ``mlvar retrain`` (same arguments) as jobs on a backend.

    Runs already complete in their set are not resubmitted. Bad input (everything
    :func:`~mlvar.retrain.service.plan_retrain` refuses, an unknown backend, ``--runs-per-job``
    below 1, a missing extra or backend setting) raises :class:`MlvarError` before
    anything is written; a dry run writes only ``out``.
    """
    be = get_backend(backend, config)
    runs_per_job = check_runs_per_job(config, runs_per_job)
    retries = retries_for(config, retries)
    plan = plan_retrain(
        experiment, config, pool, strategies, budgets, epochs, from_scratch, runs, device
    )
    be.check(dry_run=dry_run, device=plan.device)
    store, data_root = plan.store, Path(config.paths.data_root)
    run_ids = [r.run_id for r in plan.runs]
    pending = {s.name: pending_runs(store, s.name, run_ids) for s in plan.sets}
    names = [s.name for s in plan.strategies]
    meta = store.meta
    sub = Submission(
        id=submission_id or new_submission_id(backend),
        backend=backend,
        experiment=store.name,
        dataset=str(meta.get("dataset", "")),
        scenario=plan.scenario.name,
        runs=len(run_ids),
        base_seed=int((meta.get("train") or {}).get("base_seed", 0) or 0),
        runs_per_job=runs_per_job,
        retries=retries,
        kind=RETRAIN.name,
        split=plan.pool,
        options={"pool": plan.pool, "strategies": names, "budgets": list(plan.budgets)},
    )
    scenarios = pool_scenarios(plan, data_root)
    specs = {}
    for job, spec in retrain_jobs(plan, pending, runs_per_job, sub.id, scenarios):
        sub.jobs.append(job)
        specs[job.name] = spec
    batch = JobBatch(
        sub,
        store,
        RETRAIN,
        specs,
        plan.scenario,
        data_root,
        plan.device,
        workers,
        {s.name: s for s in scenarios} if len(scenarios) > 1 else {},
    )
    result = RetrainSubmitResult(
        store.name,
        backend,
        plan.pool,
        plan.root,
        [s.name for s in plan.sets],
        sub,
        {k: v for k, v in pending.items() if v},
        {k: [r for r in run_ids if r not in v] for k, v in pending.items()},
        synchronous=be.synchronous,
    )
    if dry_run:
        target = Path(out) if out is not None else Path("mlvar-jobs") / f"{store.name}-retrain"
        result.dry_run_dir, result.files = target, be.write_dry_run(batch, target)
        return result
    from mlvar.retrain.service import _write_selected
    from mlvar.train.continuation import open_target_store  # torch: the request is sane

    started = time.perf_counter()
    result.files = [_write_selected(plan)]
    for s in plan.sets:
        if pending[s.name]:
            open_target_store(
                store, plan.root / s.name, s.meta, plan.pool_data, plan.epochs, plan.from_scratch
            )
    if sub.jobs:
        with be.session():
            run_batch(be, batch, progress)
    else:
        result.submission = None
    if sub.state == "complete":
        result.summary, written = write_retrain_summary(store.root, names, plan.pool)
        result.files += written
    result.wall_time_s = time.perf_counter() - started
    return result
