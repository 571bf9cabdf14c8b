"""The ``ray`` backend: one Ray task per pack of runs.

``ray.init()`` starts a local instance, or connects to ``[backend.ray] address``. The
scenario's files go to the tasks through the object store and each task returns its
pack's finished runs as bytes (:func:`mlvar.backends.worker.collect_runs`), which the
driver writes into a temporary folder and imports with the same verification as
``mlvar submit download``: no shared filesystem is needed, on a laptop or on a cluster.
Tasks need mlvar installed on the workers (the same version as the driver).

Analysis and saliency shards (:func:`run_ray_shards`) go the same way: the files a shard
reads (for analysis its run block's logits of the split, ``samples/<split>.parquet``,
``experiment.json``; for saliency every ranked run's logits, its block's ``model.pt``
and the prepared scenario) are put in the object store, each file once however many
tasks read it; each task computes one shard from them and returns the shard's files as
bytes, which land only when complete and verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlvar.backends import shard_jobs
from mlvar.backends.common import SubmitProgress, finish_attempt, require, tail
from mlvar.backends.spec import Submission
from mlvar.config import RayConfig, TrainConfig
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore

_FAULT = "MLVAR_WORKER_FAULT"


def require_ray() -> Any:
    return require("ray", "ray")


@dataclass
class RayContext:
    started: bool  # this process called ray.init (and shuts Ray down again)

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def _probe(address: str, timeout: float) -> None:
    """Fail within ``timeout`` seconds, with one line, when ``address`` does not answer."""
    url = urlparse(address if "://" in address else f"tcp://{address}")
    if url.scheme not in ("tcp", "ray") or not url.hostname:
        raise MlvarError(
            f"backend.ray.address '{address}' is not host:port or ray://host:port",
            'e.g. address = "10.0.0.5:6379" or "ray://head:10001"',
        )
    port = url.port or (10001 if url.scheme == "ray" else 6379)
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(
                (url.hostname, port), timeout=max(0.1, deadline - time.monotonic())
            ):
                return
        except OSError as exc:
            last = exc
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise MlvarError(
        f"the Ray cluster at {address} did not answer within {timeout:g} s ({last})",
        "check [backend.ray] address and that the head node is up; raise MLVAR_RAY_TIMEOUT",
    )


def connect(cfg: RayConfig) -> RayContext:
    """``ray.init`` against the configured address (or a local instance)."""
    ray = require_ray()
    if ray.is_initialized():
        return RayContext(started=False)
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if cfg.address:
        _probe(cfg.address, cfg.connect_timeout_s)
        ray.init(address=cfg.address, **kwargs)
    else:
        if cfg.num_cpus:
            kwargs["num_cpus"] = cfg.num_cpus
        ray.init(**kwargs)
    return RayContext(started=True)


def scenario_files(scenario: Scenario) -> dict[str, bytes]:
    """The prepared scenario folder as ``{file name: bytes}`` (shipped to the tasks)."""
    return {p.name: p.read_bytes() for p in sorted(scenario.path.iterdir()) if p.is_file()}


def _task(spec: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """Runs on a Ray worker: unpack the scenario, train the pack, return the runs as bytes."""
    from mlvar.backends.worker import collect_runs, run_pack

    with tempfile.TemporaryDirectory(prefix="mlvar-ray-") as tmp:
        data_root, runs_root = Path(tmp) / "data", Path(tmp) / "runs"
        folder = data_root / spec["scenario"]
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        error = log = ""
        try:
            run_pack(spec, runs_root, data_root, log=lambda *a, **k: None)
        except Exception as exc:  # noqa: BLE001 - returned to the driver with its traceback
            error, log = f"{type(exc).__name__}: {exc}", tail(traceback.format_exc())
        exp_dir = runs_root / spec["experiment"]
        runs = collect_runs(exp_dir) if (exp_dir / "experiment.json").is_file() else {}
        return {"files": runs, "error": error, "log_tail": log}


def run_ray(
    sub: Submission,
    store: ExperimentStore,
    specs: dict[str, dict[str, Any]],
    scenario: Scenario,
    cfg: TrainConfig,
    ray_cfg: RayConfig,
    progress: SubmitProgress | None = None,
) -> None:
    """Run every job as a Ray task (failed runs resubmitted up to ``sub.retries`` times)."""
    import ray

    from mlvar.backends.worker import write_files

    files_ref = ray.put(scenario_files(scenario))
    total = sum(len(j.run_indices) for j in sub.jobs)
    done = 0
    jobs = {j.name: j for j in sub.jobs}
    in_flight: dict[Any, tuple[str, list[int]]] = {}

    def launch(name: str, indices: list[int]) -> None:
        job = jobs[name]
        job.attempts += 1
        job.state = "running"
        gpus = ray_cfg.gpus_per_run * len(indices) if cfg.device == "cuda" else 0
        remote = ray.remote(num_cpus=ray_cfg.cpus_per_run, num_gpus=gpus, max_retries=0)(_task)
        spec = dict(specs[name], run_indices=indices, attempt=job.attempts)
        ref = remote.remote(spec, files_ref)
        job.ref = ref.hex()
        in_flight[ref] = (name, indices)

    for job in sub.jobs:
        launch(job.name, job.run_indices)
    sub.save(store.root)
    work = store.root / "submissions" / sub.id / "work"
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        name, _indices = in_flight.pop(ready[0])
        job = jobs[name]
        try:
            out = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
            out = {"files": {}, "error": f"{type(exc).__name__}", "log_tail": tail(str(exc))}
        folder = work / f"{name}-a{job.attempts}"
        try:
            if out["files"]:
                write_files(out["files"], folder / sub.experiment)
            left, _ = finish_attempt(sub, job, store, folder, out["error"], out["log_tail"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if left:
            launch(name, left)
        elif job.state == "complete":
            done += len(job.run_indices)
        sub.save(store.root)
        if progress:
            progress(done, total, f"{name} {job.state}")
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # only when empty


def _shard_task(
    spec: dict[str, Any], inputs: dict[str, Any], scenario: dict[str, bytes] | None
) -> dict[str, Any]:
    """Runs on a Ray worker: fetch the shard's inputs (``{relative path: object ref}``)
    and the scenario's files, compute the shard, return its files."""
    import ray

    from mlvar.backends.shard_jobs import collect_shard, run_job
    from mlvar.backends.worker import write_files

    with tempfile.TemporaryDirectory(prefix="mlvar-ray-") as tmp:
        exp_dir, out = Path(tmp) / "in" / spec["experiment"], Path(tmp) / "out"
        data_root = Path(tmp) / "data" if scenario is not None else None
        error = log = ""
        try:
            write_files(dict(zip(inputs, ray.get(list(inputs.values())), strict=True)), exp_dir)
            if data_root is not None:
                write_files(scenario, data_root / spec["scenario"])
            run_job(spec, exp_dir, out, data_root, log=lambda *a, **k: None)
        except Exception as exc:  # noqa: BLE001 - returned to the driver with its traceback
            error, log = f"{type(exc).__name__}: {exc}", tail(traceback.format_exc())
        return {"files": collect_shard(out / spec["job"]), "error": error, "log_tail": log}


