"""Studies (issue #12 item 3): ``--scenario`` selects names, modes, globs or lists;
``mlvar train`` and ``mlvar submit`` run one experiment per selected scenario, finished
runs skipped, leftover runs of several experiments packed into shared jobs that land each
run in its own experiment, failures reported while the others go on (exit code 3)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlvar.backends.study import submit_study
from mlvar.backends.train_jobs import make_packs, study_packs
from mlvar.cli import app
from mlvar.config import Config, PathsConfig
from mlvar.data.registry import prepare_sweep
from mlvar.data.selection import select_scenarios
from mlvar.errors import ExitCode, MlvarError
from mlvar.store import ExperimentStore, list_experiments
from mlvar.train.study import train_study

runner = CliRunner()
#: COMPAS 'artificial': the study's ratios 0.0, 0.1, ..., 0.5 (issue #12 item 1).
RATIOS = [f"{i / 10:.1f}" for i in range(6)]
ARTIFICIAL = [f"compas-artificial-r{r}" for r in RATIOS]
FAST = {"epochs": 2}


# ---------------------------------------------------------------- selection (no data)


def _fake_root(tmp_path: Path, scenarios: dict[str, tuple[str, str]]) -> Path:
    """A data root of bare manifests: name -> (dataset, mode)."""
    for name, (dataset, mode) in scenarios.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text(
            json.dumps({"dataset": dataset, "mode": mode})
        )
    return tmp_path


def test_select_scenarios_by_name_mode_glob_and_list(tmp_path: Path) -> None:
    names = {f"cifar10-holdout-dup-r0.{i}": ("cifar10", "holdout-dup") for i in range(3)}
    names |= {"cifar10-original": ("cifar10", "original"), "digits-x": ("digits", "original")}
    root = _fake_root(tmp_path, names)

    def pick(value: str | None) -> list[str]:
        return [s.name for s in select_scenarios(root, "cifar10", value)]

    dup = [f"cifar10-holdout-dup-r0.{i}" for i in range(3)]
    assert pick(None) == sorted(dup + ["cifar10-original"])  # every one of the dataset
    assert pick("holdout-dup") == dup  # a mode: all of it
    assert pick("cifar10-holdout-dup-*") == dup
    assert pick("cifar10-holdout-dup-r0.[02]") == [dup[0], dup[2]]
    assert pick("original, cifar10-holdout-dup-r0.1") == ["cifar10-original", dup[1]]
    assert pick("cifar10-*-r0.1,holdout-dup,cifar10-holdout-dup-r0.1") == [dup[1], dup[0], dup[2]]
    for value, words in [
        ("cifar10-holdot-*", "matches no"),
        ("holdot-dup", "did you mean 'holdout-dup'"),
        (",", "names no scenario"),
        ("digits-x", "no prepared 'cifar10' scenario 'digits-x'"),
    ]:
        with pytest.raises(MlvarError, match=words):
            pick(value)
    with pytest.raises(MlvarError, match="no prepared scenario of dataset 'compas'"):
        select_scenarios(root, "compas", None)


def test_select_scenarios_orders_numbers_by_value(tmp_path: Path) -> None:
    clusters = [f"compas-holdout-cluster{k}" for k in (0, 1, 2, 9, 10, 11)]
    ratios = [f"compas-artificial-r{r}" for r in ("0.05", "0.1", "0.5", "0.55")]
    root = _fake_root(
        tmp_path,
        {n: ("compas", "holdout") for n in clusters}
        | {n: ("compas", "artificial") for n in ratios},
    )
    assert [s.name for s in select_scenarios(root, "compas", "holdout")] == clusters
    assert [s.name for s in select_scenarios(root, "compas", "compas-*-r*")] == ratios
    assert [s.name for s in select_scenarios(root, "compas", None)] == ratios + clusters


def test_study_packs_fill_jobs_and_keep_single_experiments_as_before() -> None:
    pending = {"a": list(range(10)), "b": [0, 1, 2], "c": [3, 4, 5, 6, 7]}
    jobs = study_packs(pending, 4)
    assert len(jobs) == math.ceil((10 + 3 + 5) / 4)  # the fewest jobs
    flat = [(exp, i) for job in jobs for exp, idx in job for i in idx]
    assert sorted(flat) == sorted((e, i) for e, idx in pending.items() for i in idx)
    assert all(sum(len(idx) for _, idx in job) <= 4 for job in jobs)
    assert [j for j in jobs if len(j) == 1][:2] == [[("a", [0, 1, 2, 3])], [("a", [4, 5, 6, 7])]]
    mixed = [j for j in jobs if len(j) > 1]
    assert mixed[0] == [("a", [8, 9]), ("b", [0, 1])]
    for runs, per_job in [(7, 3), (8, 4), (1, 8)]:  # one experiment: packs as before
        one = study_packs({"x": list(range(runs))}, per_job)
        assert [idx for (job,) in one for idx in [job[1]]] == make_packs(list(range(runs)), per_job)


# ---------------------------------------------------------------- COMPAS artificial study


@pytest.fixture(scope="module")
def compas_sweep(tmp_path_factory: pytest.TempPathFactory, compas_csv: Path) -> Path:
    """The six COMPAS 'artificial' ratios prepared through the service."""
    root = tmp_path_factory.mktemp("study") / "data"
    (root / "raw").mkdir(parents=True)
    shutil.copyfile(compas_csv, root / "raw" / "compas-scores-two-years.csv")
    prepare_sweep(root, "compas", mode="artificial")
    return root


def _cli(root: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(root / "runs"))
    monkeypatch.setenv("MLVAR_REPORTS_ROOT", str(root / "reports"))
    return runner.invoke(app, list(args))


def _runs(runs_root: Path) -> dict[str, list[str]]:
    """Every experiment's complete, verified runs."""
    return {
        exp: [r.run_id for r in ExperimentStore.open(runs_root, exp).runs(verify=True)]
        for exp in list_experiments(runs_root)
    }


