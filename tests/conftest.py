"""Shared pytest fixtures."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cifar_format import py2_pickle

# pytest-xdist's workers inherit COLUMNS=80 and LINES=24 from execnet, which makes rich
# wrap the wide tables that tests parse; a serial run has neither, so neither do workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("COLUMNS", "LINES"):
        os.environ.pop(_var, None)

# Under pytest-xdist (the README's test command runs two workers), each worker would
# start its own Slurm cluster or Ray instance: the tests that use one run in one worker.
_SHARED_SERVICES = {"slurm_cluster": "slurm", "slurm": "slurm", "ray_instance": "ray"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        group = next((g for f, g in _SHARED_SERVICES.items() if f in names), None)
        if group is None and item.nodeid.startswith("tests/test_backends_ray.py"):
            group = "ray"
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


# The real ProPublica file lives in the shared folder beside the repository
# (docs/design.md section 4).
_SHARED_COMPAS = Path(__file__).resolve().parents[2] / "shared/data/compas-scores-two-years.csv"


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for every Ray test of the session (starting one costs many
    seconds); skipped where Ray is not installed."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def compas_csv() -> Path:
    """Path of the real COMPAS CSV (shared copy, else ``$MLVAR_COMPAS_CSV``)."""
    if _SHARED_COMPAS.is_file():
        return _SHARED_COMPAS
    env = os.environ.get("MLVAR_COMPAS_CSV")
    if env and Path(env).is_file():
        return Path(env)
    raise FileNotFoundError(
        f"COMPAS CSV not found at {_SHARED_COMPAS}; set MLVAR_COMPAS_CSV to its path"
    )


@pytest.fixture
def compas_root(tmp_path: Path, compas_csv: Path) -> Path:
    """A fresh data root whose ``raw/`` holds a copy of the COMPAS CSV."""
    root = tmp_path / "data"
    (root / "raw").mkdir(parents=True)
    shutil.copyfile(compas_csv, root / "raw" / "compas-scores-two-years.csv")
    return root


@pytest.fixture(scope="session")
def tree_listing() -> Callable[[Path], list[tuple[str, int]]]:
    """Return a function listing every file and folder under a path (with sizes).

    Compare its result before and after a failing call to show nothing was written.
    """

    def listing(root: Path) -> list[tuple[str, int]]:
        root = Path(root)
        if not root.exists():
            return []
        return sorted(
            (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
            for p in root.rglob("*")
        )

    return listing


#: Environment variables that change what ``load_config`` returns.
MLVAR_CONFIG_VARS = ("MLVAR_CONFIG", "MLVAR_DATA_ROOT", "MLVAR_RUNS_ROOT", "MLVAR_REPORTS_ROOT")


@pytest.fixture
def no_mlvar_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Remove every ``MLVAR_*`` config variable and make ``tmp_path`` the current directory
    (so no stray ``./mlvar.toml`` is read); return ``tmp_path``."""
    for var in MLVAR_CONFIG_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fast_deterministic_flag(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """``torch.use_deterministic_algorithms`` without its import of torch._inductor's
    config (many seconds, for Inductor's own flag, which mlvar does not use): the same
    flag set, every call recorded as ``(mode, warn_only)``."""
    import torch

    calls: list[tuple[bool, bool]] = []

    def use(mode: bool, *, warn_only: bool = False) -> None:
        calls.append((mode, warn_only))
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)

    monkeypatch.setattr(torch, "use_deterministic_algorithms", use)
    return calls


# ---------------------------------------------------------------- tiny CIFAR archives
#
# Archives in the exact CIFAR formats (python: pickled dicts written the way Python 2 wrote
# them, channel-planar uint8 rows; binary: label byte(s) + 3072 bytes), with the real folder
# and file names, but only a few random images per class.

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

#: The real CIFAR-100 hierarchy: superclass -> its five fine classes.
CIFAR100_HIERARCHY = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def _tar(path: Path, members: dict[str, bytes], folder: str) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclass
class TinyCifar:
    """A tiny CIFAR copy: the archive and the arrays it holds (NHWC, file order)."""

    archive: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    coarse_train: np.ndarray | None = None
    coarse_test: np.ndarray | None = None
    members: dict[str, bytes] | None = None
    folder: str = ""


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _planar(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1))


