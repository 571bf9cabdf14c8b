"""Training packs as backend jobs: ``mlvar submit DATASET --runs N``.

A *run spec* is (dataset, scenario name, experiment name, run index, resolved training
config). Runs of one experiment share everything but the index, so a *pack* (one job, one
Ray task, one worker call) is one spec with a list of ``run_indices`` (``kind: "train"``;
specs written before kinds existed have no ``kind`` and are training packs too).

The worker trains the pack into a runs root of its own; that output folder is itself a
run store (``<experiment>/experiment.json``, ``samples/``, ``runs/<id>/``), whose complete,
sha256-verified runs :func:`mlvar.backends.transfer.import_runs` moves into the user's
store. The job reads only the prepared scenario.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from mlvar import __version__
from mlvar.backends import faults
from mlvar.backends.kind import JobKind, JobText, Log, quiet
from mlvar.backends.spec import SPEC_FORMAT, Job, Submission
from mlvar.backends.transfer import ImportResult, import_runs
from mlvar.config import Config, PathsConfig, TrainConfig
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, read_run, run_id_for

KIND = "train"


def pack_spec(
    scenario: Scenario,
    cfg: TrainConfig,
    experiment: str,
    run_indices: list[int],
    job: str,
    submission: str,
) -> dict[str, Any]:
    """The JSON spec of one pack of runs (what a worker reads)."""
    from mlvar.train.seeding import run_seed  # torch: only for training packs

    return {
        "format": SPEC_FORMAT,
        "kind": KIND,
        "mlvar_version": __version__,
        "submission": submission,
        "job": job,
        "dataset": scenario.dataset,
        "scenario": scenario.name,
        "scenario_manifest_sha256": scenario.manifest_sha256,
        "experiment": experiment,
        "run_indices": [int(i) for i in run_indices],
        "seeds": [run_seed(cfg.base_seed, i) for i in run_indices],
        "train": dataclasses.asdict(cfg),
    }


def make_packs(indices: list[int], runs_per_job: int) -> list[list[int]]:
    """Split run indices into packs of at most ``runs_per_job``."""
    return [indices[i : i + runs_per_job] for i in range(0, len(indices), runs_per_job)]


def missing_runs(store: ExperimentStore, indices: list[int]) -> list[int]:
    """The indices whose run is not complete in ``store``."""
    return [i for i in indices if read_run(store.run_dir(run_id_for(i))) is None]


def run_pack(
    spec: dict[str, Any],
    runs_root: Path,
    data_root: Path | None = None,
    log: Log = print,
) -> list[str]:
    """Train the pack ``spec`` into ``runs_root``; return the run ids trained or found done.

    The scenario is read from ``data_root``. Raises :class:`MlvarError` when there is none,
    or its manifest differs from the one the spec was made for.
    """
    from mlvar.train.service import train  # torch: imported by the jobs that train

    if data_root is None:
        raise MlvarError("the worker needs --data-root or --scenario-dir", "see --help")
    indices = list(spec["run_indices"])
    faults.before_work(spec, {i: f"run {run_id_for(i)}" for i in indices})
    config = Config(paths=PathsConfig(Path(data_root), Path(runs_root), Path(runs_root)))

    def progress(done: int, total: int, message: str) -> None:
        log(f"[{time.strftime('%H:%M:%S')}] {message}: {done}/{total} run-epochs", flush=True)
        faults.during_work(
            spec, {i: run_id_for(i) for i in indices if run_id_for(i) in message}, log
        )

    result = train(
        config,
        spec["dataset"],
        scenario=spec["scenario"],
        runs=max(indices) + 1,
        name=spec["experiment"],
        overrides=dict(spec["train"]),
        progress=progress,
        run_indices=indices,
    )
    store = ExperimentStore.open(Path(runs_root), spec["experiment"])
    want = spec.get("scenario_manifest_sha256")
    got = store.meta.get("scenario", {}).get("manifest_sha256")
    if want and got != want:
        raise MlvarError(
            f"scenario '{spec['scenario']}' here has manifest sha256 {str(got)[:12]}, the "
            f"spec was made for {want[:12]}",
            "upload the same prepared scenario",
        )
    log(f"trained {len(result.trained)}, already done {len(result.skipped)}", flush=True)
    return result.trained + result.skipped


def collect_runs(experiment_dir: Path) -> dict[str, bytes]:
    """The files of a worker's experiment folder (experiment.json, samples, complete runs)
    as ``{relative path: bytes}``: how a Ray task returns its outputs without a shared
    filesystem."""
    root = Path(experiment_dir)
    files: dict[str, bytes] = {"experiment.json": (root / "experiment.json").read_bytes()}
    for path in sorted((root / "samples").glob("*.parquet")):
        files[f"samples/{path.name}"] = path.read_bytes()
    for run in sorted((root / "runs").iterdir()) if (root / "runs").is_dir() else []:
        record = read_run(run)
        if record is None:
            continue
        for name in record.meta.get("arrays", {}):
            files[f"runs/{run.name}/{name}"] = (run / name).read_bytes()
        files[f"runs/{run.name}/run.json"] = (run / "run.json").read_bytes()
    return files


class TrainKind(JobKind):
    """A pack of runs trained from the prepared scenario."""

    name = KIND
    reads_scenario = True
    out_flag = "--runs-root"
    output_name = "runs"

    def units(self, spec: dict[str, Any]) -> int:
        return len(spec["run_indices"])

    def describe(self, sub: Submission, spec: dict[str, Any]) -> JobText:
        pack, indices = spec["job"], spec["run_indices"]
        return JobText(
            title=f"{sub.experiment} {pack} (runs {indices[0]}-{indices[-1]})",
            description=f"mlvar: train runs {', '.join(map(str, indices))} of {sub.experiment}",
            labels={
                "mlvar_experiment": sub.experiment,
                "mlvar_submission": sub.id,
                "mlvar_pack": pack,
                "mlvar_runs": ",".join(map(str, indices)),
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
        done = run_pack(spec, out, data_root, log)
        missing = [run_id_for(i) for i in spec["run_indices"] if run_id_for(i) not in done]
        if missing:
            raise RuntimeError(f"runs not finished: {', '.join(missing)}")

    def run_in_store(
        self, spec: dict[str, Any], store: ExperimentStore, data_root: Path | None, work: Path
    ) -> Path | None:
        # Training in process writes each run atomically into the store itself.
        run_pack(spec, store.root.parent, data_root, log=quiet)
        return None

    def output_files(self, spec: dict[str, Any], out: Path) -> dict[str, bytes]:
        exp_dir = Path(out) / spec["experiment"]
        if not (exp_dir / "experiment.json").is_file():
            return {}
        return {f"{spec['experiment']}/{k}": v for k, v in collect_runs(exp_dir).items()}

    def land(self, out: Path, store: ExperimentStore, spec: dict[str, Any]) -> ImportResult:
        total = ImportResult()
        for found in sorted(Path(out).rglob("experiment.json")):
            got = import_runs(found.parent, store)
            total.imported += got.imported
            total.skipped += got.skipped
            total.rejected.update(got.rejected)
        return total

    def remaining(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Any] | None:
        left = missing_runs(store, list(spec["run_indices"]))
        if not left:
            return None
        from mlvar.train.seeding import run_seed

        base = int(spec.get("train", {}).get("base_seed", 0))
        return dict(spec, run_indices=left, seeds=[run_seed(base, i) for i in left])

    def pending_text(self, left: dict[str, Any], landed: ImportResult | None) -> str:
        return f"runs not finished: {', '.join(run_id_for(i) for i in left['run_indices'])}"

    def failures(self, sub: Submission, job: Job, left: dict[str, Any]) -> list[dict[str, Any]]:
        from mlvar.train.seeding import run_seed

        return [
            {"run_id": run_id_for(i), "seed": run_seed(sub.base_seed, i)}
            for i in left["run_indices"]
        ]

    def landed(self, store: ExperimentStore, sub: Submission, job: Job) -> list[str]:
        missing = set(missing_runs(store, job.run_indices))
        return [run_id_for(i) for i in job.run_indices if i not in missing]


TRAIN = TrainKind()
