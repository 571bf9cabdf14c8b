"""mlvar submit: the local backend, run subsets, importing worker outputs, retries, a killed
worker, bad input, and the [backend.*]/[submit] config tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlvar.backends import service
from mlvar.backends.spec import load_submission
from mlvar.backends.transfer import import_runs
from mlvar.cli import app
from mlvar.config import Config, PathsConfig, load_config
from mlvar.data.registry import prepare
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore
from mlvar.train.service import train

EXP = "digits-holdout-sub3-r1.0-mlp"
OVER = {"epochs": 2}
runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "data"
    prepare(root, "digits", mode="holdout", subclass=3)
    return root


def make_config(data_root: Path, runs: Path) -> Config:
    return Config(paths=PathsConfig(data_root, runs, runs.parent / "reports"))


def logits(runs_root: Path, name: str = EXP) -> dict[str, np.ndarray]:
    store = ExperimentStore.open(runs_root, name)
    return {r.run_id: np.load(r.logits_path("test")) for r in store.runs(verify=True)}


def test_train_run_indices_trains_exactly_those(data_root: Path, tmp_path: Path) -> None:
    cfg = make_config(data_root, tmp_path / "runs")
    res = train(cfg, "digits", runs=6, overrides=OVER, run_indices=[4, 1])
    assert res.trained == ["run-0001", "run-0004"]
    again = train(cfg, "digits", runs=6, overrides=OVER, run_indices=[1, 2])
    assert again.skipped == ["run-0001"] and again.trained == ["run-0002"]
    full = make_config(data_root, tmp_path / "full")
    train(full, "digits", runs=5, overrides=OVER)
    a, b = logits(tmp_path / "runs"), logits(tmp_path / "full")
    for run_id in a:  # a run does not depend on which others share its pack
        assert np.array_equal(a[run_id], b[run_id])


def test_local_submit_equals_train_and_skips_complete_runs(data_root: Path, tmp_path: Path) -> None:
    cfg = make_config(data_root, tmp_path / "runs")
    train(cfg, "digits", runs=2, overrides=OVER)
    res = service.submit(cfg, "digits", runs=5, overrides=OVER, runs_per_job=2)
    assert res.skipped == ["run-0000", "run-0001"]
    assert [j.run_indices for j in res.submission.jobs] == [[2, 3], [4]]
    assert res.submission.state == "complete"
    record = json.loads(res.submission.path.read_text())
    assert record["backend"] == "local" and record["state"] == "complete"
    ref = make_config(data_root, tmp_path / "ref")
    train(ref, "digits", runs=5, overrides=OVER)
    a, b = logits(tmp_path / "runs"), logits(tmp_path / "ref")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    again = service.submit(cfg, "digits", runs=5, overrides=OVER)
    assert again.submission is None and len(again.skipped) == 5


def _worker_output(data_root: Path, out: Path, runs: int = 3) -> Path:
    cfg = make_config(data_root, out)
    train(cfg, "digits", runs=runs, overrides=OVER)
    return out / EXP


def test_import_lands_only_complete_verified_runs(data_root: Path, tmp_path: Path) -> None:
    src = _worker_output(data_root, tmp_path / "worker", runs=4)
    (src / "runs" / "run-0001" / "run.json").unlink()  # killed before run.json
    bad = src / "runs" / "run-0002" / "test.logits.npy"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    dest_cfg = make_config(data_root, tmp_path / "dest")
    train(dest_cfg, "digits", runs=1, overrides=OVER, run_indices=[3])
    store = ExperimentStore.open(tmp_path / "dest", EXP)
    before = (store.run_dir("run-0003") / "run.json").read_bytes()
    res = import_runs(tmp_path / "worker", store)
    assert res.imported == ["run-0000"]
    assert res.skipped == ["run-0003"]  # complete in the destination: never overwritten
    assert set(res.rejected) == {"run-0001", "run-0002"}
    assert "sha256" in res.rejected["run-0002"]
    assert (store.run_dir("run-0003") / "run.json").read_bytes() == before
    assert sorted(p.name for p in (store.root / "runs").iterdir()) == ["run-0000", "run-0003"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]
    assert not store.runs(verify=True)[0].verify()


def test_import_refuses_another_experiment_identity(data_root: Path, tmp_path: Path) -> None:
    _worker_output(data_root, tmp_path / "worker", runs=1)
    cfg = make_config(data_root, tmp_path / "dest")
    train(cfg, "digits", runs=1, overrides={"epochs": 3}, run_indices=[])
    store = ExperimentStore.open(tmp_path / "dest", EXP)
    with pytest.raises(MlvarError, match=r"differs in train\.epochs") as info:
        import_runs(tmp_path / "worker", store)
    assert "\n" not in str(info.value)
    assert list((store.root / "runs").iterdir()) == []


def test_failing_run_is_retried_then_reported_by_seed(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(data_root, tmp_path / "runs")
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1")  # every attempt of the pack with run 1
    over = dict(OVER, base_seed=10)
    res = service.submit(cfg, "digits", runs=4, overrides=over, runs_per_job=2, retries=2)
    sub = res.submission
    assert sub.state == "failed"
    failed = {j.name: j for j in sub.jobs}
    assert failed["pack-000"].state == "failed" and failed["pack-000"].attempts == 3
    assert failed["pack-000"].failed == [
        {"run_id": "run-0000", "seed": 10},
        {"run_id": "run-0001", "seed": 11},
    ]
    assert "injected failure in run run-0001" in failed["pack-000"].log_tail
    assert failed["pack-001"].state == "complete"  # the other runs went on
    assert sorted(logits(tmp_path / "runs")) == ["run-0002", "run-0003"]
    # A failure in the first attempt only: the retry completes it.
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1:1")
    again = service.submit(cfg, "digits", runs=4, overrides=over, runs_per_job=2, retries=1)
    assert again.submission.state == "complete"
    assert again.submission.jobs[0].attempts == 2
    assert sorted(logits(tmp_path / "runs")) == [f"run-{i:04d}" for i in range(4)]


@pytest.mark.slow
def test_killed_worker_leaves_no_partial_run_and_resubmit_completes(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(data_root, tmp_path / "runs")
    over = dict(OVER, pack_size=2)  # the worker writes runs 0, 1, then is killed in run 2
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "kill:2")
    res = service.submit(
        cfg, "digits", runs=4, overrides=over, runs_per_job=4, retries=0, workers=1
    )
    job = res.submission.jobs[0]
    assert job.state == "failed" and "code -9" in job.error, job
    assert [f["run_id"] for f in job.failed] == ["run-0002", "run-0003"]
    assert "injected kill in run-0002" in job.log_tail
    store = ExperimentStore.open(tmp_path / "runs", EXP)
    assert sorted(p.name for p in (store.root / "runs").iterdir()) == ["run-0000", "run-0001"]
    assert not store.unfinished_run_dirs()
    monkeypatch.delenv("MLVAR_WORKER_FAULT")
    again = service.submit(cfg, "digits", runs=4, overrides=over, runs_per_job=4, workers=1)
    assert again.skipped == ["run-0000", "run-0001"]
    assert again.submission.state == "complete"
    ref = make_config(data_root, tmp_path / "ref")
    train(ref, "digits", runs=4, overrides=over)
    a, b = logits(tmp_path / "runs"), logits(tmp_path / "ref")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert not (store.root / "submissions" / again.submission.id / "work").exists()


# ---------------------------------------------------------------- CLI and bad input


@pytest.fixture
def cli_root(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    return tmp_path


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_cli_submit_status_download(cli_root: Path, data_root: Path) -> None:
    res = runner.invoke(app, ["submit", "digits", "--runs", "3", "--epochs", "2", "--json"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["submission"]["state"] == "complete" and out["backend"] == "local"
    res = runner.invoke(app, ["submit", "status", EXP, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["state"] == "complete"
    res = runner.invoke(app, ["submit", "download", EXP])
    assert res.exit_code == 0 and "Imported 0 run(s)" in res.stdout
    _worker_output(data_root, cli_root / "worker", runs=5)
    res = runner.invoke(app, ["submit", "download", EXP, "--from", "worker", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["imported"] == ["run-0003", "run-0004"]
    res = runner.invoke(app, ["submit", "--help"])
    assert res.exit_code == 0 and "mlvar submit status" in res.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--backend", "pbs"], ["unknown backend 'pbs'", "local", "slurm"]),
        (["--backend", "aml"], ["subscription_id", "resource_group", "workspace", "compute"]),
        (["--backend", "aml", "--dry-run"], ["missing [backend.aml] settings: compute"]),
        (["--runs-per-job", "0"], ["--runs-per-job"]),
    ],
)
def test_cli_bad_input_writes_nothing(cli_root: Path, args: list[str], words: list[str]) -> None:
    before = listing(cli_root)
    res = runner.invoke(app, ["submit", "digits", "--runs", "2", *args])
    one_line_error(res, *words)
    assert listing(cli_root) == before


def test_ray_address_that_does_not_answer_times_out(
    cli_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (cli_root / "mlvar.toml").write_text(f'[backend.ray]\naddress = "127.0.0.1:{port}"\n')
    monkeypatch.setenv("MLVAR_RAY_TIMEOUT", "1.5")
    before = listing(cli_root)
    t0 = time.perf_counter()
    res = runner.invoke(app, ["submit", "digits", "--runs", "2", "--backend", "ray"])
    elapsed = time.perf_counter() - t0
    one_line_error(res, f"127.0.0.1:{port}", "did not answer within 1.5 s", "MLVAR_RAY_TIMEOUT")
    assert elapsed < 10
    assert listing(cli_root) == before


def test_submit_status_of_unknown_experiment(cli_root: Path) -> None:
    one_line_error(runner.invoke(app, ["submit", "status", "nope"]), "unknown experiment 'nope'")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "[backend.ray]\nadress = 'x'\n",
            r"unknown key 'backend.ray.adress'.*did you mean 'address'",
        ),
        ("[backend.pbs]\n", r"unknown key 'backend.pbs'"),
        ("[submit]\nruns_per_job = 'many'\n", r"'submit.runs_per_job' .* must be a int"),
        ("[submit]\nretries = -1\n", r"submit.retries is out of range"),
        ("[backend.aml]\ncompute = 3\n", r"'backend.aml.compute' .* must be a str"),
    ],
)
def test_backend_config_errors(no_mlvar_env: Path, text: str, match: str) -> None:
    path = no_mlvar_env / "mlvar.toml"
    path.write_text(text)
    with pytest.raises(MlvarError, match=match):
        load_config(path, env={})


def test_ray_timeout_from_environment(no_mlvar_env: Path) -> None:
    assert load_config(None, env={"MLVAR_RAY_TIMEOUT": "7"}).backend.ray.connect_timeout_s == 7.0
    with pytest.raises(MlvarError, match="MLVAR_RAY_TIMEOUT"):
        load_config(None, env={"MLVAR_RAY_TIMEOUT": "soon"})


def test_submission_record_roundtrip(data_root: Path, tmp_path: Path) -> None:
    cfg = make_config(data_root, tmp_path / "runs")
    res = service.submit(cfg, "digits", runs=2, overrides=OVER, submission_id="s1")
    sub = load_submission(res.path, None)
    assert sub.id == "s1" and sub.to_dict()["jobs"] == res.submission.to_dict()["jobs"]


@pytest.mark.parametrize(("backend", "module"), [("ray", "ray"), ("aml", "azure.ai.ml")])
def test_missing_extra_is_a_clear_error(
    cli_root: Path, monkeypatch: pytest.MonkeyPatch, backend: str, module: str
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    (cli_root / "mlvar.toml").write_text('[backend.aml]\ncompute = "c"\n')
    before = listing(cli_root)
    res = runner.invoke(app, ["submit", "digits", "--backend", backend, "--dry-run"])
    one_line_error(res, f"install mlvar[{backend}]")
    assert listing(cli_root) == before
