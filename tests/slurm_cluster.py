"""A real single-node Slurm cluster for tests: ``munged``, ``slurmctld`` and ``slurmd``.

The session fixture :func:`slurm_cluster` writes a ``slurm.conf`` for this host into a
temporary folder (accounting off, no cgroups, its own free ports, state, spool and logs),
starts the daemons from Debian's ``slurm-wlm`` and ``munge`` as children of the test
process, exports ``SLURM_CONF`` so that ``sbatch``/``squeue``/submitit in the tests and
in their children talk to it, waits until the node is idle, and at the end cancels every
job, stops the daemons, ends whatever processes of the cluster are left and removes the
folder. Tests that use it are skipped, with the reason, when the packages are missing or
the process is not root (the daemons run jobs as root here); ``.ci/run`` installs them.

Use it from a test module::

    from slurm_cluster import slurm, slurm_cluster  # noqa: F401 (fixtures)

``slurm_cluster`` is the cluster for the whole session; ``slurm`` is the same cluster for
one test, left idle afterwards (jobs the test left queued are cancelled), so that a
failing test does not hold the node for the next one.

Run by hand, ``python tests/slurm_cluster.py`` starts a cluster and prints the
``SLURM_CONF`` to export in another shell; Ctrl-C stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

APT_PACKAGES = "slurm-wlm munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "unmunge", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
PARTITION = "debug"
# Finished jobs stay visible to `scontrol show job` this long (slurmctld's MinJobAge).
MIN_JOB_AGE_S = 3600
# Seconds between SIGTERM and SIGKILL when a job is cancelled or runs out of time.
KILL_WAIT_S = 5
# A requeued job may start again this long after its requeue (AuthInfo cred_expire).
REQUEUE_DELAY_S = 5
START_TIMEOUT_S = 30.0
# A job is over for squeue once it leaves these states.
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
)


class SlurmStartError(RuntimeError):
    """A daemon of the test cluster did not come up (the message holds its log tail)."""


def missing() -> str | None:
    """Why the test cluster cannot run here (one line), or None when it can."""
    absent = [name for name in DAEMONS + CLIENTS if not _which(name)]
    if absent:
        return (
            f"Slurm/munge not installed ({', '.join(absent)} missing; "
            f"apt-get install {APT_PACKAGES}; .ci/run does this)"
        )
    if os.geteuid() != 0:
        return (
            "the Slurm test cluster needs root (its daemons run as SlurmUser=root; "
            f"packages: {APT_PACKAGES})"
        )
    return None


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_ports(count: int) -> list[int]:
    """Distinct TCP ports free right now (all held open together while they are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text[-lines:])


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the daemon gets SIGTERM if the test
    # process dies without tearing down (SIGKILL, a crash), so it never outlives it.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _node_hardware() -> dict[str, str]:
    """The node line `slurmd -C` measures for this machine (CPUs, sockets, memory)."""
    out = subprocess.run(
        [_which("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    hardware = {k: fields[k] for k in keep if k in fields}
    # Leave headroom: a node whose measured memory is below its RealMemory is drained.
    hardware["RealMemory"] = str(max(1, int(int(fields.get("RealMemory", "1024")) * 0.9)))
    return hardware


@dataclass
class _Daemon:
    name: str
    process: subprocess.Popen
    logs: tuple[Path, ...]

    def alive(self) -> bool:
        return self.process.poll() is None

    def failure(self, what: str) -> SlurmStartError:
        tails = "\n".join(f"--- {p} ---\n{_tail(p)}" for p in self.logs if p.exists())
        code = self.process.poll()
        state = f"exited with {code}" if code is not None else "still running"
        return SlurmStartError(f"{self.name} {what} ({state}); log tail:\n{tails}")

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


@dataclass
class SlurmCluster:
    """A running single-node test cluster and the helpers tests need.

    Attributes
    ----------
    root
        The temporary folder holding its configuration, state, spool and logs.
    conf
        Its ``slurm.conf`` (also ``$SLURM_CONF`` while the cluster runs).
    partition
        The one partition (the default one).
    node
        The node's name (this host's short name).
    cpus
        CPUs the node offers (jobs get one each unless they ask for more).
    shared
        A folder every job can read and write (the "shared filesystem").
    """

    root: Path
    conf: Path
    partition: str
    node: str
    cpus: int
    shared: Path
    log_dir: Path
    started_in_s: float = 0.0
    _daemons: list[_Daemon] = field(default_factory=list, repr=False)
    _folders: int = field(default=0, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm commands of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run a Slurm client command against this cluster; return its stdout."""
        done = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed with {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def new_folder(self, name: str = "jobs") -> Path:
        """A fresh folder under :attr:`shared` (unique per call)."""
        self._folders += 1
        folder = self.shared / f"{name}-{self._folders:03d}"
        folder.mkdir(parents=True)
        return folder

    def sbatch(self, *args: str) -> str:
        """Submit with ``sbatch --parsable ARGS``; return the job id."""
        out = self.command("sbatch", "--parsable", *args)
        return out.strip().split(";")[0]

    def jobs(self) -> list[dict[str, str]]:
        """Jobs ``squeue`` lists (pending, running, completing), array tasks one by one.

        Each is a dict with ``id`` (``123`` or ``123_4``), ``state`` (long form, e.g.
        ``RUNNING``), ``name`` and ``reason``.
        """
        out = self.command("squeue", "--noheader", "--array", "--format=%i|%T|%j|%r")
        keys = ("id", "state", "name", "reason")
        return [
            dict(zip(keys, line.split("|", 3), strict=True)) for line in out.splitlines() if line
        ]

    def scontrol_job(self, job_id: str) -> dict[str, str] | None:
        """``scontrol show job ID`` as a dict of its ``Key=Value`` fields.

        None when slurmctld no longer (or never) knew the job. For an array's main id it
        describes the first task; ask ``ID_TASK`` for one task.
        """
        done = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", str(job_id)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        if done.returncode != 0:
            if "Invalid job id" in done.stderr:
                return None
            raise RuntimeError(f"scontrol show job {job_id} failed: {done.stderr.strip()}")
        first = done.stdout.splitlines()[0]
        return dict(re.findall(r"(\S+?)=(\S*)", first))

    def job_state(self, job_id: str) -> str | None:
        """``JobState`` of a job (``COMPLETED``, ``FAILED``, ...), None if unknown."""
        info = self.scontrol_job(job_id)
        return None if info is None else info["JobState"]

    def wait_state(self, job_id: str, states: set[str] | str, timeout: float = 30.0) -> str:
        """Wait until ``scontrol`` reports one of ``states`` for the job; return it."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} is {state} after {timeout:.0f} s, not {sorted(wanted)}")

    def node_state(self) -> str:
        """The node's state as ``sinfo`` says it (``idle``, ``mixed``, ``allocated``...)."""
        return self.command("sinfo", "--noheader", "--Node", "--format=%T").strip()

    def cancel_all(self) -> None:
        """Cancel every job still queued or running."""
        ids = sorted({job["id"].split("_")[0] for job in self.jobs()})
        if ids:
            self.command("scancel", *ids, check=False)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no job is queued or running and the node is idle again."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_daemons()
            active = [j for j in self.jobs() if j["state"] in ACTIVE_STATES]
            state = self.node_state()
            if not active and state == "idle":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Slurm test cluster not idle after {timeout:.0f} s: node {state}, "
                    f"jobs {active}; slurmd log:\n{_tail(self.log_dir / 'slurmd.log', 15)}"
                )
            time.sleep(0.2)

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        """The last lines of a daemon's log (``munged``, ``slurmctld`` or ``slurmd``)."""
        return _tail(self.log_dir / f"{daemon}.log", lines)

    def _check_daemons(self) -> None:
        for daemon in self._daemons:
            if not daemon.alive():
                raise daemon.failure("died")


def _write_conf(root: Path, host: str, hardware: dict[str, str], munge_socket: Path | None) -> Path:
    node = " ".join(f"{k}={v}" for k, v in hardware.items())
    ctld_port, slurmd_port = _free_ports(2)
    lines = [
        "# Written by tests/slurm_cluster.py for one test session.",
        "ClusterName=mlvartest",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again
        # (default 120 s).
        f"AuthInfo=cred_expire={REQUEUE_DELAY_S}"
        + (f",socket={munge_socket}" if munge_socket else ""),
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No accounting database and no cgroups here.
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        # One CPU per job by default, so that array tasks run side by side.
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        # Schedule a batch job at once (the default batching waits up to 3 s), and look
        # at pending jobs every 2 s, not every 60 s (a requeued job waits for that).
        "SchedulerParameters=batch_sched_delay=0,sched_interval=2",
        "ReturnToService=2",
        f"MinJobAge={MIN_JOB_AGE_S}",
        "JobRequeue=1",
        f"KillWait={KILL_WAIT_S}",
        "InactiveLimit=0",
        "MailProg=/bin/true",
        f"NodeName={host} NodeAddr=127.0.0.1 {node} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "etc" / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _munge_answers(socket_path: Path | None = None) -> bool:
    """Whether a munged answers (on its default socket, or on ``socket_path``)."""
    extra = ["--socket", str(socket_path)] if socket_path else []
    try:
        cred = subprocess.run(
            ["munge", "--no-input", *extra], capture_output=True, timeout=10, check=True
        ).stdout
        subprocess.run(["unmunge", *extra], input=cred, capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _spawn(name: str, args: list[str], root: Path, log: Path, env: dict[str, str]) -> _Daemon:
    out = root / "log" / f"{name}.out"
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [_which(name), *args],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return _Daemon(name, process, (log, out))


def _wait_for(daemon: _Daemon, ready, what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not daemon.alive():
            raise daemon.failure(f"exited before {what}")
        if time.monotonic() > deadline:
            raise daemon.failure(f"not {what} after {timeout:.0f} s")
        time.sleep(0.05)


def _start_munged(root: Path, env: dict[str, str]) -> tuple[_Daemon, Path]:
    folder = root / "munge"
    folder.mkdir(mode=0o755)
    # munged refuses a key not owned by its user or readable by others.
    key = folder / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(128))
    sock = folder / "munge.socket"
    log = root / "log" / "munged.log"
    daemon = _spawn(
        "munged",
        [
            "--foreground",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--seed-file={folder / 'munged.seed'}",
            f"--log-file={log}",
        ],
        root,
        log,
        env,
    )
    _wait_for(daemon, lambda: sock.exists() and _munge_answers(sock), "answering")
    return daemon, sock


def _node_idle(cluster: SlurmCluster) -> bool:
    try:
        return cluster.node_state() == "idle"
    except (RuntimeError, subprocess.SubprocessError):
        return False


def _ctld_up(cluster: SlurmCluster) -> bool:
    try:
        return "is UP" in cluster.command("scontrol", "ping", check=False, timeout=10)
    except subprocess.SubprocessError:
        return False


def _leftover_pids(conf: Path) -> list[int]:
    """Processes (job steps, job scripts) still carrying this cluster's SLURM_CONF."""
    marker = f"SLURM_CONF={conf}".encode()
    mine = {os.getpid(), os.getppid()}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _end_leftovers(conf: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _leftover_pids(conf)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _leftover_pids(conf):
            time.sleep(0.1)


def start_cluster() -> SlurmCluster:
    """Start munged (unless one answers), slurmctld and slurmd; wait for an idle node.

    Call :func:`stop_cluster` afterwards, also when this raises half way (it cleans up
    what it started and re-raises). The environment is left untouched; use
    :attr:`SlurmCluster.env` or :func:`running_cluster` to get ``SLURM_CONF`` set.
    """
    started = time.monotonic()
    host = socket.gethostname().split(".")[0]
    root = Path(tempfile.mkdtemp(prefix="mlvar-slurm-"))
    # munged insists that every folder above its socket is searchable by all.
    root.chmod(0o755)
    for sub in ("etc", "state", "spool", "log", "run"):
        (root / sub).mkdir()
    shared = root / "shared"
    shared.mkdir(mode=0o777)
    cluster = SlurmCluster(
        root=root,
        conf=root / "etc" / "slurm.conf",
        partition=PARTITION,
        node=host,
        cpus=0,
        shared=shared,
        log_dir=root / "log",
    )
    try:
        env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
        munge_socket = None
        if not _munge_answers():
            munged, munge_socket = _start_munged(root, env)
            cluster._daemons.append(munged)
        hardware = _node_hardware()
        cluster.cpus = int(hardware["CPUs"])
        _write_conf(root, host, hardware, munge_socket)
        ctld = _spawn(
            "slurmctld", ["-D", "-f", str(cluster.conf)], root, root / "log/slurmctld.log", env
        )
        cluster._daemons.append(ctld)
        _wait_for(ctld, lambda: _ctld_up(cluster), "answering")
        slurmd = _spawn(
            "slurmd", ["-D", "-f", str(cluster.conf)], root, root / "log/slurmd.log", env
        )
        cluster._daemons.append(slurmd)
        _wait_for(slurmd, lambda: _node_idle(cluster), "registered with an idle node")
    except BaseException:
        stop_cluster(cluster)
        raise
    cluster.started_in_s = time.monotonic() - started
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel every job, stop the daemons, end leftover job processes, remove the folder."""
    ctld_alive = any(d.name == "slurmctld" and d.alive() for d in cluster._daemons)
    if ctld_alive:
        with contextlib.suppress(Exception):
            cluster.cancel_all()
            deadline = time.monotonic() + KILL_WAIT_S + 5
            while time.monotonic() < deadline and cluster.jobs():
                time.sleep(0.2)
    for daemon in reversed(cluster._daemons):
        daemon.stop()
    _end_leftovers(cluster.conf)
    shutil.rmtree(cluster.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    """A started cluster with ``SLURM_CONF`` exported; the environment is restored after."""
    cluster = start_cluster()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stop_cluster(cluster)


# One cluster per process, even when several test modules import the fixture (each
# import makes its own fixture definition): the first user starts it, the last stops it.
_shared: dict[str, object] = {"users": 0, "context": None, "cluster": None}


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The single-node Slurm cluster of this test session (skipped where it cannot run)."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    if _shared["users"] == 0:
        context = running_cluster()
        _shared["cluster"] = context.__enter__()
        _shared["context"] = context
    _shared["users"] += 1
    try:
        yield _shared["cluster"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            context, _shared["context"], _shared["cluster"] = _shared["context"], None, None
            context.__exit__(None, None, None)


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster for one test; jobs it leaves queued are cancelled after it."""
    slurm_cluster.wait_idle()
    yield slurm_cluster
    slurm_cluster.cancel_all()
    slurm_cluster.wait_idle()


def _main() -> None:
    reason = missing()
    if reason:
        sys.exit(reason)
    with running_cluster() as cluster:
        print(f"started in {cluster.started_in_s:.2f} s; in another shell:")
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"shared folder: {cluster.shared}; logs: {cluster.log_dir}; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                cluster._check_daemons()
                time.sleep(1)


if __name__ == "__main__":
    _main()
