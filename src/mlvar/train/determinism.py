"""Deterministic kernels on CUDA by default, and ``impl``: kernel non-determinism as a
variance source of its own.

On the CPU every kernel mlvar trains with gives the same bits for the same inputs (the
image loop computes with one thread per kernel), so the randomness sources of
:mod:`mlvar.train.seeding` are all there is. On CUDA several kernels are not
deterministic by default (atomic adds in backward passes, cuDNN algorithms picked by
timing, cuBLAS reductions split over a workspace), so two runs of one seed differ and
``--vary`` attribution would not mean what it says. Training on CUDA therefore runs
(:func:`applied`) with

- ``torch.use_deterministic_algorithms(True)`` (``warn_only=False``: an operation with
  no deterministic implementation raises instead of silently differing; the networks of
  :mod:`mlvar.train.models` use none, see ``docs/training.md``),
- ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False``,
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads when CUDA starts: set in this
  process's environment before training touches CUDA, and passed to worker processes
  and cluster jobs (:func:`cuda_env`); a value the user set is kept, unless it is not
  one of the two deterministic ones, which is refused (:func:`check_environment`).

The randomness source ``impl`` (``--vary impl``) turns this off: deterministic
algorithms off, ``cudnn.benchmark`` on, so that the run-to-run spread of runs whose
seeded sources are all fixed (``--vary impl`` alone) measures kernel non-determinism
alone. ``impl`` draws no seed. On the CPU it changes nothing: it is accepted, recorded
as ``"not applicable on cpu"`` and noted (:func:`impl_note`). Every run records the
settings it trained under in ``run.json`` (``"determinism"``,
:meth:`KernelSettings.record`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlvar.errors import MlvarError

IMPL = "impl"
CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"
#: The values under which cuBLAS is deterministic (NVIDIA's cuBLAS docs, "Results
#: reproducibility"; PyTorch checks for exactly these).
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")
NOT_APPLICABLE = "not applicable on cpu"


@dataclass(frozen=True)
class KernelSettings:
    """The kernel settings of training on one device.

    ``impl`` is ``"fixed"`` (deterministic kernels), ``"varied"`` (non-deterministic
    kernels allowed) or :data:`NOT_APPLICABLE` (``impl`` asked for on the CPU).
    """

    device: str
    deterministic: bool  # torch.use_deterministic_algorithms
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    impl: str

    def record(self, deterministic: bool | None = None) -> dict[str, Any]:
        """What ``run.json`` says (``"determinism"``); ``deterministic``: the flag as it was
        in effect, where it differs from the setting (set outside mlvar on the CPU)."""
        on = self.deterministic if deterministic is None else deterministic
        out: dict[str, Any] = {"device": self.device, "deterministic_algorithms": on}
        if self.device == "cuda":
            out.update(
                cudnn_deterministic=self.cudnn_deterministic,
                cudnn_benchmark=self.cudnn_benchmark,
                cublas_workspace_config=os.environ.get(CUBLAS_ENV, ""),
            )
        out["impl"] = self.impl
        return out


def settings_for(device: str, vary: Sequence[str]) -> KernelSettings:
    """The kernel settings of training on ``device`` (``"cpu"``, ``"cuda"``) with the
    varied sources ``vary``: deterministic on CUDA unless ``impl`` is varied; on the CPU
    nothing is changed."""
    varied = IMPL in vary
    if device != "cuda":
        return KernelSettings(device, False, False, False, NOT_APPLICABLE if varied else "fixed")
    if varied:
        return KernelSettings(device, False, False, True, "varied")
    return KernelSettings(device, True, True, False, "fixed")


def cuda_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a process training on CUDA needs before CUDA starts: the cuBLAS
    workspace setting of ``environ`` (default ``os.environ``) if set, else
    :data:`CUBLAS_WORKSPACE`."""
    environ = os.environ if environ is None else environ
    return {CUBLAS_ENV: environ.get(CUBLAS_ENV) or CUBLAS_WORKSPACE}


def check_environment(settings: KernelSettings, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, with one line, a ``CUBLAS_WORKSPACE_CONFIG`` under which deterministic
    CUDA training would fail (PyTorch raises at the first matrix product)."""
    environ = os.environ if environ is None else environ
    value = environ.get(CUBLAS_ENV)
    if settings.deterministic and value and value not in DETERMINISTIC_CUBLAS:
        raise MlvarError(
            f"{CUBLAS_ENV}={value} does not make cuBLAS deterministic, which training on "
            "CUDA is by default",
            f"unset it or set {CUBLAS_ENV}={CUBLAS_WORKSPACE} (or --vary impl to allow "
            "non-deterministic kernels)",
        )


def impl_note(device: str, vary: Sequence[str]) -> str | None:
    """One line when ``impl`` is varied on the CPU, where it changes nothing."""
    if IMPL in vary and device != "cuda":
        return (
            f"note: --vary impl is {NOT_APPLICABLE}: CPU kernels are deterministic, so it "
            "adds no variance there (recorded in run.json as such)"
        )
    return None


@contextmanager
def applied(settings: KernelSettings) -> Iterator[dict[str, Any]]:
    """Train under ``settings``; yields the ``run.json`` record of what was in effect
    and restores PyTorch's previous settings afterwards. On the CPU nothing changes."""
    import torch

    if settings.device != "cuda":
        yield settings.record(torch.are_deterministic_algorithms_enabled())
        return
    check_environment(settings)
    # Read when CUDA starts: in a fresh process, training has not touched CUDA yet.
    os.environ.update(cuda_env())
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(settings.deterministic, warn_only=False)
    cudnn.deterministic, cudnn.benchmark = settings.cudnn_deterministic, settings.cudnn_benchmark
    try:
        yield settings.record()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]
