"""Leases: lock files that work on a shared filesystem and expire when their holder dies.

A lease is a small file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems
and on NFS v3 and later): whoever creates it holds it. It names its holder (host, pid,
a random token) and a background thread of the holder refreshes its mtime every
:data:`HEARTBEAT_S` seconds. Another process may break a lease that is *stale*:

- its holder ran on this host and that process is gone (killed, crashed): at once;
- otherwise, once the lease's mtime and content have not changed for :data:`STALE_S`
  seconds *as measured on the waiter's own clock* (no clock is compared with another
  machine's, so clock skew between cluster nodes does not matter; the file is opened
  each time, which makes an NFS client fetch fresh attributes: close-to-open).

Why not ``fcntl``/``flock`` locks: they vanish with their process, but on clusters they
are often not shared between nodes (Lustre ``localflock``, BeeGFS without global file
locks, NFS mounted ``nolock``), where they would silently lock nothing; and a lock whose
NFS lock manager lost track of its client can block until an administrator steps in. A
lease file needs only atomic create and rename, which every shared filesystem has, and
it cannot block forever: a killed holder stops its heartbeat.

Breaking is careful: the stale file is renamed to a unique name (one rename wins), and
only if the renamed file is still the one judged stale is it removed; a lease that was
taken over or refreshed meanwhile is put back. Correctness of the run store never rests
on the lease alone (runs land by one atomic rename that never replaces a complete run,
see ``docs/run-store.md``): a lease only keeps two processes from doing the same work
and from removing each other's unfinished folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HEARTBEAT_S = 10.0
"""Seconds between two refreshes of a held lease's mtime."""
STALE_S = 120.0
"""Seconds a lease of another host must stay unchanged before it may be broken: many
heartbeats, so that a busy machine or a slow NFS server never loses a lease it holds."""

_HOST = socket.gethostname()


@dataclass(frozen=True)
class _Seen:
    """What a lease file looked like: its inode, mtime and content."""

    inode: int
    mtime_ns: int
    content: bytes


def _look(path: Path) -> _Seen | None:
    """The lease file at ``path`` as it is now (None if there is none). Opening it (not
    ``stat``) makes an NFS client revalidate its cached attributes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        return _Seen(st.st_ino, st.st_mtime_ns, os.read(fd, 4096))
    finally:
        os.close(fd)


def _holder(content: bytes) -> dict[str, Any]:
    """The holder a lease file names (empty while its creator is still writing it)."""
    try:
        info = json.loads(content.decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    # A killed process its parent has not reaped yet (a zombie) holds nothing.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


# path -> (how the lease looked, when this process first saw it look so: monotonic s)
_observed: dict[str, tuple[_Seen, float]] = {}


def _stale(path: Path, seen: _Seen) -> bool:
    info = _holder(seen.content)
    pid = info.get("pid")
    if info.get("host") == _HOST and isinstance(pid, int) and not _process_alive(pid):
        return True
    now = time.monotonic()
    first = _observed.get(str(path))
    if first is None or first[0] != seen:
        _observed[str(path)] = (seen, now)
        return False
    return now - first[1] >= STALE_S


def _break_if_stale(path: Path) -> bool:
    """Remove the lease at ``path`` if it is stale; True when the caller may try to create
    it again (it was broken, or released meanwhile)."""
    seen = _look(path)
    if seen is None:
        return True
    if not _stale(path, seen):
        return False
    aside = path.with_name(f"{path.name}.broken-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)  # of several breakers, one rename wins
    except FileNotFoundError:
        return True
    if _look(aside) == seen:
        _observed.pop(str(path), None)
        aside.unlink(missing_ok=True)
        return True
    # Between the look and the rename the lease was taken over or refreshed: put it back
    # (a link never replaces a lease created in the meantime).
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links
        if not path.exists():
            with contextlib.suppress(OSError):
                os.rename(aside, path)
    aside.unlink(missing_ok=True)
    return False


class Lease:
    """A lease file at ``path``: :meth:`acquire` it, :meth:`release` it.

    While held, this process's heartbeat thread keeps it fresh; nothing blocks, so a
    caller that must wait polls :meth:`acquire` (it breaks a stale lease on the way).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lease if it is free or stale; True when this object holds it now."""
        if self._fd is not None:
            return True
        for _ in range(10):  # a lease (or its folder) removed meanwhile is made again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _break_if_stale(self.path):
                    return False
                continue
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            info = {
                "host": _HOST,
                "pid": os.getpid(),
                "token": secrets.token_hex(8),
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            self._fd = fd
            _heartbeat.add(self)
            return True
        return False

    def release(self) -> None:
        """Give the lease up (remove its file if it is still this lease's, and the folder
        of leases if that leaves it empty)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _heartbeat.discard(self)
        try:
            if self._is_ours(fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        # Leave no empty folder of leases (another process making a lease in it meanwhile
        # keeps it, or makes it again).
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()

    def holder(self) -> str:
        """Who holds the lease now, as ``host:pid`` (``""`` when nobody or unknown)."""
        seen = _look(self.path)
        info = _holder(seen.content) if seen else {}
        return f"{info['host']}:{info['pid']}" if "host" in info and "pid" in info else ""

    def _is_ours(self, fd: int) -> bool:
        try:
            st, mine = os.stat(self.path), os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _beat(self) -> None:
        fd = self._fd
        if fd is not None:
            # Through the open file: it refreshes this lease's inode, whatever its name.
            with contextlib.suppress(OSError):  # a slow or failing server: try again later
                os.utime(fd)


class _Heartbeat:
    """One daemon thread per process refreshing the leases it holds; it exits when none
    are held and starts again with the next one."""

    def __init__(self) -> None:
        self._leases: set[Lease] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="mlvar-lease-heartbeat", daemon=True
                )
                self._thread.start()
            else:
                self._wake.set()  # a new lease: start its beats now (and re-read HEARTBEAT_S)

    def discard(self, lease: Lease) -> None:
        with self._lock:
            self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            self._wake.wait(HEARTBEAT_S)
            self._wake.clear()
            # Under the lock: a lease released meanwhile must not have its (closed, maybe
            # reused) file descriptor touched.
            with self._lock:
                if not self._leases:
                    self._thread = None
                    return
                for lease in self._leases:
                    lease._beat()

    def after_fork(self) -> None:
        """In a forked child: no heartbeat thread runs there, and it holds no leases."""
        self._leases, self._lock, self._thread = set(), threading.Lock(), None
        self._wake = threading.Event()


_heartbeat = _Heartbeat()
os.register_at_fork(after_in_child=_heartbeat.after_fork)
