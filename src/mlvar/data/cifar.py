"""CIFAR-10 and CIFAR-100 (as 10 superclasses): fetch, parse safely, prepare scenarios.

Fetching (``mlvar data fetch cifar10|cifar100``) downloads the official archive into
``<data_root>/raw/`` (resuming a ``.part`` file left by an interrupted download), checks the
published md5, reads the batches straight out of the tar (every member checked, nothing
extracted, pickles read by :class:`mlvar.data.archives.RestrictedUnpickler`) and writes the
images once as plain arrays to ``<data_root>/raw/<dataset>/``: ``x_train.npy`` (uint8 NHWC),
``y_train.npy``, ``x_test.npy``, ``y_test.npy`` (CIFAR-100: fine labels, plus
``coarse_train.npy``/``coarse_test.npy``) and ``source.json`` (checksums, format, names).
``--source`` takes the archive or an extracted folder (torchvision's layout included).

Scenarios (docs/design.md section 4) are built from those arrays; see :mod:`mlvar.data.images` for
the CIFAR-10 class modes. Sample ids: train images are numbered 0..49999 in the order of the
concatenated train batches, test images 50000 + their index.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from mlvar.data import archives, images
from mlvar.data.compas import _missing_dirs, check_ratio, format_ratio
from mlvar.data.scenario import Scenario, SplitData, write_scenario
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import dumps_json, staging_dir

IMAGE_SHAPE = (32, 32, 3)
FLAT = 32 * 32 * 3
VAL_SIZE = 0.1
SPLIT_SEED = 69
TEST_ID_OFFSET = 50_000
MAX_VALUE = 255

CIFAR10_MODES = ("original", *images.CLASS_MODES)
CIFAR100_MODES = ("original", "holdout")

#: The 10 CIFAR-100 superclasses of the original "cifar100-cifar10" setup, in label order.
KEPT_SUPERCLASSES = (
    "aquatic_mammals",
    "fish",
    "flowers",
    "fruit_and_vegetables",
    "insects",
    "medium_mammals",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
)
#: The subclasses of the original study.
STUDY_SUBCLASSES = (
    "ray",
    "mushroom",
    "caterpillar",
    "porcupine",
    "baby",
    "boy+man",
    "girl+woman",
    "boy+girl",
    "man+woman",
)


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

RAW_ARRAYS = {
    "cifar10": ("x_train", "y_train", "x_test", "y_test"),
    "cifar100": ("x_train", "y_train", "coarse_train", "x_test", "y_test", "coarse_test"),
}


def raw_dir(data_root: str | os.PathLike, dataset: str) -> Path:
    """Folder of a fetched dataset's arrays: ``<data_root>/raw/<dataset>/``."""
    return Path(data_root) / "raw" / dataset


def _fetch_hint(dataset: str) -> str:
    return f"run 'mlvar data fetch {dataset}' (or --source ARCHIVE_OR_DIR)"


# --------------------------------------------------------------------------- parsing


@dataclass
class _Parsed:
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


def _member_handler(dataset: str, parsed: _Parsed) -> tuple[set[str], Callable[[str, bytes], None]]:
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


def _assemble(dataset: str, layout: Layout, parsed: _Parsed) -> dict[str, Any]:
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


def _read_archive(dataset: str, path: Path) -> tuple[Layout, _Parsed]:
    parsed = _Parsed()
    wanted, handle = _member_handler(dataset, parsed)
    archives.read_tar_members(path, lambda name: name in wanted, handle)
    return _complete_layout(dataset, set(parsed.md5), str(path)), parsed


def _find_folder(dataset: str, folder: Path) -> tuple[str, Path] | None:
    """A layout folder at ``folder`` itself or directly inside it: ``(layout folder, path)``."""
    for layout in SOURCES[dataset].layouts.values():
        for candidate in (folder, folder / layout.folder):
            first = layout.files()[0][0]
            if (candidate / first).is_file():
                return layout.folder, candidate
    return None


def _read_folder(dataset: str, folder: str, path: Path) -> tuple[Layout, _Parsed]:
    parsed = _Parsed()
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


# --------------------------------------------------------------------------- fetching


