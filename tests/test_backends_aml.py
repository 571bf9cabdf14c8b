"""The Azure ML backend offline: golden job YAML, each file validated with the SDK's own
``load_job``. Nothing here contacts Azure. To accept an intended change of the generated
YAML, delete the golden file(s) under tests/golden/aml/ and run the tests once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlvar.backends import service
from mlvar.config import AmlConfig, Config, PathsConfig
from mlvar.data.registry import prepare

aml = pytest.importorskip("azure.ai.ml")

GOLDEN = Path(__file__).resolve().parent / "golden" / "aml"
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
    golden = GOLDEN / name
    if not golden.is_file():
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        pytest.skip(f"wrote the missing golden file {golden}; rerun to compare")
    assert text == golden.read_text(), f"{name} differs from {golden} (delete it to accept)"


@pytest.mark.parametrize("name", ["jobs/pack-000.yaml", "jobs/pack-001.yaml", "data-asset.yaml"])
def test_generated_yaml_matches_golden(dry_run, name: str) -> None:
    root, out, _ = dry_run
    text = (out / name).read_text()
    # The scenario's local folder (uploaded as the data asset) depends on the machine.
    text = text.replace(str((root / "data").resolve()), "<DATA_ROOT>")
    _compare(name.replace("/", "-"), text)


def test_every_job_loads_with_load_job(dry_run) -> None:
    _root, out, result = dry_run
    assert [j.run_indices for j in result.submission.jobs] == [[0, 1, 2], [3, 4]]
    for job in result.submission.jobs:
        loaded = aml.load_job(out / "jobs" / f"{job.name}.yaml")
        assert loaded.type == "command"
        assert loaded.compute == "cpu-cluster"
        assert "mlvar.backends.worker" in loaded.command
        assert set(loaded.inputs) == {"scenario"} and set(loaded.outputs) == {"runs"}
        spec = json.loads((out / "code" / "specs" / f"{job.name}.json").read_text())
        assert spec["run_indices"] == job.run_indices
        assert spec["train"]["epochs"] == 2 and spec["experiment"] == result.experiment
    assert (out / "code" / "mlvar" / "backends" / "worker.py").is_file()
    assert "torch" in (out / "environment" / "conda.yaml").read_text()
    aml.load_data(out / "data-asset.yaml")
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
