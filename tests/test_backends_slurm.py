"""The Slurm backend against a real single-node Slurm cluster (tests/slurm_cluster.py
starts munged, slurmctld and slurmd; skipped, with the reason, where it cannot run).

Four digits seeds trained as a job array equal the local backend's runs bit for bit; a
job whose process is SIGKILLed mid-run, or that is cancelled with scancel, is retried
and the store ends complete with no partial run; a preempted job (USR2, as Slurm sends
it) is requeued and resumes from its checkpoint; analysis and saliency shards go the same
way; status works without accounting (sacct fails here); bad input is one line, exit 2.
The generated sbatch scripts are golden files (no cluster needed): to accept an intended
change, delete the file(s) under tests/golden/slurm/ and run the tests once.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from golden_files import compare
from mlvar.backends import service
from mlvar.backends.spec import Submission
from mlvar.cli import app
from mlvar.config import Config, PathsConfig, SlurmConfig
from mlvar.data.registry import prepare
from mlvar.store import ExperimentStore
from mlvar.train.service import train

pytest_plugins = ["slurm_cluster"]
pytest.importorskip("submitit")

EXP = "digits-holdout-sub3-r1.0-mlp"
OVER = {"epochs": 2}
runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm-digits") / "data"
    prepare(root, "digits", mode="holdout", subclass=3)
    return root


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The logits of 4 runs trained here by the local backend, by run id and split."""
    runs = tmp_path_factory.mktemp("slurm-reference") / "runs"
    cfg = Config(paths=PathsConfig(data_root, runs, runs.parent / "reports"))
    train(cfg, "digits", runs=4, overrides=OVER)
    return logits(ExperimentStore.open(runs, EXP))


def logits(store: ExperimentStore) -> dict[str, dict[str, np.ndarray]]:
    return {r.run_id: {s: r.load_logits(s) for s in store.splits} for r in store.runs(True)}


def slurm_config(data_root: Path, runs: Path, partition: str, **settings) -> Config:
    cfg = Config(paths=PathsConfig(data_root, runs, runs.parent / "reports"))
    cfg.backend.slurm = SlurmConfig(partition=partition, **{"time_limit_min": 10, **settings})
    return cfg


def follow(cfg: Config, experiment: str, sub_id: str, timeout: float = 240) -> list[Submission]:
    """``status`` once a second until the submission is complete or failed; every
    record seen, the last one final."""
    seen: list[Submission] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(service.status(cfg, experiment, sub_id))
        if seen[-1].state in ("complete", "failed"):
            return seen
        time.sleep(1)
    raise TimeoutError(f"submission {sub_id} still {seen[-1].to_dict()} after {timeout} s")


def assert_runs_equal(runs_root: Path, expected: dict[str, dict], experiment: str = EXP) -> None:
    store = ExperimentStore.open(runs_root, experiment)
    got = logits(store)
    assert sorted(got) == sorted(expected)
    for run_id, splits in expected.items():
        for split, array in splits.items():
            assert np.array_equal(got[run_id][split], array), (run_id, split)
    assert not store.unfinished_run_dirs()  # no partial run folder either
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]


def log_text(sub: Submission, ref: str) -> str:
    folder = Path(sub.options["slurm_folder"])
    return "".join(p.read_text() for p in sorted(folder.glob(f"{ref}_0_log.*")))


