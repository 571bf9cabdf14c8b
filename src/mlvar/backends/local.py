"""The ``local`` backend: packs trained (or analysis shards computed) in this process, or
by worker subprocesses.

On CPU the default is in process: the batched engine already spreads one pack over every
core, so extra processes only compete for them (see docs/clusters.md for the numbers).
On CUDA the default is one worker process per GPU (``CUDA_VISIBLE_DEVICES`` pins each).
Workers write into a folder of their own under ``submissions/<id>/work/``; their complete,
verified runs are then copied into the store, so a killed worker never leaves a partial run.
Analysis and saliency shards go the same way: a worker reads the store (and, for
saliency, the prepared scenario in the data root) and writes its shard into its own
folder; only a complete shard whose files match their sha256 lands in
``analysis/shards/<split>/`` (or ``analysis/saliency-shards/<split>/``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlvar.backends.common import SubmitProgress, finish_attempt, tail, tail_file
from mlvar.backends.shard_jobs import finish_shard_attempt, run_job
from mlvar.backends.spec import Job, Submission
from mlvar.backends.worker import run_pack
from mlvar.errors import MlvarError
from mlvar.io import atomic_write_json
from mlvar.store import ExperimentStore


def default_workers(device: str) -> int:
    """0 (in process) on CPU; one process per visible GPU on CUDA."""
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return 0


def run_local(
    sub: Submission,
    store: ExperimentStore,
    specs: dict[str, dict[str, Any]],
    data_root: Path,
    workers: int,
    device: str,
    progress: SubmitProgress | None = None,
) -> None:
    """Train every job of ``sub`` (retrying failed runs) and record the outcome."""

    def one(job: Job, slot: int | None) -> None:
        if slot is None:
            _in_process(sub, job, store, specs[job.name], data_root)
        else:
            _subprocess(sub, job, store, specs[job.name], data_root, slot, workers, device)

    _schedule(sub, store, workers, one, lambda job: len(job.run_indices), progress)


def run_local_shards(
    sub: Submission,
    store: ExperimentStore,
    specs: dict[str, dict[str, Any]],
    workers: int,
    progress: SubmitProgress | None = None,
    data_root: Path | None = None,
) -> None:
    """Compute every shard of ``sub`` (analysis or saliency; retrying failed ones), land
    them. ``data_root`` holds the prepared scenario (saliency)."""

    def one(job: Job, slot: int | None) -> None:
        procs = None if slot is None else workers
        _shard_attempts(sub, job, store, specs[job.name], procs, data_root)

    _schedule(sub, store, workers, one, lambda job: 1, progress)


def _schedule(
    sub: Submission,
    store: ExperimentStore,
    workers: int,
    one: Callable[[Job, int | None], None],
    weight: Callable[[Job], int],
    progress: SubmitProgress | None,
) -> None:
    """Run ``one(job, slot)`` for every job: in this process (slot None) when ``workers``
    is 0, else on ``workers`` slots in parallel; save the record after each job."""
    lock = threading.Lock()
    total = sum(weight(j) for j in sub.jobs)
    done = [0]

    def report(job: Job) -> None:
        with lock:
            if job.state == "complete":
                done[0] += weight(job)
            sub.save(store.root)
            if progress:
                progress(done[0], total, f"{job.name} {job.state}")

    if workers <= 0:
        for job in sub.jobs:
            one(job, None)
            report(job)
        return
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def run(job: Job) -> None:
        slot = slots.get()
        try:
            one(job, slot)
        finally:
            slots.put(slot)
        report(job)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run, job) for job in sub.jobs]:
            future.result()
    with contextlib.suppress(OSError):
        (store.root / "submissions" / sub.id / "work").rmdir()  # empty once all imported


def _in_process(
    sub: Submission, job: Job, store: ExperimentStore, spec: dict[str, Any], data_root: Path
) -> None:
    left = list(job.run_indices)
    while left:
        job.attempts += 1
        job.state = "running"
        error = log = ""
        try:
            pack = dict(spec, run_indices=left, attempt=job.attempts)
            run_pack(pack, store.root.parent, data_root, log=_quiet)
        except MlvarError:
            raise  # bad input (changed scenario...): retrying cannot help
        except Exception as exc:  # noqa: BLE001 - reported per run with its traceback
            error = f"{type(exc).__name__}: {exc}"
            log = tail(traceback.format_exc())
        left, _ = finish_attempt(sub, job, store, None, error, log)


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    pass


def _subprocess(
    sub: Submission,
    job: Job,
    store: ExperimentStore,
    spec: dict[str, Any],
    data_root: Path,
    slot: int,
    workers: int,
    device: str,
) -> None:
    base = store.root / "submissions" / sub.id
    left = list(job.run_indices)
    while left:
        job.attempts += 1
        job.state = "running"
        attempt = f"{job.name}-a{job.attempts}"
        spec_file = base / "specs" / f"{attempt}.json"
        atomic_write_json(spec_file, dict(spec, run_indices=left, attempt=job.attempts))
        out, log_file = base / "work" / attempt, base / "logs" / f"{attempt}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLVAR_WORKER_ATTEMPT=str(job.attempts))
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        else:  # share the cores instead of oversubscribing them
            threads = str(max(1, (os.cpu_count() or 1) // workers))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        cmd = [sys.executable, "-m", "mlvar.backends.worker", str(spec_file)]
        cmd += ["--runs-root", str(out), "--data-root", str(data_root)]
        with open(log_file, "wb") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        error = "" if code == 0 else f"worker exited with code {code}"
        left, _ = finish_attempt(sub, job, store, out, error, tail_file(log_file))
        shutil.rmtree(out, ignore_errors=True)


def _shard_attempts(
    sub: Submission,
    job: Job,
    store: ExperimentStore,
    spec: dict[str, Any],
    workers: int | None,
    data_root: Path | None = None,
) -> None:
    """Attempts of one shard: in this process (``workers`` None) or as a worker
    subprocess reading the store, writing into ``submissions/<id>/work/``; then land it."""
    base = store.root / "submissions" / sub.id
    retry = True
    while retry:
        job.attempts += 1
        job.state = "running"
        attempt = f"{job.name}-a{job.attempts}"
        out = base / "work" / attempt
        spec_ = dict(spec, attempt=job.attempts)
        error = log = ""
        if workers is None:
            try:
                run_job(spec_, store.root, out, data_root, log=_quiet)
            except Exception as exc:  # noqa: BLE001 - reported with its traceback
                error = f"{type(exc).__name__}: {exc}"
                log = tail(traceback.format_exc())
        else:
            spec_file = base / "specs" / f"{attempt}.json"
            atomic_write_json(spec_file, spec_)
            log_file = base / "logs" / f"{attempt}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            threads = str(max(1, (os.cpu_count() or 1) // workers))
            env = dict(os.environ, MLVAR_WORKER_ATTEMPT=str(job.attempts))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            cmd = [sys.executable, "-m", "mlvar.backends.worker", str(spec_file)]
            cmd += ["--experiment-dir", str(store.root), "--out", str(out)]
            cmd += ["--data-root", str(data_root)] if data_root is not None else []
            with open(log_file, "wb") as fh:
                code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
            error = "" if code == 0 else f"worker exited with code {code}"
            log = tail_file(log_file)
        retry = finish_shard_attempt(sub, job, store, spec, out / job.name, error, log)
        shutil.rmtree(out, ignore_errors=True)
    for folder in (base / "work", base):  # only when empty (in process: nothing is kept)
        with contextlib.suppress(OSError):
            folder.rmdir()
