"""Partial results that merge exactly: the sufficient statistics of a block of samples.

A :class:`Partial` holds, for a block of samples and a set of runs, every statistic of
:data:`~mlvar.analysis.metrics.STATISTICS` (the training-dynamics ones when the runs
recorded per-epoch predictions), with no ``runs x samples x classes`` array. Today those
are: for each per-run quantity q in ``gconf``, ``maxconf``, ``gap``, ``grank`` the sum over
runs and the sum of squared deviations from the mean (``m2``); the vote counts ``[n, C]``;
the summed probabilities ``[n, C]`` and per-run entropies ``[n]``; each run's ``p_r[y]``
and ``max_c p_r[c]`` ``[R, n]`` (the single-model baselines); and the sums over runs of
the training-dynamics values.

Partials of consecutive sample blocks concatenate (:func:`concat_samples`); partials of
the same samples over disjoint sets of runs combine (:func:`combine_runs`: sums and
counts add, squared deviations combine with Chan et al.'s pairwise update, per-run
arrays concatenate). :func:`finalize` finishes every metric record whose statistics the
partial holds.

Every sum over runs is taken in a fixed sequential order (run 0, then run 1, ...), never
by ``numpy.sum(axis=0)``, whose association order depends on the array's shape. So each
sample's values depend on nothing but its own column and the run order: results are
bit-for-bit identical however the samples are chunked or sharded, and equal to
:func:`~mlvar.analysis.metrics.compute_metrics` (the same records in memory). Combining
run blocks reorders additions, which changes results by round-off only (about
``R * 1e-16`` on values of order 1; the tests allow 1e-12).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.metrics import (
    ALL_METRICS,
    COUNT,
    DYNAMICS,
    M2,
    PROBS,
    RUNS,
    STATISTICS,
    SUM,
    RunValues,
    Sufficient,
    finish,
    reduce_runs,
    sum_statistic,
)
from mlvar.io import atomic_save_npy, atomic_write_json


@dataclass
class Partial:
    """Sufficient statistics of a block of samples over a set of runs (see module doc).

    ``stats`` maps statistic names to arrays, in registry order: every ``"probs"``
    statistic, and the ``"dynamics"`` ones or none of them.
    """

    n_runs: int
    stats: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.stats[name]

    @property
    def n(self) -> int:
        name, array = next(iter(self.stats.items()))
        return int(array.shape[STATISTICS[name].sample_axis])

    @property
    def dynamics(self) -> dict[str, np.ndarray] | None:
        """The training-dynamics statistics, or None when the runs recorded none."""
        dyn = {k: v for k, v in self.stats.items() if STATISTICS[k].source == DYNAMICS}
        return dyn or None

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by its statistic's name, a file-safe name (see :meth:`from_arrays`)."""
        return dict(self.stats)

    @classmethod
    def from_arrays(cls, n_runs: int, arrays: dict[str, np.ndarray]) -> Partial:
        """A partial of the registry's statistics found in ``arrays`` (other names are
        ignored); every ``"probs"`` statistic must be there, the dynamics all or none."""
        found = {k: arrays[k] for k in STATISTICS if k in arrays}
        missing = [k for k, s in STATISTICS.items() if s.source == PROBS and k not in found]
        dyn = [k for k, s in STATISTICS.items() if s.source == DYNAMICS]
        partly = [k for k in dyn if k not in found] if any(k in found for k in dyn) else []
        if missing or partly:
            raise ValueError(f"partial result lacks {', '.join(missing + partly)}")
        return cls(n_runs, found)

    def slice(self, start: int, stop: int) -> Partial:
        """Samples ``start:stop`` (copied into memory, so memory-mapped inputs stay small)."""
        arrays = {}
        for k, v in self.stats.items():
            arrays[k] = np.array(v[:, start:stop] if STATISTICS[k].sample_axis else v[start:stop])
        return Partial(self.n_runs, arrays)

    def save(self, folder: Path, meta: dict[str, Any]) -> None:
        """Write every array as ``<name>.npy`` and ``meta.json`` (last) into ``folder``."""
        for name, array in self.stats.items():
            atomic_save_npy(folder / f"{name}.npy", array)
        atomic_write_json(folder / "meta.json", dict(meta, n_runs=self.n_runs))

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> Partial:
        """Read a partial written by :meth:`save` (memory-mapped by default)."""
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {
            p.stem: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            for p in sorted(folder.glob("*.npy"))
        }
        return cls.from_arrays(int(meta["n_runs"]), arrays)


