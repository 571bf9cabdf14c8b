"""The ``ray`` backend: one Ray task per job, on a local instance or a cluster.

``ray.init()`` starts a local instance, or connects to ``[backend.ray] address``. No
shared filesystem is needed, on a laptop or on a cluster: what a job reads goes to the
tasks through the object store, each file once however many tasks read it (the prepared
scenario's folder and the shared arrays it reads, for a study's job each scenario it
trains, and for shards the experiment files of
:meth:`JobKind.inputs`), and
each task returns its output's complete part as bytes (:meth:`JobKind.output_files`),
which the driver writes into a temporary folder and lands with the same verification as
every backend. Tasks need mlvar installed on the workers (the same version as the
driver). Retries are mlvar's own (``max_retries=0``), so a failure is reported with its
traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlvar.backends import faults, gpus
from mlvar.backends.backend import (
    Attempt,
    Backend,
    JobBatch,
    SubmitProgress,
    drive,
    require,
    tail,
)
from mlvar.backends.kind import quiet, remove_empty, write_files
from mlvar.backends.spec import Job
from mlvar.config import RayConfig
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError
from mlvar.train.determinism import cuda_env


def require_ray() -> Any:
    return require("ray", "ray")


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


@contextlib.contextmanager
def connect(cfg: RayConfig) -> Iterator[None]:
    """``ray.init`` against the configured address (or a local instance), shut down again
    afterwards; an instance this process already started is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
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
    try:
        yield
    finally:
        ray.shutdown()


def scenario_files(scenario: Scenario) -> dict[str, Path]:
    """The files a job reads of the prepared scenario, by path relative to the data root:
    its folder and the shared arrays it reads (the source once, however many scenarios)."""
    return scenario.files()


def _fetch(refs: dict[str, Any]) -> dict[str, bytes]:
    """``{relative path: object ref}`` as ``{relative path: bytes}``."""
    import ray

    return dict(zip(refs, ray.get(list(refs.values())), strict=True))


def _task(
    spec: dict[str, Any], inputs: dict[str, Any], scenario: dict[str, Any] | None
) -> dict[str, Any]:
    """Runs on a Ray worker: fetch the job's inputs and the scenario's files (each
    ``{relative path: object ref}``), run the job, return its output's files as bytes."""
    from mlvar.backends.kinds import kind_of

    kind = kind_of(spec)
    with tempfile.TemporaryDirectory(prefix="mlvar-ray-") as tmp:
        exp_dir = Path(tmp) / "in" / spec["experiment"] if kind.reads_experiment else None
        data_root = Path(tmp) / "data" if scenario is not None else None
        out = Path(tmp) / "out"
        error = log = ""
        fatal = False
        try:
            if exp_dir is not None:
                write_files(_fetch(inputs), exp_dir)
            if data_root is not None and scenario is not None:
                write_files(_fetch(scenario), data_root)
            kind.run(spec, out, exp_dir, data_root, quiet)
        except Exception as exc:  # noqa: BLE001 - returned to the driver with its traceback
            error, log = f"{type(exc).__name__}: {exc}", tail(traceback.format_exc())
            fatal = isinstance(exc, MlvarError)
        files = kind.output_files(spec, out) if out.is_dir() else {}
        return {"files": files, "error": error, "log_tail": log, "fatal": fatal}


def task_options(cfg: RayConfig, device: str) -> dict[str, Any]:
    """The ``ray.remote`` options of every task: ``num_cpus = cpus_per_run`` and, on
    CUDA, ``num_gpus = gpus_per_run``, the GPUs of one job whatever its number of runs
    (:func:`mlvar.backends.gpus.job_gpus`), with the environment deterministic CUDA
    kernels need (:func:`mlvar.train.determinism.cuda_env`); the testing hook's
    variables (:func:`mlvar.backends.faults.task_env`) too, for workers already running.
    """
    options: dict[str, Any] = {
        "num_cpus": cfg.cpus_per_run,
        "num_gpus": gpus.job_gpus(device, cfg.gpus_per_run, "backend.ray.gpus_per_run"),
        "max_retries": 0,
    }
    env = faults.task_env()
    if device == "cuda":
        env.update(cuda_env())
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


class RayBackend(Backend):
    """One Ray task per job (``num_cpus = cpus_per_run``; on CUDA ``num_gpus =
    gpus_per_run``, the GPUs of one pack: its runs train on one device)."""

    name = "ray"
    summary = "ray (a local instance or a cluster)"
    synchronous = True

    @property
    def cfg(self) -> RayConfig:
        return self.config.backend.ray

    def check(self, dry_run: bool, device: str = "cpu") -> None:
        gpus.job_gpus(device, self.cfg.gpus_per_run, "backend.ray.gpus_per_run")
        require_ray()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with connect(self.cfg):
            yield

    def submit(self, batch: JobBatch, progress: SubmitProgress | None = None) -> None:
        import ray

        store, kind = batch.store, batch.kind
        assert store is not None
        refs: dict[Any, Any] = {}  # source file (or content digest) -> object ref

        def put(src: Path | bytes) -> Any:
            key = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else src
            if key not in refs:
                refs[key] = ray.put(src if isinstance(src, bytes) else Path(src).read_bytes())
            return refs[key]

        inputs: dict[str, dict[str, Any]] = {}  # job -> {relative path: object ref}
        scenario_refs: dict[str, dict[str, Any] | None] = {}  # job -> the same, its scenarios
        options = task_options(self.cfg, batch.device)
        in_flight: dict[Any, tuple[Job, dict[str, Any]]] = {}

        def launch(job: Job, spec: dict[str, Any]) -> None:
            if job.name not in inputs:
                files = kind.inputs(store, spec)
                inputs[job.name] = {rel: put(src) for rel, src in files.items()}
                scenarios = batch.job_scenarios(spec) if kind.reads_scenario else []
                scenario_refs[job.name] = {
                    rel: put(src) for s in scenarios for rel, src in scenario_files(s).items()
                } or None
            ref = ray.remote(**options)(_task).remote(
                spec, inputs[job.name], scenario_refs[job.name]
            )
            job.ref = ref.hex()
            in_flight[ref] = (job, spec)

        def next_ended() -> tuple[Job, Attempt]:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            job, spec = in_flight.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                out = {"error": f"{type(exc).__name__}", "log_tail": tail(str(exc))}
            folder = batch.base / "work" / f"{job.name}-a{job.attempts}"
            error = out.get("error", "")
            try:
                if out.get("files"):
                    write_files(out["files"], folder)
            except MlvarError as exc:
                error = error or str(exc)
            return job, Attempt(
                spec, folder, error, out.get("log_tail", ""), out.get("fatal", False)
            )

        drive(batch, launch, next_ended, progress)
        remove_empty(batch.base / "work", batch.base)
