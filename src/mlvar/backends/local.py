"""The ``local`` backend: packs trained in this process, or by worker subprocesses.

On CPU the default is in process: the batched engine already spreads one pack over every
core, so extra processes only compete for them (see docs/clusters.md for the numbers).
On CUDA the default is one worker process per GPU (``CUDA_VISIBLE_DEVICES`` pins each).
Workers write into a folder of their own under ``submissions/<id>/work/``; their complete,
verified runs are then copied into the store, so a killed worker never leaves a partial run.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlvar.backends.common import SubmitProgress, finish_attempt, tail, tail_file
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
    lock = threading.Lock()
    total = sum(len(j.run_indices) for j in sub.jobs)
    done = [0]

    def report(job: Job) -> None:
        with lock:
            if job.state == "complete":
                done[0] += len(job.run_indices)
            sub.save(store.root)
            if progress:
                progress(done[0], total, f"{job.name} {job.state}")

    if workers <= 0:
        for job in sub.jobs:
            _in_process(sub, job, store, specs[job.name], data_root)
            report(job)
        return
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(job: Job) -> None:
        slot = slots.get()
        try:
            _subprocess(sub, job, store, specs[job.name], data_root, slot, workers, device)
        finally:
            slots.put(slot)
        report(job)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(one, job) for job in sub.jobs]:
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
