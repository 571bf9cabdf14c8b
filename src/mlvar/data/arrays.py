"""The shared array store of a data root: ``<data_root>/shared/<sha256>.npy``.

Scenarios of one source share the data they leave unchanged (docs/datasets.md, "How
scenarios are stored"): each ``.npy`` file here is named by the sha256 of its bytes, so it
is written once however many scenarios read it, two prepares of the same content write
the same file, and a scenario's manifest, which lists the sha256 of every array it reads,
changes whenever the data it yields changes.

What lands here: a dataset's source arrays (the images or features by source position,
hard-linked from the fetched ``raw/`` files where they are whole ``.npy`` files, so they
cost no disk of their own), and the rows a scenario changed (grayscale images, a test
set made gray, COMPAS features with the artificial column). A file is verified against
its name the first time a process reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.errors import MlvarError
from mlvar.io import atomic_write_bytes, npy_bytes, sha256_file

SHARED_DIR = "shared"

#: (device, inode, size, mtime) of each file this process checked -> its sha256, so a file
#: read by several splits (or linked under two names) is hashed once.
_CHECKED: dict[tuple[int, int, int, int], str] = {}


def shared_dir(data_root: str | os.PathLike) -> Path:
    """The shared array folder of a data root."""
    return Path(data_root) / SHARED_DIR


@dataclass(frozen=True)
class ArrayRef:
    """One stored array as a manifest lists it: content hash, dtype, shape, file size and
    what it holds (for people reading the manifest)."""

    sha256: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    what: str = ""

    @property
    def file_name(self) -> str:
        return f"{self.sha256}.npy"

    def path(self, data_root: str | os.PathLike) -> Path:
        return shared_dir(data_root) / self.file_name

    def describe(self) -> str:
        """``uint8 1797x8x8x1``."""
        return f"{np.dtype(self.dtype).name} {'x'.join(str(n) for n in self.shape)}"

    def manifest(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "bytes": self.size,
            "what": self.what,
        }

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> ArrayRef:
        return cls(
            sha256=str(entry["sha256"]),
            dtype=str(entry["dtype"]),
            shape=tuple(int(n) for n in entry["shape"]),
            size=int(entry["bytes"]),
            what=str(entry.get("what", "")),
        )


def _key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, computed once per process for an unchanged file."""
    path = Path(path)
    key = _key(path)
    if key not in _CHECKED:
        _CHECKED[key] = sha256_file(path)
    return _CHECKED[key]


def store_array(data_root: str | os.PathLike, array: np.ndarray, what: str) -> ArrayRef:
    """Store ``array`` (as ``.npy`` bytes) in the shared folder unless it is there already;
    return its reference."""
    data = npy_bytes(array)
    sha = hashlib.sha256(data).hexdigest()
    ref = ArrayRef(sha, array.dtype.str, tuple(array.shape), len(data), what)
    if not _stored(data_root, ref):
        atomic_write_bytes(ref.path(data_root), data)
    return ref


def _stored(data_root: str | os.PathLike, ref: ArrayRef) -> bool:
    """``ref`` is in the shared folder, intact (a damaged file is written again)."""
    target = ref.path(data_root)
    return (
        target.is_file()
        and target.stat().st_size == ref.size
        and (file_sha256(target) == ref.sha256)
    )


_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def whole_npy_file(array: Any) -> Path | None:
    """The ``.npy`` file ``array`` memory-maps in full (as ``numpy.load(mmap_mode='r')``
    returns it), or None for any other array (in memory, a slice, a reshaped view)."""
    if not isinstance(array, np.memmap) or not array.filename:
        return None
    path = Path(array.filename)
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                return None
            shape, fortran, dtype = read_header(fh)
            header = fh.tell()
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    same = (
        tuple(shape) == array.shape
        and dtype == array.dtype
        and not fortran
        and array.flags.c_contiguous
        and array.offset == header
        and size == header + array.nbytes
    )
    return path if same else None


