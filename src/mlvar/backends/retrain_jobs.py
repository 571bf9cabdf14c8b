"""Retraining continuations as backend jobs: ``mlvar submit retrain EXP ... --backend B``.

``mlvar retrain`` continues every run once per retraining set (``b0`` and each strategy
at each budget, docs/retrain.md); here each set's runs are packed ``runs_per_job`` to a
job of the kind :data:`RETRAIN` (one set x a pack of runs), planned by
:func:`retrain_jobs` from a checked :class:`mlvar.retrain.service.RetrainPlan`:

- the spec (``kind: "retrain"``) carries what the worker needs: the experiment (and the
  sha256 of its ``experiment.json``), the scenario and its manifest sha256, the set's
  name and identity (``set_meta``), the pool split, the pool positions each run adds
  (``added``), the run ids and seeds, ``epochs``, ``from_scratch`` and ``device``. A pool
  that ``mlvar analyze predict`` added from another scenario makes the job read that
  scenario too (``parts``: the scenarios, as a study's training job names them);
- what a job reads (:meth:`RetrainKind.inputs`, for backends without a shared
  filesystem): ``experiment.json``, every ``samples/<split>.parquet``, and of the job's
  runs only ``model.pt`` and a ``run.json`` listing it; plus the prepared scenario(s);
- the worker (:func:`run_retrain_job`) calls
  :func:`mlvar.train.continuation.continue_runs` into ``OUT/<set>/``, a run store of its
  own; in the local backend's own process the runs continue in the set's store directly,
  as ``mlvar retrain`` does;
- landing (:meth:`RetrainKind.land`): the complete, sha256-verified continued runs are
  imported into ``<experiment>/retrain/<set>/`` (:func:`mlvar.backends.transfer.import_runs`,
  each atomically); the set's store is created at submit time
  (:func:`mlvar.train.continuation.open_target_store`), so its identity is checked
  against the worker's.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlvar import __version__
from mlvar.backends import faults, shard_kind
from mlvar.backends.kind import JobKind, JobText, Log, named, quiet
from mlvar.backends.spec import SPEC_FORMAT, Job, Submission
from mlvar.backends.train_jobs import collect_runs
from mlvar.backends.transfer import ImportResult, import_runs
from mlvar.errors import MlvarError
from mlvar.io import sha256_file
from mlvar.store import ExperimentStore, list_experiments, read_run, run_id_for

if TYPE_CHECKING:
    import pandas as pd

    from mlvar.data.scenario import Scenario
    from mlvar.retrain.service import RetrainPlan

KIND = "retrain"
WEIGHTS_FILE = "model.pt"  # mlvar.train.trained.WEIGHTS_FILE, without importing torch


def set_root(store: ExperimentStore, name: str) -> Path:
    """``<experiment>/retrain/<set>/``: where a set's continued runs land."""
    return store.root / "retrain" / name  # mlvar.analysis.retrain.retrain_dir (pandas)


def pending_runs(store: ExperimentStore, name: str, run_ids: list[str]) -> list[str]:
    """The runs of ``run_ids`` not complete in the set ``name`` of ``store``."""
    root = set_root(store, name)
    if name not in list_experiments(root.parent):
        return list(run_ids)
    return [r for r in run_ids if read_run(root / "runs" / r) is None]


def _run_index(run_id: str) -> int:
    return int(run_id.rsplit("-", 1)[1])


def pool_scenarios(plan: RetrainPlan, data_root: Path) -> list[Scenario]:
    """The prepared scenarios a job of ``plan`` reads: the experiment's, and the pool's
    when ``mlvar analyze predict`` added the pool from another scenario."""
    external = plan.store.meta.get("external_splits") or {}
    if plan.pool not in external:
        return [plan.scenario]
    from mlvar.data.scenario import split_source  # the pool helper's (it brings such pools)

    other, _ = split_source(data_root, plan.store.name, plan.store.meta, plan.pool)
    return [plan.scenario] if other.name == plan.scenario.name else [plan.scenario, other]