def test_train_artificial_trains_six_experiments_then_skips_them(
    compas_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [s.name for s in select_scenarios(compas_sweep, "compas", "artificial")] == ARTIFICIAL
    args = ("train", "compas", "--scenario", "artificial", "--runs", "3", "--epochs", "2")
    res = _cli(tmp_path, compas_sweep, monkeypatch, *args)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "compas study: 6 experiments" in res.stdout  # the plan, first
    for name in ARTIFICIAL:
        assert f"{name}-mlp" in res.stdout
    three = [f"run-{i:04d}" for i in range(3)]
    assert _runs(tmp_path / "runs") == {f"{n}-mlp": three for n in ARTIFICIAL}
    again = _cli(tmp_path, compas_sweep, monkeypatch, *args, "--json")
    assert again.exit_code == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["trained"] == 0 and out["skipped"] == 6 * 3
    assert [p["to_run"] for p in out["plan"]["experiments"]] == [0] * 6
    # A glob and a list select their subsets: one more run each, only there.
    glob = _cli(tmp_path, compas_sweep, monkeypatch, "train", "compas", "--scenario",
                "compas-artificial-r0.[01]", "--runs", "4", "--epochs", "2", "--json")  # fmt: skip
    assert glob.exit_code == 0, glob.stderr
    assert sorted(json.loads(glob.stdout)["experiments"]) == [f"{n}-mlp" for n in ARTIFICIAL[:2]]
    pair = f"{ARTIFICIAL[5]},{ARTIFICIAL[3]}"
    listed = _cli(tmp_path, compas_sweep, monkeypatch, "train", "compas", "--scenario", pair,
                  "--runs", "4", "--epochs", "2", "--json")  # fmt: skip
    assert listed.exit_code == 0, listed.stderr
    assert list(json.loads(listed.stdout)["experiments"]) == [
        f"{ARTIFICIAL[5]}-mlp",
        f"{ARTIFICIAL[3]}-mlp",
    ]
    counts = {exp: len(runs) for exp, runs in _runs(tmp_path / "runs").items()}
    four = {f"{ARTIFICIAL[i]}-mlp" for i in (0, 1, 3, 5)}
    assert counts == {f"{n}-mlp": 4 if f"{n}-mlp" in four else 3 for n in ARTIFICIAL}


def _config(data_root: Path, runs_root: Path) -> Config:
    return Config(paths=PathsConfig(data_root, runs_root, runs_root.parent / "reports"))


def _logits(runs_root: Path) -> dict[tuple[str, str, str], np.ndarray]:
    found = {}
    for exp in list_experiments(runs_root):
        store = ExperimentStore.open(runs_root, exp)
        for run in store.runs(verify=True):
            for split in store.splits:
                found[exp, run.run_id, split] = run.load_logits(split)
    return found


def test_local_submit_of_a_sweep_equals_train_and_shares_jobs(
    compas_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    three = ",".join(ARTIFICIAL[:3])
    ref = _config(compas_sweep, tmp_path / "train")
    trained = train_study(ref, "compas", three, runs=3, overrides=FAST)
    assert not trained.failed and trained.trained == 9
    cfg = _config(compas_sweep, tmp_path / "local")
    res = submit_study(cfg, "compas", three, runs=3, overrides=FAST, runs_per_job=4)
    sub = res.submission
    assert sub is not None and sub.state == "complete" and not res.failed
    # 9 runs, 3 per experiment, 4 per job: 3 jobs, two of them mixing experiments.
    exps = [f"{n}-mlp" for n in ARTIFICIAL[:3]]
    assert [[(p["experiment"], p["run_indices"]) for p in j.parts] for j in sub.jobs] == [
        [(exps[0], [0, 1, 2]), (exps[1], [0])],
        [(exps[1], [1, 2]), (exps[2], [0, 1])],
        [(exps[2], [2])],
    ]
    a, b = _logits(tmp_path / "local"), _logits(tmp_path / "train")
    assert sorted(a) == sorted(b) and len(a) == 9 * 3
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for exp in exps:  # the record is in every experiment's folder; status works from each
        record = json.loads(
            (tmp_path / "local" / exp / "submissions" / f"{sub.id}.json").read_text()
        )
        assert record["experiments"] == exps and record["state"] == "complete"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(compas_sweep))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "local"))
    status = runner.invoke(app, ["submit", "status", exps[2]])
    assert status.exit_code == 0 and "complete" in status.stdout
    got = runner.invoke(app, ["submit", "download", exps[1], "--json"])
    assert got.exit_code == 0, got.stderr
    assert len(json.loads(got.stdout)["skipped"]) == 9  # every run of the study is there
    again = submit_study(cfg, "compas", three, runs=3, overrides=FAST, runs_per_job=4)
    assert again.submission is None and again.skipped == 9


