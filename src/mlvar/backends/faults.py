"""Test fault injection for backend jobs: the only reader of ``MLVAR_WORKER_FAULT``.

The tests prove that a failing or killed job is retried, reported and never lands a
partial result, on every backend, by setting ``MLVAR_WORKER_FAULT`` before submitting:

``fail:K``    raise in the job whose targets include K (``RuntimeError: injected failure
              in ...``);
``kill:K``    SIGKILL the job's own process at a point where it has written part of its
              output (a run trained, a shard's first file);
``...:K:A``   only in attempts ``<= A`` (the spec's ``attempt``), so a retry succeeds.

K is a run index for a training pack and the shard's position in its plan (``index``)
for a shard. Production code never reads the variable: a job kind calls
:func:`before_work` when it starts and :func:`during_work` at the points a kill would
leave partial output; a backend that runs jobs in processes it does not start itself
forwards :func:`task_env` to them (Ray tasks, Slurm jobs). Unset, every hook is a no-op.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ENV = "MLVAR_WORKER_FAULT"


@dataclass(frozen=True)
class Fault:
    action: str  # "fail" or "kill"
    target: int  # run index (training) or shard index
    until_attempt: int | None  # strike only in attempts <= this


def active() -> Fault | None:
    """The fault the environment asks for, if any."""
    value = os.environ.get(ENV, "")
    if not value:
        return None
    parts = value.split(":")
    return Fault(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None)


def _striking(spec: Mapping[str, Any], targets: Mapping[int, str], action: str) -> str | None:
    fault = active()
    if fault is None or fault.action != action or fault.target not in targets:
        return None
    if fault.until_attempt is not None and int(spec.get("attempt") or 1) > fault.until_attempt:
        return None
    return targets[fault.target]


def before_work(spec: Mapping[str, Any], targets: Mapping[int, str]) -> None:
    """Raise the injected failure when it targets this job (``targets``: fault key ->
    what it names, e.g. ``{1: "run run-0001"}``)."""
    label = _striking(spec, targets, "fail")
    if label is not None:
        raise RuntimeError(f"injected failure in {label}")


def during_work(
    spec: Mapping[str, Any], targets: Mapping[int, str], log: Callable[..., None]
) -> None:
    """SIGKILL this process when the injected kill targets what it is doing now."""
    label = _striking(spec, targets, "kill")
    if label is not None:
        log(f"injected kill in {label}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def task_env() -> dict[str, str]:
    """The variable to pass on to jobs started elsewhere (empty when unset)."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}