def retrain_jobs(
    plan: RetrainPlan,
    pending: dict[str, list[str]],
    runs_per_job: int,
    submission: str,
    scenarios: list[Scenario],
) -> list[tuple[Job, dict[str, Any]]]:
    """One job per set x pack of at most ``runs_per_job`` of its ``pending`` runs (``{set
    name: run ids}``), named ``<set>-<k>``, in the plan's order of sets."""
    experiment_sha256 = sha256_file(plan.store.root / "experiment.json")
    seeds = {r.run_id: r.meta.get("seed") for r in plan.runs}
    jobs = []
    for s in plan.sets:
        run_ids = pending.get(s.name, [])
        for k in range(0, len(run_ids), runs_per_job):
            pack = run_ids[k : k + runs_per_job]
            name = f"{s.name}-{k // runs_per_job:03d}"
            spec: dict[str, Any] = {
                "format": SPEC_FORMAT,
                "kind": KIND,
                "mlvar_version": __version__,
                "submission": submission,
                "job": name,
                "experiment": plan.store.name,
                "experiment_sha256": experiment_sha256,
                "scenario": plan.scenario.name,
                "scenario_manifest_sha256": plan.scenario.manifest_sha256,
                "set": s.name,
                "set_meta": dict(s.meta),
                "pool": plan.pool,
                "added": {r: [int(p) for p in s.added[r]] for r in pack},
                "run_ids": list(pack),
                "seeds": {r: seeds[r] for r in pack},
                "epochs": plan.epochs,
                "from_scratch": bool(plan.from_scratch),
                "device": plan.device,
            }
            if len(scenarios) > 1:  # the worker's data root holds each (kind.scenario_root)
                spec["parts"] = [{"scenario": one.name} for one in scenarios]
            shard = {"set": s.name, "runs": _span(pack)}
            job = Job(name=name, kind=KIND, run_indices=[_run_index(r) for r in pack], shard=shard)
            jobs.append((job, spec))
    return jobs


def _span(run_ids: list[str]) -> str:
    return run_ids[0] if len(run_ids) == 1 else f"{run_ids[0]}..{run_ids[-1]}"


# ------------------------------------------------------------------ the worker


def _targets(spec: dict[str, Any]) -> dict[int, str]:
    """The fault-injection targets of a job: its runs by run index."""
    return {_run_index(r): f"run {r} of set {spec['set']}" for r in spec["run_ids"]}


def _continue(
    spec: dict[str, Any],
    source: ExperimentStore,
    target_root: Path,
    data_root: Path | None,
    log: Log,
) -> list[str]:
    """Continue the job's runs of ``source`` into the store at ``target_root``; returns
    the run ids continued or found done."""
    import numpy as np

    from mlvar.retrain.service import pool_source
    from mlvar.train.continuation import continue_runs  # torch: only where jobs compute

    if data_root is None:
        raise MlvarError(
            "a retrain job needs the prepared scenario", "pass --data-root or --scenario-dir"
        )
    scenario, pool = pool_source(Path(data_root), source, spec["pool"])
    want = spec.get("scenario_manifest_sha256")
    if want and scenario.manifest_sha256 != want:
        raise MlvarError(
            f"scenario '{scenario.name}' here has manifest sha256 "
            f"{scenario.manifest_sha256[:12]}, the spec was made for {want[:12]}",
            "give the job the prepared scenario it was submitted with",
        )
    targets = _targets(spec)
    faults.before_work(spec, targets)

    def progress(done: float, total: float, message: str = "", *_: Any) -> None:
        log(f"[{time.strftime('%H:%M:%S')}] {spec['job']}: {done}/{total} run-epochs", flush=True)
        faults.during_work(spec, targets, log)

    added = {r: np.asarray(p, dtype=np.int64) for r, p in spec["added"].items()}
    result = continue_runs(
        source,
        target_root,
        dict(spec["set_meta"]),
        scenario,
        pool,
        added,
        list(spec["run_ids"]),
        epochs=spec["epochs"],
        from_scratch=bool(spec["from_scratch"]),
        device=str(spec["device"]),
        progress=progress,
    )
    log(f"continued {len(result.trained)}, already done {len(result.skipped)}", flush=True)
    return result.trained + result.skipped


def run_retrain_job(
    spec: dict[str, Any],
    experiment_dir: Path,
    out: Path,
    data_root: Path | None,
    log: Log = print,
) -> None:
    """Continue the runs of the job ``spec`` from ``experiment_dir`` (the store's folder
    or a job's input) and the prepared scenario in ``data_root`` into ``out/<set>/``.

    Raises :class:`MlvarError` when the experiment or the scenario is not the one the spec
    was planned on, or a run is missing or its weights fail their sha256;
    :class:`RuntimeError` when a run did not finish.
    """
    meta = shard_kind.check_job_input(spec, Path(experiment_dir), KIND)
    with named(Path(experiment_dir), spec["experiment"]) as root:
        done = _continue(spec, ExperimentStore(root, meta), Path(out) / spec["set"], data_root, log)
    missing = [r for r in spec["run_ids"] if r not in done]
    if missing:
        raise RuntimeError(f"runs not finished in set {spec['set']}: {', '.join(missing)}")