def test_a_failing_experiment_is_reported_and_the_others_finish(
    compas_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    shutil.copytree(compas_sweep, data, symlinks=True)
    damaged = data / ARTIFICIAL[1] / "train.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])  # cut short
    scen = ",".join(ARTIFICIAL[:3])
    for command in ("train", "submit"):
        root = tmp_path / command
        root.mkdir()
        res = _cli(root, data, monkeypatch, command, "compas", "--scenario", scen,
                   "--runs", "2", "--epochs", "2")  # fmt: skip
        assert res.exit_code == ExitCode.JOB_FAILED, (command, res.stdout, res.stderr)
        assert f"{ARTIFICIAL[1]}-mlp failed:" in res.stderr and "sha256 differs" in res.stderr
        assert "1 of 3 experiment(s) failed" in res.stdout
        two = ["run-0000", "run-0001"]
        runs = _runs(root / "runs")
        assert {k: v for k, v in runs.items() if v} == {
            f"{ARTIFICIAL[0]}-mlp": two,
            f"{ARTIFICIAL[2]}-mlp": two,
        }


def test_a_failing_job_of_a_sweep_names_its_experiments(
    compas_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:2")  # run 2 of every experiment fails
    cfg = _config(compas_sweep, tmp_path / "runs")
    scen = ",".join(ARTIFICIAL[:2])
    res = submit_study(cfg, "compas", scen, runs=3, overrides=FAST, runs_per_job=4, retries=0)
    exps = [f"{n}-mlp" for n in ARTIFICIAL[:2]]
    assert sorted(res.failed) == exps and all("injected failure" in e for e in res.failed.values())
    # Jobs [exp0: 0,1,2 + exp1: 0] and [exp1: 1,2]: a part holding run 2 fails as a whole
    # (as a pack of one experiment does); the other part of the shared job lands.
    assert [
        [(p["experiment"], p["run_indices"]) for p in j.parts] for j in res.submission.jobs
    ] == [
        [(exps[0], [0, 1, 2]), (exps[1], [0])],
        [(exps[1], [1, 2])],
    ]
    failed = [(f["experiment"], f["run_id"]) for j in res.submission.jobs for f in j.failed]
    assert sorted(failed) == sorted(
        [(exps[0], f"run-{i:04d}") for i in (0, 1, 2)] + [(exps[1], f"run-{i:04d}") for i in (1, 2)]
    )
    assert _runs(tmp_path / "runs") == {exps[0]: [], exps[1]: ["run-0000"]}


# ---------------------------------------------------------------- CIFAR-100, several scenarios


def test_submit_cifar100_trains_every_prepared_scenario(
    tiny_cifar100, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlvar.data import registry

    data = tmp_path / "data"
    registry.fetch(data, "cifar100", source=tiny_cifar100.archive, verify=False)
    for subclass in ("baby", "maple_tree"):
        registry.prepare(data, "cifar100", subclass=subclass)
    res = _cli(tmp_path, data, monkeypatch, "submit", "cifar100", "--runs", "2",
               "--model", "mlp", "--epochs", "1", "--runs-per-job", "3")  # fmt: skip
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "cifar100 study: 2 experiments" in res.stdout
    scenarios = [p.parent.name for p in sorted(data.glob("cifar100-*/manifest.json"))]
    assert len(scenarios) == 2
    assert _runs(tmp_path / "runs") == {f"{s}-mlp": ["run-0000", "run-0001"] for s in scenarios}


# ---------------------------------------------------------------- Azure ML: a shared job


def test_aml_dry_run_of_a_sweep_mounts_each_scenario_of_a_shared_job(tmp_path: Path) -> None:
    pytest.importorskip("azure.ai.ml")
    import yaml

    from mlvar.backends.aml import asset_name, asset_version
    from mlvar.backends.worker import main as worker
    from mlvar.config import AmlConfig
    from mlvar.data.registry import prepare
    from mlvar.data.scenario import open_scenario

    data = tmp_path / "data"
    scen = [prepare(data, "digits", mode="holdout", subclass=k).name for k in (3, 4)]
    cfg = _config(data, tmp_path / "runs")
    cfg.backend.aml = AmlConfig(compute="cpu-cluster", datastore="workspaceblobstore")
    out = tmp_path / "jobs"
    res = submit_study(
        cfg, "digits", runs=3, backend="aml", overrides=FAST, dry_run=True, out=out,
        runs_per_job=4, submission_id="20250101T000000Z-aml-test",
    )  # fmt: skip
    exps = [f"{s}-mlp" for s in scen]
    assert [
        [(p["experiment"], p["run_indices"]) for p in j.parts] for j in res.submission.jobs
    ] == [
        [(exps[0], [0, 1, 2]), (exps[1], [0])],
        [(exps[1], [1, 2])],
    ]
    assert not (tmp_path / "runs").exists()  # a dry run writes only its folder
    scenarios = [open_scenario(data, s) for s in scen]
    assert sorted(res.files) == sorted(set(res.files)) and "data-asset.yaml" not in res.files
    assert {f"data-assets/{asset_name(s)}.yaml" for s in scenarios} <= set(res.files)
    shared = {ref.sha256: ref for s in scenarios for ref in s.arrays}
    shared_job = yaml.safe_load((out / "jobs" / "pack-000.yaml").read_text())
    inputs = shared_job["inputs"]
    assert (
        inputs["scenario"]["path"]
        == f"azureml:{asset_name(scenarios[0])}:{asset_version(scenarios[0])}"
    )
    assert (
        inputs["scenario_1"]["path"]
        == f"azureml:{asset_name(scenarios[1])}:{asset_version(scenarios[1])}"
    )
    assert sorted(k for k in inputs if k.startswith("array_")) == [
        f"array_{i}" for i in range(len(shared))
    ]
    command = shared_job["command"].split()
    assert command.count("--scenario-dir") == 2 and command.count("--array-file") == len(shared)
    alone = yaml.safe_load((out / "jobs" / "pack-001.yaml").read_text())
    assert "scenario_1" not in alone["inputs"] and alone["command"].count("--scenario-dir") == 1
    assert alone["inputs"]["scenario"] == inputs["scenario_1"]
    spec = json.loads((out / "code" / "specs" / "pack-000.json").read_text())
    assert [p["experiment"] for p in spec["parts"]] == exps
    # The worker, as the job runs it: each scenario and array from its own mount.
    args = [str(out / "code" / "specs" / "pack-000.json"), "--runs-root", str(tmp_path / "w")]
    for s in scenarios:
        args += ["--scenario-dir", str(s.path)]
    for ref in shared.values():
        args += ["--array-file", str(ref.path(data))]
    assert worker(args) == 0
    ref_cfg = _config(data, tmp_path / "ref")
    train_study(ref_cfg, "digits", runs=3, overrides=FAST)
    got, want = _logits(tmp_path / "w"), _logits(tmp_path / "ref")
    assert sorted(got) == sorted(
        (e, f"run-{i:04d}", split)
        for e, idx in [(exps[0], [0, 1, 2]), (exps[1], [0])]
        for i in idx
        for split in ("train", "val", "test", "full_val")  # holdout scenarios: full_val too
    )
    assert all(np.array_equal(got[k], want[k]) for k in got)
