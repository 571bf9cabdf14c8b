"""``mlvar submit``: train an experiment's missing runs on a backend, track and fetch them.

:func:`submit` resolves the request exactly like ``mlvar train`` (same options, same
experiment identity), finds the runs that are not complete yet, packs them
``runs_per_job`` to a job and hands the jobs to a backend:

``local``  in this process, or worker subprocesses (one per GPU on CUDA);
``ray``    one Ray task per pack (fractional GPUs), local instance or cluster address;
``aml``    one Azure ML command job per pack (``--dry-run`` writes and validates the YAML).

``local`` and ``ray`` finish before :func:`submit` returns; ``aml`` jobs run remotely and
:func:`download` fetches their outputs later. Every submission is recorded in
``<runs_root>/<experiment>/submissions/<id>.json``.

:func:`submit_analysis` does the same for the sharded ``analyze rank`` of an existing
experiment (``mlvar submit analyze``): one job per (sample block, run block), shards
landed in ``analysis/shards/<split>/``, then merged as ``mlvar analyze rank --merge`` does.
:func:`submit_saliency` does it for ``analyze saliency`` (``mlvar submit saliency``): one
job per block of the runs explained, shards landed in ``analysis/saliency-shards/<split>/``,
then merged as ``mlvar analyze saliency --merge`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.analysis import saliency
from mlvar.analysis.service import DEFAULT_RANK_BY, RankResult, check_by
from mlvar.analysis.shards import merge_shards, shards_dir
from mlvar.backends import aml as aml_backend
from mlvar.backends import local as local_backend
from mlvar.backends import ray_backend, saliency_jobs, shard_jobs
from mlvar.backends.common import SubmitProgress, missing_runs
from mlvar.backends.spec import (
    Job,
    Submission,
    load_submission,
    make_packs,
    new_submission_id,
    pack_spec,
)
from mlvar.backends.transfer import ImportResult, import_runs
from mlvar.config import Config
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError, unknown_choice
from mlvar.saliency import merge_saliency_shards
from mlvar.store import ExperimentStore, list_experiments, run_id_for
from mlvar.train.service import prepare_training, train

BACKENDS = ("local", "ray", "aml")


@dataclass
class SubmitResult:
    """What :func:`submit` did."""

    experiment: str
    backend: str
    path: Path
    submission: Submission | None = None
    pending: list[int] = field(default_factory=list)  # runs that were missing
    skipped: list[str] = field(default_factory=list)  # already complete, not resubmitted
    dry_run_dir: Path | None = None
    files: list[str] = field(default_factory=list)  # dry run: files written
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "backend": self.backend,
            "path": str(self.path),
            "submission": self.submission.to_dict() if self.submission else None,
            "pending": [run_id_for(i) for i in self.pending],
            "skipped": self.skipped,
            "dry_run_dir": str(self.dry_run_dir) if self.dry_run_dir else None,
            "files": self.files,
            "wall_time_s": self.wall_time_s,
        }


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise unknown_choice("backend", name, BACKENDS)
    return name


def submit(
    config: Config,
    dataset: str,
    scenario: str | None = None,
    runs: int = 10,
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
) -> SubmitResult:
    """Submit runs ``0 .. runs-1`` of an experiment that are not complete yet.

    Bad input (unknown backend, a missing extra or AML setting, a Ray address that does not
    answer) raises :class:`MlvarError` before anything is written.
    """
    check_backend(backend)
    runs_per_job = config.submit.runs_per_job if runs_per_job is None else runs_per_job
    retries = config.submit.retries if retries is None else retries
    if runs_per_job < 1:
        raise MlvarError(f"--runs-per-job must be at least 1, got {runs_per_job}", "e.g. 8")
    if retries < 0:
        raise MlvarError(f"--retries must be >= 0, got {retries}", "0 disables retries")
    found, cfg, exp = prepare_training(config, dataset, scenario, runs, name, overrides)
    if backend == "ray":
        ray_backend.require_ray()
    if backend == "aml":
        aml_backend.check_settings(config.backend.aml, dry_run=dry_run)
    runs_root = Path(config.paths.runs_root)
    sub_id = submission_id or new_submission_id(backend)

    def build_sub(pending: list[int]) -> tuple[Submission, dict[str, dict[str, Any]]]:
        sub = Submission(
            id=sub_id,
            backend=backend,
            experiment=exp,
            dataset=dataset,
            scenario=found.name,
            runs=runs,
            base_seed=cfg.base_seed,
            runs_per_job=runs_per_job,
            retries=retries,
        )
        specs = {}
        for k, pack in enumerate(make_packs(pending, runs_per_job)):
            job = Job(name=f"pack-{k:03d}", run_indices=pack)
            sub.jobs.append(job)
            specs[job.name] = pack_spec(found, cfg, exp, pack, job.name, sub_id)
        return sub, specs

    if dry_run:
        pending = list(range(runs))
        if exp in list_experiments(runs_root) and not force:
            pending = missing_runs(ExperimentStore.open(runs_root, exp), pending)
        sub, specs = build_sub(pending)
        target = Path(out) if out is not None else Path("mlvar-jobs") / exp
        if backend == "aml":
            files = aml_backend.write_jobs(sub, specs, found, config.backend.aml, target)
        else:
            files = aml_backend.write_specs(sub, specs, target)
        result = SubmitResult(exp, backend, target, sub, pending, dry_run_dir=target, files=files)
        result.skipped = [run_id_for(i) for i in range(runs) if i not in pending]
        return result

    ray_ctx = ray_backend.connect(config.backend.ray) if backend == "ray" else None
    ml_client = aml_backend.client(config.backend.aml) if backend == "aml" else None
    try:
        started = time.perf_counter()
        # Create (or check) the experiment folder exactly as 'mlvar train' does, training nothing.
        made = train(config, dataset, found.name, runs, exp, overrides, force, run_indices=[])
        store = ExperimentStore.open(runs_root, exp)
        pending = missing_runs(store, list(range(runs)))
        sub, specs = build_sub(pending)
        result = SubmitResult(exp, backend, made.path, sub, pending)
        result.skipped = [run_id_for(i) for i in range(runs) if i not in pending]
        if not pending:
            result.submission = None
            return result
        sub.save(store.root)
        if backend == "local":
            workers_ = config.submit.local_workers if workers is None else workers
            if workers_ == 0 and workers is None:
                workers_ = local_backend.default_workers(cfg.device)
            local_backend.run_local(
                sub, store, specs, Path(config.paths.data_root), workers_, cfg.device, progress
            )
        elif backend == "ray":
            ray_backend.run_ray(sub, store, specs, found, cfg, config.backend.ray, progress)
        else:
            aml_backend.submit_jobs(ml_client, sub, specs, found, config.backend.aml, store)
        sub.save(store.root)
        result.wall_time_s = time.perf_counter() - started
        return result
    finally:
        if ray_ctx is not None:
            ray_ctx.close()


@dataclass
class AnalysisSubmitResult:
    """What :func:`submit_analysis` did."""

    experiment: str
    backend: str
    split: str
    shards: int
    run_shards: int
    path: Path  # analysis/shards/<split>/
    submission: Submission | None = None
    pending: list[str] = field(default_factory=list)  # shards submitted
    skipped: list[str] = field(default_factory=list)  # present and valid, not resubmitted
    dry_run_dir: Path | None = None
    files: list[str] = field(default_factory=list)  # dry run: files written
    merged: RankResult | None = None  # every shard present and merged
    ranking: Path | None = None  # the merged ranking (rank-<split>.parquet)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "backend": self.backend,
            "split": self.split,
            "shards": self.shards,
            "run_shards": self.run_shards,
            "path": str(self.path),
            "submission": self.submission.to_dict() if self.submission else None,
            "pending": self.pending,
            "skipped": self.skipped,
            "dry_run_dir": str(self.dry_run_dir) if self.dry_run_dir else None,
            "files": self.files,
            "merged": self.merged is not None,
            "n_runs": self.merged.n_runs if self.merged else None,
            "ranking": str(self.ranking) if self.ranking else None,
            "analysis_files": self.merged.files if self.merged else [],
            "wall_time_s": self.wall_time_s,
        }


def _merge(store: ExperimentStore, split: str, by: str) -> tuple[RankResult, Path]:
    result = merge_shards(store, split, by=by)
    ranking = next((Path(f) for f in result.files if f.endswith(".parquet")), None)
    return result, ranking or store.root / "analysis" / f"rank-{split}.parquet"


def submit_analysis(
    config: Config,
    experiment: str,
    backend: str = "local",
    shards: int = 1,
    run_shards: int = 1,
    split: str = "test",
    by: str = DEFAULT_RANK_BY,
    merge: bool = True,
    allow_mixed: bool = False,
    retries: int | None = None,
    workers: int | None = None,
    dry_run: bool = False,
    out: Path | None = None,
    submission_id: str | None = None,
    progress: SubmitProgress | None = None,
) -> AnalysisSubmitResult:
    """Compute the sharded ``analyze rank`` of an experiment as ``shards x run_shards``
    jobs on a backend, land the shards and (``merge``) merge them once all are present.

    Shards already in ``analysis/shards/<split>/``, complete and verified, over the same
    runs, are not resubmitted. Bad input (unknown experiment, backend or split, K or M out
    of range, shards of another K or M present, a missing extra or AML setting, a Ray
    address that does not answer) raises :class:`MlvarError` before anything is written.
    ``aml`` jobs run remotely: :func:`download` lands (and merges) them later.
    """
    check_backend(backend)
    check_by(by)
    retries = _retries(config, retries)
    store = ExperimentStore.open(Path(config.paths.runs_root), experiment)
    plan = shard_jobs.plan_shards(store, split, shards, run_shards, allow_mixed)
    _check_backend_setup(config, backend, dry_run)
    options = {"merge": merge, "by": by}
    sub, specs, skipped = _shard_submission(store, plan, backend, retries, submission_id, options)
    sub.shards = shards
    result = AnalysisSubmitResult(
        store.name, backend, split, shards, run_shards, shards_dir(store, split), sub
    )
    result.pending, result.skipped = list(specs), skipped
    if dry_run:
        target = Path(out) if out is not None else Path("mlvar-jobs") / f"{store.name}-{split}"
        result.dry_run_dir = target
        result.files = _write_shard_dry_run(config, sub, specs, store, backend, target)
        return result
    started = time.perf_counter()
    if sub.jobs:
        _run_shard_jobs(config, sub, store, specs, backend, workers, progress)
    else:
        result.submission = None
    if merge and sub.state == "complete":
        result.merged, result.ranking = _merge(store, split, by)
    result.wall_time_s = time.perf_counter() - started
    return result


def _retries(config: Config, retries: int | None) -> int:
    retries = config.submit.retries if retries is None else retries
    if retries < 0:
        raise MlvarError(f"--retries must be >= 0, got {retries}", "0 disables retries")
    return retries


def _check_backend_setup(config: Config, backend: str, dry_run: bool) -> None:
    """The backend's extra is installed and (aml) its settings are there."""
    if backend == "ray":
        ray_backend.require_ray()
    if backend == "aml":
        aml_backend.check_settings(config.backend.aml, dry_run=dry_run)


