"""mlvar submit analyze: sharded analysis as backend jobs (local backend here; Ray in
test_backends_ray.py, Azure ML dry runs in test_backends_aml.py).

The merged ranking must equal an unsharded ``analyze rank`` (sample shards bit for bit,
run shards to 1e-12), shards already present are not resubmitted, a failing shard is
retried then reported, a killed worker lands nothing, and bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mlvar.analysis import service as analysis
from mlvar.analysis.metrics import METRICS
from mlvar.analysis.shards import merge_shards, shards_dir, verify_shard, write_shard
from mlvar.backends import kinds, service, shard_jobs
from mlvar.backends.shard_jobs import ANALYSIS
from mlvar.backends.spec import Submission, load_submission
from mlvar.cli import app
from mlvar.config import Config, PathsConfig
from mlvar.data.registry import prepare
from mlvar.errors import ExitCode, MlvarError
from mlvar.store import ExperimentStore
from mlvar.train.service import train

EXP = "digits-holdout-sub3-r1.0-mlp"
N_TEST = 540  # digits holdout of digit 3: test split size
ALL = [f"s{i}of3-r{j}of2" for i in (1, 2, 3) for j in (1, 2)]
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Once per module: digits holdout of digit 3, 4 runs of 2 epochs."""
    root = tmp_path_factory.mktemp("analysis-jobs")
    prepare(root / "data", "digits", mode="holdout", subclass=3)
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    train(cfg, "digits", runs=4, overrides={"epochs": 2})
    return root


