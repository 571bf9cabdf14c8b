"""Per-sample sufficient statistics of every metric: partial results that merge exactly.

A :class:`Partial` holds, for a block of samples and a set of runs, everything the
metrics of :data:`~mlvar.analysis.metrics.METRICS` (and the training-dynamics metrics)
need, with no ``runs x samples x classes`` array:

* for each per-run quantity q in ``gconf``, ``maxconf``, ``gap``, ``grank``: the sum over
  runs and the sum of squared deviations from the mean (``m2``);
* the vote counts ``[n, C]`` (runs predicting each class), the summed probabilities
  ``[n, C]`` and the summed per-run entropies ``[n]``;
* each run's ``p_r[y]`` and ``max_c p_r[c]`` ``[R, n]`` (the single-model baselines);
* for the training-dynamics metrics, the sums over runs of each per-run value.

Partials of consecutive sample blocks concatenate (:func:`concat_samples`); partials of
the same samples over disjoint sets of runs combine (:func:`combine_runs`, with Chan et
al.'s pairwise update of the squared deviations). :func:`finalize` turns a partial into
the metric columns.

Every sum over runs is taken in a fixed sequential order (run 0, then run 1, ...), never
by ``numpy.sum(axis=0)``, whose association order depends on the array's shape. So each
sample's values depend on nothing but its own column and the run order: results are
bit-for-bit identical however the samples are chunked or sharded. They agree with
:func:`~mlvar.analysis.metrics.compute_metrics` to float round-off. Combining run blocks
reorders additions, which changes results by round-off only (about ``R * 1e-16`` on
values of order 1; the tests allow 1e-12).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.metrics import (
    _SPECS,
    DYNAMICS_METRICS,
    METRICS,
    _Stats,
    entropy,
    sequential_sum,
)
from mlvar.io import atomic_save_npy, atomic_write_json

MOMENTS: tuple[str, ...] = ("gconf", "maxconf", "gap", "grank")
"""Per-run quantities whose mean and std over runs are metrics."""


@dataclass
class Partial:
    """Sufficient statistics of a block of samples over a set of runs (see module doc)."""

    n_runs: int
    sums: dict[str, np.ndarray]  # moment -> [n] sum over runs
    m2: dict[str, np.ndarray]  # moment -> [n] sum of squared deviations from the mean
    votes: np.ndarray  # [n, C] int64
    prob_sum: np.ndarray  # [n, C] float64
    entropy_sum: np.ndarray  # [n] float64
    run_gconf: np.ndarray  # [R, n] float64
    run_maxconf: np.ndarray  # [R, n] float64
    dynamics: dict[str, np.ndarray] | None = None  # metric -> [n] sum over runs

    @property
    def n(self) -> int:
        return int(self.entropy_sum.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by a file-safe name (see :meth:`from_arrays`)."""
        out = {f"sum_{k}": v for k, v in self.sums.items()}
        out |= {f"m2_{k}": v for k, v in self.m2.items()}
        out |= {
            "votes": self.votes,
            "prob_sum": self.prob_sum,
            "entropy_sum": self.entropy_sum,
            "run_gconf": self.run_gconf,
            "run_maxconf": self.run_maxconf,
        }
        if self.dynamics is not None:
            out |= {f"dyn_{k}": v for k, v in self.dynamics.items()}
        return out

    @classmethod
    def from_arrays(cls, n_runs: int, arrays: dict[str, np.ndarray]) -> Partial:
        dyn = {k[4:]: v for k, v in arrays.items() if k.startswith("dyn_")}
        return cls(
            n_runs=n_runs,
            sums={k: arrays[f"sum_{k}"] for k in MOMENTS},
            m2={k: arrays[f"m2_{k}"] for k in MOMENTS},
            votes=arrays["votes"],
            prob_sum=arrays["prob_sum"],
            entropy_sum=arrays["entropy_sum"],
            run_gconf=arrays["run_gconf"],
            run_maxconf=arrays["run_maxconf"],
            dynamics=dyn or None,
        )

    def slice(self, start: int, stop: int) -> Partial:
        """Samples ``start:stop`` (copied into memory, so memory-mapped inputs stay small)."""
        arrays = {}
        for k, v in self.arrays().items():
            arrays[k] = np.array(v[:, start:stop] if k.startswith("run_") else v[start:stop])
        return Partial.from_arrays(self.n_runs, arrays)

    def save(self, folder: Path, meta: dict[str, Any]) -> None:
        """Write every array as ``<name>.npy`` and ``meta.json`` (last) into ``folder``."""
        for name, array in self.arrays().items():
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
    s = _Stats(probs, labels)
    r = s.n_runs
    sums, m2 = {}, {}
    for k in MOMENTS:
        x = getattr(s, k)  # [R, n]
        total = sequential_sum(x)
        d = x - (total / r)[None, :]
        sums[k] = total
        m2[k] = sequential_sum(d * d)
    return Partial(
        n_runs=r,
        sums=sums,
        m2=m2,
        votes=s.votes.astype(np.int64),
        prob_sum=sequential_sum(s.probs),
        entropy_sum=sequential_sum(entropy(s.probs, axis=2)),
        run_gconf=s.gconf.copy(),
        run_maxconf=s.maxconf.copy(),
        dynamics=dynamics,
    )