def _shard_submission(
    store: ExperimentStore,
    plan: Any,
    backend: str,
    retries: int,
    submission_id: str | None,
    options: dict[str, Any],
) -> tuple[Submission, dict[str, dict[str, Any]], list[str]]:
    """The record and specs of the planned shards not yet present (``plan``: analysis or
    saliency), and the names of those present (skipped)."""
    present = set(shard_jobs.present_shards(store, plan))
    meta = store.meta
    sub = Submission(
        id=submission_id or new_submission_id(backend),
        backend=backend,
        experiment=store.name,
        dataset=str(meta.get("dataset", "")),
        scenario=str((meta.get("scenario") or {}).get("name", "")),
        runs=len(plan.run_ids),
        base_seed=int((meta.get("train") or {}).get("base_seed", 0) or 0),
        runs_per_job=0,
        retries=retries,
        kind=plan.kind.name,
        split=plan.split,
        run_shards=plan.run_shards,
        options=options,
    )
    specs: dict[str, dict[str, Any]] = {}
    skipped = []
    for job, spec in plan.jobs(sub.id):
        if job.name in present:
            skipped.append(job.name)
        else:
            sub.jobs.append(job)
            specs[job.name] = spec
    return sub, specs, skipped


def _write_shard_dry_run(
    config: Config,
    sub: Submission,
    specs: dict[str, dict[str, Any]],
    store: ExperimentStore,
    backend: str,
    target: Path,
    scenario: Scenario | None = None,
) -> list[str]:
    if backend == "aml":
        return aml_backend.write_shard_jobs(sub, specs, store, config.backend.aml, target, scenario)
    return aml_backend.write_specs(sub, specs, target)