@pytest.fixture
def root(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained work folder."""
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w"


def config(root: Path) -> Config:
    return Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))


def store_of(root: Path) -> ExperimentStore:
    return ExperimentStore.open(root / "runs", EXP)


def by_id(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("sample_id").reset_index(drop=True)


def shard_names(store: ExperimentStore, split: str = "test") -> list[str]:
    folder = shards_dir(store, split)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------- results


def test_local_shards_merge_to_the_unsharded_ranking(root: Path) -> None:
    store = store_of(root)
    whole = analysis.rank(store, "test", write=False)
    res = service.submit_analysis(config(root), EXP, shards=3, run_shards=2, workers=0)
    sub = res.submission
    assert sub.kind == "analysis" and sub.state == "complete" and sub.split == "test"
    assert [j.name for j in sub.jobs] == ALL == res.pending
    assert sub.jobs[1].shard == {
        "samples": "1/3",
        "runs": "2/2",
        "run_ids": ["run-0002", "run-0003"],
    }
    assert shard_names(store) == ALL
    # Each landed shard lists the sha256 of every file, and they match.
    for name in ALL:
        meta, why = verify_shard(shards_dir(store, "test") / name)
        assert not why and len(meta["files"]) == 13, (name, why)
    assert res.ranking == store.root / "analysis" / "rank-test.parquet"
    assert res.ranking.is_file() and res.merged.n_runs == 4
    info = json.loads((store.root / "analysis" / "rank-test.json").read_text())
    assert info["merged_shards"] == {"samples": 3, "runs": 2}
    merged, ref = by_id(res.merged.ranking), by_id(whole.ranking)
    assert len(merged) == N_TEST and merged["sample_id"].tolist() == ref["sample_id"].tolist()
    diff = max(float(np.abs(merged[c] - ref[c]).max()) for c in METRICS)
    assert diff <= 1e-12, diff
    exact = ["n_correct", "n_distinct_pred", "vote_entropy", "disagreement", "votes"]
    pd.testing.assert_frame_equal(merged[exact], ref[exact], check_exact=True)
    pd.testing.assert_frame_equal(res.merged.baselines, whole.baselines, check_exact=True)
    # The same shards written by hand ('analyze rank --shard', then '--merge'): bit for bit.
    by_hand = root.parent / "by-hand"
    shutil.copytree(root / "runs", by_hand)
    hand_store = ExperimentStore.open(by_hand, EXP)
    shutil.rmtree(hand_store.root / "analysis")
    for i in (1, 2, 3):
        for j in (1, 2):
            write_shard(hand_store, "test", (i, 3), (j, 2))
    hand = merge_shards(hand_store, "test")
    pd.testing.assert_frame_equal(hand.ranking, res.merged.ranking, check_exact=True)
    pd.testing.assert_frame_equal(hand.detection, res.merged.detection, check_exact=True)


def test_sample_shards_in_worker_processes_merge_exactly(root: Path) -> None:
    store = store_of(root)
    whole = analysis.rank(store, "test", by="disagreement", write=False)
    res = service.submit_analysis(
        config(root), EXP, shards=3, run_shards=1, by="disagreement", workers=2
    )
    assert res.submission.state == "complete", res.submission
    assert [j.attempts for j in res.submission.jobs] == [1, 1, 1]
    pd.testing.assert_frame_equal(res.merged.ranking, whole.ranking, check_exact=True)
    pd.testing.assert_frame_equal(res.merged.detection, whole.detection, check_exact=True)
    base = store.root / "submissions" / res.submission.id
    assert sorted(p.name for p in (base / "logs").iterdir()) == [
        f"s{i}of3-r1of1-a1.log" for i in (1, 2, 3)
    ]
    assert not (base / "work").exists()


def test_resubmission_skips_present_shards(root: Path) -> None:
    cfg = config(root)
    store = store_of(root)
    first = service.submit_analysis(cfg, EXP, shards=3, run_shards=2)
    assert first.submission.state == "complete"
    folder = shards_dir(store, "test")
    shutil.rmtree(folder / "s2of3-r1of2")  # lost
    bad = folder / "s3of3-r2of2" / "votes.npy"  # damaged: fails its sha256
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    untouched = (folder / "s1of3-r1of2" / "meta.json").stat().st_mtime_ns
    again = service.submit_analysis(cfg, EXP, shards=3, run_shards=2)
    assert again.pending == ["s2of3-r1of2", "s3of3-r2of2"]
    assert [j.name for j in again.submission.jobs] == again.pending
    assert again.skipped == [n for n in ALL if n not in again.pending]
    assert (folder / "s1of3-r1of2" / "meta.json").stat().st_mtime_ns == untouched
    assert not verify_shard(folder / "s3of3-r2of2")[1]
    pd.testing.assert_frame_equal(again.merged.ranking, first.merged.ranking, check_exact=True)
    third = service.submit_analysis(cfg, EXP, shards=3, run_shards=2)
    assert third.submission is None and third.pending == [] and third.skipped == ALL
    assert third.merged is not None  # all present: merged again
    # A new run makes the shards stale: all are recomputed over the five runs.
    logits = store.runs()[0].load_logits("test", mmap=False)
    store.write_run("run-0100", {"test": logits}, dict(store.runs()[0].meta, seed=1))
    fourth = service.submit_analysis(cfg, EXP, shards=3, run_shards=2, merge=False)
    assert fourth.pending == ALL and fourth.merged is None
    meta = json.loads((folder / "s1of3-r2of2" / "meta.json").read_text())
    assert meta["run_ids"] == ["run-0002", "run-0003", "run-0100"]
    assert meta["all_run_ids"] == ["run-0000", "run-0001", "run-0002", "run-0003", "run-0100"]


def test_failing_shard_is_retried_then_reported(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(root)
    store = store_of(root)
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1")  # shard index 1: s1of3-r2of2
    res = service.submit_analysis(cfg, EXP, shards=3, run_shards=2, retries=2)
    sub = res.submission
    assert sub.state == "failed" and res.merged is None and res.ranking is None
    jobs = {j.name: j for j in sub.jobs}
    failed = jobs["s1of3-r2of2"]
    assert failed.state == "failed" and failed.attempts == 3
    assert failed.failed == [{"shard": "s1of3-r2of2", "samples": "1/3", "runs": "2/2"}]
    assert "injected failure in shard s1of3-r2of2" in failed.error
    assert "RuntimeError: injected failure" in failed.log_tail
    assert all(
        j.state == "complete" and j.attempts == 1 for n, j in jobs.items() if n != failed.name
    )
    assert shard_names(store) == [n for n in ALL if n != "s1of3-r2of2"]
    record = json.loads(sub.path.read_text())
    assert record["kind"] == "analysis" and record["state"] == "failed"
    assert not (store.root / "analysis" / "rank-test.parquet").exists()
    # Failing in the first attempt only: the retry completes it, and the merge follows.
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1:1")
    again = service.submit_analysis(cfg, EXP, shards=3, run_shards=2, retries=1)
    assert again.pending == ["s1of3-r2of2"]
    assert again.submission.state == "complete" and again.submission.jobs[0].attempts == 2
    assert again.ranking is not None and again.ranking.is_file()


def test_cli_reports_a_failed_shard_with_its_log_tail(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(root, monkeypatch)
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:0")
    res = runner.invoke(app, ["submit", "analyze", EXP, "--shards", "2", "--retries", "1"])
    assert res.exit_code == ExitCode.JOB_FAILED == 3, (res.stdout, res.stderr)
    assert "s1of2-r1of1 failed after 2 attempt(s)" in res.stdout
    assert "injected failure in shard s1of2-r1of1" in res.stdout
    assert "Merged" not in res.stdout


def test_killed_worker_leaves_no_partial_shard(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(root)
    store = store_of(root)
    plan = shard_jobs.plan_shards(store, "test", 3, 2)
    spec = plan.spec(2, 1, "manual")  # index 2
    # The worker, killed after its first array file: a partial folder under the shard's name.
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = root / "worker-out"
    cmd = [sys.executable, "-m", "mlvar.backends.worker", str(spec_file)]
    cmd += ["--experiment-dir", str(store.root), "--out", str(out)]
    env = dict(os.environ, MLVAR_WORKER_FAULT="kill:2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    partial = out / "s2of3-r1of2"
    assert len(list(partial.glob("*.npy"))) == 1 and not (partial / "meta.json").exists()
    assert kinds.land_shard(partial, store, spec["expect"]) == "unfinished (no meta.json)"
    assert shard_names(store) == []
    # Through the backend: the killed shard is reported, nothing partial lands.
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "kill:2")
    res = service.submit_analysis(cfg, EXP, shards=3, run_shards=2, retries=0, workers=2)
    job = {j.name: j for j in res.submission.jobs}["s2of3-r1of2"]
    assert job.state == "failed" and "code -9" in job.error, job
    assert "injected kill in shard s2of3-r1of2" in job.log_tail
    assert shard_names(store) == [n for n in ALL if n != "s2of3-r1of2"]  # no .tmp-* either
    assert not (store.root / "submissions" / res.submission.id / "work").exists()
    monkeypatch.delenv("MLVAR_WORKER_FAULT")
    again = service.submit_analysis(cfg, EXP, shards=3, run_shards=2, workers=2)
    assert again.pending == ["s2of3-r1of2"] and again.submission.state == "complete"
    assert again.merged is not None


def test_a_damaged_shard_never_lands(root: Path) -> None:
    store = store_of(root)
    plan = shard_jobs.plan_shards(store, "test", 2, 1)
    spec = plan.spec(1, 1, "manual")
    folder = shard_jobs.run_shard_job(spec, store.root, root / "out", log=lambda *a, **k: None)
    bad = folder / "prob_sum.npy"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert kinds.land_shard(folder, store, spec["expect"]) == "sha256 mismatch in prob_sum.npy"
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    other = plan.spec(2, 1, "manual")["expect"]  # the plan of another shard
    assert "differs from the plan in samples, start, stop" in kinds.land_shard(folder, store, other)
    (folder / "extra.npy").write_bytes(b"x")
    assert "unlisted" in kinds.land_shard(folder, store, spec["expect"])
    assert shard_names(store) == []
    (folder / "extra.npy").unlink()
    assert kinds.land_shard(folder, store, spec["expect"]) == ""
    assert shard_names(store) == ["s1of2-r1of1"]
    # merge refuses a shard damaged after it landed
    write_shard(store, "test", (2, 2))
    landed = shards_dir(store, "test") / "s1of2-r1of1" / "votes.npy"
    landed.write_bytes(landed.read_bytes()[:-1] + b"\x07")
    with pytest.raises(MlvarError, match="s1of2-r1of1 .* is damaged: sha256 mismatch in votes"):
        merge_shards(store, "test")


def test_a_job_reads_only_its_run_block(root: Path) -> None:
    """What a Ray task is sent (and an Azure ML input holds): experiment.json, the split's
    samples and the runs of the shard's run block, each run.json listing only the logits
    shipped; the worker computes the shard from that alone."""
    store = store_of(root)
    plan = shard_jobs.plan_shards(store, "test", 3, 2)
    spec = plan.spec(1, 2, "manual")
    files = kinds.input_bytes(store, spec)
    assert sorted(files) == [
        "experiment.json",
        "runs/run-0002/run.json",
        "runs/run-0002/test.logits.npy",
        "runs/run-0003/run.json",
        "runs/run-0003/test.logits.npy",
        "samples/test.parquet",
    ]
    run_json = json.loads(files["runs/run-0002/run.json"])
    assert list(run_json["arrays"]) == ["test.logits.npy"]
    from mlvar.backends.kind import write_files

    copy = root / "copy" / "anything"
    write_files(files, copy)
    folder = shard_jobs.run_shard_job(spec, copy, root / "out", log=lambda *a, **k: None)
    meta, why = verify_shard(folder)
    assert not why and meta["experiment"] == EXP and meta["run_ids"] == ["run-0002", "run-0003"]
    assert kinds.land_shard(folder, store, spec["expect"]) == ""
    direct = shard_jobs.run_shard_job(spec, store.root, root / "out2", log=lambda *a, **k: None)
    for name in meta["files"]:
        assert np.array_equal(np.load(folder / name), np.load(direct / name)), name
    # a copy missing a run of the block is bad input, named
    shutil.rmtree(copy / "runs" / "run-0003")
    with pytest.raises(MlvarError, match="lacks run.*run-0003"):
        shard_jobs.run_shard_job(spec, copy, root / "out3")


def test_dynamics_shards_on_the_train_split(tmp_path: Path) -> None:
    from mlvar.analysis.synthetic import synthetic_store

    store = synthetic_store(
        tmp_path / "runs", name="dyn", n_runs=4, n_samples=60, split="train", dynamics_epochs=3
    )
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "rep"))
    whole = analysis.rank(store, "train", by="dm_confidence", write=False)
    plan = shard_jobs.plan_shards(store, "train", 2, 2)
    assert plan.dynamics
    assert "runs/run-0000/train.dynamics.npy" in ANALYSIS.inputs(store, plan.spec(1, 1, "x"))
    res = service.submit_analysis(
        cfg, "dyn", split="train", shards=2, run_shards=2, by="dm_confidence"
    )
    assert res.merged.dynamics
    merged, ref = by_id(res.merged.ranking), by_id(whole.ranking)
    for col in ("dm_confidence", "dm_variability", "forgetting_events", "gconf_std"):
        np.testing.assert_allclose(merged[col], ref[col], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- records, CLI


def use(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.delenv("MLVAR_WORKER_FAULT", raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(root / "data"))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(root / "runs"))
    monkeypatch.setenv("MLVAR_REPORTS_ROOT", str(root / "reports"))
    return root


def test_cli_analyze_status_download(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use(root, monkeypatch)
    res = runner.invoke(app, ["submit", "analyze", EXP, "--shards", "3", "--run-shards", "2"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    ranking = root / "runs" / EXP / "analysis" / "rank-test.parquet"
    assert f"ranking by gconf_mean in {ranking}" in res.stdout.replace("\n", "")
    assert "analysis submission" in res.stdout and "s3of3-r2of2" in res.stdout
    res = runner.invoke(app, ["submit", "status", EXP, "--json"])
    assert res.exit_code == 0
    status = json.loads(res.stdout)
    assert status["kind"] == "analysis" and status["state"] == "complete"
    assert [j["kind"] for j in status["jobs"]] == ["analysis"] * 6
    res = runner.invoke(app, ["submit", "status", EXP])
    assert res.exit_code == 0 and "samples" in res.stdout and "run-0000..run-0001" in res.stdout
    res = runner.invoke(app, ["submit", "download", EXP, "--json"])
    assert res.exit_code == 0
    down = json.loads(res.stdout)
    assert down["kind"] == "shards" and down["skipped"] == ALL
    res = runner.invoke(
        app, ["submit", "analyze", EXP, "--shards", "3", "--run-shards", "2", "--json"]
    )
    out = json.loads(res.stdout)
    assert out["submission"] is None and out["skipped"] == ALL and out["ranking"] == str(ranking)
    res = runner.invoke(app, ["submit", "analyze", EXP, "--shards", "3", "--run-shards", "2"])
    assert "Nothing to submit: all 6 shard(s) are present." in res.stdout
    # A dry run of the local backend writes the plan only.
    res = runner.invoke(
        app,
        ["submit", "analyze", EXP, "--shards", "2", "--split", "val", "--dry-run", "--out", "plan"],
    )
    assert res.exit_code == 0, res.stderr
    spec = json.loads((root / "plan" / "specs" / "s2of2-r1of1.json").read_text())
    assert spec["kind"] == "analysis" and spec["split"] == "val" and spec["shard"] == [2, 2]
    assert not shards_dir(store_of(root), "val").exists()
    res = runner.invoke(app, ["submit", "--help"])
    assert "mlvar submit analyze" in res.stdout


def test_download_from_a_folder_of_shards(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_of(root)
    plan = shard_jobs.plan_shards(store, "test", 2, 1)
    out = root / "copied-by-hand"
    for i, j in plan.blocks():
        shard_jobs.run_shard_job(plan.spec(i, j, "x"), store.root, out, log=lambda *a, **k: None)
    (out / "junk").mkdir()
    (out / "junk" / "meta.json").write_text("{not json")
    use(root, monkeypatch)
    res = runner.invoke(app, ["submit", "download", EXP, "--from", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["kind"] == "shards" and got["imported"] == ["s1of2-r1of1", "s2of2-r1of1"]
    assert got["rejected"] == {"junk": "corrupt meta.json"}
    merged = merge_shards(store, "test", write=False)
    pd.testing.assert_frame_equal(
        merged.ranking, analysis.rank(store, "test", write=False).ranking, check_exact=True
    )


def test_old_training_records_still_load(tmp_path: Path) -> None:
    old = {  # a record written before analysis jobs existed
        "id": "20250101T000000Z-local-abcd",
        "backend": "local",
        "experiment": EXP,
        "dataset": "digits",
        "scenario": "digits-holdout-sub3-r1.0",
        "runs": 2,
        "base_seed": 0,
        "runs_per_job": 8,
        "retries": 2,
        "jobs": [
            {
                "name": "pack-000",
                "run_indices": [0, 1],
                "state": "failed",
                "attempts": 3,
                "ref": None,
                "failed": [{"run_id": "run-0001", "seed": 1}],
                "error": "boom",
                "log_tail": "",
            }
        ],
        "created_at": "2025-01-01T00:00:00+00:00",
        "updated_at": "2025-01-01T00:00:00+00:00",
        "options": {},
        "state": "failed",
    }
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / f"{old['id']}.json").write_text(json.dumps(old))
    sub = load_submission(tmp_path, None)
    assert sub.kind == "train" and sub.jobs[0].kind == "train" and sub.state == "failed"
    assert sub.failed_runs() == [{"run_id": "run-0001", "seed": 1, "job": "pack-000"}]
    again = Submission.from_dict(sub.to_dict())
    assert again.to_dict() == sub.to_dict()


@pytest.fixture
def cli_root(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use(root, monkeypatch)


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["nope"], ["unknown experiment 'nope'", "experiments here"]),
        ([EXP, "--backend", "pbs"], ["unknown backend 'pbs'", "local", "slurm"]),
        ([EXP, "--split", "validation"], ["has no split 'validation'", "train, val, test"]),
        ([EXP, "--shards", "0"], ["--shards must be at least 1"]),
        ([EXP, "--shards", "541"], ["cannot split 540 test samples into 541 blocks", "540"]),
        ([EXP, "--run-shards", "5"], ["cannot split 4 runs into 5 blocks", "at most 4"]),
        ([EXP, "--retries", "-1"], ["--retries must be >= 0"]),
        ([EXP, "--by", "nope"], ["unknown metric 'nope'"]),
        (
            [EXP, "--backend", "aml"],
            ["missing [backend.aml] settings", "subscription_id", "workspace", "compute"],
        ),
        ([EXP, "--backend", "aml", "--dry-run"], ["missing [backend.aml] settings: compute"]),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(
    cli_root: Path, args: list[str], words: list[str]
) -> None:
    before = listing(cli_root)
    res = runner.invoke(app, ["submit", "analyze", *args, "--out", "jobs"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "(hint: " in lines[0], lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert listing(cli_root) == before


def test_cli_shards_of_another_sharding_are_refused(cli_root: Path) -> None:
    store = store_of(cli_root)
    write_shard(store, "test", (1, 2))
    before = listing(cli_root)
    res = runner.invoke(app, ["submit", "analyze", EXP, "--shards", "3"])
    assert res.exit_code == 2
    (line,) = res.stderr.strip().splitlines()
    assert "holds shards of another sharding (s1of2-r1of1), not 3 x 1" in line
    assert "same --shards/--run-shards" in line
    assert listing(cli_root) == before


def test_experiment_without_runs_is_refused(tmp_path: Path) -> None:
    prepare(tmp_path / "data", "digits", mode="holdout", subclass=3)
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "rep"))
    train(cfg, "digits", runs=2, overrides={"epochs": 2}, run_indices=[])
    with pytest.raises(MlvarError, match="has no finished runs"):
        service.submit_analysis(cfg, EXP, shards=2)
    assert not (tmp_path / "runs" / EXP / "submissions").exists()
