"""How many GPUs a job asks for, and which GPU a local worker process gets.

A job is one pack of runs, and a pack trains on one device: on CUDA its runs train one
after another (image models) or stacked in one network (the MLP's ``batched`` engine),
always on the job's first visible GPU. So a job asks for the GPUs *one pack* uses,
whatever its size: ``[backend.ray] gpus_per_run`` (1, or a fraction such as 0.25 so that
four jobs share a GPU) and ``[backend.slurm] gpus_per_job`` (1), never more than one GPU,
and none on the CPU. The local backend's worker processes are pinned to the GPUs this
process sees in turn (slot ``k`` on GPU ``k % n``): more workers than GPUs share them.

Every GPU count of the backends comes from :func:`gpu_count` (tests replace it).
"""

from __future__ import annotations

import os

from mlvar.errors import MlvarError

#: What one pack of runs computes on at most.
PACK_GPUS = 1


def gpu_count() -> int:
    """The CUDA devices this process sees (``torch.cuda.device_count()``; it honours
    ``CUDA_VISIBLE_DEVICES``)."""
    import torch

    return int(torch.cuda.device_count())


def job_gpus(device: str, per_job: float, key: str) -> float:
    """The GPUs one job asks for: 0 on the CPU, ``per_job`` on CUDA.

    ``key`` names the setting ``per_job`` comes from, for the error: on CUDA it must be
    more than 0 (a job without a GPU cannot train on one) and at most
    :data:`PACK_GPUS` (a pack never uses a second GPU, which would sit idle and keep
    the job from being scheduled where fewer are free).
    """
    if device != "cuda":
        return 0
    if per_job <= 0:
        raise MlvarError(
            f"--device cuda needs a GPU per job, but {key} = {per_job:g}",
            f"set {key} = 1 (or a fraction where jobs may share a GPU), or train with --device cpu",
        )
    if per_job > PACK_GPUS:
        raise MlvarError(
            f"{key} = {per_job:g} asks for more GPUs than a job uses: a pack of runs trains "
            f"on one GPU",
            f"set {key} = 1 (more GPUs: more jobs, e.g. a smaller --runs-per-job)",
        )
    return per_job


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them to a
    child process: the entries of this process's own ``CUDA_VISIBLE_DEVICES`` (indices or
    UUIDs) when it is set, else ``0 .. n-1``; ``n`` is :func:`gpu_count`."""
    n = gpu_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(n)]
    return [d.strip() for d in given.split(",") if d.strip()][:n]


def slot_gpus(workers: int, gpus: list[str]) -> list[str]:
    """The GPU of each local worker slot ``0 .. workers-1``: ``gpus[slot % len(gpus)]``."""
    if not gpus:
        raise MlvarError("--device cuda was asked for, but no GPU is visible", "use --device cpu")
    return [gpus[slot % len(gpus)] for slot in range(workers)]


def sharing_note(workers: int, gpus: list[str]) -> str | None:
    """One line saying how ``workers`` processes share fewer ``gpus`` (None: they do not)."""
    if not gpus or workers <= len(gpus):
        return None
    by_gpu: dict[str, list[int]] = {}
    for slot, gpu in enumerate(slot_gpus(workers, gpus)):
        by_gpu.setdefault(gpu, []).append(slot)
    where = "; ".join(
        f"GPU {gpu}: workers {', '.join(map(str, slots))}" for gpu, slots in by_gpu.items()
    )
    return (
        f"note: {workers} local worker processes share {len(gpus)} GPU(s), "
        f"{workers / len(gpus):.3g} per GPU ({where})"
    )
