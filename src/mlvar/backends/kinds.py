"""The registry of job kinds (``train``, ``analysis``, ``saliency``, ``retrain``), and what needs
them all: finding a spec's kind, and landing shard folders of any kind found on disk.

A new kind is a :class:`mlvar.backends.kind.JobKind` subclass in a module of its own,
plus one entry in :data:`KINDS`; every backend then runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlvar.backends.kind import JobKind
from mlvar.backends.retrain_jobs import RETRAIN
from mlvar.backends.saliency_jobs import SALIENCY
from mlvar.backends.shard_jobs import ANALYSIS
from mlvar.backends.shard_kind import ShardKind
from mlvar.backends.train_jobs import TRAIN
from mlvar.backends.transfer import ImportResult
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import read_meta
from mlvar.store import ExperimentStore

KINDS: dict[str, JobKind] = {kind.name: kind for kind in (TRAIN, ANALYSIS, SALIENCY, RETRAIN)}
SHARD_KINDS: tuple[ShardKind, ...] = (SALIENCY, ANALYSIS)  # most specific first


def kind_of(spec: dict[str, Any]) -> JobKind:
    """The kind of a spec (or a submission record's ``kind``); ``train`` when it names
    none (specs written before kinds existed)."""
    name = str(spec.get("kind") or "train")
    if name not in KINDS:
        raise unknown_choice("job kind", name, KINDS)
    return KINDS[name]


def shard_kind_of(meta: dict[str, Any] | None) -> ShardKind:
    """The kind of a shard's ``meta.json`` or a plan's ``expect`` (analysis unless
    another kind recognises it)."""
    return next((k for k in SHARD_KINDS if k.recognises(meta or {})), ANALYSIS)


def input_bytes(store: ExperimentStore, spec: dict[str, Any]) -> dict[str, bytes]:
    """What the job ``spec`` reads from the store (:meth:`JobKind.inputs`), in memory."""
    return {
        rel: src if isinstance(src, bytes) else Path(src).read_bytes()
        for rel, src in kind_of(spec).inputs(store, spec).items()
    }


def land_shard(folder: Path, store: ExperimentStore, expect: dict[str, Any] | None) -> str:
    """Land the shard in ``folder`` (its kind read from ``expect``, else its meta): ``""``
    when it landed, else why not (see :meth:`ShardKind.land_folder`)."""
    if expect is None:
        meta, _ = read_meta(Path(folder))
        expect_kind = shard_kind_of(meta if isinstance(meta, dict) else {})
    else:
        expect_kind = shard_kind_of(expect)
    return expect_kind.land_folder(Path(folder), store, expect)


def find_shard_folders(source: Path) -> list[Path]:
    """Folders under ``source`` (itself included) holding a shard's ``meta.json``."""
    source = Path(source)
    found = []
    for file in sorted(source.rglob("meta.json")) if source.is_dir() else []:
        if any(part.startswith(".") for part in file.relative_to(source).parts[:-1]):
            continue
        try:
            meta = json.loads(file.read_text())
        except (OSError, ValueError):
            found.append(file.parent)  # rejected (and reported) by land_shard
            continue
        if isinstance(meta, dict) and any(k.recognises(meta) for k in SHARD_KINDS):
            found.append(file.parent)
    return found


def import_shards(source: Path, store: ExperimentStore) -> ImportResult:
    """Land every shard found under ``source`` (a folder copied by hand), each checked
    against this experiment (the merge checks the rest)."""
    result = ImportResult(kind="shards")
    for folder in find_shard_folders(source):
        why = land_shard(folder, store, None)
        if why:
            result.rejected[folder.name] = why
        else:
            result.imported.append(folder.name)
    return result


def read_spec(path: Path) -> dict[str, Any]:
    """A job's JSON spec file."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MlvarError(f"cannot read the job spec {path}: {exc}", "pass a spec file") from None
    if not isinstance(spec, dict):
        raise MlvarError(f"{path} is not a job spec (a JSON object)", "pass a spec file")
    return spec
