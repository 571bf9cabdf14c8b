"""Run one job of ``mlvar submit``: ``python -m mlvar.backends.worker SPEC.json ...``.

The worker is the unit every backend runs: a local subprocess, a Ray task, an Azure ML
command job. What it does depends on the spec's ``kind``:

``train`` (a pack of runs): train them into a runs root. Its output folder is itself a
run store (``<runs_root>/<experiment>/`` with ``experiment.json``, ``samples/`` and
``runs/<id>/``), which ``mlvar submit download``
(:func:`mlvar.backends.transfer.import_runs`) copies into the user's store.

``analysis`` (one shard of ``mlvar analyze rank``, see :mod:`mlvar.backends.shard_jobs`):
compute it from an experiment folder into ``OUT/<shard>/`` (``meta.json`` last, listing
the sha256 of every file).

``saliency`` (one run block of ``mlvar analyze saliency``, see
:mod:`mlvar.backends.saliency_jobs`): the same, reading the prepared scenario too
(``--data-root`` or ``--scenario-dir``), into ``OUT/r<j>of<m>/``.

Usage::

    python -m mlvar.backends.worker SPEC.json --runs-root OUT --data-root DATA
    python -m mlvar.backends.worker SPEC.json --runs-root OUT --scenario-dir DIR
    python -m mlvar.backends.worker SHARD.json --experiment-dir EXP --out OUT
    python -m mlvar.backends.worker SALIENCY.json --experiment-dir EXP --out OUT \
        (--data-root DATA | --scenario-dir DIR)

``--scenario-dir`` names the prepared scenario folder itself (an Azure ML input mount).
Exit codes: 0 every run of the pack (or the shard) is complete, 2 bad input, 1 a failure.

Testing hook: ``MLVAR_WORKER_FAULT`` injects faults, ``fail:K`` (raise when the pack holds
run index K; ``fail:K:A`` only in attempts <= A: the spec's ``attempt``) or
``kill:K`` (SIGKILL the process while training run K). For a shard spec K is the
shard's position in the plan (``index``, 0-based; analysis: sample block major); for an
analysis shard ``kill`` strikes after its first array file is written, before its
``meta.json``; for a saliency shard after the attributions of its first run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlvar.config import Config, PathsConfig
from mlvar.errors import MlvarError
from mlvar.store import run_id_for


def _fault(spec: dict[str, Any]) -> tuple[str, int] | None:
    value = os.environ.get("MLVAR_WORKER_FAULT", "")
    if not value:
        return None
    parts = value.split(":")
    kind, index = parts[0], int(parts[1])
    keys = [spec.get("index")] if spec.get("kind", "train") != "train" else spec["run_indices"]
    if index not in keys:
        return None
    attempt = int(spec.get("attempt") or os.environ.get("MLVAR_WORKER_ATTEMPT", "1"))
    if len(parts) > 2 and attempt > int(parts[2]):
        return None
    return kind, index


def run_pack(
    spec: dict[str, Any],
    runs_root: Path,
    data_root: Path | None = None,
    scenario_dir: Path | None = None,
    log=print,
) -> list[str]:
    """Train the pack ``spec`` into ``runs_root``; return the run ids trained or found done.

    The scenario is read from ``data_root`` (a data root holding it) or ``scenario_dir``
    (the scenario folder itself). Raises :class:`MlvarError` when the scenario's manifest
    differs from the one the spec was made for.
    """
    from mlvar.train.service import train

    with tempfile.TemporaryDirectory(prefix="mlvar-data-") as tmp:
        if scenario_dir is not None:
            data_root = Path(tmp)
            (data_root / spec["scenario"]).symlink_to(Path(scenario_dir).resolve())
        if data_root is None:
            raise MlvarError("the worker needs --data-root or --scenario-dir", "see --help")
        config = Config(paths=PathsConfig(Path(data_root), Path(runs_root), Path(runs_root)))
        fault = _fault(spec)
        if fault and fault[0] == "fail":
            raise RuntimeError(f"injected failure in run {run_id_for(fault[1])}")

        def progress(done: int, total: int, message: str) -> None:
            log(f"[{time.strftime('%H:%M:%S')}] {message}: {done}/{total} run-epochs", flush=True)
            if fault and fault[0] == "kill" and run_id_for(fault[1]) in message:
                log(f"injected kill in {run_id_for(fault[1])}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        indices = list(spec["run_indices"])
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
        from mlvar.store import ExperimentStore

        store = ExperimentStore.open(Path(runs_root), spec["experiment"])
        want = spec.get("scenario_manifest_sha256")
        got = store.meta.get("scenario", {}).get("manifest_sha256")
        if want and got != want:
            raise MlvarError(
                f"scenario '{spec['scenario']}' here has manifest sha256 {got[:12]}, the "
                f"spec was made for {want[:12]}",
                "upload the same prepared scenario",
            )
        log(f"trained {len(result.trained)}, already done {len(result.skipped)}", flush=True)
        return result.trained + result.skipped


def collect_runs(experiment_dir: Path) -> dict[str, bytes]:
    """The files of a worker's experiment folder (experiment.json, samples, complete runs)
    as ``{relative path: bytes}``: how a Ray task returns its outputs without a shared
    filesystem."""
    from mlvar.store import read_run

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


def write_files(files: dict[str, bytes], root: Path) -> None:
    """Write the output of :func:`collect_runs` under ``root`` (run.json files last)."""
    ordered = sorted(files, key=lambda k: (k.endswith("run.json"), k))
    for rel in ordered:
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise MlvarError(f"refusing the path {rel!r} in a task's output", "a bad worker")
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[rel])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlvar.backends.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", type=Path, help="the job's JSON spec (a pack or a shard)")
    parser.add_argument("--runs-root", type=Path, help="train: output runs root")
    parser.add_argument(
        "--data-root", type=Path, help="train, saliency: a data root holding the scenario"
    )
    parser.add_argument(
        "--scenario-dir", type=Path, help="train, saliency: the prepared scenario folder itself"
    )
    parser.add_argument(
        "--experiment-dir", type=Path, help="analysis, saliency: the experiment folder to read"
    )
    parser.add_argument(
        "--out", type=Path, help="analysis, saliency: output folder (gets <shard>/)"
    )
    args = parser.parse_args(argv)
    try:
        spec = json.loads(args.spec.read_text())
        if spec.get("kind", "train") != "train":
            return _shard(spec, args)
        if args.runs_root is None:
            raise MlvarError("a training spec needs --runs-root", "see --help")
        done = run_pack(spec, args.runs_root, args.data_root, args.scenario_dir)
    except MlvarError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 2
    missing = [run_id_for(i) for i in spec["run_indices"] if run_id_for(i) not in done]
    if missing:
        print(f"Error: runs not finished: {', '.join(missing)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _shard(spec: dict[str, Any], args: argparse.Namespace) -> int:
    """Run a shard job (analysis, saliency) as the command line asks."""
    from mlvar.backends.shard_jobs import run_job

    if args.experiment_dir is None or args.out is None:
        raise MlvarError(
            f"a {spec.get('kind')} spec needs --experiment-dir and --out", "see --help"
        )
    run_job(spec, args.experiment_dir, args.out, args.data_root, args.scenario_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
