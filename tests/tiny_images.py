"""A tiny image scenario with CNN and MLP experiments, shared by the saliency tests.

16x16 greyscale images whose bright square's place depends on the class (3 classes),
half of class 0 affected; 3 runs of the small CNN (``tiny-cnn``) and 2 of the MLP
(``tiny-mlp``), two epochs each: enough for distinct, finite attributions in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlvar.config import Config, PathsConfig
from mlvar.data.scenario import SplitData, write_scenario
from mlvar.train.service import train

SIZE = 16
N_CLASSES = 3


def tiny_split(rng: np.random.Generator, n: int, offset: int) -> SplitData:
    """``n`` images with ids from ``offset``."""
    y = np.arange(n, dtype=np.int64) % N_CLASSES
    x = rng.integers(0, 8, size=(n, SIZE, SIZE, 1))
    for i in range(n):
        r = 2 + 4 * int(y[i])
        x[i, r : r + 4, r : r + 4, 0] += 8
    return SplitData(
        x=x.astype(np.uint8),
        y=y,
        id=np.arange(offset, offset + n, dtype=np.int64),
        affected=(y == 0) & (np.arange(n) % 2 == 0),
        group=np.full(n, -1, dtype=np.int64),
    )


def tiny_config(root: Path) -> Config:
    return Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))


def write_tiny_scenario(data_root: Path, name: str = "tiny") -> None:
    """Write the tiny scenario (dataset ``digits``: 60 train, 30 test images) as ``name``."""
    rng = np.random.default_rng(0)
    manifest = {
        "dataset": "digits",
        "mode": "holdout",
        "params": {},
        "class_names": ["a", "b", "c"],
        "input": {"kind": "image", "shape": [SIZE, SIZE, 1], "max_value": 16},
    }
    splits = {"train": tiny_split(rng, 60, 0), "test": tiny_split(rng, 30, 1000)}
    write_scenario(data_root, name, manifest, splits)


def build_tiny_experiments(root: Path) -> Path:
    """Prepare scenario ``tiny`` under ``root/data`` and train ``tiny-cnn`` (3 runs) and
    ``tiny-mlp`` (2 runs) under ``root/runs``; returns ``root``."""
    write_tiny_scenario(root / "data")
    cfg = tiny_config(root)
    over = {"epochs": 2, "batch_size": 16, "workers": 1}
    train(cfg, "digits", scenario="tiny", runs=3, overrides={"model": "cnn", **over})
    train(cfg, "digits", scenario="tiny", runs=2, overrides={"model": "mlp", "epochs": 2})
    return root