def _mismatch(spec: CifarSource, origin: str, md5: str) -> MlvarError:
    expected = " or ".join(f"{m} ({f})" for f, (_, m) in spec.archives.items())
    return MlvarError(
        f"checksum mismatch for {origin}: md5 {md5}, expected {expected}",
        f"use the unmodified archive from {spec.url}, or skip the check with --no-verify",
    )


def fetch_cifar(
    data_root: str | os.PathLike,
    dataset: str,
    source: str | os.PathLike | None = None,
    verify: bool = True,
    progress: archives.Progress | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """Fetch CIFAR-10 or CIFAR-100 into ``<data_root>/raw/``.

    Parameters
    ----------
    data_root
        Data root; the archive goes to ``raw/`` and the arrays to ``raw/<dataset>/``.
    dataset
        ``cifar10`` or ``cifar100``.
    source
        A local archive (``.tar.gz``) or extracted folder (the batches folder or the folder
        holding it, as torchvision lays it out) to use instead of downloading.
    verify
        Check the published md5 (of the archive, or of each batch file of a python folder).
    progress
        ``progress(done_bytes, total_bytes_or_None)`` during the download or copy.
    url
        Download from here instead of the official URL (tests use ``file://``).

    Returns
    -------
    dict
        ``dataset``, ``path``, ``format``, ``md5``, ``sha256``, ``train``/``test`` counts,
        ``verified``, ``source``, ``action`` (and ``warning`` when not verified).

    Raises
    ------
    MlvarError
        Download failure (a ``.part`` file stays so the next call resumes), checksum
        mismatch, or an archive that is not CIFAR or is unsafe. Apart from a ``.part`` file
        of an interrupted download, a failure leaves the data root as it was.
    """
    if dataset not in SOURCES:
        raise unknown_choice("CIFAR dataset", str(dataset), SOURCES)
    spec = SOURCES[dataset]
    root = Path(data_root)
    raw = root / "raw"
    created = _missing_dirs(raw)
    part: Path | None = None
    downloading = False
    keep_archive: tuple[Path, Path] | None = None
    archive_name: str | None = None
    try:
        if source is None:
            origin = url or spec.url
            archive = raw / spec.filename
            archive_name = spec.filename
            if archive.is_file():
                action = "reused downloaded archive"
                md5, sha256 = archives.file_digests(archive)
                read_from = archive
            else:
                raw.mkdir(parents=True, exist_ok=True)
                part = raw / f"{spec.filename}.part"
                action = "resumed download" if part.exists() else "downloaded"
                downloading = True
                md5, sha256 = archives.download(origin, part, progress)
                downloading = False
                read_from = part
                keep_archive = (part, archive)
            fmt_md5 = {m: f for f, (_, m) in spec.archives.items()}
            if verify and md5 not in fmt_md5:
                error = _mismatch(spec, origin, md5)
                if part is None:  # a previously downloaded archive that no longer matches
                    error = MlvarError(
                        error.message.replace(origin, str(archive), 1),
                        f"delete {archive} to download it again, or skip the check with "
                        "--no-verify",
                    )
                raise error
            layout, parsed = _read_archive(dataset, read_from)
            files_sha = None
        else:
            src = Path(source).expanduser()
            origin = str(src)
            if not src.exists():
                raise MlvarError(
                    f"source {src} not found", f"pass {spec.filename} or its extracted folder"
                )
            found = _find_folder(dataset, src) if src.is_dir() else None
            if src.is_dir() and found is None:
                inner = [src / name for name, _ in spec.archives.values() if (src / name).is_file()]
                if not inner:
                    raise MlvarError(
                        f"{src} holds no {spec.title} batches folder or archive",
                        f"pass {spec.filename} or the folder that holds "
                        + " / ".join(lay.folder for lay in spec.layouts.values()),
                    )
                src = inner[0]
                origin = str(src)
            if found is None:
                action = "read archive"
                archive_name = src.name
                total = src.stat().st_size
                md5, sha256 = archives.file_digests(src)
                if progress is not None:
                    progress(total, total)
                if verify and md5 not in {m for _, m in spec.archives.values()}:
                    raise _mismatch(spec, origin, md5)
                layout, parsed = _read_archive(dataset, src)
                files_sha = None
            else:
                action = "read folder"
                layout, parsed = _read_folder(dataset, found[0], found[1])
                if verify:
                    _verify_files(spec, layout, parsed, origin)
                md5 = None
                # One checksum for the folder: sha256 of its sha256sum listing.
                listing = "".join(f"{parsed.sha256[p]}  {p}\n" for p in layout.paths())
                sha256 = hashlib.sha256(listing.encode()).hexdigest()
                files_sha = {p: parsed.sha256[p] for p in layout.paths()}
        assembled = _assemble(dataset, layout, parsed)
        del parsed
        arrays = assembled["arrays"]
        info = {
            "dataset": dataset,
            "format": layout.format,
            "origin": origin,
            "archive": archive_name,
            "md5": md5,
            "sha256": sha256,
            "files_sha256": files_sha,
            "verified": bool(verify),
            "train": int(len(arrays["x_train"])),
            "test": int(len(arrays["x_test"])),
            **assembled["names"],
        }
        target = raw_dir(root, dataset)
        with staging_dir(target, replace=True) as tmp:
            for name, array in arrays.items():
                _save_npy(tmp / f"{name}.npy", array)
            (tmp / "source.json").write_text(dumps_json(info))
        if keep_archive is not None:
            os.replace(*keep_archive)
    except BaseException as exc:
        # A failed or interrupted download keeps its .part file so the next call resumes; a
        # complete one that failed its checks is removed, and so are the folders this call
        # created.
        if part is not None and not downloading and isinstance(exc, MlvarError):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        _cleanup(created)
        raise
    out = {
        "dataset": dataset,
        "path": str(target),
        "format": layout.format,
        "md5": md5,
        "sha256": sha256,
        "train": info["train"],
        "test": info["test"],
        "verified": bool(verify),
        "source": origin,
        "action": action,
    }
    if not verify:
        out["warning"] = (
            f"checksum not verified (--no-verify): scenarios from this {spec.title} copy may "
            "differ from the published dataset"
        )
    return out


def _cleanup(created: list[Path]) -> None:
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _verify_files(spec: CifarSource, layout: Layout, parsed: _Parsed, origin: str) -> None:
    known = {f"{layout.folder}/{name}": md5 for name, md5 in layout.files()}
    if any(md5 is None for md5 in known.values()):
        raise MlvarError(
            f"cannot verify the extracted {layout.folder} folder {origin}: no published "
            "checksums for its files",
            f"pass the {layout.format} archive instead, or skip the check with --no-verify",
        )
    for path, md5 in known.items():
        if parsed.md5[path] != md5:
            raise MlvarError(
                f"checksum mismatch for {path} in {origin}: md5 {parsed.md5[path]}, expected {md5}",
                f"use an unmodified copy of {spec.filename}, or skip the check with --no-verify",
            )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o644)


