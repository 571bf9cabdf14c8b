"""Synthetic run stores for tests and benchmarks (no training involved).

Each sample gets a fixed "true" logit vector (its label's class raised by ``signal``,
lowered for affected samples, which are a fraction of class 0), and each run adds its own
Gaussian noise, so runs disagree most on the affected and the hard samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlvar.store import ExperimentStore


def synthetic_store(
    runs_root: Path,
    name: str = "synthetic",
    n_runs: int = 5,
    n_samples: int = 200,
    n_classes: int = 3,
    dtype: str = "float32",
    affected_fraction: float = 0.5,
    signal: float = 2.0,
    noise: float = 1.0,
    seed: int = 0,
    split: str = "test",
    dynamics_epochs: int = 0,
    config: dict | None = None,
) -> ExperimentStore:
    """Write an experiment of ``n_runs`` runs with ``[n_samples, n_classes]`` logits.

    Affected samples: a fraction ``affected_fraction`` of the class-0 samples, whose
    label logit is lowered by ``signal``. With ``dynamics_epochs`` > 0 (and ``split``
    ``"train"``) each run also records per-epoch logits that sharpen over the epochs.
    Run ``r`` uses seed ``seed + 1 + r``; memory is one run's logits at a time.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    affected = np.zeros(n_samples, dtype=bool)
    in0 = np.flatnonzero(labels == 0)
    affected[in0[rng.random(in0.size) < affected_fraction]] = True
    base = rng.normal(scale=0.5, size=(n_samples, n_classes)).astype(np.float32)
    base[np.arange(n_samples), labels] += signal
    base[affected, 0] -= signal
    meta = {
        "name": name,
        "dataset": "synthetic",
        "class_names": [f"c{i}" for i in range(n_classes)],
        "scenario": {
            "name": f"synthetic-n{n_samples}",
            "mode": "synthetic",
            "params": {"affected_fraction": affected_fraction},
            "description": "synthetic logits",
        },
        "model": "none",
        "train": {},
    }
    samples = {
        split: {
            "sample_id": np.arange(n_samples) + 1000,
            "label": labels,
            "affected": affected,
            "group": np.full(n_samples, -1),
        }
    }
    store = ExperimentStore.create(runs_root, name, meta, samples)
    for r in range(n_runs):
        run_rng = np.random.default_rng(seed + 1 + r)
        logits = base + run_rng.normal(scale=noise, size=base.shape).astype(np.float32)
        dyn = None
        if dynamics_epochs:
            steps = np.linspace(0.2, 1.0, dynamics_epochs, dtype=np.float32)[:, None, None]
            jitter = run_rng.normal(
                scale=noise, size=(dynamics_epochs, n_samples, n_classes)
            ).astype(np.float32)
            dyn = (steps * logits[None] + jitter).astype(dtype)
        store.write_run(
            f"run-{r:04d}",
            {split: logits.astype(dtype)},
            {"seed": seed + 1 + r, "config": config or {"synthetic": True}},
            dynamics=dyn,
        )
    return store
