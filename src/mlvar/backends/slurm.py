"""The ``slurm`` backend: one Slurm job array per submission, submitted with submitit.

Each job of the submission is one array task running :class:`SlurmTask` (pickled by
submitit: the job's spec dict and four paths, nothing else) in the task's Python process
on a node: it runs the job (:meth:`mlvar.backends.kind.JobKind.run`) into its own folder
``submissions/<id>/work/<job>/`` and lands the complete, sha256-verified result into the
store itself (the runs root and the data root are on a filesystem the nodes share). So
results arrive while ``mlvar submit`` is long gone; ``mlvar submit status`` and
``download`` only follow the jobs:

- a job whose results are in the store is complete (the store is the source of truth);
- else ``squeue`` says whether it is pending or running (a requeued job is pending again);
- a job that left the queue with results missing ended; its state comes from ``scontrol
  show job`` (or ``sacct``, where accounting is on; it is off on many clusters), its log
  tail from submitit's log files, and whatever it wrote completely lands now; it is then
  resubmitted (another attempt, in a new array) until ``retries`` is spent, or failed.

Preemption and time-outs are submitit's: Slurm signals the task ``USR2`` before the time
limit (or when preempting it); submitit calls :meth:`SlurmTask.checkpoint` and requeues
the job, which then resumes from what is on disk in its work folder (finished runs, image
runs' ``checkpoint.pt``; see :mod:`mlvar.train.images`), up to ``max_requeues`` times.
A job killed outright (``scancel``, SIGKILL, a node lost) ends, and is retried as above.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlvar.backends import faults, gpus
from mlvar.backends.backend import (
    Attempt,
    Backend,
    JobBatch,
    SubmitProgress,
    finish_attempt,
    require,
    start_attempt,
    tail,
    write_specs,
)
from mlvar.backends.kind import remove_empty
from mlvar.backends.spec import Job, Submission
from mlvar.backends.transfer import ImportResult
from mlvar.config import SlurmConfig
from mlvar.errors import MlvarError, unknown_choice
from mlvar.io import atomic_write_json, atomic_write_text
from mlvar.store import ExperimentStore
from mlvar.train.determinism import cuda_env

REQUIRED = ("partition",)
GPUS_KEY = "backend.slurm.gpus_per_job"
TIMEOUT_S = 30.0  # for squeue, scontrol and sacct calls
#: squeue states of a job that has not started (again) yet; any other listed one runs.
WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING")
#: states of a job that has ended (squeue can list them for a moment).
ENDED = (
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
)


def parse_extra(lines: list[str]) -> dict[str, Any]:
    """``[backend.slurm] extra_sbatch`` (``"--constraint=a100"``, ``"--exclusive"``) as
    submitit's ``additional_parameters``; raises :class:`MlvarError` for a line that is
    not one sbatch option."""
    options: dict[str, Any] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        name = key[2:]
        if not key.startswith("--") or not name or not name.replace("-", "").isalnum():
            raise MlvarError(
                f"backend.slurm.extra_sbatch entry {line!r} is not one sbatch option",
                'write each as "--name=value" or "--flag", e.g. "--constraint=a100"',
            )
        options[name] = value if sep else True
    return options


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def spec_device(spec: dict[str, Any]) -> str:
    """Where a job computes: its training config's ``device`` (shards: the CPU)."""
    return str(spec.get("train", {}).get("device", "cpu"))


