"""What a CIFAR copy holds: the official archives and their layouts, and the parsing of
their members (python batches through :func:`mlvar.data.archives.safe_unpickle`, binary
batches directly), every value checked before it is used.

:mod:`mlvar.data.cifar` fetches with these; the scenarios never read archives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data import archives
from mlvar.errors import MlvarError

IMAGE_SHAPE = (32, 32, 3)
FLAT = 32 * 32 * 3


@dataclass(frozen=True)
class Layout:
    """Where a format keeps its files: ``folder/<name>`` with known md5s (None: unknown)."""

    format: str  # "python" or "binary"
    folder: str
    train: tuple[tuple[str, str | None], ...]
    test: tuple[tuple[str, str | None], ...]
    meta: tuple[tuple[str, str | None], ...]

    def files(self) -> list[tuple[str, str | None]]:
        return [*self.train, *self.test, *self.meta]

    def paths(self) -> list[str]:
        return [f"{self.folder}/{name}" for name, _ in self.files()]


@dataclass(frozen=True)
class CifarSource:
    """One dataset's official archives (url, file name, md5 per format) and layouts."""

    dataset: str
    title: str
    url: str
    filename: str
    archives: dict[str, tuple[str, str]]  # format -> (archive file name, md5)
    layouts: dict[str, Layout] = field(default_factory=dict)


SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        dataset="cifar10",
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        archives={
            "python": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
            "binary": ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
        },
        layouts={
            "python": Layout(
                format="python",
                folder="cifar-10-batches-py",
                train=(
                    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
                ),
                test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
                meta=(("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),),
            ),
            "binary": Layout(
                format="binary",
                folder="cifar-10-batches-bin",
                train=tuple((f"data_batch_{i}.bin", None) for i in range(1, 6)),
                test=(("test_batch.bin", None),),
                meta=(("batches.meta.txt", None),),
            ),
        },
    ),
    "cifar100": CifarSource(
        dataset="cifar100",
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz",
        archives={"python": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")},
        layouts={
            "python": Layout(
                format="python",
                folder="cifar-100-python",
                train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
                test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
                meta=(("meta", "7973b15100ade9c7d40fb424638fde48"),),
            )
        },
    ),
}


# --------------------------------------------------------------------------- parsing


@dataclass
class Parsed:
    """What the members of one archive or folder held, keyed by path inside the layout."""

    batches: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    md5: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


def _labels(value: Any, n: int, what: str, key: str, n_classes: int) -> np.ndarray:
    try:
        labels = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise MlvarError(f"{what}: '{key}' is not a list of integers", _FORMAT_HINT) from None
    if labels.shape != (n,):
        raise MlvarError(f"{what}: {len(labels)} '{key}' for {n} images", _FORMAT_HINT)
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise MlvarError(f"{what}: '{key}' outside 0..{n_classes - 1}", _FORMAT_HINT)
    return labels


_FORMAT_HINT = "pass an official CIFAR archive or a copy in the same format"


def _parse_python_batch(
    data: bytes, what: str, keys: dict[str, int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A python-format batch: ``{b'data': uint8 [n, 3072], b'<labels>': [...] ...}``."""
    obj = archives.safe_unpickle(data, what)
    if not isinstance(obj, dict) or b"data" not in obj:
        raise MlvarError(f"{what} is not a CIFAR batch (no b'data')", _FORMAT_HINT)
    x = obj[b"data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != FLAT:
        raise MlvarError(f"{what}: 'data' is not a uint8 [n, 3072] array", _FORMAT_HINT)
    labels = {}
    for key, n_classes in keys.items():
        if key.encode() not in obj:
            raise MlvarError(f"{what} is not a CIFAR batch (no b'{key}')", _FORMAT_HINT)
        labels[key] = _labels(obj[key.encode()], len(x), what, key, n_classes)
    return x, labels


def _parse_binary_batch(data: bytes, what: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A CIFAR-10 binary batch: records of 1 label byte + 3072 image bytes."""
    record = 1 + FLAT
    if len(data) % record:
        raise MlvarError(f"{what}: size {len(data)} is not a multiple of {record}", _FORMAT_HINT)
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = _labels(rec[:, 0], len(rec), what, "labels", 10)
    return np.array(rec[:, 1:]), {"labels": labels}


def _names(value: Any, what: str, key: str, count: int) -> list[str]:
    if not isinstance(value, list) or len(value) != count:
        raise MlvarError(f"{what}: '{key}' is not a list of {count} names", _FORMAT_HINT)
    out = []
    for v in value:
        if isinstance(v, bytes):
            v = v.decode("latin1")
        if not isinstance(v, str) or not v.strip():
            raise MlvarError(f"{what}: '{key}' holds a non-name {v!r}", _FORMAT_HINT)
        out.append(v.strip())
    return out


def _member_handler(dataset: str, parsed: Parsed) -> tuple[set[str], Callable[[str, bytes], None]]:
    """The layout paths to read and a callback that parses each one as it is read."""
    spec = SOURCES[dataset]
    roles: dict[str, tuple[str, str]] = {}
    for layout in spec.layouts.values():
        for part in ("train", "test", "meta"):
            for name, _ in getattr(layout, part):
                roles[f"{layout.folder}/{name}"] = (layout.format, part)

    def handle(path: str, data: bytes) -> None:
        fmt, part = roles[path]
        parsed.md5[path] = hashlib.md5(data).hexdigest()
        parsed.sha256[path] = hashlib.sha256(data).hexdigest()
        what = f"'{path}'"
        if part == "meta":
            if fmt == "binary":
                lines = [ln.strip() for ln in data.decode("latin1").splitlines() if ln.strip()]
                parsed.meta[path] = {"label_names": _names(lines, what, "label_names", 10)}
                return
            obj = archives.safe_unpickle(data, what)
            if not isinstance(obj, dict):
                raise MlvarError(f"{what} is not a CIFAR meta file", _FORMAT_HINT)
            if dataset == "cifar10":
                names = {"label_names": _names(obj.get(b"label_names"), what, "label_names", 10)}
            else:
                names = {
                    "fine_label_names": _names(
                        obj.get(b"fine_label_names"), what, "fine_label_names", 100
                    ),
                    "coarse_label_names": _names(
                        obj.get(b"coarse_label_names"), what, "coarse_label_names", 20
                    ),
                }
            parsed.meta[path] = names
        elif fmt == "binary":
            parsed.batches[path] = _parse_binary_batch(data, what)
        elif dataset == "cifar10":
            parsed.batches[path] = _parse_python_batch(data, what, {"labels": 10})
        else:
            keys = {"fine_labels": 100, "coarse_labels": 20}
            parsed.batches[path] = _parse_python_batch(data, what, keys)

    return set(roles), handle


def _complete_layout(dataset: str, present: set[str], origin: str) -> Layout:
    """The layout whose files are all present, or an error naming what is missing."""
    spec = SOURCES[dataset]
    best: tuple[int, Layout] | None = None
    for layout in spec.layouts.values():
        have = sum(p in present for p in layout.paths())
        if have == len(layout.paths()):
            return layout
        if best is None or have > best[0]:
            best = (have, layout)
    assert best is not None
    layout = best[1]
    missing = [p for p in layout.paths() if p not in present]
    shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    raise MlvarError(
        f"{origin} is not a {spec.title} copy: it lacks {shown}",
        f"pass the official {spec.filename} or its extracted {layout.folder} folder",
    )


def assemble(dataset: str, layout: Layout, parsed: Parsed) -> dict[str, Any]:
    """Concatenate the batches in the layout's order into the raw arrays and names."""

    def stack(part: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        pieces = [parsed.batches[f"{layout.folder}/{name}"] for name, _ in getattr(layout, part)]
        n = sum(len(x) for x, _ in pieces)
        x = np.empty((n, *IMAGE_SHAPE), dtype=np.uint8)
        at = 0
        for flat, _ in pieces:
            # Channel-planar rows [R(1024) G(1024) B(1024)] -> NHWC.
            x[at : at + len(flat)] = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            at += len(flat)
        labels = {k: np.concatenate([lab[k] for _, lab in pieces]) for k in pieces[0][1]}
        return x, labels

    x_train, lab_train = stack("train")
    x_test, lab_test = stack("test")
    meta = parsed.meta[f"{layout.folder}/{layout.meta[0][0]}"]
    if not len(x_train) or not len(x_test):
        raise MlvarError(f"the {SOURCES[dataset].title} copy has no train or no test images", "")
    if dataset == "cifar10":
        arrays = {
            "x_train": x_train,
            "y_train": lab_train["labels"],
            "x_test": x_test,
            "y_test": lab_test["labels"],
        }
        names: dict[str, Any] = {"class_names": meta["label_names"]}
    else:
        arrays = {
            "x_train": x_train,
            "y_train": lab_train["fine_labels"],
            "coarse_train": lab_train["coarse_labels"],
            "x_test": x_test,
            "y_test": lab_test["fine_labels"],
            "coarse_test": lab_test["coarse_labels"],
        }
        fine = np.concatenate([arrays["y_train"], arrays["y_test"]])
        coarse = np.concatenate([arrays["coarse_train"], arrays["coarse_test"]])
        fine_to_coarse = np.full(100, -1, dtype=np.int64)
        for f in np.unique(fine):
            parents = np.unique(coarse[fine == f])
            if len(parents) != 1:
                raise MlvarError(
                    f"CIFAR-100 fine class {int(f)} has several coarse labels", _FORMAT_HINT
                )
            fine_to_coarse[f] = parents[0]
        names = {
            "fine_names": meta["fine_label_names"],
            "coarse_names": meta["coarse_label_names"],
            "fine_to_coarse": fine_to_coarse.tolist(),
        }
    return {"arrays": arrays, "names": names}


def read_archive(dataset: str, path: Path) -> tuple[Layout, Parsed]:
    parsed = Parsed()
    wanted, handle = _member_handler(dataset, parsed)
    archives.read_tar_members(path, lambda name: name in wanted, handle)
    return _complete_layout(dataset, set(parsed.md5), str(path)), parsed


def find_folder(dataset: str, folder: Path) -> tuple[str, Path] | None:
    """A layout folder at ``folder`` itself or directly inside it: ``(layout folder, path)``."""
    for layout in SOURCES[dataset].layouts.values():
        for candidate in (folder, folder / layout.folder):
            first = layout.files()[0][0]
            if (candidate / first).is_file():
                return layout.folder, candidate
    return None


def read_folder(dataset: str, folder: str, path: Path) -> tuple[Layout, Parsed]:
    parsed = Parsed()
    wanted, handle = _member_handler(dataset, parsed)
    for name in sorted(wanted):
        top, _, file = name.partition("/")
        if top != folder or not (path / file).is_file():
            continue
        try:
            data = (path / file).read_bytes()
        except OSError as exc:
            raise MlvarError(f"cannot read {path / file}: {exc.strerror or exc}", "") from None
        handle(name, data)
    return _complete_layout(dataset, set(parsed.md5), str(path)), parsed