# --------------------------------------------------------------------------- raw data


@dataclass
class RawCifar:
    """A fetched dataset: arrays (memory-mapped) and its ``source.json``."""

    arrays: dict[str, np.ndarray]
    source: dict[str, Any]

    @property
    def n_train(self) -> int:
        return int(len(self.arrays["y_train"]))


def load_raw(data_root: str | os.PathLike, dataset: str, arrays: bool = True) -> RawCifar:
    """Open ``<data_root>/raw/<dataset>/``; raise :class:`MlvarError` if it is not fetched."""
    folder = raw_dir(data_root, dataset)
    title = SOURCES[dataset].title
    file = folder / "source.json"
    if not file.is_file():
        raise MlvarError(f"{title} data not found in {folder}", _fetch_hint(dataset))
    import json

    try:
        source = json.loads(file.read_text())
        loaded = {}
        if arrays:
            for name in RAW_ARRAYS[dataset]:
                loaded[name] = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MlvarError(f"{title} data in {folder} is damaged: {exc}", "fetch it again") from None
    return RawCifar(arrays=loaded, source=source)


def _source_manifest(raw: RawCifar, dataset: str) -> dict[str, Any]:
    s = raw.source
    return {
        "name": SOURCES[dataset].title,
        "url": SOURCES[dataset].url,
        "archive": s.get("archive"),
        "format": s.get("format"),
        "md5": s.get("md5"),
        "sha256": s.get("sha256"),
        "verified": s.get("verified"),
        "train_images": s.get("train"),
        "test_images": s.get("test"),
    }


