"""Per-run, per-source random generators.

Run ``r`` of an experiment has seed ``base_seed + r``. Each source of randomness (weight
initialisation, data order, dropout, augmentation) gets its own generator, derived from
that seed when the source is in ``vary`` and from ``base_seed`` otherwise. Fixing a source
across runs therefore removes exactly that source of variance, and a run's randomness
never depends on which other runs are trained beside it. The source ``impl`` (CUDA
kernels' non-determinism) draws no seed: :mod:`mlvar.train.determinism` handles it.
"""

from __future__ import annotations

import numpy as np
import torch

from mlvar.recipes import RANDOMNESS_SOURCES, SEEDED_SOURCES

# Distinct stream ids so that, say, the init and order generators of one seed are unrelated.
_SOURCE_STREAM = {name: i + 1 for i, name in enumerate(RANDOMNESS_SOURCES)}


def run_seed(base_seed: int, run_index: int) -> int:
    """The seed of run ``run_index``."""
    return base_seed + run_index


def source_seeds(base_seed: int, run_index: int, vary: list[str]) -> dict[str, int]:
    """The seed each seeded randomness source uses in run ``run_index``."""
    seed = run_seed(base_seed, run_index)
    return {s: (seed if s in vary else base_seed) for s in SEEDED_SOURCES}


def make_generator(seed: int, source: str) -> torch.Generator:
    """A CPU generator for one source, mixed from ``seed`` and the source's stream id."""
    state = np.random.SeedSequence([seed, _SOURCE_STREAM[source]]).generate_state(1, np.uint64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state[0]) & ((1 << 63) - 1))
    return gen


class RunGenerators:
    """The generators of one run: ``init``, ``order``, ``dropout`` and ``aug``."""

    def __init__(self, base_seed: int, run_index: int, vary: list[str]) -> None:
        self.seeds = source_seeds(base_seed, run_index, vary)
        self.init = make_generator(self.seeds["init"], "init")
        self.order = make_generator(self.seeds["order"], "order")
        self.dropout = make_generator(self.seeds["dropout"], "dropout")
        self.aug = make_generator(self.seeds["aug"], "aug")
