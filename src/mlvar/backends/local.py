"""The ``local`` backend: jobs run in this process, or by worker subprocesses.

On CPU the default is in process: the batched engine already spreads one pack over every
core, so extra processes only compete for them (see docs/clusters.md for the numbers).
On CUDA the default is one worker process per GPU (``CUDA_VISIBLE_DEVICES`` pins each);
with more workers (``--workers``) than GPUs, worker slot ``k`` gets GPU ``k % n``
(:mod:`mlvar.backends.gpus`), and the plan says how they share them.
A worker process reads the store (and the prepared scenario in the data root) directly
and writes into a folder of its own under ``submissions/<id>/work/``; only its complete,
verified output is then moved into the store, so a killed worker never leaves a partial
run or shard. In process, a training pack writes each run atomically into the store
itself, and a shard goes through ``work/`` like a worker's.
"""

from __future__ import annotations

import collections
import os
import queue
import subprocess
import sys
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from mlvar.backends import gpus
from mlvar.backends.backend import (
    Attempt,
    Backend,
    JobBatch,
    SubmitProgress,
    drive,
    tail,
    tail_file,
)
from mlvar.backends.kind import remove_empty, worker_command
from mlvar.backends.spec import Job
from mlvar.errors import ExitCode, MlvarError
from mlvar.io import atomic_write_json
from mlvar.train.determinism import cuda_env


def default_workers(device: str) -> int:
    """0 (in process) on CPU; one process per visible GPU on CUDA."""
    if device == "cuda":
        return max(1, gpus.gpu_count())
    return 0


def worker_env(device: str, gpu: str | None = None) -> dict[str, str]:
    """The environment of a worker process: this process's, and on CUDA pinned to
    ``gpu`` (its slot's, :func:`mlvar.backends.gpus.slot_gpus`) with the settings
    deterministic CUDA kernels need before CUDA starts."""
    env = dict(os.environ)
    if device == "cuda":
        env.update(cuda_env(env))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


class LocalBackend(Backend):
    """Jobs in this process (``workers`` 0) or in ``workers`` worker processes."""

    name = "local"
    summary = "local (in process or worker processes)"
    synchronous = True

    def workers_for(self, device: str, workers: int | None) -> int:
        """The worker processes of a batch: ``workers`` (``--workers``), else ``[submit]
        local_workers``, whose 0 means :func:`default_workers`; 0 is in process."""
        if workers is not None:
            return workers
        return self.config.submit.local_workers or default_workers(device)

    def plan_notes(self, device: str, workers: int | None) -> list[str]:
        if device != "cuda":
            return []
        note = gpus.sharing_note(self.workers_for(device, workers), gpus.visible_gpus())
        return [note] if note else []

    def submit(self, batch: JobBatch, progress: SubmitProgress | None = None) -> None:
        workers = self.workers_for(batch.device, batch.workers)
        if workers <= 0:
            self._in_process(batch, progress)
        else:
            self._in_workers(batch, workers, progress)
        remove_empty(batch.base / "work", batch.base)  # the logs and specs stay

    def _in_process(self, batch: JobBatch, progress: SubmitProgress | None) -> None:
        pending: collections.deque[tuple[Job, dict[str, Any]]] = collections.deque()

        def next_ended() -> tuple[Job, Attempt]:
            job, spec = pending.popleft()
            return job, self._attempt_here(batch, job, spec)

        drive(batch, lambda job, spec: pending.append((job, spec)), next_ended, progress)

    def _attempt_here(self, batch: JobBatch, job: Job, spec: dict[str, Any]) -> Attempt:
        assert batch.store is not None
        work = batch.base / "work" / f"{job.name}-a{spec['attempt']}"
        try:
            out = batch.kind.run_in_store(spec, batch.store, batch.data_root, work)
        except MlvarError as exc:  # bad input (a changed scenario...): retrying cannot help
            return Attempt(spec, work, str(exc), tail(traceback.format_exc()), fatal=True)
        except Exception as exc:  # noqa: BLE001 - reported with its traceback
            return Attempt(spec, work, f"{type(exc).__name__}: {exc}", tail(traceback.format_exc()))
        return Attempt(spec, out)

    def _in_workers(self, batch: JobBatch, workers: int, progress: SubmitProgress | None) -> None:
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(workers):
            slots.put(slot)
        running: dict[Future[Attempt], Job] = {}
        devices = gpus.slot_gpus(workers, gpus.visible_gpus()) if batch.device == "cuda" else []

        def one(job: Job, spec: dict[str, Any]) -> Attempt:
            slot = slots.get()
            try:
                return self._attempt_in_worker(batch, job, spec, slot, workers, devices)
            finally:
                slots.put(slot)

        def next_ended() -> tuple[Job, Attempt]:
            ended, _ = wait(list(running), return_when=FIRST_COMPLETED)
            future = next(iter(ended))
            return running.pop(future), future.result()

        with ThreadPoolExecutor(max_workers=workers) as pool:

            def launch(job: Job, spec: dict[str, Any]) -> None:
                running[pool.submit(one, job, spec)] = job

            drive(batch, launch, next_ended, progress)

    def _attempt_in_worker(
        self,
        batch: JobBatch,
        job: Job,
        spec: dict[str, Any],
        slot: int,
        workers: int,
        devices: list[str],
    ) -> Attempt:
        assert batch.store is not None
        attempt = f"{job.name}-a{spec['attempt']}"
        spec_file = batch.base / "specs" / f"{attempt}.json"
        atomic_write_json(spec_file, spec)
        out, log_file = batch.base / "work" / attempt, batch.base / "logs" / f"{attempt}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        env = worker_env(batch.device, devices[slot] if devices else None)
        if batch.device != "cuda":  # share the cores instead of oversubscribing them
            threads = str(max(1, (os.cpu_count() or 1) // workers))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        cmd = worker_command(
            batch.kind,
            str(spec_file),
            str(out),
            experiment_dir=str(batch.store.root),
            data_root=str(batch.data_root) if batch.data_root is not None else None,
            python=sys.executable,
        )
        with open(log_file, "wb") as fh:
            if devices:  # which GPU, for whoever reads the log of a slow or failed job
                fh.write(f"mlvar: worker slot {slot} on GPU {devices[slot]}\n".encode())
                fh.flush()
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        error = "" if code == ExitCode.OK else f"worker exited with code {code}"
        return Attempt(spec, out, error, tail_file(log_file), fatal=code == ExitCode.BAD_INPUT)