def _run_shard_jobs(
    config: Config,
    sub: Submission,
    store: ExperimentStore,
    specs: dict[str, dict[str, Any]],
    backend: str,
    workers: int | None,
    progress: SubmitProgress | None,
    scenario: Scenario | None = None,
) -> None:
    """Run (local, ray) or submit (aml) the shard jobs of ``sub``, recording them; jobs
    that read the prepared ``scenario`` find it in the data root, or get it shipped."""
    ray_ctx = ray_backend.connect(config.backend.ray) if backend == "ray" else None
    ml_client = aml_backend.client(config.backend.aml) if backend == "aml" else None
    try:
        sub.save(store.root)
        if backend == "local":
            workers_ = config.submit.local_workers if workers is None else workers
            data_root = Path(config.paths.data_root) if scenario is not None else None
            local_backend.run_local_shards(sub, store, specs, workers_, progress, data_root)
        elif backend == "ray":
            ray_backend.run_ray_shards(sub, store, specs, config.backend.ray, progress, scenario)
        else:
            aml = config.backend.aml
            aml_backend.submit_shard_jobs(ml_client, sub, specs, store, aml, scenario)
        sub.save(store.root)
    finally:
        if ray_ctx is not None:
            ray_ctx.close()


@dataclass
class SaliencySubmitResult:
    """What :func:`submit_saliency` did."""

    experiment: str
    backend: str
    split: str
    run_shards: int
    path: Path  # analysis/saliency-shards/<split>/
    submission: Submission | None = None
    pending: list[str] = field(default_factory=list)  # shards submitted
    skipped: list[str] = field(default_factory=list)  # present and valid, not resubmitted
    dry_run_dir: Path | None = None
    files: list[str] = field(default_factory=list)  # dry run: files written
    merged: saliency.SaliencyResult | None = None  # every shard present and merged
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        merged = self.merged
        return {
            "experiment": self.experiment,
            "backend": self.backend,
            "split": self.split,
            "run_shards": self.run_shards,
            "path": str(self.path),
            "submission": self.submission.to_dict() if self.submission else None,
            "pending": self.pending,
            "skipped": self.skipped,
            "dry_run_dir": str(self.dry_run_dir) if self.dry_run_dir else None,
            "files": self.files,
            "merged": merged is not None,
            "saliency": str(merged.path) if merged else None,
            "method": merged.method if merged else None,
            "layer": merged.layer if merged else None,
            "run_ids": merged.run_ids if merged else [],
            "n_samples": len(merged.samples) if merged else None,
            "wall_time_s": self.wall_time_s,
        }