def run_ray_shards(
    sub: Submission,
    store: ExperimentStore,
    specs: dict[str, dict[str, Any]],
    ray_cfg: RayConfig,
    progress: SubmitProgress | None = None,
    scenario: Scenario | None = None,
) -> None:
    """Compute every shard of ``sub`` (analysis, or saliency reading ``scenario``) as a Ray
    task (``num_cpus = cpus_per_run``, no GPU), retrying a failed shard up to
    ``sub.retries`` times. Each input file goes into the object store once."""
    import ray

    refs: dict[Any, Any] = {}  # source file (or content digest) -> object ref

    def put(src: Path | bytes) -> Any:
        key = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else src
        if key not in refs:
            refs[key] = ray.put(src if isinstance(src, bytes) else Path(src).read_bytes())
        return refs[key]

    inputs: dict[str, dict[str, Any]] = {}  # job -> {relative path: object ref}
    scenario_ref = ray.put(scenario_files(scenario)) if scenario is not None else None
    jobs = {j.name: j for j in sub.jobs}
    in_flight: dict[Any, str] = {}
    options: dict[str, Any] = {"num_cpus": ray_cfg.cpus_per_run, "num_gpus": 0, "max_retries": 0}
    if os.environ.get(_FAULT):  # the testing hook, for workers already running
        options["runtime_env"] = {"env_vars": {_FAULT: os.environ[_FAULT]}}
    remote = ray.remote(**options)(_shard_task)

    def launch(name: str) -> None:
        job, spec = jobs[name], specs[name]
        if name not in inputs:
            files = shard_jobs.input_files(store, spec)
            inputs[name] = {rel: put(src) for rel, src in files.items()}
        job.attempts += 1
        job.state = "running"
        ref = remote.remote(dict(spec, attempt=job.attempts), inputs[name], scenario_ref)
        job.ref = ref.hex()
        in_flight[ref] = name

    for job in sub.jobs:
        launch(job.name)
    sub.save(store.root)
    work = store.root / "submissions" / sub.id / "work"
    done, total = 0, len(sub.jobs)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        name = in_flight.pop(ready[0])
        job = jobs[name]
        try:
            out = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
            out = {"files": {}, "error": f"{type(exc).__name__}", "log_tail": tail(str(exc))}
        folder = work / f"{name}-a{job.attempts}" / name
        error = out["error"]
        try:
            if out["files"]:
                try:
                    shard_jobs.write_shard_files(out["files"], folder)
                except MlvarError as exc:
                    error = error or str(exc)
            retry = shard_jobs.finish_shard_attempt(
                sub, job, store, specs[name], folder, error, out["log_tail"]
            )
        finally:
            shutil.rmtree(folder.parent, ignore_errors=True)
        if retry:
            launch(name)
        elif job.state == "complete":
            done += 1
        sub.save(store.root)
        if progress:
            progress(done, total, f"{name} {job.state}")
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # only when empty