def sbatch_parameters(cfg: SlurmConfig, job_name: str, device: str = "cpu") -> dict[str, Any]:
    """The parameters of :class:`submitit.SlurmExecutor` for ``[backend.slurm]`` and jobs
    computing on ``device``: on CUDA each array task (one job, one pack of runs) asks for
    ``gpus_per_job`` GPUs, the one its pack trains on (:func:`mlvar.backends.gpus.job_gpus`),
    with the environment deterministic CUDA kernels need; on the CPU for none."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "partition": cfg.partition,
        "time": cfg.time_limit_min,
        "cpus_per_task": cfg.cpus_per_job,
        "wckey": None,  # submitit's default tags every job "submitit"
    }
    optional = {
        "gpus_per_node": gpus.job_gpus(device, cfg.gpus_per_job, GPUS_KEY) or None,
        "mem": _mem(cfg.mem_gb) if cfg.mem_gb else None,
        "account": cfg.account or None,
        "qos": cfg.qos or None,
        "array_parallelism": cfg.array_parallelism or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    env = {**(cuda_env() if device == "cuda" else {}), **faults.task_env()}
    setup = list(cfg.setup) + [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if setup:
        params["setup"] = setup
    extra = parse_extra(cfg.extra_sbatch)
    if extra:
        params["additional_parameters"] = extra
    return params


def _slurm(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command; a controller that does not answer is bad input."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise MlvarError(
            f"the Slurm controller did not answer '{args[0]}' within {TIMEOUT_S:g} s",
            "check that slurmctld is up (scontrol ping)",
        ) from None
    except OSError as exc:
        raise MlvarError(f"cannot run {args[0]}: {exc}", "run on a Slurm login node") from None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def ping() -> None:
    """Refuse, with one line, a controller that does not answer ``scontrol ping``."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # the Slurm commands would retry it for 60 s
        raise MlvarError(
            f"SLURM_CONF names {conf}, which does not exist", "point it at the slurm.conf"
        )
    done = _slurm(["scontrol", "ping"])
    text = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "DOWN" in done.stdout or "UP" not in done.stdout:
        raise MlvarError(
            f"the Slurm controller does not answer ({_first_line(text) or 'scontrol ping failed'})",
            "check that slurmctld is up and SLURM_CONF names this cluster (scontrol ping)",
        )


def check_partition(name: str) -> None:
    """Refuse a partition ``sinfo`` does not list, naming the ones it does."""
    done = _slurm(["sinfo", "-h", "-o", "%R"])
    names = sorted({line.strip() for line in done.stdout.splitlines() if line.strip()})
    if done.returncode == 0 and names and name not in names:
        raise unknown_choice("Slurm partition", name, names)


def queue_states(refs: list[str]) -> dict[str, str]:
    """``squeue``'s state of each listed job or array task still in the queue."""
    if not refs:
        return {}
    done = _slurm(["squeue", "-h", "-r", "-o", "%i|%T"])
    if done.returncode != 0:
        raise MlvarError(
            f"squeue failed: {_first_line(done.stderr) or done.returncode}",
            "check that slurmctld is up (scontrol ping)",
        )
    wanted = set(refs)
    states = {}
    for line in done.stdout.splitlines():
        ref, _, state = line.strip().partition("|")
        if ref in wanted:
            states[ref] = state.strip()
    return states


def final_state(ref: str) -> str:
    """How a job that left the queue ended: ``scontrol show job`` while the controller
    remembers it, else ``sacct`` where accounting is on; "" when neither knows."""
    done = _slurm(["scontrol", "-o", "show", "job", ref])
    for field in done.stdout.split() if done.returncode == 0 else []:
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    done = _slurm(["sacct", "-n", "-X", "-P", "-o", "State", "-j", ref])
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.split()[0].strip()
    return ""


class SlurmTask:
    """What runs in an array task (pickled by submitit into its folder: the spec dict and
    the paths, nothing else). Its ``checkpoint`` makes submitit requeue it on preemption
    or time-out; the requeued task resumes from its work folder."""

    def __init__(self, spec: dict[str, Any], store_root: str, work: str, data_root: str):
        self.spec = spec
        self.store_root = store_root
        self.work = work
        self.data_root = data_root

    def __call__(self) -> dict[str, Any]:
        from mlvar.backends.kinds import kind_of

        spec, work = self.spec, Path(self.work)
        kind = kind_of(spec)
        root = Path(self.store_root)
        store = ExperimentStore.open(root.parent, root.name)
        data_root = Path(self.data_root) if self.data_root else None
        print(f"mlvar: job {spec['job']} attempt {spec.get('attempt')} into {work}", flush=True)
        kind.run(spec, work, store.root, data_root, print)
        landed = kind.land(work, store, spec)
        left = kind.remaining(store, spec)
        if left is not None:
            raise RuntimeError(kind.pending_text(left, landed))
        shutil.rmtree(work, ignore_errors=True)
        print(f"mlvar: landed {', '.join(landed.imported) or 'nothing new'}", flush=True)
        return {"job": spec["job"], "landed": landed.imported}  # a status, never used as data

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        print(f"mlvar: job {self.spec['job']} requeued; it resumes from {self.work}", flush=True)
        return DelayedSubmission(self, *args, **kwargs)