def submit_saliency(
    config: Config,
    experiment: str,
    backend: str = "local",
    run_shards: int = 1,
    split: str = "test",
    top: int = saliency.TOP_DEFAULT,
    seeds: int = saliency.SEEDS_DEFAULT,
    by: str = DEFAULT_RANK_BY,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = saliency.BATCH_DEFAULT,
    merge: bool = True,
    retries: int | None = None,
    workers: int | None = None,
    dry_run: bool = False,
    out: Path | None = None,
    submission_id: str | None = None,
    progress: SubmitProgress | None = None,
) -> SaliencySubmitResult:
    """Compute ``analyze saliency`` of an experiment as ``run_shards`` jobs on a backend
    (one per block of the runs explained), land the shards and (``merge``) merge them
    once all are present into ``analysis/saliency-<split>/``, as an unsharded run writes it.

    Shards already in ``analysis/saliency-shards/<split>/``, complete, verified and of the
    same plan, are not resubmitted. Bad input (unknown experiment, backend, split or
    metric, ``--layer`` for an MLP or unknown to the model, runs without ``model.pt``, a
    missing or changed prepared scenario, M out of range, shards of another M present, a
    missing extra or AML setting) raises :class:`MlvarError` before anything is written.
    ``aml`` jobs run remotely: :func:`download` lands (and merges) them later.
    """
    check_backend(backend)
    retries = _retries(config, retries)
    _check_backend_setup(config, backend, dry_run)
    store = ExperimentStore.open(Path(config.paths.runs_root), experiment)
    data_root = Path(config.paths.data_root)
    plan = saliency_jobs.plan_saliency_jobs(
        store, data_root, run_shards, split, top, seeds, by, layer, seed, batch_size
    )
    options = {"merge": merge, **plan.options}
    sub, specs, skipped = _shard_submission(store, plan, backend, retries, submission_id, options)
    folder = saliency.shards_folder(store, split)
    result = SaliencySubmitResult(store.name, backend, split, run_shards, folder, sub)
    result.pending, result.skipped = list(specs), skipped
    if dry_run:
        target = Path(out) if out is not None else Path("mlvar-jobs") / f"{store.name}-saliency"
        result.dry_run_dir = target
        result.files = _write_shard_dry_run(
            config, sub, specs, store, backend, target, plan.scenario
        )
        return result
    started = time.perf_counter()
    if sub.jobs:
        _run_shard_jobs(config, sub, store, specs, backend, workers, progress, plan.scenario)
    else:
        result.submission = None
    if merge and sub.state == "complete":
        result.merged = merge_saliency_shards(store, data_root, split, layer)
    result.wall_time_s = time.perf_counter() - started
    return result