def store_source_array(data_root: str | os.PathLike, array: Any, what: str) -> ArrayRef:
    """Store a source array: a memory-mapped whole ``.npy`` file is hard-linked (copied
    where links are not possible) under its sha256; any other array is written."""
    path = whole_npy_file(array)
    if path is None:
        return store_array(data_root, np.ascontiguousarray(array), what)
    ref = ArrayRef(
        file_sha256(path), array.dtype.str, tuple(array.shape), path.stat().st_size, what
    )
    if _stored(data_root, ref):
        return ref
    target = ref.path(data_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            atomic_write_bytes(tmp, path.read_bytes())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return ref


def open_array(data_root: str | os.PathLike, ref: ArrayRef, scenario: str) -> np.ndarray:
    """The stored array ``ref`` (memory-mapped), checked against its sha256, dtype and shape.

    Raises
    ------
    MlvarError
        The file is missing, or is not the data the scenario was prepared with.
    """
    path = ref.path(data_root)
    what = f" ({ref.what})" if ref.what else ""
    if not path.is_file():
        raise MlvarError(
            f"scenario '{scenario}' reads the shared array {path}{what}, which is missing",
            f"prepare the scenario again with --force; a scenario folder copied alone needs "
            f"its data root's {SHARED_DIR}/ folder too",
        )
    try:
        same = path.stat().st_size == ref.size and file_sha256(path) == ref.sha256
        array = np.load(path, mmap_mode="r", allow_pickle=False) if same else None
    except (OSError, ValueError) as exc:
        raise MlvarError(
            f"cannot read the shared array {path}: {exc}", "prepare the scenario again with --force"
        ) from None
    if array is None or array.dtype.str != ref.dtype or tuple(array.shape) != ref.shape:
        raise MlvarError(
            f"the shared array {path}{what} of scenario '{scenario}' is not the data it was "
            f"prepared with (its sha256 differs)",
            "prepare the scenario again with --force",
        )
    return array


def missing_arrays(data_root: str | os.PathLike, refs: Iterable[ArrayRef]) -> list[Path]:
    """The arrays of ``refs`` that are not in the shared folder at their size (no hashing)."""
    out = []
    for ref in refs:
        path = ref.path(data_root)
        if not (path.is_file() and path.stat().st_size == ref.size):
            out.append(path)
    return out


def link_arrays(folder: Path, files: Iterable[str | os.PathLike]) -> None:
    """Make ``folder`` a shared array folder holding ``files`` (symbolic links named by each
    file's sha256, whatever the file is called): how a job assembles a data root from input
    mounts."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        src = Path(file).resolve()
        link = folder / f"{file_sha256(src)}.npy"
        if not link.exists():
            link.symlink_to(src)


class SourceRows:
    """A dataset's source arrays (its samples by source position, in ``parts`` laid end to
    end) as shared arrays: which part and row of the source each row of a split equals.

    Parts are stored on first use, so a sweep stores (or links) each once.
    """

    #: rows compared at a time (bounds the memory of :meth:`match`)
    CHUNK_BYTES = 1 << 25

    def __init__(
        self, data_root: str | os.PathLike, parts: Sequence[Any], ids: np.ndarray, what: str
    ) -> None:
        self.data_root = Path(data_root)
        self.parts = list(parts)
        lengths = [len(part) for part in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.ids = np.asarray(ids)
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        self.what = what
        self._refs: dict[int, ArrayRef] = {}

    def ref(self, part: int) -> ArrayRef:
        """Part ``part`` of the source, stored in the shared folder (once)."""
        if part not in self._refs:
            n = len(self.parts)
            what = self.what if n == 1 else f"{self.what}, part {part + 1} of {n}"
            self._refs[part] = store_source_array(self.data_root, self.parts[part], what)
        return self._refs[part]

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """The source position of the sample with each id (-1 for an id not in the source)."""
        ids = np.asarray(ids)
        if not len(self._sorted):
            return np.full(len(ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        found = self._sorted[at] == ids
        return np.where(found, self._order[at], -1).astype(np.int64)

    def match(self, x: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row of ``x``: the part and row of the source it equals byte for byte,
        tried at ``candidates`` (source positions, -1 for none); part -1 where it equals
        none (a row the scenario changed)."""
        n = len(x)
        part = np.full(n, -1, dtype=np.int64)
        row = np.zeros(n, dtype=np.int64)
        candidates = np.asarray(candidates, dtype=np.int64)
        for k, source in enumerate(self.parts):
            if source.dtype != x.dtype or tuple(source.shape[1:]) != tuple(x.shape[1:]):
                continue
            lo, hi = self.starts[k], self.starts[k + 1]
            rows = np.flatnonzero((candidates >= lo) & (candidates < hi))
            step = max(1, self.CHUNK_BYTES // max(1, x[:1].nbytes))
            for start in range(0, len(rows), step):
                at = rows[start : start + step]
                want = candidates[at] - lo
                got = np.ascontiguousarray(source[want]).reshape(len(at), -1).view(np.uint8)
                mine = np.ascontiguousarray(x[at]).reshape(len(at), -1).view(np.uint8)
                same = (got == mine).all(axis=1)
                part[at[same]] = k
                row[at[same]] = want[same]
        return part, row