def from_probs(
    probs: np.ndarray, labels: np.ndarray, dynamics: dict[str, np.ndarray] | None = None
) -> Partial:
    """The partial of one block of samples over the runs stacked in ``probs``.

    Parameters
    ----------
    probs
        Probabilities ``[R, n, C]``.
    labels
        Integer labels ``[n]``.
    dynamics
        Optional output of :func:`~mlvar.analysis.metrics.dynamics_sums` for the same
        runs and samples.
    """
    values = RunValues(probs, labels)
    arrays = reduce_runs(values)
    return Partial.from_arrays(values.n_runs, arrays | (dynamics or {}))


def _combine(a: Partial, b: Partial) -> dict[str, np.ndarray]:
    na, nb = a.n_runs, b.n_runs
    out = {}
    for k in a.stats:
        stat = STATISTICS[k]
        if stat.reduce in (SUM, COUNT):
            out[k] = a[k] + b[k]
        elif stat.reduce == M2:
            s = sum_statistic(k)
            delta = b[s] / nb - a[s] / na
            out[k] = a[k] + b[k] + delta * delta * (na * nb / (na + nb))
        elif stat.reduce == RUNS:
            out[k] = np.concatenate([a[k], b[k]], axis=0)
    return out


def combine_runs(parts: Sequence[Partial]) -> Partial:
    """Combine partials of the same samples over disjoint runs, in the order given.

    Sums and counts add; squared deviations combine with Chan et al.'s pairwise update
    ``m2 = m2_a + m2_b + (mean_b - mean_a)^2 n_a n_b / (n_a + n_b)``; the per-run arrays
    are concatenated in order.
    """
    if not parts:
        raise ValueError("nothing to combine")
    out = parts[0]
    for b in parts[1:]:
        a = out
        if a.n != b.n or a["votes"].shape != b["votes"].shape:
            raise ValueError(f"partials cover {a.n} and {b.n} samples")
        if a.stats.keys() != b.stats.keys():
            raise ValueError("only some partials hold training dynamics")
        out = Partial(a.n_runs + b.n_runs, _combine(a, b))
    return out


def concat_samples(parts: Sequence[Partial]) -> Partial:
    """Concatenate partials of consecutive sample blocks over the same runs."""
    if not parts:
        raise ValueError("nothing to concatenate")
    if len({p.n_runs for p in parts}) != 1:
        raise ValueError("partials over different numbers of runs")
    arrays = {}
    for k in parts[0].stats:
        axis = STATISTICS[k].sample_axis
        arrays[k] = np.concatenate([p[k] for p in parts], axis=axis)
    return Partial.from_arrays(parts[0].n_runs, arrays)


def finalize(part: Partial, labels: np.ndarray) -> pd.DataFrame:
    """The metric columns of ``part``: every metric of
    :data:`~mlvar.analysis.metrics.ALL_METRICS` whose statistics it holds (all of
    :data:`~mlvar.analysis.metrics.METRICS`, then the training-dynamics metrics when it
    holds dynamics), in registry order."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if labels.shape != (part.n,):
        raise ValueError(f"{labels.shape} labels for {part.n} samples")
    held = part.stats.keys()
    names = [m for m, metric in ALL_METRICS.items() if set(metric.statistics) <= held]
    return finish(Sufficient(part.stats, part.n_runs, labels), names)
