"""Copy finished runs from a worker's output (itself a run store) into the user's store.

A worker writes into a folder of its own: a local temporary store, the bytes a Ray task
returned, or an Azure ML job's output folder. Only runs that are complete (a ``run.json``
with ``status: complete``) and whose arrays match their sha256 are copied, each into a
temporary folder beside ``runs/``, verified again, and renamed into place: a partial or
corrupt run never lands, and a complete run of the destination is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.errors import MlvarError
from mlvar.store import (
    RUN_ID_RE,
    ExperimentStore,
    RunClaims,
    identity_diffs,
    inspect_run,
    read_run,
)


@dataclass
class ImportResult:
    """What :func:`import_runs` (or an import of analysis shards) did."""

    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already complete in the destination
    rejected: dict[str, str] = field(default_factory=dict)  # run id (or shard) -> why
    kind: str = "runs"  # "shards": the names are analysis (or saliency) shards
    ranking: str = ""  # analysis shards merged: the ranking's parquet file
    merged: str = ""  # shards merged: what was written (the ranking, the saliency folder)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "imported": self.imported,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "ranking": self.ranking or None,
            "merged": self.merged or None,
        }


def find_experiment_dir(source: Path, name: str) -> Path:
    """The experiment folder inside a worker output: ``source`` itself, ``source/<name>``,
    or the only experiment folder under ``source``."""
    source = Path(source)
    if (source / "experiment.json").is_file():
        return source
    if (source / name / "experiment.json").is_file():
        return source / name
    found = (
        [p for p in source.iterdir() if (p / "experiment.json").is_file()]
        if source.is_dir()
        else []
    )
    if len(found) == 1:
        return found[0]
    raise MlvarError(
        f"{source} holds no run store of experiment '{name}'",
        "point at a worker's output folder (it has experiment.json and runs/)",
    )


def import_runs(source: Path, store: ExperimentStore) -> ImportResult:
    """Copy the complete, sha256-verified runs of ``source`` into ``store`` atomically.

    Raises :class:`MlvarError` (before copying anything) when the source's experiment
    identity (dataset, scenario manifest sha256, model, train config) differs.
    """
    src = find_experiment_dir(Path(source), store.name)
    try:
        meta = json.loads((src / "experiment.json").read_text())
    except (OSError, ValueError) as exc:
        raise MlvarError(f"{src}/experiment.json is unreadable: {exc}", "re-run the job") from None
    diffs = [key for key, _, _ in identity_diffs(store.meta, meta)]
    if diffs:
        raise MlvarError(
            f"{src} was trained with a different setup than experiment '{store.name}' "
            f"(differs in {', '.join(diffs)})",
            "download into the experiment it was submitted for",
        )
    result = ImportResult()
    runs_dir = src / "runs"
    if not runs_dir.is_dir():
        return result
    for path in sorted(runs_dir.iterdir()):
        if not path.is_dir() or not RUN_ID_RE.match(path.name):
            continue
        why = _import_one(path, store, result)
        if why:
            result.rejected[path.name] = why
    return result


def _import_one(path: Path, store: ExperimentStore, result: ImportResult) -> str | None:
    record, why = inspect_run(path)
    if record is None:
        return why
    if read_run(store.run_dir(record.run_id)) is not None:
        result.skipped.append(record.run_id)
        return None
    arrays = record.meta.get("arrays", {})
    for name, info in arrays.items():
        if name.endswith(".logits.npy"):
            split = name[: -len(".logits.npy")]
            if split not in store.splits:
                return f"has logits of unknown split '{split}'"
            if (info.get("shape") or [None])[0] != store.n_samples(split):
                return f"{name} has shape {info.get('shape')}, not {store.n_samples(split)} rows"
    bad = record.verify()
    if bad:
        return "sha256 mismatch in " + ", ".join(bad)
    tmp_root = Path(tempfile.mkdtemp(prefix=".tmp-import-", dir=store.root))
    try:
        tmp = tmp_root / record.run_id
        tmp.mkdir()
        for name in arrays:
            if "/" in name or name.startswith("."):
                return f"array name {name!r} is not a plain file name"
            _copy_synced(path / name, tmp / name)
        _copy_synced(path / "run.json", tmp / "run.json")  # last, as the writer does
        copy = read_run(tmp)
        if copy is None or copy.verify():
            return "the copy failed verification"
        # The run's lease keeps a local process from writing it meanwhile; land_run
        # replaces an unfinished folder (a killed local run's), never a complete run.
        with RunClaims(store, keep=lambda _folder: True) as claims:
            if not claims.claim(record.run_id) or not store.land_run(tmp, record.run_id):
                result.skipped.append(record.run_id)  # complete, or being written here
                return None
        result.imported.append(record.run_id)
        return None
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _copy_synced(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        with contextlib.suppress(OSError):
            os.fsync(fout.fileno())
