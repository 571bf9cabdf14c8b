"""GPU requests and pinning of the backends (mlvar.backends.gpus), with mocked device
counts: a job asks for the GPUs of one pack (its runs train on one device), not
``gpus_per_run x`` its runs, on Ray (fractions too) and on Slurm (per array task, none
for CPU jobs); the local backend pins worker slot ``k`` to visible GPU ``k % n`` and the
plan says how more workers than GPUs share them; settings a job cannot use are one line.

Nothing here needs a GPU or a Ray cluster: ``mlvar.backends.gpus.gpu_count`` and
``mlvar.train.service._cuda_available`` are replaced, Ray is a stand-in module that
records the options of each task, and the local backend's worker processes are
replaced by a stand-in for ``subprocess.run`` that records their environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mlvar.backends import gpus, local, service, slurm
from mlvar.backends.ray_backend import task_options
from mlvar.backends.study import submit_study
from mlvar.cli import app
from mlvar.config import Config, PathsConfig, RayConfig, SlurmConfig
from mlvar.errors import MlvarError
from tiny_images import write_tiny_scenario

runner = CliRunner()
CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpusched") / "data"
    write_tiny_scenario(root)
    return root


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch, fast_deterministic_flag: list) -> None:
    """CUDA 'available' (nothing here computes on it), no cuBLAS or fault setting."""
    monkeypatch.setattr("mlvar.train.service._cuda_available", lambda: True)
    for var in (CUBLAS, "MLVAR_WORKER_FAULT", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)


def _config(data_root: Path, tmp_path: Path) -> Config:
    return Config(paths=PathsConfig(data_root, tmp_path / "runs", tmp_path / "reports"))


# ---------------------------------------------------------------- the helper


def test_job_gpus_is_one_pack_s_whatever_its_runs() -> None:
    assert gpus.job_gpus("cuda", 1, "k") == 1
    assert gpus.job_gpus("cuda", 0.25, "k") == 0.25
    assert gpus.job_gpus("cpu", 1, "k") == 0  # a CPU job asks for no GPU
    with pytest.raises(MlvarError, match="k = 8 asks for more GPUs than a job uses"):
        gpus.job_gpus("cuda", 8, "k")
    with pytest.raises(MlvarError, match="needs a GPU per job, but k = 0"):
        gpus.job_gpus("cuda", 0, "k")


def test_local_slots_map_modulo_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpus, "gpu_count", lambda: 2)
    assert gpus.visible_gpus() == ["0", "1"]
    assert gpus.slot_gpus(5, gpus.visible_gpus()) == ["0", "1", "0", "1", "0"]
    assert local.default_workers("cuda") == 2 and local.default_workers("cpu") == 0
    # this process sees GPUs 3 and 5 of the machine: its children are pinned to those
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpus.slot_gpus(3, gpus.visible_gpus()) == ["3", "5", "3"]
    assert gpus.sharing_note(2, ["3", "5"]) is None
    assert gpus.sharing_note(3, ["3", "5"]) == (
        "note: 3 local worker processes share 2 GPU(s), 1.5 per GPU "
        "(GPU 3: workers 0, 2; GPU 5: workers 1)"
    )
    monkeypatch.setattr(gpus, "gpu_count", lambda: 0)
    assert local.default_workers("cuda") == 1
    with pytest.raises(MlvarError, match="no GPU is visible"):
        gpus.slot_gpus(2, gpus.visible_gpus())


# ---------------------------------------------------------------- ray


def fake_ray(options: list[dict[str, Any]]) -> types.ModuleType:
    """A stand-in ``ray``: every task's ``ray.remote`` options land in ``options``; the
    tasks fail at once as bad input (there is no GPU here), so each job ends failed."""
    ray = types.ModuleType("ray")

    class Ref:
        def hex(self) -> str:
            return f"ref{id(self):x}"

    def remote(**opts: Any):
        options.append(opts)
        return lambda fn: types.SimpleNamespace(remote=lambda *args: Ref())

    ray.is_initialized = lambda: True
    ray.put = lambda value: value
    ray.remote = remote
    ray.wait = lambda refs, num_returns=1: (refs[:1], refs[1:])
    ray.get = lambda ref: {"files": {}, "error": "no GPU here", "fatal": True}
    return ray


@pytest.mark.parametrize(("per_run", "asked"), [(1.0, 1.0), (0.25, 0.25)])
def test_ray_asks_one_pack_s_gpus_for_an_8_run_pack(
    cuda, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_run, asked
) -> None:
    options: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "ray", fake_ray(options))
    cfg = _config(data_root, tmp_path)
    cfg.backend.ray = RayConfig(gpus_per_run=per_run, cpus_per_run=2)
    res = service.submit(
        cfg,
        "digits",
        "tiny",
        runs=8,
        backend="ray",
        overrides={"device": "cuda"},
        runs_per_job=8,
        retries=0,
    )
    assert [j.run_indices for j in res.submission.jobs] == [list(range(8))]
    (task,) = options  # one task for the pack of 8 runs (it used to ask for 8 GPUs)
    assert task["num_gpus"] == asked and task["num_cpus"] == 2 and task["max_retries"] == 0
    assert task["runtime_env"] == {"env_vars": {CUBLAS: ":4096:8"}}
    assert res.submission.jobs[0].error == "no GPU here"  # what the stand-in task said


def test_ray_cpu_tasks_ask_for_no_gpu() -> None:
    assert task_options(RayConfig(gpus_per_run=1), "cpu")["num_gpus"] == 0
    assert "runtime_env" not in task_options(RayConfig(gpus_per_run=1), "cpu")


def test_ray_gpu_settings_a_job_cannot_use_are_one_line(
    cuda, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tree_listing
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    args = ["submit", "digits", "--scenario", "tiny", "--backend", "ray", "--device", "cuda"]
    for value, words in ((8, "asks for more GPUs than a job uses"), (0, "needs a GPU per job")):
        (tmp_path / "mlvar.toml").write_text(f"[backend.ray]\ngpus_per_run = {value}\n")
        before = tree_listing(tmp_path)
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.stdout + res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert words in line and "(hint: set backend.ray.gpus_per_run = 1" in line, line
        assert tree_listing(tmp_path) == before


# ---------------------------------------------------------------- local


def test_local_workers_are_pinned_modulo_the_gpus_and_the_plan_says_so(
    cuda, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpus, "gpu_count", lambda: 2)
    seen: list[dict[str, str]] = []
    all_started = threading.Barrier(3, timeout=60)  # every slot busy at once
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if "mlvar.backends.worker" not in cmd:
            return real_run(cmd, *args, **kwargs)
        seen.append(kwargs["env"])
        all_started.wait()
        return subprocess.CompletedProcess(cmd, 2)  # bad input: not retried

    monkeypatch.setattr(local.subprocess, "run", run)
    notes: list[str] = []
    result = submit_study(
        _config(data_root, tmp_path),
        "digits",
        "tiny",
        runs=3,
        backend="local",
        overrides={"device": "cuda"},
        runs_per_job=1,
        retries=0,
        workers=3,
        on_plan=lambda plan: notes.extend(plan.notes),
    )
    assert notes == [
        "note: 3 local worker processes share 2 GPU(s), 1.5 per GPU "
        "(GPU 0: workers 0, 2; GPU 1: workers 1)"
    ]
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in seen) == ["0", "0", "1"]
    assert all(env[CUBLAS] == ":4096:8" for env in seen)
    sub = result.single.submission
    assert [j.state for j in sub.jobs] == ["failed"] * 3
    logs = sorted((tmp_path / "runs").glob("*/submissions/*/logs/*.log"))
    firsts = sorted(p.read_text().splitlines()[0] for p in logs)
    assert firsts == [f"mlvar: worker slot {k} on GPU {g}" for k, g in ((0, 0), (1, 1), (2, 0))]


# ---------------------------------------------------------------- slurm


def test_slurm_asks_one_gpu_per_job_on_cuda_and_none_on_the_cpu() -> None:
    cfg = SlurmConfig(partition="p", gpus_per_job=1)
    on_cuda = slurm.sbatch_parameters(cfg, "j", "cuda")
    assert on_cuda["gpus_per_node"] == 1
    assert f"export {CUBLAS}=:4096:8" in on_cuda["setup"]
    on_cpu = slurm.sbatch_parameters(cfg, "j", "cpu")
    assert "gpus_per_node" not in on_cpu and "setup" not in on_cpu
    backend = slurm.SlurmBackend(Config())
    for per_job, words in ((2, "asks for more GPUs"), (0, "needs a GPU per job")):
        backend.config.backend.slurm = SlurmConfig(partition="p", gpus_per_job=per_job)
        with pytest.raises(MlvarError, match=words):
            backend.check(dry_run=True, device="cuda")
        backend.check(dry_run=True, device="cpu")  # a CPU job uses none


def test_slurm_sbatch_of_an_8_run_pack_asks_for_one_gpu(
    cuda, data_root: Path, tmp_path: Path
) -> None:
    pytest.importorskip("submitit")
    cfg = _config(data_root, tmp_path)
    cfg.backend.slurm = SlurmConfig(partition="gpu", gpus_per_job=1)
    out = tmp_path / "jobs"
    res = service.submit(
        cfg,
        "digits",
        "tiny",
        runs=16,
        backend="slurm",
        overrides={"device": "cuda"},
        dry_run=True,
        out=out,
        runs_per_job=8,
    )
    assert [len(j.run_indices) for j in res.submission.jobs] == [8, 8]
    text = (out / "slurm" / "submission.sh").read_text()
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    gpu_lines = [line for line in sbatch if "gpu" in line.split("=")[0]]
    assert gpu_lines == ["#SBATCH --gpus-per-node=1"]  # per array task, i.e. per job
    assert "#SBATCH --array=0-1" in text and f"export {CUBLAS}=:4096:8" in text
    # a retried job's array is built from its spec: it computes on CUDA too
    spec = json.loads((out / "specs" / "pack-001.json").read_text())
    assert slurm.spec_device(spec) == "cuda" and slurm.spec_device({"kind": "analysis"}) == "cpu"
