"""mlvar submit saliency: ``analyze saliency`` as run-block jobs on every backend.

The merged ``analysis/saliency-<split>/`` must equal an unsharded ``saliency(...)`` byte for
byte (every file, overlays included), on the local backend (in process and in worker
processes), on a real local Ray instance, and from the Azure ML jobs' commands run here;
blocks already present are not resubmitted, a failing block is retried then reported, a
killed worker lands nothing, a job reads only what it needs, and bad input is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from golden_files import compare
from mlvar.analysis import saliency as sal
from mlvar.backends import kinds, saliency_jobs, service
from mlvar.backends.spec import load_submission
from mlvar.cli import app
from mlvar.config import AmlConfig
from mlvar.errors import ExitCode, MlvarError
from mlvar.saliency import merge_saliency_shards, saliency
from mlvar.store import ExperimentStore
from tiny_images import build_tiny_experiments, tiny_config

TOP = 3
runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image scenario, 3 runs of the small CNN and 2 of the MLP (tests/tiny_images.py)."""
    return build_tiny_experiments(tmp_path_factory.mktemp("saliency-jobs"))


@pytest.fixture(scope="module")
def reference(work: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every file of an unsharded saliency (top 3, all runs) of each model, by path."""
    runs = tmp_path_factory.mktemp("reference") / "runs"
    shutil.copytree(work / "runs", runs)
    out = {}
    for model, seeds in (("cnn", 3), ("mlp", 2)):
        store = ExperimentStore.open(runs, f"tiny-{model}")
        out[model] = files(saliency(store, work / "data", top=TOP, seeds=seeds).path)
    return out


@pytest.fixture
def root(work: Path, tmp_path: Path) -> Path:
    """A private copy of the work folder."""
    shutil.copytree(work, tmp_path / "w")
    return tmp_path / "w"


config = tiny_config


def store_of(root: Path, model: str = "cnn") -> ExperimentStore:
    return ExperimentStore.open(root / "runs", f"tiny-{model}")


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_same_bytes(folder: Path, expected: dict[str, bytes]) -> None:
    got = files(folder)
    assert sorted(got) == sorted(expected)
    assert any(name.startswith("overlays/") for name in got)
    for name in expected:  # maps, stats, index, saliency.json and every overlay PNG
        assert got[name] == expected[name], name


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


def landed(store: ExperimentStore) -> list[str]:
    folder = sal.shards_folder(store, "test")
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def quiet(*_args, **_kwargs) -> None:
    pass


# ---------------------------------------------------------------- local backend


@pytest.mark.parametrize(
    ("model", "m", "workers"), [("cnn", 2, 0), ("cnn", 3, 0), ("mlp", 2, 0), ("cnn", 3, 2)]
)
def test_local_shards_merge_to_the_unsharded_bytes(
    root: Path, reference: dict, model: str, m: int, workers: int
) -> None:
    store = store_of(root, model)
    seeds = 3 if model == "cnn" else 2
    res = service.submit_saliency(
        config(root), store.name, run_shards=m, top=TOP, seeds=seeds, workers=workers
    )
    sub = res.submission
    names = [f"r{j}of{m}" for j in range(1, m + 1)]
    assert sub.kind == "saliency" and sub.state == "complete" and sub.split == "test"
    assert [j.name for j in sub.jobs] == names == res.pending and sub.run_shards == m
    assert all(j.kind == "saliency" and j.attempts == 1 for j in sub.jobs)
    assert landed(store) == names  # no .tmp-* left either
    assert res.merged.path == sal.folder(store, "test")
    assert_same_bytes(res.merged.path, reference[model])
    blocks = [json.loads((res.path / n / "meta.json").read_text())["block_run_ids"] for n in names]
    assert sum(blocks, []) == [f"run-{i:04d}" for i in range(seeds)]
    record = json.loads(sub.path.read_text())
    assert record["kind"] == "saliency" and record["options"]["top"] == TOP
    assert not (store.root / "submissions" / sub.id / "work").exists()
    if workers:
        logs = store.root / "submissions" / sub.id / "logs"
        assert sorted(p.name for p in logs.iterdir()) == [f"{n}-a1.log" for n in names]


def test_resubmission_skips_present_blocks(root: Path, reference: dict) -> None:
    cfg, store = config(root), store_of(root)
    first = service.submit_saliency(cfg, store.name, run_shards=3, top=TOP, seeds=3)
    assert first.submission.state == "complete"
    folder = sal.shards_folder(store, "test")
    shutil.rmtree(folder / "r2of3")  # lost
    maps = folder / "r3of3" / "maps.npy"  # damaged: fails its sha256
    data = bytearray(maps.read_bytes())
    data[-1] ^= 0xFF
    maps.write_bytes(bytes(data))
    untouched = (folder / "r1of3" / "meta.json").stat().st_mtime_ns
    again = service.submit_saliency(cfg, store.name, run_shards=3, top=TOP, seeds=3)
    assert again.pending == ["r2of3", "r3of3"] and again.skipped == ["r1of3"]
    assert [j.name for j in again.submission.jobs] == again.pending
    assert (folder / "r1of3" / "meta.json").stat().st_mtime_ns == untouched
    assert not sal.verify_saliency_shard(folder / "r3of3")[1]
    assert_same_bytes(again.merged.path, reference["cnn"])
    third = service.submit_saliency(cfg, store.name, run_shards=3, top=TOP, seeds=3)
    assert third.submission is None and third.pending == [] and len(third.skipped) == 3
    assert third.merged is not None  # all present: merged again
    # Other arguments (another --top) make every block stale: all are recomputed.
    fourth = service.submit_saliency(cfg, store.name, run_shards=3, top=2, seeds=3, merge=False)
    assert fourth.pending == ["r1of3", "r2of3", "r3of3"] and fourth.merged is None
    assert json.loads((folder / "r1of3" / "meta.json").read_text())["top"] == 2
    # Blocks of another M are refused (a merge could not use both), naming them.
    before = listing(root)
    with pytest.raises(MlvarError, match=r"another sharding \(r1of3, r2of3, r3of3\)") as err:
        service.submit_saliency(cfg, store.name, run_shards=2, top=2, seeds=3)
    assert "--run-shards" in err.value.hint and listing(root) == before


def test_failing_block_is_retried_then_reported(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, store = config(root), store_of(root)
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1")  # block index 1: r2of2
    res = service.submit_saliency(cfg, store.name, run_shards=2, top=TOP, seeds=3, retries=2)
    sub = res.submission
    assert sub.state == "failed" and res.merged is None
    jobs = {j.name: j for j in sub.jobs}
    failed = jobs["r2of2"]
    assert failed.state == "failed" and failed.attempts == 3
    assert failed.failed == [{"shard": "r2of2", "runs": "2/2"}]
    assert "injected failure in shard r2of2" in failed.error
    assert "RuntimeError: injected failure" in failed.log_tail
    assert jobs["r1of2"].state == "complete" and jobs["r1of2"].attempts == 1
    assert landed(store) == ["r1of2"]
    assert not sal.folder(store, "test").exists()
    assert load_submission(store.root, None).kind == "saliency"
    # Failing in the first attempt only: the retry completes it, and the merge follows.
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1:1")
    again = service.submit_saliency(cfg, store.name, run_shards=2, top=TOP, seeds=3, retries=1)
    assert again.pending == ["r2of2"] and again.submission.jobs[0].attempts == 2
    assert again.submission.state == "complete" and again.merged is not None


def test_killed_worker_lands_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, store = config(root), store_of(root)
    plan = saliency_jobs.plan_saliency_jobs(store, root / "data", 2, top=TOP, seeds=3)
    spec = plan.spec(1, "manual")
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = root / "worker-out"
    cmd = [sys.executable, "-m", "mlvar.backends.worker", str(spec_file)]
    cmd += ["--experiment-dir", str(store.root), "--out", str(out)]
    cmd += ["--data-root", str(root / "data")]
    env = dict(os.environ, MLVAR_WORKER_FAULT="kill:0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert "injected kill in shard r1of2" in proc.stdout
    assert not (out / "r1of2").exists()
    # A partial folder under the shard's name (arrays, no meta.json) is refused too.
    partial = out / "r1of2"
    partial.mkdir(parents=True)
    (partial / "maps.npy").write_bytes(b"partial")
    assert kinds.land_shard(partial, store, spec["expect"]) == "unfinished (no meta.json)"
    assert landed(store) == []
    # Through the backend: the killed block is reported, nothing partial lands.
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "kill:0")
    res = service.submit_saliency(
        cfg, store.name, run_shards=2, top=TOP, seeds=3, retries=0, workers=2
    )
    job = {j.name: j for j in res.submission.jobs}["r1of2"]
    assert job.state == "failed" and "code -9" in job.error, job
    assert "injected kill in shard r1of2" in job.log_tail
    assert res.merged is None and landed(store) == ["r2of2"]
    assert [p.name for p in (store.root / "analysis" / "saliency-shards").iterdir()] == ["test"]
    assert not (store.root / "submissions" / res.submission.id / "work").exists()
    monkeypatch.delenv("MLVAR_WORKER_FAULT")
    again = service.submit_saliency(cfg, store.name, run_shards=2, top=TOP, seeds=3, workers=2)
    assert again.pending == ["r1of2"] and again.merged is not None


def test_a_damaged_or_foreign_shard_never_lands(root: Path) -> None:
    store = store_of(root)
    plan = saliency_jobs.plan_saliency_jobs(store, root / "data", 2, top=TOP, seeds=3)
    spec = plan.spec(1, "manual")
    folder = saliency_jobs.run_saliency_job(spec, store.root, root / "out", root / "data", quiet)
    maps = folder / "maps.npy"
    data = bytearray(maps.read_bytes())
    data[-1] ^= 0xFF
    maps.write_bytes(bytes(data))
    why = kinds.land_shard(folder, store, spec["expect"])
    assert why == "maps.npy is missing or does not match its sha256"
    data[-1] ^= 0xFF
    maps.write_bytes(bytes(data))
    other = plan.spec(2, "x")["expect"]  # the plan of the other block
    assert "differs from the plan in shard, block_run_ids" in kinds.land_shard(folder, store, other)
    stale = saliency_jobs.plan_saliency_jobs(store, root / "data", 2, top=2, seeds=3)
    assert "differs from the plan in top, sample_ids" in kinds.land_shard(
        folder, store, stale.spec(1, "x")["expect"]
    )
    assert "of experiment 'tiny-cnn', not 'tiny-mlp'" in kinds.land_shard(
        folder, store_of(root, "mlp"), None
    )
    assert landed(store) == []
    assert kinds.land_shard(folder, store, spec["expect"]) == ""
    assert landed(store) == ["r1of2"]
    assert files(sal.shards_folder(store, "test") / "r1of2") == files(folder)


def test_a_job_reads_only_what_it_needs(root: Path, reference: dict) -> None:
    """What a Ray task is sent (and an Azure ML input holds): every run's logits of the
    split (the ranking), the model.pt of the block's runs only, each run.json listing
    what it needs; with the scenario folder under another name (an input mount), the
    worker computes the same shard as from the store."""
    store = store_of(root)
    plan = saliency_jobs.plan_saliency_jobs(store, root / "data", 2, top=TOP, seeds=3)
    spec = plan.spec(2, "manual")  # runs 0001, 0002
    got = kinds.input_bytes(store, spec)
    runs = [f"run-{i:04d}" for i in range(3)]
    assert sorted(got) == sorted(
        ["experiment.json", "samples/test.parquet"]
        + [f"runs/{r}/{f}" for r in runs for f in ("run.json", "test.logits.npy")]
        + ["runs/run-0001/model.pt", "runs/run-0002/model.pt"]
    )
    listed = json.loads(got["runs/run-0000/run.json"])["arrays"]
    assert sorted(listed) == ["model.pt", "test.logits.npy"]
    from mlvar.backends.kind import write_files
    from mlvar.backends.worker import main

    copy = root / "copy" / "input-mount"
    write_files(got, copy)
    mount = root / "scenario-mount"
    shutil.copytree(root / "data" / "tiny", mount)
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    args = [str(spec_file), "--experiment-dir", str(copy), "--scenario-dir", str(mount)]
    assert main([*args, "--out", str(root / "out")]) == 0
    direct = saliency_jobs.run_saliency_job(spec, store.root, root / "o2", root / "data", quiet)
    assert files(root / "out" / "r2of2") == files(direct)
    meta = json.loads((direct / "meta.json").read_text())
    assert meta["experiment"] == "tiny-cnn" and meta["block_run_ids"] == runs[1:]
    # a copy lacking a run the ranking reads, or a shipped file damaged: bad input, named
    shutil.rmtree(copy / "runs" / "run-0000")
    with pytest.raises(MlvarError, match="lacks run.*run-0000"):
        saliency_jobs.run_saliency_job(spec, copy, root / "o3", root / "data", quiet)
    write_files(got, copy)
    (copy / "runs" / "run-0001" / "model.pt").write_bytes(b"x")
    with pytest.raises(MlvarError, match=r"run-0001 .*model.pt missing or not matching"):
        saliency_jobs.run_saliency_job(spec, copy, root / "o3", root / "data", quiet)
    # a job without the scenario is refused by the worker's command line (exit 2)
    assert main([*args[:3], "--out", str(root / "o4")]) == 2


def test_download_from_a_folder_of_saliency_shards(root: Path, reference: dict) -> None:
    store = store_of(root)
    plan = saliency_jobs.plan_saliency_jobs(store, root / "data", 3, top=TOP, seeds=3)
    out = root / "copied-by-hand"
    for job, spec in plan.jobs("x"):
        saliency_jobs.run_saliency_job(spec, store.root, out / job.name, root / "data", quiet)
    got = service.download(config(root), store.name, source=out)
    assert got.kind == "shards" and got.imported == ["r1of3", "r2of3", "r3of3"]
    merged = merge_saliency_shards(store, root / "data")
    assert_same_bytes(merged.path, reference["cnn"])


# ---------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_shards_give_the_same_bytes(
    ray_instance, root: Path, reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, store = config(root), store_of(root)
    res = service.submit_saliency(cfg, store.name, backend="ray", run_shards=2, top=TOP, seeds=3)
    sub = res.submission
    assert sub.backend == "ray" and sub.state == "complete", sub
    assert all(j.ref and j.attempts == 1 for j in sub.jobs)
    assert_same_bytes(res.merged.path, reference["cnn"])
    assert not (store.root / "submissions" / sub.id).exists()  # work folder gone
    # A block failing in every attempt: retried, then reported with its log tail.
    shutil.rmtree(sal.shards_folder(store, "test") / "r2of2")
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:1")  # sent to the tasks' runtime_env
    again = service.submit_saliency(
        cfg, store.name, backend="ray", run_shards=2, top=TOP, seeds=3, retries=1
    )
    (job,) = again.submission.jobs
    assert job.name == "r2of2" and job.state == "failed" and job.attempts == 2
    assert "injected failure in shard r2of2" in job.log_tail and again.merged is None


# ---------------------------------------------------------------- Azure ML, offline

SUB_ID = "20250101T000000Z-aml-saliency"


@pytest.fixture(scope="module")
def aml_dry_run(work: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("azure.ai.ml")
    root = tmp_path_factory.mktemp("aml-saliency")
    shutil.copytree(work, root, dirs_exist_ok=True)
    cfg = config(root)
    cfg.backend.aml = AmlConfig(compute="cpu-cluster", datastore="workspaceblobstore")
    result = service.submit_saliency(
        cfg,
        "tiny-cnn",
        backend="aml",
        run_shards=2,
        top=TOP,
        seeds=3,
        dry_run=True,
        out=root / "jobs",
        submission_id=SUB_ID,
    )
    return root, root / "jobs", result


def _compare(name: str, text: str) -> None:
    compare("aml", name, text)


@pytest.mark.parametrize("name", ["jobs/r1of2.yaml", "jobs/r2of2.yaml", "data-asset.yaml"])
def test_aml_yaml_matches_golden(aml_dry_run, name: str) -> None:
    root, out, _ = aml_dry_run
    text = (out / name).read_text().replace(str((root / "data").resolve()), "<DATA_ROOT>")
    _compare("saliency-" + name.replace("/", "-"), text)


def test_aml_jobs_load_and_run_offline(aml_dry_run, reference: dict, tmp_path: Path) -> None:
    """Every job validates with load_job; running each job's command here (its spec, its
    input folder, the scenario folder as the data asset's mount, an output folder) and
    importing the outputs gives the unsharded bytes."""
    from azure.ai.ml import load_data, load_job

    from mlvar.backends.worker import main

    root, out, result = aml_dry_run
    sub = result.submission
    assert sub.kind == "saliency" and [j.name for j in sub.jobs] == ["r1of2", "r2of2"]
    assert not (store_of(root).root / "analysis").exists()  # a dry run writes nothing there
    assert not (store_of(root).root / "submissions").exists()
    asset = load_data(out / "data-asset.yaml")
    assert asset.name == "mlvar-tiny" and Path(asset.path).name == "tiny"
    for name, weights in (("r1of2", ["run-0000"]), ("r2of2", ["run-0001", "run-0002"])):
        job = load_job(out / "jobs" / f"{name}.yaml")
        assert job.type == "command" and job.compute == "cpu-cluster"
        assert "--scenario-dir ${{inputs.scenario}}" in job.command
        assert set(job.inputs) == {"experiment", "scenario"} and set(job.outputs) == {"shards"}
        assert job.inputs["experiment"].path == f"../inputs/{name}"
        assert job.inputs["scenario"].path.endswith(f"mlvar-tiny:{asset.version}")
        assert job.outputs["shards"].path.endswith(f"/tiny-cnn/{SUB_ID}/{name}/")
        folder = out / "inputs" / name / "runs"
        assert sorted(p.parent.name for p in folder.glob("*/model.pt")) == weights
        assert len(list(folder.glob("*/test.logits.npy"))) == 3
        args = [str(out / "code" / "specs" / f"{name}.json")]
        args += ["--experiment-dir", str(out / "inputs" / name)]
        args += ["--scenario-dir", str(root / "data" / "tiny")]
        assert main([*args, "--out", str(tmp_path / "outputs" / name)]) == 0
    shutil.copytree(root, tmp_path / "w", ignore=shutil.ignore_patterns("jobs"))
    cfg = config(tmp_path / "w")
    imported = service.download(cfg, "tiny-cnn", source=tmp_path / "outputs")
    assert imported.kind == "shards" and imported.imported == ["r1of2", "r2of2"]
    merged = merge_saliency_shards(store_of(tmp_path / "w"), tmp_path / "w" / "data")
    assert_same_bytes(merged.path, reference["cnn"])


class _FakeAzure:
    """Stands in for ``MLClient``: a created job runs its command here at once (the data
    asset's mount is the scenario's local folder)."""

    def __init__(self, outputs: Path, scenario_dir: Path) -> None:
        self.outputs, self.scenario_dir = outputs, scenario_dir
        self.created: dict[str, str] = {}
        self.assets: list[str] = []
        self.jobs = SimpleNamespace(
            create_or_update=self.create, get=self.get, download=self.download
        )
        self.data = SimpleNamespace(get=self.get_asset, create_or_update=self.create_asset)

    def get_asset(self, name: str, version: str):
        from azure.core.exceptions import ResourceNotFoundError

        if f"{name}:{version}" not in self.assets:
            raise ResourceNotFoundError("no such asset")

    def create_asset(self, asset) -> None:
        self.assets.append(f"{asset.name}:{asset.version}")

    def create(self, job):
        from mlvar.backends.worker import main

        base = Path(job._base_path)
        assert job.inputs["scenario"].path.removeprefix("azureml:") in self.assets
        args = [str(base / job.code / job.command.split()[3])]
        args += ["--experiment-dir", str(base / job.inputs["experiment"].path)]
        args += ["--scenario-dir", str(self.scenario_dir)]
        code = main([*args, "--out", str(self.outputs / job.name / "shards")])
        self.created[job.name] = "Completed" if code == 0 else "Failed"
        return SimpleNamespace(name=job.name)

    def get(self, ref: str):
        return SimpleNamespace(status=self.created[ref])

    def download(self, ref: str, download_path: str, output_name: str) -> None:
        assert output_name == "shards"
        shutil.copytree(self.outputs / ref / "shards", Path(download_path) / "named-outputs")


def test_aml_submit_status_download_with_a_stand_in_client(
    aml_dry_run, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Azure bookkeeping offline: submit uploads the scenario asset once and creates
    one job per block, status refreshes their states, download lands and merges them."""
    from mlvar.backends import aml as aml_backend

    root, _, _ = aml_dry_run
    shutil.copytree(root, tmp_path / "w", ignore=shutil.ignore_patterns("jobs"))
    cfg = config(tmp_path / "w")
    cfg.backend.aml = AmlConfig(
        subscription_id="s", resource_group="g", workspace="w", compute="cpu-cluster"
    )
    fake = _FakeAzure(tmp_path / "azure", tmp_path / "w" / "data" / "tiny")
    monkeypatch.setattr(aml_backend, "client", lambda _cfg: fake)
    res = service.submit_saliency(cfg, "tiny-cnn", backend="aml", run_shards=2, top=TOP, seeds=3)
    sub = res.submission
    assert sub.state == "submitted" and res.merged is None and len(fake.assets) == 1
    assert service.status(cfg, "tiny-cnn").state == "finished"
    got = service.download(cfg, "tiny-cnn")
    assert got.kind == "shards" and got.imported == ["r1of2", "r2of2"] and not got.rejected
    store = store_of(tmp_path / "w")
    assert got.merged == str(sal.folder(store, "test")) and got.ranking == ""
    assert_same_bytes(Path(got.merged), reference["cnn"])
    assert service.status(cfg, "tiny-cnn").state == "complete"


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli_root(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.delenv("MLVAR_WORKER_FAULT", raising=False)
    for var, sub in {"DATA": "data", "RUNS": "runs", "REPORTS": "reports"}.items():
        monkeypatch.setenv(f"MLVAR_{var}_ROOT", str(root / sub))
    return root


def test_cli_submit_status_download(cli_root: Path, reference: dict) -> None:
    base = ["submit", "saliency", "tiny-cnn", "--top", str(TOP), "--seeds", "3"]
    res = runner.invoke(app, [*base, "--run-shards", "2"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    folder = cli_root / "runs" / "tiny-cnn" / "analysis" / "saliency-test"
    text = res.stdout.replace("\n", "")
    assert "saliency submission" in text and "r2of2" in text and "2/2 (run-0001..run-0002)" in text
    merged = "Merged 2 saliency shard(s) (GradCAM (pytorch_grad_cam), 6 samples under 3 runs)"
    assert f"{merged} into {folder}" in text
    assert_same_bytes(folder, reference["cnn"])
    res = runner.invoke(app, ["submit", "status", "tiny-cnn", "--json"])
    status = json.loads(res.stdout)
    assert status["kind"] == "saliency" and status["state"] == "complete"
    assert [j["kind"] for j in status["jobs"]] == ["saliency"] * 2
    res = runner.invoke(app, ["submit", "status", "tiny-cnn"])
    assert res.exit_code == 0 and "saliency submission" in res.stdout
    assert "run-0000..run-0000" in res.stdout and "complete" in res.stdout
    res = runner.invoke(app, ["submit", "download", "tiny-cnn", "--json"])
    down = json.loads(res.stdout)
    assert down["kind"] == "shards" and down["skipped"] == ["r1of2", "r2of2"]
    res = runner.invoke(app, [*base, "--run-shards", "2", "--json"])
    out = json.loads(res.stdout)
    assert out["submission"] is None and out["saliency"] == str(folder) and out["merged"]
    res = runner.invoke(app, [*base, "--run-shards", "2"])
    assert "Nothing to submit: all 2 shard(s) are present." in res.stdout
    # A dry run of the local backend writes the plan only.
    dry = ["--split", "train", "--run-shards", "3", "--dry-run", "--out", "plan"]
    res = runner.invoke(app, [*base, *dry])
    assert res.exit_code == 0, res.stderr
    spec = json.loads((cli_root / "plan" / "specs" / "r3of3.json").read_text())
    assert spec["kind"] == "saliency" and spec["run_shard"] == [3, 3] and spec["split"] == "train"
    assert "Dry run: 3 saliency job(s) of 3" in res.stdout
    assert not (folder.parent / "saliency-shards" / "train").exists()
    res = runner.invoke(app, ["submit", "--help"])
    assert "mlvar submit saliency" in res.stdout


def test_cli_reports_a_failed_block_with_its_log_tail(
    cli_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:0")
    args = ["submit", "saliency", "tiny-mlp", "--run-shards", "2", "--retries", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == ExitCode.JOB_FAILED == 3, (res.stdout, res.stderr)
    assert "r1of2 failed after 2 attempt(s)" in res.stdout
    assert "injected failure in shard r1of2" in res.stdout and "Merged" not in res.stdout


def _drop_weights(root: Path) -> None:
    run = root / "runs" / "tiny-mlp" / "runs" / "run-0001"
    meta = json.loads((run / "run.json").read_text())
    del meta["arrays"]["model.pt"]
    (run / "run.json").write_text(json.dumps(meta))
    (run / "model.pt").unlink()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["nope"], ["unknown experiment 'nope'", "experiments here"]),
        (["tiny-cnn", "--backend", "pbs"], ["unknown backend 'pbs'", "local", "slurm"]),
        (["tiny-cnn", "--split", "val"], ["has no split 'val'", "train, test"]),
        (["tiny-cnn", "--by", "nope"], ["unknown metric 'nope'"]),
        (["tiny-cnn", "--run-shards", "0"], ["--run-shards must be at least 1"]),
        (["tiny-cnn", "--run-shards", "4"], ["cannot split the 3 runs explained", "at most 3"]),
        (["tiny-cnn", "--seeds", "2", "--run-shards", "3"], ["the 2 runs explained"]),
        (["tiny-cnn", "--top", "0"], ["--top must be at least 1"]),
        (["tiny-cnn", "--retries", "-1"], ["--retries must be >= 0"]),
        (["tiny-mlp", "--layer", "fc1"], ["--layer applies to GradCAM", "leave out --layer"]),
        (["tiny-cnn", "--layer", "features.33"], ["no layer 'features.33'", "features.7"]),
        (["tiny-mlp", "WEIGHTS"], ["saved no model weights", "retrain"]),
        (["tiny-cnn", "SCENARIO"], ["prepared scenario 'tiny'", "not in the data root"]),
        (
            ["tiny-cnn", "--backend", "aml"],
            ["missing [backend.aml] settings", "subscription_id", "workspace", "compute"],
        ),
        (
            ["tiny-cnn", "--backend", "aml", "--dry-run"],
            ["missing [backend.aml] settings: compute"],
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(
    cli_root: Path, args: list[str], words: list[str]
) -> None:
    if "WEIGHTS" in args:
        _drop_weights(cli_root)
    if "SCENARIO" in args:
        shutil.move(cli_root / "data" / "tiny", cli_root / "elsewhere")
    args = [a for a in args if a not in ("WEIGHTS", "SCENARIO")]
    before = listing(cli_root)
    res = runner.invoke(app, ["submit", "saliency", *args, "--out", "jobs"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "(hint: " in lines[0], lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert listing(cli_root) == before