def _split_train(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation positions (10%, ``random_state=69``), each in original order."""
    train, val = train_test_split(positions, test_size=VAL_SIZE, random_state=SPLIT_SEED)
    return np.sort(np.asarray(train)), np.sort(np.asarray(val))


def _ids(n_train: int, n_test: int) -> np.ndarray:
    offset = max(TEST_ID_OFFSET, n_train)
    return np.concatenate(
        [np.arange(n_train, dtype=np.int64), offset + np.arange(n_test, dtype=np.int64)]
    )


def _exists(data_root: Path, name: str, force: bool) -> None:
    if (data_root / name).exists() and not force:
        raise MlvarError(
            f"scenario '{name}' already exists in {data_root}", "pass --force to rebuild it"
        )


# --------------------------------------------------------------------------- CIFAR-10


def prepare_cifar10(
    data_root: str | os.PathLike,
    mode: str = "original",
    cls: int | str | None = None,
    ratio: float | None = None,
    seed: int = 0,
    force: bool = False,
) -> Scenario:
    """Prepare a CIFAR-10 scenario from the fetched arrays.

    Parameters
    ----------
    mode
        ``original``, ``holdout``, ``holdout-dup``, ``augmentation`` or ``augmentation-all``.
    cls
        Target class 0-9 (default 0, airplane); not for ``original``/``augmentation-all``.
    ratio
        Fraction in [0, 1] of the class's training samples affected (required by the class
        modes; below 1 for ``holdout-dup``).
    seed
        Seed of the copies' draw (``holdout-dup`` only).
    force
        Replace an existing scenario folder.
    """
    data_root = Path(data_root)
    if mode not in CIFAR10_MODES:
        raise unknown_choice("cifar10 mode", str(mode), CIFAR10_MODES)
    cls_i, ratio_f, seed_i = images.check_class_mode("cifar10", mode, cls, ratio, seed, 10)
    name = images.class_mode_name("cifar10", mode, cls_i, ratio_f, seed_i)
    _exists(data_root, name, force)
    raw = load_raw(data_root, "cifar10")
    class_names = list(raw.source["class_names"])
    a = raw.arrays
    n_train = raw.n_train
    images_all = _Concat(a["x_train"], a["x_test"])
    labels = np.concatenate([a["y_train"], a["y_test"]]).astype(np.int64)
    ids = _ids(n_train, len(a["y_test"]))
    groups = np.full(len(labels), -1, dtype=np.int64)
    train, val = _split_train(np.arange(n_train))
    index = {"train": train, "val": val, "test": n_train + np.arange(len(a["y_test"]))}
    extra: dict[str, Any] = {}
    if mode == "original":
        splits = {
            s: SplitData(
                x=images_all[pos],
                y=labels[pos],
                id=ids[pos],
                affected=np.zeros(len(pos), bool),
                group=groups[pos],
            )
            for s, pos in index.items()
        }
    else:
        splits, info = images.class_mode_splits(
            images_all,
            labels,
            ids,
            groups,
            index,
            mode,
            cls_i,
            ratio_f or 0.0,
            seed_i,
            images.grayscale,
            10,
        )
        extra["change"] = {
            "mode": mode,
            "target_class": cls_i,
            "appearance": "3-channel grayscale, ITU-R 601-2 luma as PIL convert('L')"
            if mode in images.APPEARANCE_MODES
            else None,
            **info,
        }
        if mode in images.APPEARANCE_MODES:
            extra["test_gray"] = "the test split converted to 3-channel grayscale"
    params: dict[str, Any] = {}
    if cls_i is not None:
        params["cls"] = cls_i
    if ratio_f is not None:
        params["ratio"] = ratio_f
    if mode == "holdout-dup":
        params["seed"] = seed_i
    manifest = {
        "dataset": "cifar10",
        "mode": mode,
        "params": params,
        "description": images.class_mode_description(
            mode, class_names[cls_i] if cls_i is not None else None, ratio_f, "grayscale", seed_i
        ),
        "source": _source_manifest(raw, "cifar10"),
        "class_names": class_names,
        "input": {"kind": "image", "shape": list(IMAGE_SHAPE), "max_value": MAX_VALUE},
        "group": None,
        "ids": f"train images 0..n-1 in batch order, test images {max(TEST_ID_OFFSET, n_train)}"
        " + index",
        "split": {
            "val_size": VAL_SIZE,
            "random_state": SPLIT_SEED,
            "stratify": None,
            "test": "the official test batch",
        },
        **extra,
    }
    return write_scenario(data_root, name, manifest, splits, force=force)


class _Concat:
    """Train and test image arrays indexed as one (positions >= n_train are test images),
    without concatenating the (memory-mapped) arrays."""

    def __init__(self, train: np.ndarray, test: np.ndarray) -> None:
        self.train, self.test = train, test
        self.n = len(train)

    def __getitem__(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos)
        if len(pos) and pos.min() >= self.n:
            return np.ascontiguousarray(self.test[pos - self.n])
        if len(pos) and pos.max() >= self.n:
            raise IndexError("mixed train and test positions")
        return np.ascontiguousarray(self.train[pos])


# --------------------------------------------------------------------------- CIFAR-100


def parse_subclasses(value: Any, raw_source: dict[str, Any]) -> list[int]:
    """Fine-class indices of ``NAME[+NAME...]``, sorted; each must belong to a kept superclass.

    Raises
    ------
    MlvarError
        An unknown name, one of a dropped superclass, or a repeated name; the hint lists
        close valid names.
    """
    fine_names: list[str] = list(raw_source["fine_names"])
    coarse_names: list[str] = list(raw_source["coarse_names"])
    fine_to_coarse: list[int] = list(raw_source["fine_to_coarse"])
    kept = {coarse_names.index(c) for c in KEPT_SUPERCLASSES if c in coarse_names}
    valid = [f for i, f in enumerate(fine_names) if fine_to_coarse[i] in kept]
    if not isinstance(value, str) or not value.strip():
        raise MlvarError(
            f"cifar100 subclass {value!r} is not a fine class name",
            "e.g. --subclass baby or --subclass boy+man",
        )
    out = []
    for part in value.split("+"):
        name = part.strip()
        near = _near(name, valid)
        if name not in fine_names:
            raise MlvarError(f"unknown CIFAR-100 fine class '{name}'", near)
        idx = fine_names.index(name)
        parent = fine_to_coarse[idx]
        if parent not in kept:
            owner = coarse_names[parent] if parent >= 0 else "none in this copy"
            raise MlvarError(
                f"CIFAR-100 fine class '{name}' belongs to superclass '{owner}', which the "
                "10-superclass setup drops",
                near,
            )
        if idx in out:
            raise MlvarError(f"cifar100 subclass '{name}' is given twice", "e.g. boy+man")
        out.append(idx)
    return sorted(out)


def _near(name: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    if close:
        return "close valid names: " + ", ".join(close)
    return "valid names: " + ", ".join(sorted(valid))


def prepare_cifar100(
    data_root: str | os.PathLike,
    mode: str | None = None,
    subclass: str | None = None,
    ratio: float | None = None,
    force: bool = False,
) -> Scenario:
    """Prepare a CIFAR-100 10-superclass scenario (``original`` or ``holdout``).

    ``holdout`` (the default when ``subclass`` is given) removes the first ``floor(ratio *
    count)`` samples of each named fine class from train and from validation (each split
    separately, in original order; ``ratio`` defaults to 1.0). The test split is untouched;
    its samples of the named fine classes are the affected ones. ``group`` is the fine class.
    """
    data_root = Path(data_root)
    if mode is None:
        mode = "holdout" if subclass is not None else "original"
    if mode not in CIFAR100_MODES:
        raise unknown_choice("cifar100 mode", str(mode), CIFAR100_MODES)
    if mode == "original":
        for option, value in (("subclass", subclass), ("ratio", ratio)):
            if value is not None:
                raise MlvarError(
                    f"cifar100 mode 'original' takes no --{option}", "use --mode holdout"
                )
    else:
        if subclass is None:
            raise MlvarError(
                "cifar100 mode 'holdout' needs --subclass",
                "e.g. --subclass baby or --subclass boy+man",
            )
        ratio = check_ratio(1.0 if ratio is None else ratio, 0.0, 1.0, "holdout")
    raw_meta = load_raw(data_root, "cifar100", arrays=False)
    source = raw_meta.source
    missing = [c for c in KEPT_SUPERCLASSES if c not in source["coarse_names"]]
    if missing:
        raise MlvarError(f"the CIFAR-100 copy lacks superclasses {', '.join(missing)}", "")
    subs = parse_subclasses(subclass, source) if mode == "holdout" else []
    fine_names = list(source["fine_names"])
    if mode == "original":
        name = "cifar100-original"
    else:
        name = f"cifar100-holdout-{'+'.join(fine_names[f] for f in subs)}-r{format_ratio(ratio)}"
    _exists(data_root, name, force)

    raw = load_raw(data_root, "cifar100")
    a = raw.arrays
    n_train, n_test = raw.n_train, len(a["y_test"])
    kept_idx = [source["coarse_names"].index(c) for c in KEPT_SUPERCLASSES]
    relabel = np.full(20, -1, dtype=np.int64)
    relabel[kept_idx] = np.arange(len(kept_idx))
    fine = np.concatenate([a["y_train"], a["y_test"]]).astype(np.int64)
    coarse = np.concatenate([a["coarse_train"], a["coarse_test"]]).astype(np.int64)
    labels = relabel[coarse]
    ids = _ids(n_train, n_test)
    kept_train = np.flatnonzero(labels[:n_train] >= 0)
    train, val = _split_train(kept_train)
    test = n_train + np.flatnonzero(labels[n_train:] >= 0)
    index = {"train": train, "val": val, "test": test}
    removed: dict[str, dict[str, int]] = {}
    if mode == "holdout":
        assert ratio is not None
        for s in ("train", "val"):
            pos = index[s]
            drop = []
            removed[s] = {}
            for f in subs:
                members = np.flatnonzero(fine[pos] == f)
                k = images.n_affected(ratio, len(members))
                removed[s][fine_names[f]] = int(k)
                drop.append(members[:k])
            index[s] = np.delete(pos, np.concatenate(drop))
    images_all = _Concat(a["x_train"], a["x_test"])
    sub_mask = np.isin(fine, subs)
    splits = {
        s: SplitData(
            x=images_all[pos],
            y=labels[pos],
            id=ids[pos],
            affected=sub_mask[pos] if s == "test" else np.zeros(len(pos), bool),
            group=fine[pos],
        )
        for s, pos in index.items()
    }
    sub_names = [fine_names[f] for f in subs]
    extra: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if mode == "holdout":
        params = {"subclass": "+".join(sub_names), "ratio": ratio}
        extra["holdout"] = {
            "subclasses": sub_names,
            "superclasses": sorted(
                {KEPT_SUPERCLASSES[int(relabel[source["fine_to_coarse"][f]])] for f in subs}
            ),
            "removed": removed,
            "rule": "first floor(ratio * count) samples of each fine class, in original order, "
            "from train and from validation separately",
        }
        extra["group_counts"] = images.group_counts(splits, subs, {f: fine_names[f] for f in subs})
        description = (
            f"Removed the first {ratio:.0%} of fine class {' and '.join(sub_names)} from train "
            f"and validation; affected rows are its test samples."
        )
    else:
        description = "CIFAR-100 as 10 superclasses, unchanged; nothing injected."
    manifest = {
        "dataset": "cifar100",
        "mode": mode,
        "params": params,
        "description": description,
        "source": _source_manifest(raw, "cifar100"),
        "class_names": list(KEPT_SUPERCLASSES),
        "superclasses": {
            "kept": list(KEPT_SUPERCLASSES),
            "coarse_index": kept_idx,
            "rule": "samples of the other 10 superclasses are dropped",
        },
        "fine_class_names": fine_names,
        "input": {"kind": "image", "shape": list(IMAGE_SHAPE), "max_value": MAX_VALUE},
        "group": "fine class (index into fine_class_names)",
        "ids": f"train images 0..n-1 in file order, test images {max(TEST_ID_OFFSET, n_train)}"
        " + index",
        "split": {
            "val_size": VAL_SIZE,
            "random_state": SPLIT_SEED,
            "stratify": None,
            "of": "the training images of the kept superclasses, before any holdout",
        },
        **extra,
    }
    return write_scenario(data_root, name, manifest, splits, force=force)