class SlurmBackend(Backend):
    """A job array per submission (one array task per job), results landed by the jobs."""

    name = "slurm"
    summary = "slurm (a job array, through submitit)"
    synchronous = False
    dry_run_note = "sbatch script in slurm/submission.sh"

    @property
    def cfg(self) -> SlurmConfig:
        return self.config.backend.slurm

    def check(self, dry_run: bool, device: str = "cpu") -> None:
        missing = [key for key in REQUIRED if not getattr(self.cfg, key)]
        if missing:
            raise MlvarError(
                "missing [backend.slurm] settings: " + ", ".join(missing),
                "set them in mlvar.toml (see docs/clusters.md)",
            )
        parse_extra(self.cfg.extra_sbatch)
        gpus.job_gpus(device, self.cfg.gpus_per_job, GPUS_KEY)
        require("submitit", "slurm")
        if dry_run:
            return
        for tool in ("sbatch", "srun", "squeue", "scontrol", "sinfo"):
            if shutil.which(tool) is None:
                raise MlvarError(
                    f"the slurm backend needs '{tool}' on PATH, which is not there",
                    "run mlvar submit on a Slurm login node",
                )
        ping()
        check_partition(self.cfg.partition)

    # ---------------------------------------------------------------- where things go

    def folder(self, sub: Submission) -> Path:
        """submitit's folder of a submission: job scripts, pickles and logs."""
        if self.cfg.folder:
            return Path(self.cfg.folder).expanduser() / sub.experiment / sub.id
        return self._base(sub) / "slurm"

    def _base(self, sub: Submission) -> Path:
        root = Path(self.config.paths.runs_root).resolve()
        return root / sub.experiment / "submissions" / sub.id

    def _job_name(self, sub: Submission) -> str:
        return f"mlvar-{sub.experiment}"

    def _command(self, folder: Path) -> str:
        python = self.cfg.python or shlex.quote(sys.executable)
        return f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"

    # ---------------------------------------------------------------- submitting

    def write_dry_run(self, batch: JobBatch, out: Path) -> list[str]:
        """The plan (``submission.json``, ``specs/``) and ``slurm/submission.sh``, the sbatch
        script of the job array as submitit writes it."""
        from submitit.slurm.slurm import _make_sbatch_string

        files = write_specs(batch.sub, batch.specs, out)
        folder = self.folder(batch.sub)
        n = len(batch.sub.jobs)
        params = sbatch_parameters(self.cfg, self._job_name(batch.sub), batch.device)
        text = _make_sbatch_string(
            command=self._command(folder),
            folder=folder,
            map_count=n if n > 1 else None,
            **params,
        )
        atomic_write_text(Path(out) / "slurm" / "submission.sh", text)
        return [*files, "slurm/submission.sh"]

    def submit(self, batch: JobBatch, progress: SubmitProgress | None = None) -> None:
        sub = batch.sub
        sub.options = dict(sub.options, slurm_folder=str(self.folder(sub)))
        try:
            self._submit_jobs(sub, [(job, batch.specs[job.name]) for job in sub.jobs])
        except MlvarError:  # nothing was submitted: leave nothing behind
            if sub.path is not None:
                sub.path.unlink(missing_ok=True)
            shutil.rmtree(self.folder(sub), ignore_errors=True)
            shutil.rmtree(self._base(sub), ignore_errors=True)
            raise

    def _submit_jobs(self, sub: Submission, todo: list[tuple[Job, dict[str, Any]]]) -> None:
        """Submit one array of the attempts ``todo`` (job, spec left), recording them."""
        submitit = require("submitit", "slurm")
        base = self._base(sub)
        data_root = str(Path(self.config.paths.data_root).resolve())
        tasks = []
        for job, left in todo:
            spec = start_attempt(job, left)
            atomic_write_json(base / "specs" / f"{job.name}-a{job.attempts}.json", spec)
            work = base / "work" / job.name  # kept across attempts: runs resume from it
            tasks.append(SlurmTask(spec, str(base.parent.parent), str(work), data_root))
        folder = self.folder(sub)
        executor = submitit.SlurmExecutor(
            folder=folder, max_num_timeout=self.cfg.max_requeues, python=self.cfg.python or None
        )
        device = "cuda" if any(spec_device(spec) == "cuda" for _, spec in todo) else "cpu"
        executor.update_parameters(**sbatch_parameters(self.cfg, self._job_name(sub), device))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):  # submitit echoes sbatch's stderr
                submitted = executor.submit_array(tasks)
        except Exception as exc:  # noqa: BLE001 - sbatch refused (bad partition, account...)
            why = _first_line(str(exc)) or _first_line(err.getvalue()) or type(exc).__name__
            raise MlvarError(
                f"sbatch refused the jobs: {why}", "check the [backend.slurm] settings"
            ) from None
        for (job, _), handle in zip(todo, submitted, strict=True):
            job.ref, job.state = str(handle.job_id), "submitted"  # the last error stays

    # ---------------------------------------------------------------- following

    def refresh(self, sub: Submission, store: ExperimentStore) -> None:
        self._follow(sub, store)

    def download(self, sub: Submission, store: ExperimentStore) -> ImportResult:
        """Follow the jobs (landing what ended ones wrote); report what is in the store."""
        from mlvar.backends.kinds import kind_of

        landed = self._follow(sub, store)
        kind = kind_of({"kind": sub.kind})
        result = kind.empty_result()
        result.imported = list(landed.imported)
        result.rejected = dict(landed.rejected)
        have = [name for job in sub.jobs for name in kind.landed(store, sub, job)]
        result.skipped = [name for name in have if name not in result.imported]
        return result

    def _follow(self, sub: Submission, store: ExperimentStore) -> ImportResult:
        """Update every job not done from the store, the queue and the controller; land
        and retry (or fail) those that ended; returns what landed here."""
        from mlvar.backends.kinds import kind_of, read_spec

        kind = kind_of({"kind": sub.kind})
        base = self._base(sub)
        active = [j for j in sub.jobs if j.ref and j.state in ("submitted", "running")]
        states = queue_states([j.ref for j in active if j.ref])
        total = kind.empty_result()
        retry: list[tuple[Job, dict[str, Any]]] = []
        for job in active:
            spec = read_spec(base / "specs" / f"{job.name}-a{job.attempts}.json")
            state = states.get(str(job.ref), "")
            if kind.remaining(store, spec) is None:
                job.state, job.error, job.log_tail, job.failed = "complete", "", "", []
                continue
            if state and state not in ENDED:
                job.state = "submitted" if state in WAITING else "running"
                continue
            ended = state or final_state(str(job.ref))
            attempt = Attempt(
                spec,
                base / "work" / job.name,
                f"Slurm job {job.ref} ended {ended}"
                if ended
                else f"Slurm job {job.ref} left the queue without landing its results",
                self._log_tail(sub, str(job.ref)),
            )
            again, landed = finish_attempt(sub, job, store, kind, attempt)
            total.imported += landed.imported
            total.rejected.update(landed.rejected)
            if again is not None:
                retry.append((job, again))
        for job in sub.jobs:  # a failed job's folder stays, to look into
            if job.state == "complete":
                shutil.rmtree(base / "work" / job.name, ignore_errors=True)
        remove_empty(base / "work")
        if retry:
            self._submit_jobs(sub, retry)
        return total

    def _log_tail(self, sub: Submission, ref: str) -> str:
        from submitit.core.utils import JobPaths

        paths = JobPaths(self.folder(sub), job_id=ref, task_id=0)
        text = ""
        for path in (paths.stdout, paths.stderr):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return tail(text)
