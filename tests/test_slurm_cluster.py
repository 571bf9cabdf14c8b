"""The single-node Slurm test cluster (tests/slurm_cluster.py) works: plain sbatch jobs,
scancel, submitit jobs and job arrays run on it, and it leaves nothing behind.

Skipped, with the reason, where Slurm/munge are not installed or the process is not
root; ``.ci/run`` installs them so that CI always runs these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from slurm_cluster import SlurmCluster

# The fixtures slurm_cluster and slurm (one cluster for the whole session). Registered as
# a plugin rather than imported so that a test's `slurm` argument does not shadow an
# import (ruff F811); the module is imported here only inside the tests that need it,
# so that pytest can still rewrite it as a plugin.
pytest_plugins = ["slurm_cluster"]


def test_sbatch_wrap_job_runs_and_writes_a_file(slurm: SlurmCluster) -> None:
    assert os.environ["SLURM_CONF"] == str(slurm.conf)
    out = slurm.shared / "hello.txt"
    job = slurm.sbatch(
        f"--output={slurm.shared / 'hello-%j.log'}",
        "--wrap",
        f'echo "$SLURM_JOB_ID on $(hostname -s) in $SLURM_JOB_PARTITION" > {out}',
    )
    assert slurm.wait_state(job, {"COMPLETED", "FAILED"}) == "COMPLETED"
    assert out.read_text() == f"{job} on {slurm.node} in {slurm.partition}\n"
    info = slurm.scontrol_job(job)
    assert info["ExitCode"] == "0:0"
    assert info["StdOut"] == str(slurm.shared / f"hello-{job}.log")
    # A finished job is gone from squeue but scontrol still describes it.
    assert job not in [j["id"] for j in slurm.jobs()]


def test_failed_job_is_reported_failed_with_its_exit_code(slurm: SlurmCluster) -> None:
    job = slurm.sbatch("--output=/dev/null", "--wrap", "exit 3")
    assert slurm.wait_state(job, {"COMPLETED", "FAILED"}) == "FAILED"
    assert slurm.scontrol_job(job)["ExitCode"] == "3:0"


def test_scancel_ends_a_running_job(slurm: SlurmCluster) -> None:
    started = slurm.shared / "started.txt"
    job = slurm.sbatch("--output=/dev/null", "--wrap", f"touch {started}; sleep 300")
    slurm.wait_state(job, "RUNNING")
    assert [(j["id"], j["state"]) for j in slurm.jobs()] == [(job, "RUNNING")]
    slurm.command("scancel", job)
    assert slurm.wait_state(job, "CANCELLED") == "CANCELLED"
    assert started.exists()
    slurm.wait_idle()
    assert slurm.jobs() == []


def test_unknown_job_is_none(slurm: SlurmCluster) -> None:
    assert slurm.scontrol_job("987654") is None


def _double(x: int) -> tuple[int, str]:
    return 2 * x, os.environ["SLURM_JOB_ID"]


def test_submitit_job_returns_its_value(slurm: SlurmCluster) -> None:
    submitit = pytest.importorskip("submitit")
    # Jobs unpickle functions by reference: this test module must be importable there.
    executor = submitit.AutoExecutor(folder=slurm.new_folder("submitit"), cluster="slurm")
    executor.update_parameters(
        timeout_min=2, slurm_partition=slurm.partition, slurm_setup=[_pythonpath()]
    )
    job = executor.submit(_double, 21)
    value, job_id = job.result()
    assert (value, job_id) == (42, job.job_id)
    assert slurm.wait_state(job.job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"


def test_submitit_job_array_runs_every_task(slurm: SlurmCluster) -> None:
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=slurm.new_folder("array"), cluster="slurm")
    executor.update_parameters(
        timeout_min=2, slurm_partition=slurm.partition, slurm_setup=[_pythonpath()]
    )
    jobs = executor.map_array(_double, [1, 2, 3])
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{k}" for k in range(3)]
    results = [j.result() for j in jobs]
    assert [value for value, _ in results] == [2, 4, 6]
    # Each task ran as its own Slurm job.
    assert len({job_id for _, job_id in results}) == 3
    for j in jobs:
        # The result file is written before the task's python has exited.
        assert slurm.wait_state(j.job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"
        assert slurm.scontrol_job(j.job_id)["ArrayJobId"] == array_id


def _pythonpath() -> str:
    return f"export PYTHONPATH={Path(__file__).parent}${{PYTHONPATH:+:$PYTHONPATH}}"


def test_cluster_stops_cleanly_and_restores_the_environment() -> None:
    """A second cluster, started and stopped here: no daemon, process or folder remains."""
    import slurm_cluster as module

    reason = module.missing()
    if reason:
        pytest.skip(reason)

    before = os.environ.get("SLURM_CONF")
    with module.running_cluster() as cluster:
        assert os.environ["SLURM_CONF"] == str(cluster.conf)
        pids = [d.process.pid for d in cluster._daemons]
        job = cluster.sbatch("--output=/dev/null", "--wrap", "sleep 300")
        cluster.wait_state(job, "RUNNING")
        # The job's processes carry the cluster's SLURM_CONF: that is how leftovers are found.
        assert module._leftover_pids(cluster.conf)
    assert os.environ.get("SLURM_CONF") == before
    assert not cluster.root.exists()
    assert module._leftover_pids(cluster.conf) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_daemon_that_fails_to_start_is_reported_with_its_log(monkeypatch) -> None:
    """A slurm.conf slurmctld rejects: one error with its log, and nothing left behind."""
    import slurm_cluster as module

    reason = module.missing()
    if reason:
        pytest.skip(reason)

    write_conf = module._write_conf
    roots = []

    def broken_conf(root: Path, *args) -> Path:
        roots.append(root)
        conf = write_conf(root, *args)
        conf.write_text(conf.read_text() + "NoSuchSlurmOption=1\n")
        return conf

    monkeypatch.setattr(module, "_write_conf", broken_conf)
    before = os.environ.get("SLURM_CONF")
    with pytest.raises(module.SlurmStartError, match=r"(?s)slurmctld exited.*NoSuchSlurmOption"):
        module.start_cluster()
    assert os.environ.get("SLURM_CONF") == before
    assert not roots[0].exists()
    assert module._leftover_pids(roots[0] / "etc" / "slurm.conf") == []