def wait_for_file(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


# ---------------------------------------------------------------- training on the cluster


@pytest.fixture
def cli_root(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("MLVAR_CONFIG", "MLVAR_WORKER_FAULT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    return tmp_path


def test_four_seeds_through_slurm_equal_the_local_runs(
    slurm, cli_root: Path, reference: dict
) -> None:
    (cli_root / "mlvar.toml").write_text(f'[backend.slurm]\npartition = "{slurm.partition}"\n')
    args = ["submit", "digits", "--runs", "4", "--epochs", "2", "--runs-per-job", "2"]
    res = runner.invoke(app, [*args, "--backend", "slurm", "--json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    out = json.loads(res.stdout)["submission"]
    assert out["backend"] == "slurm" and out["state"] == "submitted"
    array = out["jobs"][0]["ref"].split("_")[0]
    assert [j["ref"] for j in out["jobs"]] == [f"{array}_0", f"{array}_1"]  # one job array
    assert [j["run_indices"] for j in out["jobs"]] == [[0, 1], [2, 3]]
    deadline = time.monotonic() + 240
    while True:  # `mlvar submit status` follows the array (sacct fails on this cluster)
        res = runner.invoke(app, ["submit", "status", EXP, "--json"])
        assert res.exit_code == 0, res.stderr
        status = json.loads(res.stdout)
        if status["state"] in ("complete", "failed") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status["state"] == "complete", status
    assert [j["attempts"] for j in status["jobs"]] == [1, 1]
    assert_runs_equal(cli_root / "runs", reference)
    res = runner.invoke(app, ["submit", "download", EXP, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["skipped"] == [
        f"run-{i:04d}" for i in range(4)
    ]
    base = cli_root / "runs" / EXP / "submissions" / out["id"]
    assert not (base / "work").exists()  # each job's own folder went once its runs landed
    slurm.wait_idle()  # the tasks return (and submitit pickles that) after their runs land
    pickled = sorted(p.name for p in (base / "slurm").glob("*.pkl"))
    assert pickled == [f"{array}_{t}_{n}.pkl" for t in (0, 1) for n in ("0_result", "submitted")]
    res = runner.invoke(app, ["submit", "status", EXP])
    assert res.exit_code == 0 and f"{array}_1" in res.stdout and "complete" in res.stdout


@pytest.mark.slow
def test_a_killed_job_is_retried_and_the_store_ends_complete(
    slurm, data_root: Path, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job's process SIGKILLs itself while training run 2, after runs 0 and 1 were
    # written into its folder; only in attempt 1, so the retry completes.
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "kill:2:1")
    cfg = slurm_config(data_root, tmp_path / "runs", slurm.partition)
    over = dict(OVER, pack_size=2)
    res = service.submit(
        cfg, "digits", runs=4, backend="slurm", overrides=over, runs_per_job=4, retries=1
    )
    first = res.submission.jobs[0].ref
    seen = follow(cfg, EXP, res.submission.id)
    job = seen[-1].jobs[0]
    assert seen[-1].state == "complete" and job.attempts == 2 and job.ref != first, job
    assert slurm.job_state(first) == "FAILED"
    errors = {s.jobs[0].error for s in seen}
    assert f"Slurm job {first} ended FAILED" in errors  # seen by the status that retried it
    assert "injected kill in run-0002" in log_text(seen[-1], first)
    spec = json.loads(
        (res.path / "submissions" / res.submission.id / "specs" / "pack-000-a2.json").read_text()
    )
    assert spec["run_indices"] == [2, 3] and spec["attempt"] == 2  # runs 0, 1 had landed
    assert_runs_equal(tmp_path / "runs", reference)


@pytest.mark.slow
def test_a_cancelled_job_is_retried(
    slurm, data_root: Path, reference: dict, tmp_path: Path
) -> None:
    marker = tmp_path / "started-once"
    # The first attempt waits in its setup until it is cancelled; the retry goes on.
    setup = [f"test -e {marker} || {{ touch {marker}; sleep 300; }}"]
    cfg = slurm_config(data_root, tmp_path / "runs", slurm.partition, setup=setup)
    res = service.submit(cfg, "digits", runs=2, backend="slurm", overrides=OVER, retries=1)
    first = res.submission.jobs[0].ref
    wait_for_file(marker)
    slurm.command("scancel", first)
    seen = follow(cfg, EXP, res.submission.id)
    job = seen[-1].jobs[0]
    assert seen[-1].state == "complete" and job.attempts == 2 and job.ref != first, job
    assert slurm.job_state(first) == "CANCELLED"
    assert f"Slurm job {first} ended CANCELLED" in {s.jobs[0].error for s in seen}
    assert_runs_equal(tmp_path / "runs", {k: reference[k] for k in ("run-0000", "run-0001")})


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(slurm, tmp_path: Path) -> None:
    from mlvar.data.scenario import write_scenario
    from tiny_images import tiny_split

    rng = np.random.default_rng(0)
    manifest = {
        "dataset": "digits",
        "mode": "holdout",
        "params": {},
        "class_names": ["a", "b", "c"],
        "input": {"kind": "image", "shape": [16, 16, 1], "max_value": 16},
    }
    splits = {"train": tiny_split(rng, 600, 0), "test": tiny_split(rng, 30, 10_000)}
    write_scenario(tmp_path / "data", "tiny", manifest, splits)
    over = {"model": "cnn", "epochs": 8, "batch_size": 32, "checkpoint_every": 1, "workers": 1}
    cfg = slurm_config(tmp_path / "data", tmp_path / "runs", slurm.partition)
    res = service.submit(
        cfg, "digits", scenario="tiny", runs=1, name="cnn", overrides=over, backend="slurm"
    )
    ref = res.submission.jobs[0].ref
    work = res.path / "submissions" / res.submission.id / "work" / "pack-000"
    wait_for_file(work / "cnn" / "runs" / "run-0000" / "checkpoint.pt")
    slurm.command("scancel", "--signal=USR2", ref)  # what Slurm sends before a time limit
    seen = follow(cfg, "cnn", res.submission.id)
    job = seen[-1].jobs[0]
    assert seen[-1].state == "complete" and job.attempts == 1 and job.ref == ref, job
    assert slurm.scontrol_job(ref)["Restarts"] == "1"  # requeued by submitit, same job
    assert "requeued; it resumes from" in log_text(seen[-1], ref)
    store = ExperimentStore.open(tmp_path / "runs", "cnn")
    (run,) = store.runs(verify=True)
    assert run.meta["resumed_from_epoch"] >= 1
    local = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "local", tmp_path / "rep"))
    train(local, "digits", scenario="tiny", runs=1, name="cnn", overrides=over)
    (expected,) = ExperimentStore.open(tmp_path / "local", "cnn").runs(verify=True)
    for split in store.splits:  # resuming from the checkpoint changes nothing
        assert np.array_equal(run.load_logits(split), expected.load_logits(split)), split


# ---------------------------------------------------------------- shards on the cluster


@pytest.mark.slow
def test_analysis_and_saliency_shards_through_slurm(slurm, tmp_path: Path) -> None:
    import pandas as pd

    from mlvar.analysis import service as analysis
    from mlvar.saliency import saliency
    from tiny_images import build_tiny_experiments

    root = build_tiny_experiments(tmp_path / "w")
    shutil.copytree(root / "runs", tmp_path / "reference")
    ref_store = ExperimentStore.open(tmp_path / "reference", "tiny-cnn")
    ranking = analysis.rank(ref_store, "test", write=False).ranking
    maps = saliency(ref_store, root / "data", top=3, seeds=3).path
    cfg = slurm_config(root / "data", root / "runs", slurm.partition)
    a = service.submit_analysis(cfg, "tiny-cnn", backend="slurm", shards=2)
    s = service.submit_saliency(cfg, "tiny-cnn", backend="slurm", run_shards=2, top=3, seeds=3)
    assert a.submission.state == s.submission.state == "submitted" and a.merged is None
    for sub in (a.submission, s.submission):
        assert follow(cfg, "tiny-cnn", sub.id)[-1].state == "complete"
    got = service.download(cfg, "tiny-cnn", a.submission.id)
    assert got.kind == "shards" and sorted(got.skipped) == ["s1of2-r1of1", "s2of2-r1of1"]
    merged = pd.read_parquet(got.ranking).sort_values("sample_id").reset_index(drop=True)
    expected = ranking.sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(merged[expected.columns], expected, check_exact=True)
    again = service.download(cfg, "tiny-cnn", a.submission.id)
    assert again.ranking == "" and again.merged == ""  # merged once
    got = service.download(cfg, "tiny-cnn", s.submission.id)
    folder = Path(got.merged)
    want = {p.relative_to(maps): p.read_bytes() for p in maps.rglob("*") if p.is_file()}
    have = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sorted(have) == sorted(want) and all(have[k] == want[k] for k in want)


# ---------------------------------------------------------------- the sbatch script

SUB_ID = "20250101T000000Z-slurm-test"


def _compare(name: str, text: str) -> None:
    compare("slurm", name, text)


def _script(out: Path, runs: Path) -> str:
    """The dry run's sbatch script, machine-specific paths replaced."""
    text = (out / "slurm" / "submission.sh").read_text()
    folder = runs.resolve() / EXP / "submissions" / SUB_ID / "slurm"
    return text.replace(str(folder), "<FOLDER>").replace(shlex.quote(sys.executable), "<PYTHON>")


def test_sbatch_script_of_a_job_array_matches_golden(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA submission: one GPU per array task, the cuBLAS setting exported."""
    monkeypatch.delenv("MLVAR_WORKER_FAULT", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr("mlvar.train.service._cuda_available", lambda: True)
    cfg = slurm_config(
        data_root,
        tmp_path / "runs",
        "gpu",
        time_limit_min=120,
        cpus_per_job=4,
        gpus_per_job=1,
        mem_gb=16,
        account="lab",
        qos="high",
        extra_sbatch=["--constraint=a100", "--exclusive"],
        setup=["module load cuda/12.1", "source /shared/venvs/mlvar/bin/activate"],
        python="python3",
        array_parallelism=2,
    )
    out = tmp_path / "jobs"
    res = service.submit(
        cfg,
        "digits",
        runs=5,
        backend="slurm",
        overrides={**OVER, "device": "cuda"},
        dry_run=True,
        out=out,
        runs_per_job=2,
        submission_id=SUB_ID,
    )
    assert res.files == [
        "submission.json",
        "specs/pack-000.json",
        "specs/pack-001.json",
        "specs/pack-002.json",
        "slurm/submission.sh",
    ]
    text = _script(out, tmp_path / "runs")
    assert "#SBATCH --array=0-2%2" in text and "python3 -u -m submitit.core._submit" in text
    _compare("train-array.sh", text)
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing to the store


def test_sbatch_script_of_one_job_matches_golden(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLVAR_WORKER_FAULT", raising=False)
    cfg = slurm_config(data_root, tmp_path / "runs", "cpu")
    res = service.submit(
        cfg,
        "digits",
        runs=2,
        backend="slurm",
        overrides=OVER,
        dry_run=True,
        out=tmp_path / "jobs",
        submission_id=SUB_ID,
    )
    assert [j.run_indices for j in res.submission.jobs] == [[0, 1]]
    text = _script(tmp_path / "jobs", tmp_path / "runs")
    assert "--array" not in text and "<PYTHON> -u -m submitit.core._submit <FOLDER>" in text
    _compare("train-one-job.sh", text)


# ---------------------------------------------------------------- bad input


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


def one_line_error(res, *words: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "(hint: " in lines[0], lines
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_missing_slurm_settings_are_one_line(cli_root: Path, dry_run: list[str]) -> None:
    before = listing(cli_root)
    res = runner.invoke(app, ["submit", "digits", "--runs", "2", "--backend", "slurm", *dry_run])
    one_line_error(res, "missing [backend.slurm] settings: partition", "mlvar.toml")
    assert listing(cli_root) == before


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('extra_sbatch = ["constraint=a100"]', ["extra_sbatch entry 'constraint=a100'"]),
        ("folder = 'relative/logs'", ["backend.slurm.folder is out of range", "absolute"]),
        ("time_limit_min = 0", ["backend.slurm.time_limit_min is out of range"]),
    ],
)
def test_bad_slurm_settings_are_one_line(cli_root: Path, toml: str, words: list[str]) -> None:
    (cli_root / "mlvar.toml").write_text(f'[backend.slurm]\npartition = "p"\n{toml}\n')
    before = listing(cli_root)
    res = runner.invoke(app, ["submit", "digits", "--backend", "slurm", "--dry-run"])
    one_line_error(res, *words)
    assert listing(cli_root) == before


def test_missing_submitit_names_the_extra(cli_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import raises ImportError
    (cli_root / "mlvar.toml").write_text('[backend.slurm]\npartition = "p"\n')
    res = runner.invoke(app, ["submit", "digits", "--backend", "slurm", "--dry-run"])
    one_line_error(res, "install mlvar[slurm]")


def test_unreachable_controller_and_unknown_partition_are_one_line(
    slurm, cli_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cli_root / "mlvar.toml").write_text(f'[backend.slurm]\npartition = "{slurm.partition}"\n')
    args = ["submit", "digits", "--runs", "2", "--backend", "slurm"]
    # a controller that does not answer: this cluster's configuration, another port
    dead = cli_root / "dead.conf"
    lines = slurm.conf.read_text().splitlines()
    dead.write_text(
        "\n".join("SlurmctldPort=1" if x.startswith("SlurmctldPort=") else x for x in lines)
    )
    before = listing(cli_root)
    monkeypatch.setenv("SLURM_CONF", str(dead))
    one_line_error(runner.invoke(app, args), "the Slurm controller does not answer", "DOWN")
    monkeypatch.setenv("SLURM_CONF", str(cli_root / "missing.conf"))
    one_line_error(runner.invoke(app, args), "missing.conf, which does not exist")
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    res = runner.invoke(app, ["submit", "analyze", "nope", "--backend", "slurm"])
    one_line_error(res, "unknown experiment 'nope'")
    assert listing(cli_root) == before
    (cli_root / "mlvar.toml").write_text('[backend.slurm]\npartition = "nope"\n')
    before = listing(cli_root)
    one_line_error(runner.invoke(app, args), "unknown Slurm partition 'nope'", slurm.partition)
    assert listing(cli_root) == before
