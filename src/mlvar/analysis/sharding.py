"""Shard mechanics shared by sharded analysis and sharded saliency.

Sharded ``analyze rank`` (:mod:`mlvar.analysis.shards`) splits a split's samples into k
blocks and its runs into m; sharded ``analyze saliency``
(:mod:`mlvar.analysis.saliency.shards`) splits the runs it explains into m blocks. Both
write each shard as one folder and merge a complete set; what they share is here:

* ``i/k`` parsed from the command line (:func:`parse_shard`);
* contiguous blocks: block ``j`` of ``m`` of ``n`` items is ``[(j-1)n/m, jn/m)``
  (:func:`shard_range`);
* folder names: ``s<i>of<k>-r<j>of<m>`` for a block of samples and of runs,
  ``r<j>of<m>`` for a block of runs only (:func:`shard_name`);
* the folder: one ``.npy`` per array, then ``meta.json`` written last and listing the
  sha256 of every array file (:func:`write_shard_folder`), so a folder without
  ``meta.json`` is unfinished and one whose files do not match is damaged
  (:func:`verify_shard_folder`, checking a :class:`ShardFormat`);
* the shard folders of a root, leaving out temporary ones (:func:`shard_folders`), and
  whether the blocks of a set are complete (:func:`survey_blocks`).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.errors import MlvarError
from mlvar.io import atomic_save_npy, atomic_write_json, read_meta, sha256_file

META_FILE = "meta.json"
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str, option: str = "--shard") -> tuple[int, int]:
    """Parse ``"i/k"`` (1 <= i <= k) into ``(i, k)``."""
    match = _SHARD_RE.match(text or "")
    if match:
        i, k = int(match.group(1)), int(match.group(2))
        if 1 <= i <= k:
            return i, k
    raise MlvarError(
        f"{option} must be i/k with 1 <= i <= k, got '{text}'",
        f"e.g. {option} 2/4 for the second of four contiguous blocks",
    )


def shard_range(i: int, k: int, n: int) -> tuple[int, int]:
    """Rows of block ``i`` of ``k`` (1-based) of ``n`` rows: ``[(i-1)n/k, in/k)``."""
    return (i - 1) * n // k, i * n // k


def shard_name(samples: tuple[int, int] | None, runs: tuple[int, int]) -> str:
    """The folder of one shard: ``s<i>of<k>-r<j>of<m>`` for sample block ``(i, k)`` and
    run block ``(j, m)``, ``r<j>of<m>`` when only the runs are split (``samples`` None)."""
    name = f"r{runs[0]}of{runs[1]}"
    return name if samples is None else f"s{samples[0]}of{samples[1]}-{name}"


def write_shard_folder(
    folder: Path,
    arrays: Mapping[str, np.ndarray],
    meta: dict[str, Any],
    on_file: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``arrays`` into ``folder`` as ``<name>`` files (``.npy``), then ``meta.json``
    last: ``meta`` with ``files``, the sha256 of every array file. Returns the meta
    written. ``on_file(name)`` is called after each array file (a testing hook)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        files[name] = atomic_save_npy(folder / name, array)
        if on_file is not None:
            on_file(name)
    meta = dict(meta, files=files)
    atomic_write_json(folder / META_FILE, meta)
    return meta


@dataclass(frozen=True)
class ShardFormat:
    """What one kind of shard folder holds, for :func:`verify_shard_folder`."""

    what: str  # whose meta.json this is, e.g. "a shard's"
    recognises: Callable[[dict[str, Any]], bool]  # whether a meta.json is of this kind
    names: frozenset[str] | None = None  # the array files it may list (None: any .npy)
    #: a meta.json without ``files`` passes (shards written before sha256 were listed)
    files_optional: bool = False
    missing: str = "{name} is missing"  # why not, for a listed file that is absent
    mismatch: str = "sha256 mismatch in {name}"  # and for one that does not match


def verify_shard_folder(folder: Path, fmt: ShardFormat) -> tuple[dict[str, Any] | None, str]:
    """``(meta, "")`` when ``folder`` is a complete shard of format ``fmt``: its
    ``meta.json`` is readable and of that kind, lists plain ``.npy`` file names with
    their sha256, each file is there and matches, and no other ``.npy`` is. Else
    ``(meta or None, why)``."""
    folder = Path(folder)
    meta, why = read_meta(folder)
    if meta is None:
        return None, why
    if not isinstance(meta, dict) or not fmt.recognises(meta):
        return None, f"meta.json is not {fmt.what}"
    files = meta.get("files")
    if files is None and fmt.files_optional:
        return meta, ""
    if not isinstance(files, dict) or not files:
        return meta, "meta.json lists no files"
    for name, digest in files.items():
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".npy"):
            return meta, f"file name {name!r} is not a plain .npy name"
        if fmt.names is not None and name not in fmt.names:
            return meta, f"unexpected file {name!r}"
        path = folder / name
        if not path.is_file():
            return meta, fmt.missing.format(name=name)
        if sha256_file(path) != digest:
            return meta, fmt.mismatch.format(name=name)
    extra = sorted(p.name for p in folder.glob("*.npy") if p.name not in files)
    if extra:
        return meta, f"unlisted file(s) {', '.join(extra)}"
    return meta, ""


def shard_folders(root: Path) -> list[Path]:
    """The folders in ``root``, sorted by name, leaving out ``.tmp-*`` ones (a folder
    being written or landed, or left by a killed process). None when ``root`` is absent."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


@dataclass
class BlockSurvey:
    """Which blocks a set of shards covers (:func:`survey_blocks`)."""

    counts: list[list[int]]  # per axis, the block counts the shards use, sorted
    missing: list[tuple[int, ...]]  # with one count per axis: the absent block numbers
    repeated: list[tuple[int, ...]]  # ... and those two or more shards claim

    @property
    def sizes(self) -> tuple[int, ...] | None:
        """The block count of every axis, when the shards agree on each (else None)."""
        if any(len(c) != 1 for c in self.counts):
            return None
        return tuple(c[0] for c in self.counts)

    @property
    def complete(self) -> bool:
        return self.sizes is not None and not self.missing and not self.repeated


def survey_blocks(blocks: Sequence[Sequence[tuple[int, int]]]) -> BlockSurvey:
    """What a set of shards covers. ``blocks``: per shard, its ``(j, m)`` along each axis
    (for analysis shards: samples, runs; for saliency shards: runs); at least one."""
    axes = len(blocks[0])
    counts = [sorted({int(b[a][1]) for b in blocks}) for a in range(axes)]
    if any(len(c) != 1 for c in counts):
        return BlockSurvey(counts, [], [])
    seen = Counter(tuple(int(b[a][0]) for a in range(axes)) for b in blocks)
    every = itertools.product(*(range(1, c[0] + 1) for c in counts))
    missing = [key for key in every if key not in seen]
    repeated = sorted(key for key, n in seen.items() if n > 1)
    return BlockSurvey(counts, missing, repeated)
