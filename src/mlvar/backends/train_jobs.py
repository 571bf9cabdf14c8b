"""Training packs as backend jobs: ``mlvar submit DATASET --runs N``.

A *run spec* is (dataset, scenario name, experiment name, run index, resolved training
config). Runs of one experiment share everything but the index, so a *pack* (one job, one
Ray task, one worker call) is one spec with a list of ``run_indices`` (``kind: "train"``;
specs written before kinds existed have no ``kind`` and are training packs too).

A study (``mlvar submit DATASET --scenario artificial``) trains one experiment per
scenario in one submission; its runs are packed by :func:`study_packs`, and a job that
holds runs of several experiments has a spec whose ``parts`` list each experiment's
(``dataset``, ``scenario``, ``scenario_manifest_sha256``, ``experiment``,
``run_indices``, ``seeds``); its top-level fields are those of the first part. A job of
one experiment has no ``parts``: its spec is the one a submission of that experiment
alone writes.

The worker trains the pack (each part) into a runs root of its own; that output folder
is itself a run store (``<experiment>/experiment.json``, ``samples/``, ``runs/<id>/``),
whose complete, sha256-verified runs :func:`mlvar.backends.transfer.import_runs` moves
into the user's store (each experiment's into its own). The job reads only the prepared scenario(s).
"""

from __future__ import annotations

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
        "train": cfg.record(),
    }


#: The per-experiment fields of a pack spec: what each part of a study's job has.
PART_KEYS = (
    "dataset",
    "scenario",
    "scenario_manifest_sha256",
    "experiment",
    "run_indices",
    "seeds",
)


def make_packs(indices: list[int], runs_per_job: int) -> list[list[int]]:
    """Split run indices into packs of at most ``runs_per_job``."""
    return [indices[i : i + runs_per_job] for i in range(0, len(indices), runs_per_job)]


def study_packs(
    pending: dict[str, list[int]], runs_per_job: int
) -> list[list[tuple[str, list[int]]]]:
    """Pack the runs of several experiments (``{experiment: run indices}``, in order) into
    jobs of at most ``runs_per_job`` runs, each a list of ``(experiment, indices)``.

    Each experiment fills jobs of its own first (:func:`make_packs`); the runs left over
    (fewer than ``runs_per_job`` per experiment) are then packed together, in order, so
    the study takes the fewest jobs (``ceil(runs / runs_per_job)``) and only those jobs
    mix experiments. One experiment gives exactly :func:`make_packs`.
    """
    jobs: list[list[tuple[str, list[int]]]] = []
    rest: list[tuple[str, int]] = []
    for exp, indices in pending.items():
        full = len(indices) - len(indices) % runs_per_job
        jobs += [[(exp, pack)] for pack in make_packs(indices[:full], runs_per_job)]
        rest += [(exp, i) for i in indices[full:]]
    for k in range(0, len(rest), runs_per_job):
        job: list[tuple[str, list[int]]] = []
        for exp, i in rest[k : k + runs_per_job]:
            if job and job[-1][0] == exp:
                job[-1][1].append(i)
            else:
                job.append((exp, [i]))
        jobs.append(job)
    return jobs


