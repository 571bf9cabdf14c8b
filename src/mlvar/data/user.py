"""User datasets: a source the user fetched under a name of their own, of a *user kind*
(``table``, ``imagefolder``), recorded in ``<data_root>/user/<name>/``.

``mlvar data fetch KIND --source PATH --name NAME`` writes that folder atomically: the
kind's copy of the source (converted or not) and ``source.json`` (``kind``, ``name``,
``file``: the original file name, ``sha256`` of the source bytes, ``format``, what the kind
records besides, and ``options``: the fetch options that define the dataset). Fetching the
same bytes with the same options again is a no-op; other bytes or options under a name
already fetched are refused unless ``force``.

A name resolves to its :class:`mlvar.data.spec.DatasetSpec` through
:data:`mlvar.data.registry.USER_KINDS`: ``factory(name, info, folder)`` builds the spec,
``info`` being the parsed ``source.json`` (``{"kind": KIND, "name": NAME}`` alone while
the name is being fetched: the spec's ``fetch`` then records it, taking the kind's fetch
options as keyword arguments, see :func:`mlvar.data.registry.fetch`). Built-in names come
first; a user name can neither shadow one nor a kind.

Reads and writes JSON only; nothing heavy is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mlvar.errors import MlvarError
from mlvar.io import atomic_write_bytes, dumps_json, staging_dir

USER_DIR = "user"
SOURCE_FILE = "source.json"
#: A user dataset's name: it starts scenario and experiment names, so lower-case letters,
#: digits and underscores (no ``-``, which separates a scenario name's parts).
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,39}")


def user_root(data_root: str | os.PathLike) -> Path:
    """``<data_root>/user``: where user datasets are recorded."""
    return Path(data_root) / USER_DIR


def user_dir(data_root: str | os.PathLike, name: str) -> Path:
    """``<data_root>/user/<name>``: one user dataset's folder."""
    return user_root(data_root) / name


def check_name(name: str, taken: Iterable[str]) -> str:
    """``name`` if it can name a user dataset; raise :class:`MlvarError` otherwise (not a
    valid name, or one of ``taken``: the built-in datasets and the user kinds)."""
    if not NAME_PATTERN.fullmatch(name or ""):
        raise MlvarError(
            f"--name {name!r} is not a valid dataset name",
            "use 1-40 lower-case letters, digits and underscores, starting with a letter",
        )
    if name in set(taken):
        raise MlvarError(
            f"--name {name} is taken by a built-in dataset or kind", "choose another name"
        )
    return name


def read_info(data_root: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The parsed ``source.json`` of user dataset ``name`` (None when there is none)."""
    if not NAME_PATTERN.fullmatch(name or ""):
        return None
    path = user_dir(data_root, name) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MlvarError(
            f"{path} cannot be read: {exc}", f"fetch it again with --name {name} --force"
        ) from None
    if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
        raise MlvarError(f"{path} names no kind", f"fetch it again with --name {name} --force")
    return info


def user_names(data_root: str | os.PathLike) -> list[str]:
    """The user datasets recorded in ``data_root``, by name."""
    root = user_root(data_root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if NAME_PATTERN.fullmatch(p.name) and (p / SOURCE_FILE).is_file()
    )


def same_fetch(
    data_root: str | os.PathLike, name: str, sha256: str, options: dict[str, Any], stored: str
) -> dict[str, Any] | None:
    """The recorded info when ``name`` was fetched from the same bytes with the same
    options and its copy ``stored`` is there (fetching again is a no-op), else None."""
    info = read_info(data_root, name)
    same = info is not None and _same(info, sha256, options)
    if same and info.get("stored") == stored and (user_dir(data_root, name) / stored).is_file():
        return info
    return None


def _same(info: dict[str, Any], sha256: str, options: dict[str, Any]) -> bool:
    return info.get("sha256") == sha256 and info.get("options") == options


def refuse_replacing(
    data_root: str | os.PathLike, name: str, sha256: str, options: dict[str, Any], force: bool
) -> None:
    """Raise :class:`MlvarError` when ``name`` is recorded from other bytes or options
    and ``force`` is not given (a record of the same ones is rewritten freely)."""
    info = read_info(data_root, name)
    if info is None or force or _same(info, sha256, options):
        return
    what = "other bytes" if info.get("sha256") != sha256 else "other options"
    raise MlvarError(
        f"user dataset '{name}' is already fetched from {info.get('file')} "
        f"(sha256 {str(info.get('sha256'))[:12]}...), with {what} than these",
        "pass --force to replace it, or fetch under another --name",
    )


@contextlib.contextmanager
def recording(data_root: str | os.PathLike, name: str) -> Iterator[Path]:
    """A staging folder for user dataset ``name``: the caller writes the kind's files and
    :func:`write_info` into it (having called :func:`refuse_replacing`); on success it
    becomes ``<data_root>/user/<name>``, replacing a folder there atomically (the old one
    removed only once the new one is complete); on failure nothing is left (folders this
    call created included)."""
    final = user_dir(data_root, name)
    created = [p for p in (Path(data_root), user_root(data_root)) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staging_dir(final, replace=final.exists()) as tmp:
            yield tmp
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def write_info(folder: Path, info: dict[str, Any]) -> None:
    """Write ``source.json`` into a :func:`recording` folder."""
    atomic_write_bytes(folder / SOURCE_FILE, dumps_json(info).encode())
