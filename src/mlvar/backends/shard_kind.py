"""What every kind of shard job shares (analysis shards, saliency run blocks).

A shard job writes one folder, ``OUT/<shard>/``, with ``meta.json`` last listing the
sha256 of every file. :class:`ShardKind` lands it (:meth:`ShardKind.land_folder`): only
when ``meta.json`` is there, every file matches its sha256 and the meta is the plan's
(``expect``); it is copied into a temporary folder beside its destination, verified
again and renamed into place, so a partial or corrupt shard never lands. It also says
when a job is done (its shard landed and verified) and how a failure is recorded, and
holds the helpers for what a shard job reads (the experiment's files and a run block's
arrays, each ``run.json`` rewritten to list only what is shipped).

Subclasses: :class:`mlvar.backends.shard_jobs.AnalysisKind` and
:class:`mlvar.backends.saliency_jobs.SaliencyKind`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlvar.backends.kind import JobKind, Log
from mlvar.backends.spec import Job, Submission
from mlvar.backends.transfer import ImportResult, _copy_synced
from mlvar.errors import MlvarError
from mlvar.io import _fsync_dir, sha256_file, swap_in
from mlvar.store import ExperimentStore, read_run


class ShardKind(JobKind):
    """A job that writes one shard folder (``OUT/<shard>/``, ``meta.json`` last listing
    the sha256 of every file), landed under a folder of the experiment's ``analysis/``."""

    reads_experiment = True
    output_name = "shards"
    #: the meta.json keys a landed shard must share with its plan
    keys: tuple[str, ...] = ()

    # -- what differs between shard kinds

    def verify(self, folder: Path) -> tuple[dict[str, Any] | None, str]:
        """``(meta, "")`` for a complete shard folder whose files match their sha256,
        else ``(meta or None, why not)``."""
        raise NotImplementedError

    def recognises(self, meta: dict[str, Any]) -> bool:
        """Whether a ``meta.json`` is of this kind."""
        raise NotImplementedError

    def root(self, store: ExperimentStore, split: str) -> Path:
        """Where the shards of a split land."""
        raise NotImplementedError

    def place(self, store: ExperimentStore, meta: dict[str, Any]) -> tuple[Path | None, str]:
        """The folder a shard (its meta, or a plan's expect) lands in, or why it cannot."""
        raise NotImplementedError

    def compute(self, spec: dict, exp: Path, out: Path, data: Path | None, log: Log) -> Path:
        """Compute the shard from the experiment folder ``exp`` into ``out/<shard>/``."""
        raise NotImplementedError

    # -- shared

    def run(
        self,
        spec: dict[str, Any],
        out: Path,
        experiment_dir: Path | None,
        data_root: Path | None,
        log: Log = print,
    ) -> None:
        if experiment_dir is None:
            raise MlvarError(f"a {self.name} job needs --experiment-dir", "see --help")
        self.compute(spec, Path(experiment_dir), Path(out), data_root, log)

    def input_group(self, spec: dict[str, Any]) -> str:
        j, m = spec["run_shard"]
        return f"r{j}of{m}"  # the K shards of a run block read the same files

    def _diffs(self, meta: dict[str, Any], expect: dict[str, Any]) -> list[str]:
        return [k for k in self.keys if k in expect and meta.get(k) != expect[k]]

    def shard_ok(self, store: ExperimentStore, expect: dict[str, Any]) -> bool:
        """Whether the shard ``expect`` describes is in the store, complete and verified."""
        folder, _ = self.place(store, expect)
        if folder is None or not folder.is_dir():
            return False
        meta, why = self.verify(folder)
        return (
            meta is not None
            and not why
            and bool(meta.get("files"))
            and not self._diffs(meta, expect)
        )

    def land_folder(
        self, folder: Path, store: ExperimentStore, expect: dict[str, Any] | None
    ) -> str:
        """Copy the shard in ``folder`` into the store atomically; ``""`` when it landed,
        else why not.

        The shard must be complete (``meta.json`` listing the sha256 of every file, each
        matching) and, with ``expect``, have the planned meta; without, at least be of
        this experiment (:meth:`place` says). It is copied into a ``.tmp-*`` folder beside
        the split's folder, verified again and renamed into place, replacing a stale
        shard of the same name only then.
        """
        folder = Path(folder)
        meta, why = self.verify(folder)
        if meta is None or why:
            return why
        if not meta.get("files"):
            return "meta.json lists no sha256 of its files"
        if expect is not None:
            diffs = self._diffs(meta, expect)
            if diffs:
                return f"meta.json differs from the plan in {', '.join(diffs)}"
        final, why = self.place(store, meta)
        if final is None:
            return why
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent.parent))
        try:
            os.chmod(tmp, 0o755)
            for file in meta["files"]:
                _copy_synced(folder / file, tmp / file)
            _copy_synced(folder / "meta.json", tmp / "meta.json")  # last, as the writer does
            copy, why = self.verify(tmp)
            if copy is None or why:
                return f"the copy failed verification ({why})"
            swap_in(tmp, final)
            _fsync_dir(final.parent)
            return ""
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def output_files(self, spec: dict[str, Any], out: Path) -> dict[str, bytes]:
        folder = Path(out) / spec["job"]
        if not folder.is_dir():
            return {}
        return {
            f"{spec['job']}/{p.name}": p.read_bytes()
            for p in sorted(folder.iterdir())
            if p.is_file()
        }

    def land(self, out: Path, store: ExperimentStore, spec: dict[str, Any]) -> ImportResult:
        result = self.empty_result()
        name, expect = spec["job"], spec["expect"]
        folders = [p.parent for p in sorted(Path(out).rglob("meta.json")) if p.parent.name == name]
        folder = folders[0] if folders else Path(out) / name
        if not folder.is_dir():
            return result
        if self.shard_ok(store, expect):
            result.skipped.append(name)
            return result
        why = self.land_folder(folder, store, expect)
        if why:
            result.rejected[name] = why
        else:
            result.imported.append(name)
        return result

    def remaining(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Any] | None:
        return None if self.shard_ok(store, spec["expect"]) else spec

    def pending_text(self, left: dict[str, Any], landed: ImportResult | None) -> str:
        why = "; ".join(landed.rejected.values()) if landed is not None else ""
        return f"shard not landed: {why}" if why else "shard not written"

    def failures(self, sub: Submission, job: Job, left: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"shard": job.name} | {k: job.shard[k] for k in ("samples", "runs") if k in job.shard}
        ]

    def landed(self, store: ExperimentStore, sub: Submission, job: Job) -> list[str]:
        return (
            [job.name] if (self.root(store, sub.split) / job.name / "meta.json").is_file() else []
        )

    def empty_result(self) -> ImportResult:
        return ImportResult(kind="shards")