class RetrainKind(JobKind):
    """One retraining set x a pack of runs, continued from their saved weights."""

    name = KIND
    reads_experiment = True
    reads_scenario = True
    output_name = "runs"

    def inputs(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Path | bytes]:
        """``experiment.json``, every split's ``samples/<split>.parquet`` (the continued
        runs predict every split) and, of the job's runs, ``model.pt`` with a ``run.json``
        listing only it. The prepared scenario goes separately."""
        files: dict[str, Path | bytes] = {"experiment.json": store.root / "experiment.json"}
        for split in store.splits:
            files[f"samples/{split}.parquet"] = store.root / "samples" / f"{split}.parquet"
        for run_id in spec["run_ids"]:
            files.update(shard_kind.run_files(store, run_id, {WEIGHTS_FILE}))
        return files

    def input_group(self, spec: dict[str, Any]) -> str:
        # the jobs of every set over the same runs read the same files
        digest = hashlib.sha256(",".join(spec["run_ids"]).encode()).hexdigest()[:12]
        return f"runs-{digest}"

    def units(self, spec: dict[str, Any]) -> int:
        return len(spec["run_ids"])

    def describe(self, sub: Submission, spec: dict[str, Any]) -> JobText:
        runs = _span(list(spec["run_ids"]))
        exp, name = spec["experiment"], spec["set"]
        return JobText(
            title=f"{exp} retrain {spec['job']} ({len(spec['run_ids'])} runs)",
            description=(
                f"mlvar: retrain {exp} --pool {spec['pool']}, set {name} (runs {runs}, "
                f"{spec['epochs']} epochs{', from scratch' if spec['from_scratch'] else ''})"
            ),
            labels={
                "mlvar_kind": KIND,
                "mlvar_experiment": exp,
                "mlvar_submission": sub.id,
                "mlvar_set": name,
                "mlvar_runs": ",".join(spec["run_ids"]),
            },
        )

    def run(
        self,
        spec: dict[str, Any],
        out: Path,
        experiment_dir: Path | None,
        data_root: Path | None,
        log: Log = print,
    ) -> None:
        if experiment_dir is None:
            raise MlvarError("a retrain job needs --experiment-dir", "see --help")
        run_retrain_job(spec, Path(experiment_dir), Path(out), data_root, log)

    def run_in_store(
        self, spec: dict[str, Any], store: ExperimentStore, data_root: Path | None, work: Path
    ) -> Path | None:
        # In process the runs continue in the set's store itself, as 'mlvar retrain' does
        # (each lands atomically there, claimed like training).
        shard_kind.check_job_input(spec, store.root, KIND)
        _continue(spec, store, set_root(store, spec["set"]), data_root, quiet)
        return None

    def output_files(self, spec: dict[str, Any], out: Path) -> dict[str, bytes]:
        folder = Path(out) / spec["set"]
        if not (folder / "experiment.json").is_file():
            return {}
        return {f"{spec['set']}/{k}": v for k, v in collect_runs(folder).items()}

    def land(self, out: Path, store: ExperimentStore, spec: dict[str, Any]) -> ImportResult:
        name = spec["set"]
        # OUT/<set>/, wherever a backend's download put OUT (Azure ML: under named-outputs/)
        found = [p.parent for p in sorted(Path(out).rglob("experiment.json"))]
        folder = next((f for f in found if f.name == name), None)
        if folder is None:
            return ImportResult()
        root = set_root(store, name)
        if name not in list_experiments(root.parent):
            raise MlvarError(
                f"experiment '{store.name}' has no retraining set '{name}' to land runs in",
                "submit the retraining again (it creates the set)",
            )
        got = import_runs(folder, ExperimentStore.open(root.parent, name))
        return ImportResult(
            imported=[f"{name}/{r}" for r in got.imported],
            skipped=[f"{name}/{r}" for r in got.skipped],
            rejected={f"{name}/{r}": why for r, why in got.rejected.items()},
        )

    def remaining(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Any] | None:
        left = pending_runs(store, spec["set"], list(spec["run_ids"]))
        if not left:
            return None
        return dict(
            spec,
            run_ids=left,
            added={r: spec["added"][r] for r in left},
            seeds={r: spec["seeds"].get(r) for r in left},
        )

    def pending_text(self, left: dict[str, Any], landed: ImportResult | None) -> str:
        text = f"runs not finished in set {left['set']}: {', '.join(left['run_ids'])}"
        why = "; ".join(f"{k}: {v}" for k, v in landed.rejected.items()) if landed else ""
        return f"{text} ({why})" if why else text

    def failures(self, sub: Submission, job: Job, left: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"run_id": r, "seed": left["seeds"].get(r), "set": left["set"]} for r in left["run_ids"]
        ]

    def landed(self, store: ExperimentStore, sub: Submission, job: Job) -> list[str]:
        name = str(job.shard.get("set", ""))
        run_ids = [run_id_for(i) for i in job.run_indices]
        missing = set(pending_runs(store, name, run_ids))
        return [f"{name}/{r}" for r in run_ids if r not in missing]


RETRAIN = RetrainKind()


def write_retrain_summary(
    experiment_root: Path, strategies: Sequence[str], pool: str
) -> tuple[pd.DataFrame, list[str]]:
    """``retrain/summary.{parquet,csv}`` rewritten from the stored sets, as ``mlvar
    retrain`` writes it (:func:`mlvar.analysis.retrain.write_summary`)."""
    from mlvar.analysis.retrain import RETRAIN_DIR, write_summary

    return write_summary(Path(experiment_root) / RETRAIN_DIR, list(strategies), pool)
