"""``mlvar submit``: train an experiment's missing runs on a backend, track and fetch them.

:func:`submit` resolves the request exactly like ``mlvar train`` (same options, same
experiment identity), finds the runs that are not complete yet, packs them
``runs_per_job`` to a job and hands the jobs to a backend of
:data:`mlvar.backends.registry.BACKENDS` (local, ray, aml, slurm). Synchronous backends
(local, ray) land every result before :func:`submit` returns; asynchronous ones (aml,
slurm) submit and return, and :func:`status` follows the jobs, :func:`download` lands
what they wrote. Every submission is recorded in
``<runs_root>/<experiment>/submissions/<id>.json``.

:func:`submit_analysis` does the same for the sharded ``analyze rank`` of an existing
experiment (``mlvar submit analyze``): one job per (sample block, run block), shards
landed in ``analysis/shards/<split>/``, then merged as ``mlvar analyze rank --merge`` does.
:func:`submit_saliency` does it for ``analyze saliency`` (``mlvar submit saliency``): one
job per block of the runs explained, shards landed in ``analysis/saliency-shards/<split>/``,
then merged as ``mlvar analyze saliency --merge`` does. The backends see only job kinds
(:mod:`mlvar.backends.kinds`), never which command they serve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.analysis import saliency
from mlvar.analysis.service import DEFAULT_RANK_BY, RankResult, check_by
from mlvar.analysis.shards import merge_shards, shards_dir
from mlvar.backends.backend import Backend, JobBatch, SubmitProgress
from mlvar.backends.kind import JobKind
from mlvar.backends.kinds import find_shard_folders, import_shards
from mlvar.backends.registry import get_backend
from mlvar.backends.retrain_jobs import write_retrain_summary
from mlvar.backends.saliency_jobs import plan_saliency_jobs
from mlvar.backends.shard_jobs import plan_shards
from mlvar.backends.shard_kind import present_shards
from mlvar.backends.spec import Job, Submission, load_submission, new_submission_id
from mlvar.backends.train_jobs import TRAIN, make_packs, missing_runs, pack_spec
from mlvar.backends.transfer import ImportResult, import_runs
from mlvar.config import Config
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError
from mlvar.saliency import merge_saliency_shards
from mlvar.store import ExperimentStore, list_experiments, run_id_for


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
    synchronous: bool = True  # the backend landed the results before returning

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


def retries_for(config: Config, retries: int | None) -> int:
    """``--retries``, or ``[submit] retries``; refuses a negative count."""
    retries = config.submit.retries if retries is None else retries
    if retries < 0:
        raise MlvarError(f"--retries must be >= 0, got {retries}", "0 disables retries")
    return retries


def check_runs_per_job(config: Config, runs_per_job: int | None) -> int:
    """``--runs-per-job``, or ``[submit] runs_per_job``; refuses less than 1."""
    runs_per_job = config.submit.runs_per_job if runs_per_job is None else runs_per_job
    if runs_per_job < 1:
        raise MlvarError(f"--runs-per-job must be at least 1, got {runs_per_job}", "e.g. 8")
    return runs_per_job


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

    Bad input (unknown backend, a missing extra or backend setting, a cluster that does
    not answer) raises :class:`MlvarError` before anything is written.
    """
    be = get_backend(backend, config)
    runs_per_job = check_runs_per_job(config, runs_per_job)
    retries = retries_for(config, retries)
    from mlvar.train.service import prepare_training, train  # torch: training only

    found, cfg, exp = prepare_training(config, dataset, scenario, runs, name, overrides)
    be.check(dry_run=dry_run, device=cfg.device)
    runs_root = Path(config.paths.runs_root)
    sub_id = submission_id or new_submission_id(backend)

    def batch_for(pending: list[int], store: ExperimentStore | None) -> JobBatch:
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
        data_root = Path(config.paths.data_root)
        return JobBatch(sub, store, TRAIN, specs, found, data_root, cfg.device, workers)

    if dry_run:
        pending = list(range(runs))
        if exp in list_experiments(runs_root) and not force:
            pending = missing_runs(ExperimentStore.open(runs_root, exp), pending)
        batch = batch_for(pending, None)
        target = Path(out) if out is not None else Path("mlvar-jobs") / exp
        files = be.write_dry_run(batch, target)
        result = SubmitResult(
            exp, backend, target, batch.sub, pending, dry_run_dir=target, files=files
        )
        result.skipped = [run_id_for(i) for i in range(runs) if i not in pending]
        return result

    with be.session():
        started = time.perf_counter()
        # Create (or check) the experiment folder exactly as 'mlvar train' does, training nothing.
        made = train(config, dataset, found.name, runs, exp, overrides, force, run_indices=[])
        store = ExperimentStore.open(runs_root, exp)
        pending = missing_runs(store, list(range(runs)))
        batch = batch_for(pending, store)
        result = SubmitResult(exp, backend, made.path, batch.sub, pending)
        result.skipped = [run_id_for(i) for i in range(runs) if i not in pending]
        result.synchronous = be.synchronous
        if not pending:
            result.submission = None
            return result
        run_batch(be, batch, progress)
        result.wall_time_s = time.perf_counter() - started
        return result


