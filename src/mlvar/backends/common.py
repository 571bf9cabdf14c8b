"""Pieces shared by the backends: extras, job bookkeeping, log tails."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from mlvar.backends.spec import Job, Submission
from mlvar.backends.transfer import ImportResult, import_runs
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, read_run, run_id_for
from mlvar.train.seeding import run_seed

#: ``progress(done_runs, total_runs, message)``.
SubmitProgress = Callable[[int, int, str], None]

LOG_TAIL_LINES = 20


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise a one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MlvarError(
            f"the {extra} backend needs the '{module}' package, which is not installed",
            f"install mlvar[{extra}] (pip install 'mlvar[{extra}]')",
        ) from None


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return tail(Path(path).read_text(errors="replace"), lines)
    except OSError:
        return ""


def missing_runs(store: ExperimentStore, indices: list[int]) -> list[int]:
    """The indices whose run is not complete in ``store``."""
    return [i for i in indices if read_run(store.run_dir(run_id_for(i))) is None]


def finish_attempt(
    sub: Submission,
    job: Job,
    store: ExperimentStore,
    output: Path | None,
    error: str,
    log_tail: str,
) -> tuple[list[int], ImportResult | None]:
    """Import an attempt's output (when it has one) and decide what is left.

    Returns the run indices to retry (empty when done or out of retries) and the import
    result. A job out of retries is marked failed with its runs listed by seed.
    """
    imported = None
    if output is not None and Path(output).exists():
        try:
            imported = import_runs(Path(output), store)
        except MlvarError as exc:
            error = error or str(exc)
    left = missing_runs(store, job.run_indices)
    if not left:
        job.state, job.error, job.log_tail, job.failed = "complete", "", "", []
        return [], imported
    job.error = error or f"runs not finished: {', '.join(run_id_for(i) for i in left)}"
    job.log_tail = log_tail
    if job.attempts <= sub.retries:
        job.state = "running"
        return left, imported
    job.state = "failed"
    job.failed = [{"run_id": run_id_for(i), "seed": run_seed(sub.base_seed, i)} for i in left]
    return [], imported
