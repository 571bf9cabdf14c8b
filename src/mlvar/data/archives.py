"""Safe handling of downloaded archives: resumable downloads with checksums, tar members
read without extraction (every member checked first), and a restricted unpickler.

Nothing here trusts the archive: a member with an absolute path, a ``..`` component, a link
or a device is refused; a pickle that references anything but the few numpy globals that
CIFAR's python batches need is refused (plain :mod:`pickle` would run arbitrary code).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from mlvar.errors import MlvarError

Progress = Callable[[int, int | None], None]

_CHUNK = 1 << 20

# --------------------------------------------------------------------------- hashing


@dataclass
class Digests:
    """md5 (the published CIFAR checksums) and sha256 (recorded in manifests) of a stream."""

    md5: Any = field(default_factory=hashlib.md5)
    sha256: Any = field(default_factory=hashlib.sha256)

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.sha256.update(chunk)

    def hex(self) -> tuple[str, str]:
        return self.md5.hexdigest(), self.sha256.hexdigest()


def file_digests(path: str | os.PathLike) -> tuple[str, str]:
    """Return ``(md5, sha256)`` of a file, read in chunks."""
    digests = Digests()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digests.update(chunk)
    return digests.hex()


def missing_dirs(folder: Path) -> list[Path]:
    """Folders from ``folder`` upwards that do not exist yet, deepest first (a failed fetch
    removes them, so it leaves the data root as it was)."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def copy_file(source: Path, out: BinaryIO, progress: Progress | None = None) -> str:
    """Copy ``source`` into the open file ``out`` in chunks; return its sha256."""
    digest = hashlib.sha256()
    total = source.stat().st_size
    done = 0
    try:
        with open(source, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except OSError as exc:
        raise MlvarError(
            f"cannot copy {source}: {exc.strerror or exc}", "check the path and free disk space"
        ) from None
    return digest.hexdigest()


# --------------------------------------------------------------------------- downloading


def download(
    url: str,
    part: Path,
    progress: Progress | None = None,
    timeout: float = 60,
    hint: str = "check the network and run the same command again to resume, or pass --source PATH",
) -> tuple[str, str]:
    """Download ``url`` into ``part``, resuming from the bytes already there.

    An existing ``part`` is continued with an HTTP ``Range`` request (``file://`` URLs seek);
    a server that ignores the range restarts the file from the beginning. On failure the
    partial file stays, so the same call can resume it later.

    Returns
    -------
    tuple
        ``(md5, sha256)`` of the complete file.
    """
    digests = Digests()
    done = 0
    if part.exists():
        with open(part, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digests.update(chunk)
                done += len(chunk)
    try:
        with _open_url(url, done, timeout) as (stream, start, total):
            if start != done:  # the server sent the whole file: start over
                digests, done = Digests(), 0
            with open(part, "ab" if done else "wb") as out:
                if progress is not None:
                    progress(done, total)
                while chunk := stream.read(1 << 16):
                    out.write(chunk)
                    digests.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())
    except (
        TimeoutError,
        urllib.error.URLError,
        http.client.HTTPException,
        ConnectionError,
        ValueError,
    ) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise MlvarError(f"cannot download {url}: {reason}", hint) from None
    except OSError as exc:
        raise MlvarError(
            f"download of {url} failed: {exc}", hint + " (and free disk space)"
        ) from None
    return digests.hex()


@contextlib.contextmanager
def _open_url(url: str, offset: int, timeout: float) -> Iterator[tuple[BinaryIO, int, int | None]]:
    """Open ``url`` from byte ``offset`` if possible: yield ``(stream, start, total)``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise urllib.error.URLError(f"no such file {path}")
        size = path.stat().st_size
        start = offset if offset <= size else 0
        with open(path, "rb") as fh:
            fh.seek(start)
            yield fh, start, size
        return
    request = urllib.request.Request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Range not satisfiable: the partial file is not a prefix we can continue.
        response = urllib.request.urlopen(urllib.request.Request(url), timeout=timeout)
    with response:
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        if getattr(response, "status", None) == 206:
            yield response, offset, (size + offset if size is not None else None)
        else:
            yield response, 0, size


# --------------------------------------------------------------------------- tar members


def check_member(member: tarfile.TarInfo, archive: str) -> str:
    """Return a tar member's normalised name, or refuse the archive.

    Refused: absolute names, ``..`` components, links, devices and anything else that is not
    a plain file or folder; and whatever ``tarfile``'s ``data`` extraction filter refuses.
    """
    name = member.name
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise MlvarError(
            f"archive {archive} is refused: member '{name}' has an absolute path",
            "use the official archive; an archive must not write outside its folder",
        )
    if ".." in path.parts:
        raise MlvarError(
            f"archive {archive} is refused: member '{name}' points outside the archive (..)",
            "use the official archive; an archive must not write outside its folder",
        )
    if not (member.isfile() or member.isdir()):
        raise MlvarError(
            f"archive {archive} is refused: member '{name}' is a link or special file",
            "use the official archive, which holds only plain files",
        )
    try:
        tarfile.data_filter(member, "/nonexistent-mlvar-dest")
    except tarfile.FilterError as exc:
        raise MlvarError(
            f"archive {archive} is refused: {exc}", "use the official archive"
        ) from None
    parts = [p for p in path.parts if p not in ("", ".")]
    return "/".join(parts)


def read_tar_members(
    path: Path, wanted: Callable[[str], bool], on_member: Callable[[str, bytes], None]
) -> list[str]:
    """Stream through a tar archive (any compression) once, checking every member, and hand
    the content of each wanted plain file to ``on_member(name, data)``.

    Nothing is extracted to disk. Returns every member name. A damaged or non-tar file is an
    :class:`MlvarError`.
    """
    names = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = check_member(member, str(path))
                names.append(name)
                if member.isfile() and wanted(name):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    on_member(name, fh.read())
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, MlvarError):
            raise
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise MlvarError(
            f"{path} is not a readable tar archive: {msg}",
            "pass the official .tar.gz archive or its extracted folder",
        ) from None
    return names


# --------------------------------------------------------------------------- unpickling


def _ndarray_reconstruct() -> Callable[..., Any]:
    # ndarray's own reduce names the reconstructor, whichever numpy module holds it.
    return np.zeros(1).__reduce__()[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # What ndarray.__reduce_ex__(5) pickles (numpy._core.numeric._frombuffer).
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    order = order.decode() if isinstance(order, bytes) else order
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _codecs_encode(obj: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, 'latin1').
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError("only latin1 text may be encoded")
    return codecs.encode(obj, "latin1")


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object dtypes are not allowed")
    return dtype


_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda: _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("_codecs", "encode"): lambda: _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, strings, numbers and numpy arrays, and
    nothing else: every other global (``os.system``, ``builtins.eval``, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")
        return factory()


def safe_unpickle(data: bytes, what: str) -> Any:
    """Unpickle ``data`` (``encoding="bytes"``) with :class:`RestrictedUnpickler`.

    Raises
    ------
    MlvarError
        The pickle references a forbidden global or is damaged; ``what`` names the file.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise MlvarError(
            f"{what} is refused: unsafe or damaged pickle ({exc})",
            "use the official archive; mlvar never runs code from data files",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a bad file
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise MlvarError(
            f"{what} is not a valid pickle: {msg}", "use the official archive"
        ) from None