def _experiment_root(config: Config, experiment: str) -> Path:
    return ExperimentStore.open(Path(config.paths.runs_root), experiment).root


def status(config: Config, experiment: str, submission_id: str | None = None) -> Submission:
    """The submission record (training, analysis or saliency), refreshed from Azure ML for
    ``aml`` jobs."""
    root = _experiment_root(config, experiment)
    sub = load_submission(root, submission_id)
    if sub.backend == "aml" and any(j.ref for j in sub.jobs):
        aml_backend.refresh(aml_backend.client(config.backend.aml), sub)
        sub.save(root)
    return sub


def download(
    config: Config,
    experiment: str,
    submission_id: str | None = None,
    source: Path | None = None,
) -> ImportResult:
    """Copy complete, sha256-verified runs (or analysis or saliency shards) into the store.

    ``source``: a worker output folder copied by hand: a run store, or folders of
    shards; otherwise the outputs of the submission's finished Azure ML jobs. Once every
    shard of an analysis (saliency) submission is present it is merged (unless it was
    submitted with ``merge=False``); ``ranking`` names the ranking, ``merged`` what the
    merge wrote.
    """
    store = ExperimentStore.open(Path(config.paths.runs_root), experiment)
    if source is not None:
        if not Path(source).exists():
            raise MlvarError(f"{source} does not exist", "name a worker's output folder")
        if not list(Path(source).rglob("experiment.json")) and shard_jobs.find_shard_folders(
            Path(source)
        ):
            return shard_jobs.import_shards(Path(source), store)
        return import_runs(Path(source), store)
    sub = load_submission(store.root, submission_id)
    if sub.kind in (shard_jobs.KIND, saliency_jobs.KIND):
        return _download_shards(config, sub, store)
    if sub.backend != "aml":
        result = ImportResult()
        result.skipped = [
            run_id_for(i) for j in sub.jobs for i in j.run_indices if not missing_runs(store, [i])
        ]
        return result  # local and ray write into the store as they finish
    result = aml_backend.download_jobs(aml_backend.client(config.backend.aml), sub, store)
    sub.save(store.root)
    return result


def _download_shards(config: Config, sub: Submission, store: ExperimentStore) -> ImportResult:
    if sub.backend != "aml":  # local and ray land the shards as they finish
        result = ImportResult(kind="shards")
        root = shard_jobs.kind_of({"kind": sub.kind}).root(store, sub.split)
        result.skipped = [j.name for j in sub.jobs if (root / j.name / "meta.json").is_file()]
        return result
    result = aml_backend.download_shard_jobs(aml_backend.client(config.backend.aml), sub, store)
    sub.save(store.root)
    if result.imported and sub.state == "complete" and sub.options.get("merge", True):
        if sub.kind == saliency_jobs.KIND:
            data_root = Path(config.paths.data_root)
            layer = sub.options.get("layer")
            merged = merge_saliency_shards(store, data_root, sub.split, layer)
            result.merged = str(merged.path)
        else:
            _, ranking = _merge(store, sub.split, sub.options.get("by", DEFAULT_RANK_BY))
            result.ranking = result.merged = str(ranking)
    return result