def present_shards(store: ExperimentStore, plan: Any) -> list[str]:
    """The planned shards already landed, complete, verified and computed over the same
    runs (not resubmitted). Stale or damaged ones are recomputed.

    ``plan``: a :class:`ShardPlan` or a saliency plan (``kind``, ``split``, ``expects()``,
    ``sharding``, ``flags``). Raises :class:`MlvarError` when the folder holds shards of
    another sharding (a merge would refuse the mixture), naming them.
    """
    root = plan.kind.root(store, plan.split)
    expects = plan.expects()
    foreign = [
        folder.name
        for folder in (sorted(root.iterdir()) if root.is_dir() else [])
        if folder.is_dir()
        and not folder.name.startswith(".")
        and folder.name not in expects
        and (folder / "meta.json").is_file()
    ]
    if foreign:
        raise MlvarError(
            f"{root} already holds shards of another sharding "
            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}), not "
            f"{plan.sharding}",
            f"submit with the same {plan.flags}, or remove {root}",
        )
    return [name for name, expect in expects.items() if plan.kind.shard_ok(store, expect)]


# ------------------------------------------------------------------ what a job reads


def experiment_files(store: ExperimentStore, split: str) -> dict[str, Path | bytes]:
    """``experiment.json`` and ``samples/<split>.parquet``: what every shard job reads."""
    return {
        "experiment.json": store.root / "experiment.json",
        f"samples/{split}.parquet": store.root / "samples" / f"{split}.parquet",
    }


def run_files(
    store: ExperimentStore, run_id: str, listed: set[str], shipped: set[str] | None = None
) -> dict[str, Path | bytes]:
    """The files of run ``run_id`` a job reads: its ``run.json`` rewritten to list only the
    arrays in ``listed`` (so the copy verifies), and those of them in ``shipped`` (default:
    all listed)."""
    record = read_run(store.run_dir(run_id))
    if record is None:
        raise MlvarError(
            f"run {run_id} of '{store.name}' is not complete any more", "submit the jobs again"
        )
    arrays = {k: v for k, v in record.meta.get("arrays", {}).items() if k in listed}
    files: dict[str, Path | bytes] = {
        f"runs/{run_id}/{name}": record.path / name
        for name in arrays
        if shipped is None or name in shipped
    }
    text = json.dumps(dict(record.meta, arrays=arrays), indent=2, sort_keys=True) + "\n"
    files[f"runs/{run_id}/run.json"] = text.encode()
    return files


# ------------------------------------------------------------------ the worker


def check_job_input(spec: dict[str, Any], experiment_dir: Path, kind: str) -> dict[str, Any]:
    """The ``experiment.json`` of a shard job's ``experiment_dir``, after checking the spec
    is of ``kind`` and the file is the one the spec was planned on."""
    if spec.get("kind") != kind:
        raise MlvarError(f"the spec is of kind {spec.get('kind')!r}", f"expected '{kind}'")
    file = Path(experiment_dir) / "experiment.json"
    if not file.is_file():
        raise MlvarError(
            f"{experiment_dir} holds no experiment.json",
            "point --experiment-dir at the experiment folder (or a shard job's input)",
        )
    got, want = sha256_file(file), spec.get("experiment_sha256")
    if want and got != want:
        raise MlvarError(
            f"{file} has sha256 {got[:12]}, the spec was planned on {want[:12]}",
            "give the job the experiment it was submitted for",
        )
    return json.loads(file.read_text())


# ------------------------------------------------------------------ landing and labels


def store_mismatch(store: ExperimentStore, meta: dict[str, Any]) -> str:
    """Why a shard's meta is not of this experiment and one of its splits ("" if it is)."""
    if meta.get("experiment") != store.name:
        return f"a shard of experiment {meta.get('experiment')!r}, not '{store.name}'"
    if meta.get("split") not in store.splits:
        return f"a shard of unknown split {meta.get('split')!r}"
    return ""


def shard_labels(sub: Submission, spec: dict[str, Any]) -> dict[str, str]:
    """The labels (Azure ML tags) of a shard job."""
    return {
        "mlvar_kind": spec["kind"],
        "mlvar_experiment": sub.experiment,
        "mlvar_submission": sub.id,
        "mlvar_split": spec["split"],
        "mlvar_shard": spec["job"],
    }
