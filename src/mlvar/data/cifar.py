"""CIFAR-10 and CIFAR-100: fetch the official archive and keep its images as plain arrays.

Fetching (``mlvar data fetch cifar10|cifar100``) downloads the official archive into
``<data_root>/raw/`` (resuming a ``.part`` file left by an interrupted download), checks the
published md5, reads the batches straight out of the tar (every member checked, nothing
extracted, pickles read by :class:`mlvar.data.archives.RestrictedUnpickler`; see
:mod:`mlvar.data.cifar_archive`) and writes the images once as plain arrays to
``<data_root>/raw/<dataset>/``: ``x_train.npy`` (uint8 NHWC), ``y_train.npy``,
``x_test.npy``, ``y_test.npy`` (CIFAR-100: fine labels, plus
``coarse_train.npy``/``coarse_test.npy``) and ``source.json`` (checksums, format, names).
``--source`` takes the archive or an extracted folder (torchvision's layout included).

The scenarios (:mod:`mlvar.data.cifar10`, :mod:`mlvar.data.cifar100`) are built from those
arrays. Sample ids: train images are numbered 0..49999 in the order of the concatenated
train batches, test images 50000 + their index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data import archives
from mlvar.data.cifar_archive import (
    IMAGE_SHAPE,
    SOURCES,
    CifarSource,
    Layout,
    Parsed,
    assemble,
    find_folder,
    read_archive,
    read_folder,
)
from mlvar.data.spec import BaseData
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import dumps_json, staging_dir

__all__ = ["IMAGE_SHAPE", "SOURCES", "CifarSource", "Layout", "fetch_cifar", "load_raw"]

VAL_SIZE = 0.1
SPLIT_SEED = 69
TEST_ID_OFFSET = 50_000
MAX_VALUE = 255

RAW_ARRAYS = {
    "cifar10": ("x_train", "y_train", "x_test", "y_test"),
    "cifar100": ("x_train", "y_train", "coarse_train", "x_test", "y_test", "coarse_test"),
}


def raw_dir(data_root: str | os.PathLike, dataset: str) -> Path:
    """Folder of a fetched dataset's arrays: ``<data_root>/raw/<dataset>/``."""
    return Path(data_root) / "raw" / dataset


def _fetch_hint(dataset: str) -> str:
    return f"run 'mlvar data fetch {dataset}' (or --source ARCHIVE_OR_DIR)"


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
    created = archives.missing_dirs(raw)
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
            layout, parsed = read_archive(dataset, read_from)
            files_sha = None
        else:
            src = Path(source).expanduser()
            origin = str(src)
            if not src.exists():
                raise MlvarError(
                    f"source {src} not found", f"pass {spec.filename} or its extracted folder"
                )
            found = find_folder(dataset, src) if src.is_dir() else None
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
                layout, parsed = read_archive(dataset, src)
                files_sha = None
            else:
                action = "read folder"
                layout, parsed = read_folder(dataset, found[0], found[1])
                if verify:
                    _verify_files(spec, layout, parsed, origin)
                md5 = None
                # One checksum for the folder: sha256 of its sha256sum listing.
                listing = "".join(f"{parsed.sha256[p]}  {p}\n" for p in layout.paths())
                sha256 = hashlib.sha256(listing.encode()).hexdigest()
                files_sha = {p: parsed.sha256[p] for p in layout.paths()}
        assembled = assemble(dataset, layout, parsed)
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


def _verify_files(spec: CifarSource, layout: Layout, parsed: Parsed, origin: str) -> None:
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

    try:
        source = json.loads(file.read_text())
        loaded = {}
        if arrays:
            for name in RAW_ARRAYS[dataset]:
                loaded[name] = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MlvarError(f"{title} data in {folder} is damaged: {exc}", "fetch it again") from None
    return RawCifar(arrays=loaded, source=source)


# ------------------------------------------------------------------ shared by the scenarios


def source_manifest(raw: RawCifar, dataset: str) -> dict[str, Any]:
    """The manifest's ``source``: the fetched copy's checksums and counts."""
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


def split_train(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation positions (10%, ``random_state=69``), each in original order."""
    train, val = study_split(positions)
    return np.sort(train), np.sort(val)


def study_split(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same split in the order ``train_test_split`` gives it (shuffled), as the study
    kept it."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(positions, test_size=VAL_SIZE, random_state=SPLIT_SEED)
    return np.asarray(train), np.asarray(val)


def sample_ids(n_train: int, n_test: int) -> np.ndarray:
    """Train images 0..n_train-1, test images ``max(50000, n_train)`` + their index."""
    offset = max(TEST_ID_OFFSET, n_train)
    return np.concatenate(
        [np.arange(n_train, dtype=np.int64), offset + np.arange(n_test, dtype=np.int64)]
    )


class TrainTest:
    """Train and test image arrays indexed as one (positions >= n_train are test images),
    without concatenating the (memory-mapped) arrays."""

    def __init__(self, train: np.ndarray, test: np.ndarray) -> None:
        self.train, self.test = train, test
        self.n = len(train)

    @property
    def parts(self) -> list[np.ndarray]:
        """The arrays it indexes, in position order (the fetched ``.npy`` memory maps)."""
        return [self.train, self.test]

    def __getitem__(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos)
        if len(pos) and pos.min() >= self.n:
            return np.ascontiguousarray(self.test[pos - self.n])
        if len(pos) and pos.max() >= self.n:
            raise IndexError("mixed train and test positions")
        return np.ascontiguousarray(self.train[pos])


def scenario_base(
    raw: RawCifar,
    dataset: str,
    labels: np.ndarray,
    groups: np.ndarray,
    index: dict[str, np.ndarray],
    class_names: list[str],
    order: str,
    split: dict[str, Any],
    manifest: dict[str, Any],
) -> BaseData:
    """The samples of a fetched copy as every CIFAR scenario reads them: the train and test
    images as one view, sample ids, and the manifest entries all CIFAR scenarios share
    (``source``, ``class_names``, ``input``, ``ids``, ``split``) with ``manifest`` added.

    ``labels``/``groups`` are by position (train images, then test images); ``order``
    names the order of the train images (``batch``, ``file``); ``split`` completes the split
    recipe.
    """
    n_train, n_test = raw.n_train, len(raw.arrays["y_test"])
    entries = {
        "source": source_manifest(raw, dataset),
        "class_names": class_names,
        "input": {"kind": "image", "shape": list(IMAGE_SHAPE), "max_value": MAX_VALUE},
        "ids": f"train images 0..n-1 in {order} order, test images "
        f"{max(TEST_ID_OFFSET, n_train)} + index",
        "split": {"val_size": VAL_SIZE, "random_state": SPLIT_SEED, "stratify": None, **split},
        **manifest,
    }
    return BaseData(
        x=TrainTest(raw.arrays["x_train"], raw.arrays["x_test"]),
        y=labels,
        ids=sample_ids(n_train, n_test),
        groups=groups,
        index=index,
        class_names=class_names,
        manifest=entries,
    )
