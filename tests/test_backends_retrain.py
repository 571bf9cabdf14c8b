"""``mlvar submit retrain``: the continuations of ``mlvar retrain`` as backend jobs.

On digits (holdout of digit 3, 3 MLP runs of 2 epochs, pool ``val``, 1 continuation
epoch), with ``random`` and ``maxconf_std`` at budget 0.5: every continued run the local
backend (in process) and Ray land equals bit for bit (logits of
every split, ``model.pt``, ``continued_from``) what ``mlvar retrain`` writes in process,
and so do ``selected.parquet`` and the summary; resubmitting submits nothing; ``submit
download`` of an asynchronous backend writes the summary; a failing
job is named with its runs and exits 3, and a later submission completes only what
failed; the Azure ML dry run's jobs load with the SDK's ``load_job`` and, run offline
(the worker on their shipped inputs only) and landed, give the same runs; the Slurm dry
run's sbatch script is a golden file; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from golden_files import compare
from mlvar.backends import service
from mlvar.backends.local import LocalBackend
from mlvar.backends.retrain_jobs import RETRAIN
from mlvar.backends.retrain_submit import submit_retrain
from mlvar.config import AmlConfig, Config, SlurmConfig
from mlvar.retrain import retrain
from mlvar.retrain.service import pool_source
from mlvar.store import ExperimentStore, read_run
from mlvar.train.continuation import open_target_store
from test_cli_errors import fails_cleanly, invoke, use_root
from test_retrain import EXPERIMENT, config_for, trained_root  # noqa: F401 - a fixture

POOL = "val"
STRATEGIES = "random,maxconf_std"
BUDGETS = "0.5"
SETS = ["b0", "random-b0.5", "maxconf_std-b0.5"]  # the plan's order
REQUEST = {"pool": POOL, "strategies": STRATEGIES, "budgets": BUDGETS, "epochs": 1}
SUB_ID = "20250101T000000Z-test"


def copy_of(trained: Path, tmp: Path) -> Config:
    root = tmp / "w"
    shutil.copytree(trained, root)
    return config_for(root)


@pytest.fixture(scope="module")
def reference(trained_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """``mlvar retrain`` in process on a copy of the trained root: its retrain/ folder."""
    cfg = copy_of(trained_root, tmp_path_factory.mktemp("retrain-reference"))
    retrain(EXPERIMENT, cfg, **REQUEST)
    return Path(cfg.paths.runs_root) / EXPERIMENT / "retrain"


def run_files(root: Path, name: str) -> dict[str, dict[str, bytes]]:
    """Every complete run of set ``name`` under ``root``: its arrays' bytes."""
    found = {}
    for folder in sorted((root / name / "runs").iterdir()):
        record = read_run(folder)
        if record is not None:
            found[folder.name] = {a: (folder / a).read_bytes() for a in record.meta["arrays"]}
            found[folder.name]["continued_from"] = json.dumps(
                record.meta["continued_from"], sort_keys=True
            ).encode()
    return found


def assert_same_sets(got: Path, want: Path, sets: list[str] = SETS) -> None:
    """The sets' continued runs are equal bit for bit, and their stores' identity."""
    for name in sets:
        have, expected = run_files(got, name), run_files(want, name)
        assert sorted(have) == sorted(expected) == ["run-0000", "run-0001", "run-0002"], name
        for run_id, files in expected.items():
            assert sorted(have[run_id]) == sorted(files), (name, run_id)
            for file, data in files.items():
                assert have[run_id][file] == data, (name, run_id, file)
        meta = [json.loads((r / name / "experiment.json").read_text()) for r in (got, want)]
        for key in ("retrain", "continuation", "scenario", "train"):
            assert meta[0][key] == meta[1][key], (name, key)
        assert not [p for p in (got / name).iterdir() if p.name.startswith(".tmp")]