def combine_runs(parts: Sequence[Partial]) -> Partial:
    """Combine partials of the same samples over disjoint runs, in the order given.

    Sums add; squared deviations combine with Chan et al.'s pairwise update
    ``m2 = m2_a + m2_b + (mean_b - mean_a)^2 n_a n_b / (n_a + n_b)``; the per-run
    baseline arrays are concatenated in order.
    """
    if not parts:
        raise ValueError("nothing to combine")
    out = parts[0]
    for b in parts[1:]:
        a = out
        if a.n != b.n or a.votes.shape != b.votes.shape:
            raise ValueError(f"partials cover {a.n} and {b.n} samples")
        if (a.dynamics is None) != (b.dynamics is None):
            raise ValueError("only some partials hold training dynamics")
        na, nb = a.n_runs, b.n_runs
        sums, m2 = {}, {}
        for k in MOMENTS:
            delta = b.sums[k] / nb - a.sums[k] / na
            sums[k] = a.sums[k] + b.sums[k]
            m2[k] = a.m2[k] + b.m2[k] + delta * delta * (na * nb / (na + nb))
        out = Partial(
            n_runs=na + nb,
            sums=sums,
            m2=m2,
            votes=a.votes + b.votes,
            prob_sum=a.prob_sum + b.prob_sum,
            entropy_sum=a.entropy_sum + b.entropy_sum,
            run_gconf=np.concatenate([a.run_gconf, b.run_gconf], axis=0),
            run_maxconf=np.concatenate([a.run_maxconf, b.run_maxconf], axis=0),
            dynamics=None
            if a.dynamics is None
            else {k: a.dynamics[k] + b.dynamics[k] for k in a.dynamics},
        )
    return out


def concat_samples(parts: Sequence[Partial]) -> Partial:
    """Concatenate partials of consecutive sample blocks over the same runs."""
    if not parts:
        raise ValueError("nothing to concatenate")
    if len({p.n_runs for p in parts}) != 1:
        raise ValueError("partials over different numbers of runs")
    arrays = {}
    for k in parts[0].arrays():
        axis = 1 if k.startswith("run_") else 0
        arrays[k] = np.concatenate([p.arrays()[k] for p in parts], axis=axis)
    return Partial.from_arrays(parts[0].n_runs, arrays)


def finalize(part: Partial, labels: np.ndarray) -> pd.DataFrame:
    """The metric columns of ``part``: every name of :data:`METRICS` in registry order,
    then the training-dynamics metrics when ``part`` holds dynamics."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    r, n = part.n_runs, part.n
    if labels.shape != (n,):
        raise ValueError(f"{labels.shape} labels for {n} samples")
    data: dict[str, np.ndarray] = {"n_correct": part.votes[np.arange(n), labels].astype(np.float64)}
    for k in MOMENTS:
        data[f"{k}_mean"] = part.sums[k] / r
        data[f"{k}_std"] = np.sqrt(part.m2[k] / r)
    # The vote- and entropy-based metrics need only these, so the registry's own
    # functions compute them.
    view = SimpleNamespace(
        votes=part.votes,
        n_runs=r,
        n=n,
        predictive_entropy=entropy(part.prob_sum / r, axis=1),
        expected_entropy=part.entropy_sum / r,
    )
    for name in METRICS:
        if name not in data:
            data[name] = np.asarray(_SPECS[name][0](view), dtype=np.float64)
    columns = list(METRICS)
    if part.dynamics is not None:
        for name in DYNAMICS_METRICS:
            data[name] = part.dynamics[name] / r
        columns += list(DYNAMICS_METRICS)
    return pd.DataFrame({c: data[c] for c in columns}, index=pd.RangeIndex(n), columns=columns)