def build_cifar10(
    path: Path, per_class: int = 10, test_per_class: int = 5, fmt: str = "python", seed: int = 0
) -> TinyCifar:
    """A CIFAR-10 archive with ``per_class`` train and ``test_per_class`` test images per class
    in shuffled order (train split over the five batches)."""
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(10), per_class))
    y_test = rng.permutation(np.repeat(np.arange(10), test_per_class))
    x_train, x_test = _images(rng, len(y_train)), _images(rng, len(y_test))
    batches = np.array_split(np.arange(len(y_train)), 5)
    members: dict[str, bytes] = {}
    if fmt == "python":
        folder = "cifar-10-batches-py"
        members["batches.meta"] = py2_pickle(
            {"num_cases_per_batch": len(batches[0]), "label_names": CIFAR10_NAMES, "num_vis": 3072}
        )
        for i, idx in enumerate(batches, 1):
            members[f"data_batch_{i}"] = py2_pickle(
                {
                    "batch_label": f"training batch {i} of 5",
                    "labels": [int(v) for v in y_train[idx]],
                    "data": _planar(x_train[idx]),
                    "filenames": [f"img_{j}.png" for j in idx],
                }
            )
        members["test_batch"] = py2_pickle(
            {
                "batch_label": "testing batch 1 of 1",
                "labels": [int(v) for v in y_test],
                "data": _planar(x_test),
                "filenames": [f"test_{j}.png" for j in range(len(y_test))],
            }
        )
    else:
        folder = "cifar-10-batches-bin"

        def records(x: np.ndarray, y: np.ndarray) -> bytes:
            return np.concatenate([y.astype(np.uint8)[:, None], _planar(x)], axis=1).tobytes()

        members["batches.meta.txt"] = ("\n".join(CIFAR10_NAMES) + "\n\n").encode()
        for i, idx in enumerate(batches, 1):
            members[f"data_batch_{i}.bin"] = records(x_train[idx], y_train[idx])
        members["test_batch.bin"] = records(x_test, y_test)
    _tar(path, members, folder)
    return TinyCifar(path, x_train, y_train, x_test, y_test, members=members, folder=folder)


def build_cifar100(
    path: Path, per_fine: int = 4, test_per_fine: int = 2, seed: int = 1
) -> TinyCifar:
    """A CIFAR-100 python archive with ``per_fine`` train / ``test_per_fine`` test images per
    fine class, in shuffled order, with the real fine and coarse names and hierarchy."""
    coarse_names = sorted(CIFAR100_HIERARCHY)
    fine_names = sorted(f for fines in CIFAR100_HIERARCHY.values() for f in fines)
    parent = np.array(
        [
            coarse_names.index(next(c for c, fs in CIFAR100_HIERARCHY.items() if f in fs))
            for f in fine_names
        ]
    )
    rng = np.random.default_rng(seed)
    fine_train = rng.permutation(np.repeat(np.arange(100), per_fine))
    fine_test = rng.permutation(np.repeat(np.arange(100), test_per_fine))
    x_train, x_test = _images(rng, len(fine_train)), _images(rng, len(fine_test))
    members = {
        "meta": py2_pickle({"fine_label_names": fine_names, "coarse_label_names": coarse_names}),
        "train": py2_pickle(
            {
                "filenames": [f"img_{j}.png" for j in range(len(fine_train))],
                "batch_label": "training batch 1 of 1",
                "fine_labels": [int(v) for v in fine_train],
                "coarse_labels": [int(v) for v in parent[fine_train]],
                "data": _planar(x_train),
            }
        ),
        "test": py2_pickle(
            {
                "filenames": [f"test_{j}.png" for j in range(len(fine_test))],
                "batch_label": "testing batch 1 of 1",
                "fine_labels": [int(v) for v in fine_test],
                "coarse_labels": [int(v) for v in parent[fine_test]],
                "data": _planar(x_test),
            }
        ),
    }
    _tar(path, members, "cifar-100-python")
    return TinyCifar(
        path,
        x_train,
        fine_train,
        x_test,
        fine_test,
        coarse_train=parent[fine_train],
        coarse_test=parent[fine_test],
        members=members,
        folder="cifar-100-python",
    )


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory: pytest.TempPathFactory) -> TinyCifar:
    """A tiny CIFAR-10 python-format archive (10 train + 5 test images per class)."""
    return build_cifar10(tmp_path_factory.mktemp("cifar10") / "cifar-10-python.tar.gz")


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory: pytest.TempPathFactory) -> TinyCifar:
    """A tiny CIFAR-100 python-format archive (4 train + 2 test images per fine class)."""
    return build_cifar100(tmp_path_factory.mktemp("cifar100") / "cifar-100-python.tar.gz")