def run_batch(be: Backend, batch: JobBatch, progress: SubmitProgress | None) -> None:
    """Hand ``batch`` to the backend, the record saved before and after."""
    assert batch.store is not None
    batch.sub.save(batch.store.root)
    be.submit(batch, progress)
    batch.sub.save(batch.store.root)


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
    synchronous: bool = True  # the backend landed the shards before returning

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


@dataclass
class Merged:
    """What the merge of a complete shard submission wrote: the result object, and the
    paths to report (``ranking``: analysis only)."""

    result: Any
    path: str
    ranking: str = ""


def _merge_analysis(store: ExperimentStore, sub: Submission, data_root: Path) -> Merged:
    """``analyze rank --merge`` of the landed shards, ranked by the submission's ``by``."""
    result = merge_shards(store, sub.split, by=sub.options.get("by", DEFAULT_RANK_BY))
    found = next((f for f in result.files if f.endswith(".parquet")), None)
    ranking = found or str(store.root / "analysis" / f"rank-{sub.split}.parquet")
    return Merged(result, str(ranking), str(ranking))


def _merge_saliency(store: ExperimentStore, sub: Submission, data_root: Path) -> Merged:
    """``analyze saliency --merge`` of the landed shards."""
    layer = sub.options.get("layer")
    merged = merge_saliency_shards(store, data_root, sub.split, layer)
    return Merged(merged, str(merged.path))


def _merge_retrain(store: ExperimentStore, sub: Submission, data_root: Path) -> Merged:
    """``retrain/summary.*`` rewritten from the stored sets (``mlvar submit retrain``)."""
    opts = sub.options
    table, files = write_retrain_summary(store.root, opts.get("strategies", []), opts["pool"])
    return Merged(table, files[0])


#: How the landed outputs of a complete submission are combined, by job kind (kinds
#: not listed need nothing: training runs are the result).
MERGES = {"analysis": _merge_analysis, "saliency": _merge_saliency, "retrain": _merge_retrain}


def _merge(store: ExperimentStore, sub: Submission, data_root: Path) -> Merged | None:
    merge = MERGES.get(sub.kind)
    return merge(store, sub, data_root) if merge is not None else None


@dataclass
class _ShardOutcome:
    """What :func:`_submit_shards` did (the parts both shard commands report)."""

    submission: Submission | None
    pending: list[str]
    skipped: list[str]
    dry_run_dir: Path | None = None
    files: list[str] = field(default_factory=list)
    merged: Merged | None = None  # every shard present and merged
    wall_time_s: float = 0.0
    synchronous: bool = True


