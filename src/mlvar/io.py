"""Atomic, deterministic file writing.

Every file mlvar writes appears in one step: it is written to a temporary name in the
same folder, flushed and fsynced, then renamed over the final name. A killed process
leaves at most a stray ``.tmp-*`` file, never a truncated file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# A fixed timestamp for zip members so that the same arrays give byte-identical .npz files.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _naming(exc: OSError, final: Path, tmp: str) -> OSError:
    """``exc`` with the path the user knows: an error of the temporary ``tmp`` (a file, or a
    folder and what is inside it), or of no path at all (``write`` on a full disk), is
    raised naming ``final``; the CLI prints that path (``cli/common.py``)."""
    name = None if exc.filename is None else os.fsdecode(exc.filename)
    if exc.errno is None or (name is not None and not name.startswith(tmp)):
        return exc
    inside = name[len(tmp) :] if name is not None and name.startswith(tmp + os.sep) else ""
    return OSError(exc.errno, exc.strerror, str(final) + inside)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename).

    An :class:`OSError` (no space, permission denied, read-only filesystem) names ``path``
    and leaves no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(path.parent / f".tmp-{path.name}-")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path, prefix) from exc
    try:
        # mkstemp creates 0600; a data file is as readable as any other the user writes.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path, prefix) from exc
        raise
    _fsync_dir(path.parent)


def dumps_json(obj: Any) -> str:
    """Serialise ``obj`` as stable, human-readable JSON (sorted keys, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically."""
    atomic_write_bytes(path, dumps_json(obj).encode())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise one array in the ``.npy`` format."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Save ``array`` as ``.npy`` atomically and return the sha256 of the file's bytes."""
    data = npy_bytes(array)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise arrays as an uncompressed ``.npz`` with fixed member timestamps.

    ``numpy.savez`` stamps each member with the current time, so two saves of the same
    arrays differ; this writer does not, which makes prepared scenarios byte-identical.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy_bytes(arrays[name]))
    return buf.getvalue()


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file (pickled objects refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def scratch_dir(final: Path) -> Iterator[Path]:
    """A new temporary folder beside ``final`` (``.tmp-<name>-*``) to build it in.

    The folder is removed when the block ends, unless the block renamed it away; an
    :class:`OSError` raised inside names ``final`` (and the file under it), not the
    temporary path.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(final.parent / f".tmp-{final.name}-")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as exc:
        raise _naming(exc, final, prefix) from exc
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        yield tmp
    except OSError as exc:
        raise _naming(exc, final, str(tmp)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing there once renamed away


@contextlib.contextmanager
def staging_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to ``final`` on success.

    On any exception the temporary folder is removed, so a failed or killed build never
    leaves a folder under the final name (an :class:`OSError` names the final path). With
    ``replace`` an existing ``final`` is swapped out only once the new folder is complete.
    """
    with scratch_dir(final) as tmp:
        yield tmp
        if replace:
            swap_in(tmp, final)
        else:
            os.replace(tmp, final)
    _fsync_dir(final.parent)


def swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``, replacing a folder already there:
    the old one is moved aside first and removed only once the new one is in place."""
    if final.exists():
        old = tmp.with_name(tmp.name + "-old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def check_writable(folder: str | os.PathLike) -> None:
    """Raise the :class:`OSError` that writing into ``folder`` would raise (permission
    denied, read-only filesystem, no space), naming ``folder``, before any work:
    the nearest existing folder at or above it gets a temporary folder, removed at once.

    For a command that writes to one root only after writing to another (a report is
    written after the analysis it needs), so that it fails with nothing written.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return  # a file in the way: the command's own check names it better
    try:
        probe = tempfile.mkdtemp(prefix=".tmp-probe-", dir=existing)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(folder)) from exc
    os.rmdir(probe)


def read_meta(folder: Path) -> tuple[Any, str]:
    """The parsed ``meta.json`` of ``folder`` and ``""``, or ``None`` and why not
    (a folder whose writer wrote ``meta.json`` last is unfinished without it)."""
    try:
        return json.loads((Path(folder) / "meta.json").read_text()), ""
    except FileNotFoundError:
        return None, "unfinished (no meta.json)"
    except (OSError, ValueError):
        return None, "corrupt meta.json"
