"""The submission record, and what every job spec carries.

A job is described by a JSON *spec* of its kind (:mod:`mlvar.backends.kinds`): a pack of
runs (``kind: "train"``, :mod:`mlvar.backends.train_jobs`), one analysis shard
(``"analysis"``, :mod:`mlvar.backends.shard_jobs`) or one saliency run block
(``"saliency"``, :mod:`mlvar.backends.saliency_jobs`); every spec has ``format``
(:data:`SPEC_FORMAT`), ``kind``, ``mlvar_version``, ``submission``, ``job`` and
``experiment``, and an attempt's spec its ``attempt`` number.

A submission is recorded in ``<runs_root>/<experiment>/submissions/<id>.json`` (written
atomically after every change; a study's in the folder of each experiment it trains):
its kind, the backend, the jobs with their run indices (for a study's jobs, per
experiment: ``parts``) or shard, references (Azure ML job names, Ray object refs, Slurm
job ids), states, attempts and, for failed jobs, the seeds (or shard), the error and the
log tail. Records written before analysis jobs existed load as ``train`` submissions.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlvar.errors import MlvarError
from mlvar.io import atomic_write_json

SPEC_FORMAT = 1
#: Job states. ``complete``: every run landed in the store; ``failed``: retries used up.
#: ``finished``: an Azure ML job ended well and its outputs wait for ``download``.
STATES = ("planned", "submitted", "running", "finished", "complete", "failed")


def new_submission_id(backend: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{backend}-{secrets.token_hex(2)}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Job:
    """One pack of runs, or one analysis or saliency shard, on a backend."""

    name: str
    run_indices: list[int] = field(default_factory=list)
    state: str = "planned"
    attempts: int = 0
    ref: str | None = None  # backend reference (Azure ML job name)
    failed: list[dict[str, Any]] = field(default_factory=list)  # {run_id, seed} or {shard}
    error: str = ""
    log_tail: str = ""
    kind: str = "train"
    # analysis: {"samples": "i/k", "runs": "j/m", "run_ids": [first, last]};
    # saliency: {"runs": "j/m", "run_ids": [first, last]}
    shard: dict[str, Any] = field(default_factory=dict)
    # a study's training job: [{"experiment", "run_indices"}, ...], the runs of each
    # experiment it trains (empty in a submission of one experiment: run_indices)
    parts: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.parts:
            data.pop("parts")  # a record of one experiment, as it always was
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Submission:
    """The record of one ``mlvar submit``."""

    id: str
    backend: str
    experiment: str
    dataset: str = ""
    scenario: str = ""
    runs: int = 0
    base_seed: int = 0
    runs_per_job: int = 1
    retries: int = 0
    jobs: list[Job] = field(default_factory=list)
    kind: str = "train"  # "analysis" / "saliency": shards of 'analyze rank' / 'saliency'
    split: str = ""  # analysis, saliency: the split ranked
    shards: int = 0  # analysis: blocks of samples (K)
    run_shards: int = 0  # analysis, saliency: blocks of runs (M)
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    options: dict[str, Any] = field(default_factory=dict)  # backend details (workspace, ...)
    # a study: every experiment it trains (``experiment`` is the first, whose folder holds
    # the submission's files); the record is saved in each of their folders
    experiments: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def state(self) -> str:
        states = {j.state for j in self.jobs}
        if not states or states == {"complete"}:
            return "complete"
        if states <= {"complete", "failed"}:
            return "failed"
        if "running" in states:
            return "running"
        if "finished" in states and states <= {"complete", "failed", "finished"}:
            return "finished"
        if "submitted" in states:
            return "submitted"
        return "planned"

    def failed_shards(self) -> list[str]:
        return [f["shard"] for j in self.jobs for f in j.failed if "shard" in f]

    def failed_runs(self) -> list[dict[str, Any]]:
        return [f | {"job": j.name} for j in self.jobs for f in j.failed if "run_id" in f]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        data["jobs"] = [j.to_dict() for j in self.jobs]
        if not self.experiments:
            data.pop("experiments")  # a record of one experiment, as it always was
        data["state"] = self.state
        return data

    def save(self, experiment_root: Path) -> Path:
        """Write the record into ``experiment_root/submissions/`` (atomically), and for a
        study into the folder of each of its other experiments too."""
        self.updated_at = now()
        root = Path(experiment_root)
        self.path = root / "submissions" / f"{self.id}.json"
        data = self.to_dict()
        atomic_write_json(self.path, data)
        for name in self.experiments:
            member = root.parent / name
            if name != root.name and member.is_dir():
                atomic_write_json(member / "submissions" / f"{self.id}.json", data)
        return self.path

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> Submission:
        data = dict(data)
        data.pop("state", None)
        jobs = [Job.from_dict(j) for j in data.pop("jobs", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}, jobs=jobs, path=path)


def list_submissions(experiment_root: Path) -> list[Submission]:
    """The submissions of an experiment, oldest first."""
    folder = Path(experiment_root) / "submissions"
    found = []
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            found.append(Submission.from_dict(json.loads(file.read_text()), file))
        except (OSError, ValueError, TypeError):
            continue
    return found


def load_submission(experiment_root: Path, submission_id: str | None) -> Submission:
    """The submission ``submission_id`` (or the latest one) of an experiment."""
    subs = list_submissions(experiment_root)
    if not subs:
        raise MlvarError(
            f"experiment '{Path(experiment_root).name}' has no submissions",
            "submit runs with 'mlvar submit DATASET --backend ...', an analysis with "
            "'mlvar submit analyze EXPERIMENT ...' or saliency with "
            "'mlvar submit saliency EXPERIMENT ...'",
        )
    if submission_id is None:
        return subs[-1]
    for sub in subs:
        if sub.id == submission_id:
            return sub
    raise MlvarError(
        f"no submission '{submission_id}' in experiment '{Path(experiment_root).name}'",
        "known: " + ", ".join(s.id for s in subs),
    )