def _submit_shards(
    config: Config,
    be: Backend,
    store: ExperimentStore,
    plan: Any,
    retries: int,
    options: dict[str, Any],
    dry_run: bool,
    out: Path,
    submission_id: str | None,
    workers: int | None,
    progress: SubmitProgress | None,
    scenario: Scenario | None = None,
    shards: int = 0,
) -> _ShardOutcome:
    """Submit the planned shards (``plan``: analysis or saliency) that are not present
    yet on ``be``, or write their dry run to ``out``; merge once all are present."""
    kind: JobKind = plan.kind
    present = set(present_shards(store, plan))
    meta = store.meta
    sub = Submission(
        id=submission_id or new_submission_id(be.name),
        backend=be.name,
        experiment=store.name,
        dataset=str(meta.get("dataset", "")),
        scenario=str((meta.get("scenario") or {}).get("name", "")),
        runs=len(plan.run_ids),
        base_seed=int((meta.get("train") or {}).get("base_seed", 0) or 0),
        runs_per_job=0,
        retries=retries,
        kind=kind.name,
        split=plan.split,
        shards=shards,
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
    data_root = Path(config.paths.data_root) if kind.reads_scenario else None
    batch = JobBatch(sub, store, kind, specs, scenario, data_root, workers=workers)
    outcome = _ShardOutcome(sub, list(specs), skipped, synchronous=be.synchronous)
    if dry_run:
        outcome.dry_run_dir, outcome.files = out, be.write_dry_run(batch, out)
        return outcome
    started = time.perf_counter()
    if sub.jobs:
        with be.session():
            run_batch(be, batch, progress)
    else:
        outcome.submission = None
    if options.get("merge", True) and sub.state == "complete":
        outcome.merged = _merge(store, sub, Path(config.paths.data_root))
    outcome.wall_time_s = time.perf_counter() - started
    return outcome


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
    of range, shards of another K or M present, a missing extra or backend setting, a
    cluster that does not answer) raises :class:`MlvarError` before anything is written.
    Asynchronous backends (aml, slurm) return at once: :func:`download` lands (and
    merges) the shards later.
    """
    be = get_backend(backend, config)
    check_by(by)
    retries = retries_for(config, retries)
    store = ExperimentStore.open(Path(config.paths.runs_root), experiment)
    plan = plan_shards(store, split, shards, run_shards, allow_mixed)
    be.check(dry_run=dry_run)
    target = Path(out) if out is not None else Path("mlvar-jobs") / f"{store.name}-{split}"
    done = _submit_shards(
        config,
        be,
        store,
        plan,
        retries,
        {"merge": merge, "by": by},
        dry_run,
        target,
        submission_id,
        workers,
        progress,
        shards=shards,
    )
    result = AnalysisSubmitResult(
        store.name, backend, split, shards, run_shards, shards_dir(store, split)
    )
    _fill(result, done)
    if done.merged is not None:
        result.merged, result.ranking = done.merged.result, Path(done.merged.ranking)
    return result


def _fill(result: Any, done: _ShardOutcome) -> None:
    for key in ("submission", "pending", "skipped", "dry_run_dir", "files", "wall_time_s"):
        setattr(result, key, getattr(done, key))
    result.synchronous = done.synchronous


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
    synchronous: bool = True  # the backend landed the shards before returning

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
    missing extra or backend setting) raises :class:`MlvarError` before anything is
    written. Asynchronous backends (aml, slurm) return at once: :func:`download` lands
    (and merges) the shards later.
    """
    be = get_backend(backend, config)
    retries = retries_for(config, retries)
    be.check(dry_run=dry_run)
    store = ExperimentStore.open(Path(config.paths.runs_root), experiment)
    data_root = Path(config.paths.data_root)
    plan = plan_saliency_jobs(
        store, data_root, run_shards, split, top, seeds, by, layer, seed, batch_size
    )
    target = Path(out) if out is not None else Path("mlvar-jobs") / f"{store.name}-saliency"
    done = _submit_shards(
        config,
        be,
        store,
        plan,
        retries,
        {"merge": merge, **plan.options},
        dry_run,
        target,
        submission_id,
        workers,
        progress,
        plan.scenario,
    )
    folder = saliency.shards_folder(store, split)
    result = SaliencySubmitResult(store.name, backend, split, run_shards, folder)
    _fill(result, done)
    result.merged = done.merged.result if done.merged is not None else None
    return result


def status(config: Config, experiment: str, submission_id: str | None = None) -> Submission:
    """The submission record (training, analysis or saliency), its jobs' states refreshed
    from the cluster for asynchronous backends."""
    store = ExperimentStore.open(Path(config.paths.runs_root), experiment)
    sub = load_submission(store.root, submission_id)
    be = get_backend(sub.backend, config)
    if not be.synchronous:
        with be.session():
            be.refresh(sub, store)
        sub.save(store.root)
    return sub


def download(
    config: Config,
    experiment: str,
    submission_id: str | None = None,
    source: Path | None = None,
) -> ImportResult:
    """Copy complete, sha256-verified runs (or analysis or saliency shards) into the store.

    ``source``: a worker output folder copied by hand: a run store, or folders of
    shards; otherwise what the submission's jobs wrote (asynchronous backends; the
    synchronous ones landed it already). Once every shard of an analysis (saliency)
    submission is present it is merged, once (unless it was submitted with
    ``merge=False``); ``ranking`` names the ranking, ``merged`` what the merge wrote.
    """
    store = ExperimentStore.open(Path(config.paths.runs_root), experiment)
    if source is not None:
        source = Path(source)
        if not source.exists():
            raise MlvarError(f"{source} does not exist", "name a worker's output folder")
        if not list(source.rglob("experiment.json")) and find_shard_folders(source):
            return import_shards(source, store)
        return import_runs(source, store)
    sub = load_submission(store.root, submission_id)
    be = get_backend(sub.backend, config)
    with be.session():
        result = be.download(sub, store)
    if be.synchronous:
        return result  # landed (and merged) as the jobs finished
    if sub.state == "complete" and sub.options.get("merge", True) and not sub.options.get("merged"):
        merged = _merge(store, sub, Path(config.paths.data_root))
        if merged is not None:
            result.merged, result.ranking = merged.path, merged.ranking
            sub.options["merged"] = merged.path
    sub.save(store.root)
    return result
