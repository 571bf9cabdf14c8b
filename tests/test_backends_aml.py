"""The Azure ML backend offline: golden job YAML, each file validated with the SDK's own
``load_job``. Nothing here contacts Azure. To accept an intended change of the generated
YAML, delete the golden file(s) under tests/golden/aml/ and run the tests once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from golden_files import compare
from mlvar.backends import service
from mlvar.config import AmlConfig, Config, PathsConfig
from mlvar.data.registry import prepare

aml = pytest.importorskip("azure.ai.ml")

SUB_ID = "20250101T000000Z-aml-test"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, service.SubmitResult]:
    root = tmp_path_factory.mktemp("aml")
    prepare(root / "data", "digits", mode="holdout", subclass=3)
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    cfg.backend.aml = AmlConfig(compute="cpu-cluster", datastore="workspaceblobstore")
    out = root / "jobs"
    result = service.submit(
        cfg,
        "digits",
        runs=5,
        backend="aml",
        overrides={"epochs": 2},
        dry_run=True,
        out=out,
        runs_per_job=3,
        submission_id=SUB_ID,
    )
    return root, out, result


def _compare(name: str, text: str) -> None:
    compare("aml", name, text)


@pytest.mark.parametrize(
    "name", ["jobs/pack-000.yaml", "jobs/pack-001.yaml", "data-asset.yaml", "array-assets"]
)
def test_generated_yaml_matches_golden(dry_run, name: str) -> None:
    root, out, _ = dry_run
    # The shared arrays' data assets, one file each (named by content): compared in order.
    files = sorted((out / name).glob("*.yaml")) if name == "array-assets" else [out / name]
    assert files
    for i, file in enumerate(files):
        text = file.read_text()
        # The scenario's local folder (uploaded as the data asset) depends on the machine.
        text = text.replace(str((root / "data").resolve()), "<DATA_ROOT>")
        golden = f"array-asset-{i}.yaml" if name == "array-assets" else name.replace("/", "-")
        _compare(golden, text)


def test_every_job_loads_with_load_job(dry_run) -> None:
    _root, out, result = dry_run
    assert [j.run_indices for j in result.submission.jobs] == [[0, 1, 2], [3, 4]]
    for job in result.submission.jobs:
        loaded = aml.load_job(out / "jobs" / f"{job.name}.yaml")
        assert loaded.type == "command"
        assert loaded.compute == "cpu-cluster"
        assert "mlvar.backends.worker" in loaded.command
        # the scenario's folder and the one shared array it reads (the digits images)
        assert set(loaded.inputs) == {"scenario", "array_0"} and set(loaded.outputs) == {"runs"}
        assert loaded.inputs["array_0"].type == "uri_file"
        spec = json.loads((out / "code" / "specs" / f"{job.name}.json").read_text())
        assert spec["run_indices"] == job.run_indices
        assert spec["train"]["epochs"] == 2 and spec["experiment"] == result.experiment
    assert (out / "code" / "mlvar" / "backends" / "worker.py").is_file()
    assert "torch" in (out / "environment" / "conda.yaml").read_text()
    aml.load_data(out / "data-asset.yaml")
    (array,) = sorted((out / "array-assets").iterdir())
    assert aml.load_data(array).type == "uri_file"
    assert not (dry_run[0] / "runs").exists()  # a dry run writes nothing to the store


def test_registered_environment_is_used_as_is(dry_run, tmp_path: Path) -> None:
    root, _, _ = dry_run
    cfg = Config(paths=PathsConfig(root / "data", tmp_path / "runs", tmp_path / "reports"))
    cfg.backend.aml = AmlConfig(compute="gpu", environment="azureml:mlvar-env:3")
    res = service.submit(
        cfg, "digits", runs=1, backend="aml", dry_run=True, out=tmp_path / "j", submission_id="x"
    )
    job = aml.load_job(tmp_path / "j" / "jobs" / "pack-000.yaml")
    assert "mlvar-env" in str(job.environment)
    assert not (tmp_path / "j" / "environment").exists() and res.files


def test_worker_runs_a_spec_from_a_scenario_folder(dry_run, tmp_path: Path) -> None:
    """What the job's command does, run here: the spec, the scenario folder as an input
    mount, the output folder; the output is a run store that download imports."""
    from mlvar.backends.worker import main
    from mlvar.store import ExperimentStore

    root, out, result = dry_run
    scenario_dir = root / "data" / result.submission.scenario
    spec = out / "code" / "specs" / "pack-001.json"
    assert main([str(spec), "--scenario-dir", str(scenario_dir), "--runs-root", str(tmp_path)]) == 0
    store = ExperimentStore.open(tmp_path, result.experiment)
    assert [r.run_id for r in store.runs(verify=True)] == ["run-0003", "run-0004"]


def test_worker_reads_mounted_scenario_and_array_files(dry_run, tmp_path: Path) -> None:
    """The job's inputs as Azure ML mounts them: the scenario folder and each shared array
    under names of their own; the worker trains the same runs as from the data root, and
    refuses (exit 2) a scenario whose shared array was not mounted."""
    import shutil

    from mlvar.backends.worker import main
    from mlvar.data.scenario import open_scenario
    from mlvar.store import ExperimentStore

    root, out, result = dry_run
    scenario = open_scenario(root / "data", result.submission.scenario)
    mount = tmp_path / "INPUT_scenario"
    shutil.copytree(scenario.path, mount)
    arrays = []
    for i, ref in enumerate(scenario.arrays):
        arrays += ["--array-file", str(tmp_path / f"INPUT_array_{i}" / "data")]
        (tmp_path / f"INPUT_array_{i}").mkdir()
        shutil.copyfile(ref.path(root / "data"), tmp_path / f"INPUT_array_{i}" / "data")
    spec = str(out / "code" / "specs" / "pack-001.json")
    args = [spec, "--scenario-dir", str(mount)]
    assert main([*args, *arrays, "--runs-root", str(tmp_path / "a")]) == 0
    assert main([spec, "--data-root", str(root / "data"), "--runs-root", str(tmp_path / "b")]) == 0
    a, b = (ExperimentStore.open(tmp_path / x, result.experiment) for x in "ab")
    for ra, rb in zip(a.runs(verify=True), b.runs(verify=True), strict=True):
        assert ra.run_id == rb.run_id
        for split in a.splits:
            assert (ra.load_logits(split) == rb.load_logits(split)).all()
    assert main([*args, "--runs-root", str(tmp_path / "c")]) == 2  # its array not mounted


# ---------------------------------------------------------------- analysis shards

ANALYSIS_SUB = "20250101T000000Z-aml-shards"


@pytest.fixture(scope="module")
def analysis_dry_run(tmp_path_factory: pytest.TempPathFactory):
    from mlvar.analysis.synthetic import synthetic_store

    root = tmp_path_factory.mktemp("aml-analysis")
    synthetic_store(root / "runs", name="exp", n_runs=5, n_samples=60, n_classes=3)
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    cfg.backend.aml = AmlConfig(compute="cpu-cluster", datastore="workspaceblobstore")
    out = root / "jobs"
    result = service.submit_analysis(
        cfg,
        "exp",
        backend="aml",
        shards=2,
        run_shards=2,
        dry_run=True,
        out=out,
        submission_id=ANALYSIS_SUB,
    )
    return root, out, result, cfg


@pytest.mark.parametrize("name", ["jobs/s1of2-r1of2.yaml", "jobs/s2of2-r2of2.yaml"])
def test_analysis_yaml_matches_golden(analysis_dry_run, name: str) -> None:
    _root, out, _, _ = analysis_dry_run
    _compare("analysis-" + name.replace("/", "-"), (out / name).read_text())


def test_analysis_jobs_load_and_run_offline(analysis_dry_run, tmp_path: Path) -> None:
    """Every shard job validates with load_job; running each job's command here (its
    spec, its input folder, an output folder) and importing the outputs gives the
    unsharded ranking."""
    import shutil

    import numpy as np

    from mlvar.analysis import service as analysis
    from mlvar.analysis.metrics import METRICS
    from mlvar.analysis.shards import merge_shards
    from mlvar.backends.worker import main
    from mlvar.store import ExperimentStore

    root, out, result, cfg = analysis_dry_run
    names = [j.name for j in result.submission.jobs]
    assert names == ["s1of2-r1of2", "s1of2-r2of2", "s2of2-r1of2", "s2of2-r2of2"]
    assert result.submission.kind == "analysis"
    for name in names:
        job = aml.load_job(out / "jobs" / f"{name}.yaml")
        assert job.type == "command" and job.compute == "cpu-cluster"
        assert "mlvar.backends.worker" in job.command and "--experiment-dir" in job.command
        assert set(job.inputs) == {"experiment"} and set(job.outputs) == {"shards"}
        block = name.split("-")[1]
        assert job.inputs["experiment"].path == f"../inputs/{block}"
        assert job.outputs["shards"].path.endswith(f"/exp/{ANALYSIS_SUB}/{name}/")
    runs = {
        b: sorted(p.name for p in (out / "inputs" / b / "runs").iterdir())
        for b in ("r1of2", "r2of2")
    }
    assert runs == {
        "r1of2": ["run-0000", "run-0001"],
        "r2of2": ["run-0002", "run-0003", "run-0004"],
    }
    assert not (root / "runs" / "exp" / "analysis").exists()  # a dry run writes nothing there
    assert not (root / "runs" / "exp" / "submissions").exists()
    outputs = tmp_path / "outputs"
    for name in names:
        spec = json.loads((out / "code" / "specs" / f"{name}.json").read_text())
        block = out / "inputs" / f"r{spec['run_shard'][0]}of2"
        args = [str(out / "code" / "specs" / f"{name}.json"), "--experiment-dir", str(block)]
        assert main([*args, "--out", str(outputs / name)]) == 0
    shutil.copytree(root / "runs", tmp_path / "runs")  # the module's store stays clean
    cfg = Config(paths=PathsConfig(root / "data", tmp_path / "runs", tmp_path / "reports"))
    imported = service.download(cfg, "exp", source=outputs)
    assert imported.kind == "shards" and sorted(imported.imported) == names
    store = ExperimentStore.open(tmp_path / "runs", "exp")
    merged = merge_shards(store, "test", write=False).ranking.sort_values("sample_id")
    whole = analysis.rank(store, "test", write=False).ranking.sort_values("sample_id")
    for col in METRICS:
        np.testing.assert_allclose(merged[col], whole[col], rtol=0, atol=1e-12)


class _FakeJobs:
    """Stands in for ``MLClient.jobs``: a created job runs its command here at once."""

    def __init__(self, outputs: Path) -> None:
        self.outputs = outputs
        self.created: dict[str, str] = {}

    def create_or_update(self, job):
        from types import SimpleNamespace

        from mlvar.backends.worker import main

        base = Path(job._base_path)
        spec = job.command.split()[3]
        name = job.tags["mlvar_shard"]
        args = [str(base / job.code / spec), "--out", str(self.outputs / job.name / "shards")]
        code = main([*args, "--experiment-dir", str(base / job.inputs["experiment"].path)])
        self.created[job.name] = "Completed" if code == 0 else "Failed"
        assert name in job.name
        return SimpleNamespace(name=job.name)

    def get(self, ref: str):
        from types import SimpleNamespace

        return SimpleNamespace(status=self.created[ref])

    def download(self, ref: str, download_path: str, output_name: str) -> None:
        import shutil

        assert output_name == "shards"
        shutil.copytree(self.outputs / ref / "shards", Path(download_path) / "named-outputs")


def test_analysis_submit_status_download_with_a_stand_in_client(
    analysis_dry_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Azure bookkeeping offline: submit creates one job per shard, status refreshes
    their states, download lands the shards and merges them."""
    import shutil
    from types import SimpleNamespace

    from mlvar.backends import aml as aml_backend

    root, _, _, _ = analysis_dry_run
    shutil.copytree(root / "runs", tmp_path / "runs")
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "reports"))
    cfg.backend.aml = AmlConfig(
        subscription_id="s", resource_group="g", workspace="w", compute="cpu-cluster"
    )
    fake = SimpleNamespace(jobs=_FakeJobs(tmp_path / "azure"))
    monkeypatch.setattr(aml_backend, "client", lambda _cfg: fake)
    res = service.submit_analysis(cfg, "exp", backend="aml", shards=2, run_shards=2)
    sub = res.submission
    assert sub.state == "submitted" and res.merged is None
    assert [j.ref for j in sub.jobs] == [f"mlvar-{sub.id.lower()}-{j.name}" for j in sub.jobs]
    assert service.status(cfg, "exp").state == "finished"
    got = service.download(cfg, "exp")
    assert got.kind == "shards" and len(got.imported) == 4 and not got.rejected
    assert got.ranking == str(tmp_path / "runs" / "exp" / "analysis" / "rank-test.parquet")
    assert Path(got.ranking).is_file()
    assert service.status(cfg, "exp").state == "complete"
    again = service.download(cfg, "exp")
    assert again.imported == [] and again.ranking == ""