def with_parts(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The spec of one job training the packs ``specs`` (each :func:`pack_spec`, of one
    experiment, same job and config): the first spec, plus ``parts`` when there are
    several."""
    if len(specs) == 1:
        return specs[0]
    return dict(specs[0], parts=[{k: spec[k] for k in PART_KEYS} for spec in specs])


def parts_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The one-experiment pack specs a (study) job spec trains: itself without ``parts``."""
    if "parts" not in spec:
        return [spec]
    base = {k: v for k, v in spec.items() if k != "parts"}
    return [dict(base, **part) for part in spec["parts"]]


def store_for(store: ExperimentStore, experiment: str) -> ExperimentStore:
    """The store of ``experiment``: ``store`` itself, or its sibling in the same runs
    root (a study's experiments share one)."""
    if experiment == store.name:
        return store
    return ExperimentStore.open(store.root.parent, experiment)


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
    """A pack of runs trained from the prepared scenario (a study's job: the packs of
    several experiments, each from its own scenario, each landing in its own store)."""

    name = KIND
    reads_scenario = True
    out_flag = "--runs-root"
    output_name = "runs"

    def units(self, spec: dict[str, Any]) -> int:
        return sum(len(part["run_indices"]) for part in parts_of(spec))

    def describe(self, sub: Submission, spec: dict[str, Any]) -> JobText:
        pack, indices = spec["job"], spec["run_indices"]
        if "parts" in spec:
            parts = parts_of(spec)
            runs = "; ".join(
                f"{p['experiment']}: {', '.join(map(str, p['run_indices']))}" for p in parts
            )
            return JobText(
                title=f"{pack} ({self.units(spec)} runs of {len(parts)} experiments)",
                description=f"mlvar: train runs of {len(parts)} experiments ({runs})",
                labels={
                    "mlvar_experiment": ",".join(p["experiment"] for p in parts),
                    "mlvar_submission": sub.id,
                    "mlvar_pack": pack,
                    "mlvar_runs": runs,
                },
            )
        exp = spec["experiment"]
        return JobText(
            title=f"{exp} {pack} (runs {indices[0]}-{indices[-1]})",
            description=f"mlvar: train runs {', '.join(map(str, indices))} of {exp}",
            labels={
                "mlvar_experiment": exp,
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
        done = _each_part(spec, lambda part: run_pack(part, out, data_root, log))
        missing = [
            _run_name(spec, part["experiment"], i)
            for part in parts_of(spec)
            for i in part["run_indices"]
            if run_id_for(i) not in done[part["experiment"]]
        ]
        if missing:
            raise RuntimeError(f"runs not finished: {', '.join(missing)}")

    def run_in_store(
        self, spec: dict[str, Any], store: ExperimentStore, data_root: Path | None, work: Path
    ) -> Path | None:
        # Training in process writes each run atomically into the store itself.
        _each_part(spec, lambda part: run_pack(part, store.root.parent, data_root, log=quiet))
        return None

    def output_files(self, spec: dict[str, Any], out: Path) -> dict[str, bytes]:
        files = {}
        for part in parts_of(spec):
            exp_dir = Path(out) / part["experiment"]
            if (exp_dir / "experiment.json").is_file():
                files.update({f"{exp_dir.name}/{k}": v for k, v in collect_runs(exp_dir).items()})
        return files

    def land(self, out: Path, store: ExperimentStore, spec: dict[str, Any]) -> ImportResult:
        wanted = {part["experiment"] for part in parts_of(spec)}
        total = ImportResult()
        for found in sorted(Path(out).rglob("experiment.json")):
            name = found.parent.name
            # a folder of another experiment goes to this store, which refuses it
            target = store_for(store, name) if name in wanted else store
            got = import_runs(found.parent, target)
            prefix = f"{name}/" if "parts" in spec or name != store.name else ""
            total.imported += [prefix + r for r in got.imported]
            total.skipped += [prefix + r for r in got.skipped]
            total.rejected.update({prefix + k: v for k, v in got.rejected.items()})
        return total

    def remaining(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Any] | None:
        from mlvar.train.seeding import run_seed

        base = int(spec.get("train", {}).get("base_seed", 0))
        left = []
        for part in parts_of(spec):
            indices = missing_runs(store_for(store, part["experiment"]), part["run_indices"])
            if indices:
                left.append(
                    dict(part, run_indices=indices, seeds=[run_seed(base, i) for i in indices])
                )
        if not left:
            return None
        return with_parts(left) if "parts" in spec else left[0]

    def pending_text(self, left: dict[str, Any], landed: ImportResult | None) -> str:
        names = [
            _run_name(left, part["experiment"], i)
            for part in parts_of(left)
            for i in part["run_indices"]
        ]
        return f"runs not finished: {', '.join(names)}"

    def failures(self, sub: Submission, job: Job, left: dict[str, Any]) -> list[dict[str, Any]]:
        from mlvar.train.seeding import run_seed

        return [
            {"run_id": run_id_for(i), "seed": run_seed(sub.base_seed, i)}
            | ({"experiment": part["experiment"]} if sub.experiments else {})
            for part in parts_of(left)
            for i in part["run_indices"]
        ]

    def landed(self, store: ExperimentStore, sub: Submission, job: Job) -> list[str]:
        if not job.parts:
            missing = set(missing_runs(store, job.run_indices))
            return [run_id_for(i) for i in job.run_indices if i not in missing]
        found = []
        for part in job.parts:
            exp, indices = part["experiment"], list(part["run_indices"])
            missing = set(missing_runs(store_for(store, exp), indices))
            found += [f"{exp}/{run_id_for(i)}" for i in indices if i not in missing]
        return found


def _run_name(spec: dict[str, Any], experiment: str, index: int) -> str:
    """A run as errors name it: with its experiment in a job of several."""
    return f"{experiment}/{run_id_for(index)}" if "parts" in spec else run_id_for(index)


def _each_part(spec: dict[str, Any], train_part: Any) -> dict[str, list[str]]:
    """``train_part(part)`` for each part of ``spec`` (its run ids done, by experiment):
    every part is tried, and the first error is raised after the last."""
    done: dict[str, list[str]] = {}
    first: Exception | None = None
    for part in parts_of(spec):
        try:
            done[part["experiment"]] = train_part(part)
        except Exception as exc:  # noqa: BLE001 - raised once the other parts are trained
            done[part["experiment"]] = []
            first = first or exc
    if first is not None:
        raise first
    return done


TRAIN = TrainKind()