def assert_same_tables(got: Path, want: Path) -> None:
    for name in ("selected.parquet", "summary.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(got / name), pd.read_parquet(want / name))


# ---------------------------------------------------------------- local


def test_local_jobs_equal_retrain_and_resubmitting_submits_nothing(
    trained_root: Path,  # noqa: F811
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = copy_of(trained_root, tmp_path)
    res = submit_retrain(cfg, EXPERIMENT, **REQUEST, backend="local", runs_per_job=2)
    sub = res.submission
    assert sub is not None and sub.state == "complete" and sub.kind == "retrain"
    # b0 first, then each strategy x budget: 2 packs (2 + 1 runs) per set
    assert [(j.name, j.run_indices) for j in sub.jobs] == [
        (f"{s}-{k:03d}", runs) for s in SETS for k, runs in ((0, [0, 1]), (1, [2]))
    ]
    assert res.pending == {s: ["run-0000", "run-0001", "run-0002"] for s in SETS}
    root = Path(cfg.paths.runs_root) / EXPERIMENT / "retrain"
    assert_same_sets(root, reference)
    assert_same_tables(root, reference)
    assert res.summary is not None and len(res.summary) == 3 * 2 * 2  # runs x strategies x budgets
    record = json.loads(sub.path.read_text())
    assert record["kind"] == "retrain" and record["options"]["pool"] == POOL

    again = submit_retrain(cfg, EXPERIMENT, **REQUEST, backend="local", runs_per_job=2)
    assert again.submission is None and again.pending == {}
    assert again.skipped == {s: ["run-0000", "run-0001", "run-0002"] for s in SETS}
    assert_same_tables(root, reference)
    subs = list((Path(cfg.paths.runs_root) / EXPERIMENT / "submissions").glob("*.json"))
    assert len(subs) == 1  # nothing submitted the second time

    # An asynchronous backend's 'submit download' writes the summary once all is complete.
    (root / "summary.parquet").unlink()
    monkeypatch.setattr(LocalBackend, "synchronous", False)
    got = service.download(cfg, EXPERIMENT, sub.id)
    assert len(got.skipped) == 9 and got.merged == str(root / "summary.parquet")
    assert_same_tables(root, reference)
    assert service.download(cfg, EXPERIMENT, sub.id).merged == ""  # once


def test_a_failing_job_is_named_with_its_runs_and_exits_3(
    trained_root: Path,  # noqa: F811
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "w"
    shutil.copytree(trained_root, root)
    use_root(root, monkeypatch)
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1")
    args = ["submit", "retrain", EXPERIMENT, "--pool", POOL, "--by", "maxconf_std"]
    args += ["--budget", BUDGETS, "--epochs", "1", "--runs-per-job", "1", "--retries", "0"]
    res = invoke(*args)
    assert res.exit_code == 3, (res.stdout, res.stderr)
    out = " ".join(res.stdout.split())
    for name in ("b0-001", "maxconf_std-b0.5-001"):
        assert f"{name} failed after 1 attempt(s): run-0001 (seed" in out, out
    assert "injected failure in run run-0001" in out
    retrained = root / "runs" / EXPERIMENT / "retrain"
    assert not (retrained / "summary.parquet").exists()  # written once every job is complete
    for name in ("b0", "maxconf_std-b0.5"):
        assert sorted(run_files(retrained, name)) == ["run-0000", "run-0002"]
    monkeypatch.delenv("MLVAR_WORKER_FAULT")
    cfg = config_for(root)
    again = submit_retrain(cfg, EXPERIMENT, POOL, "maxconf_std", BUDGETS, epochs=1, runs_per_job=1)
    assert again.submission is not None and again.submission.state == "complete"
    assert [j.name for j in again.submission.jobs] == ["b0-000", "maxconf_std-b0.5-000"]
    assert [j.run_indices for j in again.submission.jobs] == [[1], [1]]
    assert_same_sets(retrained, reference, ["b0", "maxconf_std-b0.5"])


# ---------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_tasks_equal_retrain(
    ray_instance,
    trained_root: Path,  # noqa: F811
    reference: Path,
    tmp_path: Path,
) -> None:
    """Each task gets only its runs' model.pt, the experiment's samples and the scenario,
    and returns its continued runs as bytes."""
    cfg = copy_of(trained_root, tmp_path)
    res = submit_retrain(
        cfg, EXPERIMENT, POOL, "maxconf_std", "0", epochs=1, backend="ray", runs_per_job=3
    )
    assert res.submission is not None and res.submission.state == "complete"
    assert [j.name for j in res.submission.jobs] == ["b0-000"]
    root = Path(cfg.paths.runs_root) / EXPERIMENT / "retrain"
    assert_same_sets(root, reference, ["b0"])
    assert not (root.parent / "submissions" / res.submission.id).exists()  # work folder gone


# ---------------------------------------------------------------- Azure ML and Slurm


def test_aml_dry_run_jobs_load_and_run_offline_from_their_inputs(
    trained_root: Path,  # noqa: F811
    reference: Path,
    tmp_path: Path,
    tree_listing,
) -> None:
    aml = pytest.importorskip("azure.ai.ml")
    from mlvar.backends.worker import main

    cfg = copy_of(trained_root, tmp_path)
    cfg.backend.aml = AmlConfig(compute="cpu-cluster", datastore="workspaceblobstore")
    runs_root = Path(cfg.paths.runs_root)
    before = tree_listing(runs_root)
    out = tmp_path / "jobs"
    res = submit_retrain(
        cfg,
        EXPERIMENT,
        POOL,
        "maxconf_std",
        BUDGETS,
        epochs=1,
        backend="aml",
        runs_per_job=3,
        dry_run=True,
        out=out,
        submission_id=SUB_ID,
    )
    assert tree_listing(runs_root) == before  # a dry run writes nothing to the store
    names = [j.name for j in res.submission.jobs]
    assert names == ["b0-000", "maxconf_std-b0.5-000"]
    outputs = tmp_path / "outputs"
    for name in names:
        job = aml.load_job(out / "jobs" / f"{name}.yaml")
        assert job.type == "command" and job.compute == "cpu-cluster"
        assert "mlvar.backends.worker" in job.command and "--scenario-dir" in job.command
        assert {"experiment", "scenario"} <= set(job.inputs) and set(job.outputs) == {"runs"}
        assert job.tags["mlvar_kind"] == "retrain" and job.tags["mlvar_set"] == name[:-4]
        group = Path(job.inputs["experiment"].path).name
        inputs = out / "inputs" / group
        shipped = sorted(p.name for p in (inputs / "runs" / "run-0001").iterdir())
        assert shipped == ["model.pt", "run.json"]  # the job's runs' weights, nothing else
    # The job that adds pool samples, run here from its shipped inputs only.
    name = names[1]
    spec_file = out / "code" / "specs" / f"{name}.json"
    spec = json.loads(spec_file.read_text())
    scenario = Path(cfg.paths.data_root) / spec["scenario"]
    args = [str(spec_file), "--experiment-dir", str(inputs), "--scenario-dir", str(scenario)]
    # where 'ml_client.jobs.download' puts the output named runs
    assert main([*args, "--out", str(outputs / name / "named-outputs" / "runs")]) == 0
    # The outputs land through the kind into the sets' stores, created as at submit.
    land = copy_of(trained_root, tmp_path / "land")
    store = ExperimentStore.open(Path(land.paths.runs_root), EXPERIMENT)
    _, pool = pool_source(Path(land.paths.data_root), store, POOL)
    target = store.root / "retrain" / spec["set"]
    assert RETRAIN.remaining(store, spec) == spec
    open_target_store(store, target, spec["set_meta"], pool, spec["epochs"])
    got = RETRAIN.land(outputs / name, store, spec)
    assert got.imported == [f"maxconf_std-b0.5/run-000{i}" for i in range(3)] and not got.rejected
    assert RETRAIN.remaining(store, spec) is None
    assert_same_sets(store.root / "retrain", reference, ["maxconf_std-b0.5"])


def test_slurm_dry_run_script_matches_golden(
    trained_root: Path,  # noqa: F811
    tmp_path: Path,
    tree_listing,
) -> None:
    pytest.importorskip("submitit")
    cfg = copy_of(trained_root, tmp_path)
    cfg.backend.slurm = SlurmConfig(partition="cpu", time_limit_min=30, cpus_per_job=2)
    runs_root = Path(cfg.paths.runs_root)
    before = tree_listing(runs_root)
    res = submit_retrain(
        cfg,
        EXPERIMENT,
        POOL,
        STRATEGIES,
        BUDGETS,
        epochs=1,
        backend="slurm",
        runs_per_job=2,
        dry_run=True,
        out=tmp_path / "jobs",
        submission_id=SUB_ID,
    )
    assert tree_listing(runs_root) == before
    assert res.files == [
        "submission.json",
        *[f"specs/{s}-{k:03d}.json" for s in SETS for k in (0, 1)],
        "slurm/submission.sh",
    ]
    spec = json.loads((tmp_path / "jobs" / "specs" / "random-b0.5-001.json").read_text())
    assert spec["kind"] == "retrain" and spec["set"] == "random-b0.5"
    assert (
        spec["run_ids"] == ["run-0002"] and len(spec["added"]["run-0002"]) == spec["set_meta"]["k"]
    )
    text = (tmp_path / "jobs" / "slurm" / "submission.sh").read_text()
    folder = runs_root.resolve() / EXPERIMENT / "submissions" / SUB_ID / "slurm"
    text = text.replace(str(folder), "<FOLDER>").replace(shlex.quote(sys.executable), "<PYTHON>")
    assert "#SBATCH --array=0-5" in text
    compare("slurm", "retrain-array.sh", text)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def work(trained_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    root = tmp_path / "w"
    shutil.copytree(trained_root, root)
    return use_root(root, monkeypatch)


def _submit(*extra: str) -> tuple[str, ...]:
    return ("submit", "retrain", EXPERIMENT, "--pool", POOL, "--epochs", "1", *extra)


def test_bad_input_is_one_line_and_writes_nothing(work: Path, tree_listing) -> None:
    line = fails_cleanly(
        work,
        tree_listing,
        "submit",
        "retrain",
        EXPERIMENT,
        "--pool",
        "nosuch",
        words=("'nosuch'", "analyze predict"),
    )
    assert "train, val, test" in line
    fails_cleanly(work, tree_listing, *_submit("--budget", "0.1,1.5"), words=("outside [0, 1]",))
    fails_cleanly(
        work,
        tree_listing,
        *_submit("--by", "random,maxconf_sdt"),
        words=("unknown strategy 'maxconf_sdt'", "did you mean 'maxconf_std'"),
    )
    fails_cleanly(work, tree_listing, *_submit("--runs", "run-0009"), words=("run-0009",))
    fails_cleanly(work, tree_listing, *_submit("--runs-per-job", "0"), words=("--runs-per-job",))
    fails_cleanly(work, tree_listing, *_submit("--backend", "nosuch"), words=("nosuch",))
    fails_cleanly(work, tree_listing, "submit", "retrain", "nosuch-exp", words=("nosuch-exp",))


def test_runs_without_weights_are_refused(work: Path, tree_listing) -> None:
    for run in sorted((work / "runs" / EXPERIMENT / "runs").iterdir()):
        meta = json.loads((run / "run.json").read_text())
        del meta["arrays"]["model.pt"]
        (run / "run.json").write_text(json.dumps(meta))
        (run / "model.pt").unlink()
    fails_cleanly(
        work, tree_listing, *_submit(), words=("without saved weights", "run-0000", "model.pt")
    )


def test_help_lists_the_command() -> None:
    res = invoke("submit", "retrain", "--help")
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert "--runs-per-job" in text and "--from-scratch" in text and "--dry-run" in text
