"""The ``aml`` backend: one Azure ML (azure-ai-ml v2) command job per job of any kind.

Each job runs ``python -m mlvar.backends.worker specs/<job>.json ...`` on the configured
compute with:

- ``code``: a snapshot of the mlvar package plus the jobs' JSON specs;
- input ``experiment`` (kinds that read an experiment folder: analysis and saliency
  shards): a local folder ``inputs/<group>/`` holding the job's
  :meth:`~mlvar.backends.kind.JobKind.inputs` (hard links into the store), which the SDK
  uploads when the job is created (once per content: jobs of one group share it);
- input ``scenario`` (kinds that read the prepared scenario: training packs, saliency
  shards): the prepared scenario's folder as a ``uri_folder`` data asset
  (``mlvar-<scenario>``, version = the first 12 hex digits of its manifest sha256, so a
  changed scenario is a new version), mounted read-only; and inputs ``array_0``, ...: the
  shared arrays it reads (the dataset's source, the rows it changed: docs/datasets.md),
  each a ``uri_file`` data asset named by its content (``mlvar-array-<sha256[:16]>``,
  version 1), so an array is uploaded once however many scenarios read it; a study's job
  that trains several experiments mounts each scenario it reads (``scenario``,
  ``scenario_1``, ...; their assets in ``data-assets/``);
- output ``runs`` (training) or ``shards``: a ``uri_folder`` on ``[backend.aml]
  datastore`` under ``mlvar/<experiment>/<submission>/<job>/``;
- an environment: ``[backend.aml] environment`` if set, else a conda file of mlvar's own
  requirements on top of ``[backend.aml] image``.

:func:`write_jobs` writes the YAML (``--dry-run``) and validates each file offline with the
SDK's own ``azure.ai.ml.load_job``. The calls that talk to Azure (:func:`client` and the
``ml_client`` calls of :class:`AmlBackend`) are kept small: the test suite never contacts
Azure (it uses a stand-in client).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlvar import __version__
from mlvar.backends.backend import Backend, JobBatch, SubmitProgress, require
from mlvar.backends.kind import JobKind, worker_command
from mlvar.backends.spec import Submission
from mlvar.backends.transfer import ImportResult
from mlvar.config import AmlConfig
from mlvar.data.arrays import ArrayRef
from mlvar.data.scenario import Scenario
from mlvar.errors import MlvarError
from mlvar.io import atomic_write_json, atomic_write_text, staging_dir
from mlvar.store import ExperimentStore

JOB_SCHEMA = "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json"
DATA_SCHEMA = "https://azuremlschemas.azureedge.net/latest/data.schema.json"
REQUIRED_TO_SUBMIT = ("subscription_id", "resource_group", "workspace", "compute")
REQUIRED_FOR_DRY_RUN = ("compute",)
#: Azure ML job status -> submission job state.
_STATES = {
    "Completed": "finished",
    "Failed": "failed",
    "Canceled": "failed",
    "NotResponding": "failed",
}


def check_settings(cfg: AmlConfig, dry_run: bool) -> None:
    """Refuse missing ``[backend.aml]`` settings (naming each) or a missing extra."""
    required = REQUIRED_FOR_DRY_RUN if dry_run else REQUIRED_TO_SUBMIT
    missing = [key for key in required if not getattr(cfg, key)]
    if missing:
        raise MlvarError(
            "missing [backend.aml] settings: " + ", ".join(missing),
            "set them in mlvar.toml (see docs/clusters.md)",
        )
    require("azure.ai.ml", "aml")
    if not dry_run:
        require("azure.identity", "aml")


def asset_name(scenario: Scenario) -> str:
    return "mlvar-" + re.sub(r"[^A-Za-z0-9_-]", "_", scenario.name)


def asset_version(scenario: Scenario) -> str:
    return scenario.manifest_sha256[:12]


def array_asset_name(ref: ArrayRef) -> str:
    """A shared array's data asset: named by its content, so it is created once."""
    return f"mlvar-array-{ref.sha256[:16]}"


#: Every shared array's asset has this one version (its name says its content).
ARRAY_ASSET_VERSION = "1"


def job_name(sub: Submission, job: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "_", f"mlvar-{sub.id}-{job}".lower())


def requirements() -> list[str]:
    """mlvar's runtime requirements (no extras), as installed."""
    import importlib.metadata  # email, csv, zipfile...: not when the CLI lists the backends

    try:
        reqs = importlib.metadata.requires("mlvar") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    return [r for r in reqs if "extra ==" not in r]


def _yaml(obj: Any) -> str:
    yaml = require("yaml", "aml")
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=100)


def _environment(cfg: AmlConfig) -> Any:
    return cfg.environment or {"image": cfg.image, "conda_file": "../environment/conda.yaml"}


def _scenario_input(scenario: Scenario) -> dict[str, str]:
    """The prepared scenario's data asset, mounted read-only."""
    return {
        "type": "uri_folder",
        "path": f"azureml:{asset_name(scenario)}:{asset_version(scenario)}",
        "mode": "ro_mount",
    }


def job_dict(
    sub: Submission,
    kind: JobKind,
    spec: dict[str, Any],
    scenario: Scenario | list[Scenario] | None,
    cfg: AmlConfig,
) -> dict:
    """The command job of one job, as the YAML mapping: the worker on
    ``specs/<job>.json``, its inputs, its output on the datastore under
    ``mlvar/<experiment>/<submission>/<job>/``. A study's job that trains several
    experiments reads several scenarios (``scenario``: a list): inputs ``scenario``,
    ``scenario_1``, ... (in the order of its spec's parts) and every shared array they
    read, each once."""
    name = spec["job"]
    text = kind.describe(sub, spec)
    inputs: dict[str, Any] = {}
    if kind.reads_experiment:
        group = kind.input_group(spec)
        inputs["experiment"] = {
            "type": "uri_folder",
            "path": f"../inputs/{group}",
            "mode": "ro_mount",
        }
    arrays: list[str] = []
    scenario_dirs: list[str] = []
    if kind.reads_scenario:
        assert scenario is not None
        scenarios = scenario if isinstance(scenario, list) else [scenario]
        refs: dict[str, ArrayRef] = {}
        for k, one in enumerate(scenarios):
            key = "scenario" if k == 0 else f"scenario_{k}"
            inputs[key] = _scenario_input(one)
            scenario_dirs.append(f"${{{{inputs.{key}}}}}")
            refs.update({ref.sha256: ref for ref in one.arrays if ref.sha256 not in refs})
        for i, ref in enumerate(refs.values()):
            inputs[f"array_{i}"] = {
                "type": "uri_file",
                "path": f"azureml:{array_asset_name(ref)}:{ARRAY_ASSET_VERSION}",
                "mode": "ro_mount",
            }
            arrays.append(f"${{{{inputs.array_{i}}}}}")
    command = worker_command(
        kind,
        f"specs/{name}.json",
        f"${{{{outputs.{kind.output_name}}}}}",
        experiment_dir="${{inputs.experiment}}",
        scenario_dir=scenario_dirs[0] if len(scenario_dirs) == 1 else scenario_dirs or None,
        array_files=arrays,
    )
    return {
        "$schema": JOB_SCHEMA,
        "type": "command",
        "name": job_name(sub, name),
        "display_name": text.title,
        "experiment_name": cfg.experiment_name,
        "description": text.description,
        "tags": {"mlvar_version": __version__, **text.labels},
        "code": "../code",
        "command": " ".join(command),
        "inputs": inputs,
        "outputs": {
            kind.output_name: {
                "type": "uri_folder",
                "mode": "upload",
                "path": (
                    f"azureml://datastores/{cfg.datastore}/paths/mlvar/"
                    f"{sub.experiment}/{sub.id}/{name}/"
                ),
            }
        },
        "environment": _environment(cfg),
        "compute": f"azureml:{cfg.compute}",
        "resources": {"instance_count": 1},
    }


def conda_dict() -> dict[str, Any]:
    return {
        "name": "mlvar",
        "channels": ["conda-forge"],
        "dependencies": ["python=3.11", "pip", {"pip": requirements()}],
    }


def data_asset_dict(scenario: Scenario) -> dict[str, Any]:
    return {
        "$schema": DATA_SCHEMA,
        "type": "uri_folder",
        "name": asset_name(scenario),
        "version": asset_version(scenario),
        "description": f"mlvar prepared scenario {scenario.name} "
        f"(manifest sha256 {scenario.manifest_sha256})",
        "path": str(scenario.path.resolve()),
    }


def array_asset_dict(scenario: Scenario, ref: ArrayRef) -> dict[str, Any]:
    """The data asset of one shared array the scenario reads (its file in the data root)."""
    return {
        "$schema": DATA_SCHEMA,
        "type": "uri_file",
        "name": array_asset_name(ref),
        "version": ARRAY_ASSET_VERSION,
        "description": f"mlvar shared array {ref.describe()}, sha256 {ref.sha256}",
        "path": str(ref.path(scenario.data_root).resolve()),
    }


def stage_inputs(files: dict[str, Path | bytes], folder: Path) -> None:
    """Write a job's inputs into ``folder`` (hard links where the filesystem allows,
    copies otherwise): an Azure ML job's input folder."""
    for rel, src in sorted(files.items()):
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            target.write_bytes(src)
        else:
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)


def write_jobs(batch: JobBatch, cfg: AmlConfig, out: Path) -> list[str]:
    """Write the job YAML files, specs, inputs, environment, data asset and code snapshot
    to ``out`` (replacing it) and validate every YAML offline with ``load_job`` (and the
    data asset with ``load_data``).

    Layout: ``jobs/<job>.yaml``, ``code/mlvar/`` + ``code/specs/<job>.json``,
    ``inputs/<group>/`` (what the jobs of a group read, for kinds that read the
    experiment), ``environment/conda.yaml`` (when no registered environment is named),
    ``data-asset.yaml`` (the prepared scenario's folder, for kinds that read it) and
    ``array-assets/<sha256[:16]>.yaml`` (each shared array it reads), ``submission.json``.
    Returns the paths written (relative; inputs as folders).
    """
    require("azure.ai.ml", "aml")
    from azure.ai.ml import load_data

    kind, sub = batch.kind, batch.sub
    assets = _asset_files(batch) if kind.reads_scenario else {}
    with staging_dir(Path(out), replace=True) as tmp:
        written = _code_and_environment(tmp, cfg)
        for file, asset in assets.items():
            atomic_write_text(tmp / file, _yaml(asset))
            written.append(file)
        staged: set[str] = set()
        for name, spec in batch.specs.items():
            group = kind.input_group(spec)
            if kind.reads_experiment and group not in staged:
                assert batch.store is not None
                stage_inputs(kind.inputs(batch.store, spec), tmp / "inputs" / group)
                staged.add(group)
                written.append(f"inputs/{group}/")
            atomic_write_json(tmp / "code" / "specs" / f"{name}.json", spec)
            reads = batch.job_scenarios(spec)  # a study's job may read several
            one = reads if len(reads) > 1 else (reads[0] if reads else None)
            job = job_dict(sub, kind, spec, one, cfg)
            atomic_write_text(tmp / "jobs" / f"{name}.yaml", _yaml(job))
            written += [f"code/specs/{name}.json", f"jobs/{name}.yaml"]
        atomic_write_json(tmp / "submission.json", sub.to_dict())
        written.append("submission.json")
        _validate(tmp, batch.specs)
        for file in assets:
            load_data(tmp / file)
    return written


def _array_asset_files(scenario: Scenario) -> dict[str, ArrayRef]:
    """``array-assets/<sha256[:16]>.yaml`` of each shared array the scenario reads."""
    return {f"array-assets/{ref.sha256[:16]}.yaml": ref for ref in scenario.arrays}


def _asset_files(batch: JobBatch) -> dict[str, dict[str, Any]]:
    """The data assets the jobs read, by file: ``data-asset.yaml`` (the prepared
    scenario; a study of several: ``data-assets/<asset name>.yaml``, one per scenario) and
    ``array-assets/<sha256[:16]>.yaml`` (each shared array they read, once)."""
    scenarios = list(batch.scenarios.values())
    if not scenarios and batch.scenario is not None:
        scenarios = [batch.scenario]
    files: dict[str, dict[str, Any]] = {}
    if len(scenarios) == 1:
        files["data-asset.yaml"] = data_asset_dict(scenarios[0])
    else:
        for one in scenarios:
            files[f"data-assets/{asset_name(one)}.yaml"] = data_asset_dict(one)
    for one in scenarios:
        for file, ref in _array_asset_files(one).items():
            files.setdefault(file, array_asset_dict(one, ref))
    return files


def _code_and_environment(tmp: Path, cfg: AmlConfig) -> list[str]:
    """``code/mlvar/`` (a snapshot of the package) and, with no registered environment,
    ``environment/conda.yaml``."""
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(
        package, tmp / "code" / "mlvar", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    if cfg.environment:
        return []
    atomic_write_text(tmp / "environment" / "conda.yaml", _yaml(conda_dict()))
    return ["environment/conda.yaml"]


def _validate(folder: Path, names: Any) -> None:
    """Validate ``jobs/<name>.yaml`` with the SDK itself, offline: schema, inputs, outputs,
    environment."""
    from azure.ai.ml import load_job

    for name in names:
        try:
            load_job(folder / "jobs" / f"{name}.yaml")
        except Exception as exc:  # noqa: BLE001 - any SDK validation error
            raise MlvarError(
                f"jobs/{name}.yaml does not validate: {str(exc).splitlines()[0]}",
                "check [backend.aml] values",
            ) from None


# ------------------------------------------------------------------------ talks to Azure
# Tested with a stand-in client only (the suite never contacts a workspace).


def client(cfg: AmlConfig) -> Any:
    """``MLClient(DefaultAzureCredential(), ...)``: credentials are never stored."""
    check_settings(cfg, dry_run=False)
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    return MLClient(
        DefaultAzureCredential(), cfg.subscription_id, cfg.resource_group, cfg.workspace
    )


def _ensure_data_asset(ml_client: Any, name: str, version: str, yaml_file: Path) -> None:
    """Create a data asset (uploading its folder or file) unless that version exists."""
    from azure.ai.ml import load_data
    from azure.core.exceptions import ResourceNotFoundError

    try:
        ml_client.data.get(name, version=version)
    except ResourceNotFoundError:
        ml_client.data.create_or_update(load_data(yaml_file))


class AmlBackend(Backend):
    """One Azure ML command job per job; ``status`` asks Azure ML for their states and
    ``download`` fetches and lands the outputs of finished ones."""

    name = "aml"
    summary = "aml (Azure ML jobs)"
    synchronous = False
    dry_run_note = "validated with load_job"

    @property
    def cfg(self) -> AmlConfig:
        return self.config.backend.aml

    def check(self, dry_run: bool, device: str = "cpu") -> None:
        check_settings(self.cfg, dry_run=dry_run)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._client: Any = None

    @property
    def ml_client(self) -> Any:
        """The workspace's ``MLClient``, made on first use."""
        if self._client is None:
            self._client = client(self.cfg)
        return self._client

    def write_dry_run(self, batch: JobBatch, out: Path) -> list[str]:
        return write_jobs(batch, self.cfg, out)

    def submit(self, batch: JobBatch, progress: SubmitProgress | None = None) -> None:
        """Upload the scenario's folder (once per version) and each shared array it reads
        (once ever), and create one command job per job (the SDK uploads each input folder
        when the first job using it is created)."""
        from azure.ai.ml import load_job

        sub, store = batch.sub, batch.store
        assert store is not None
        ml_client = self.ml_client
        folder = batch.base / "aml"
        write_jobs(batch, self.cfg, folder)
        if batch.kind.reads_scenario:
            for file, asset in _asset_files(batch).items():
                _ensure_data_asset(ml_client, asset["name"], asset["version"], folder / file)
        sub.options = dict(
            sub.options,
            workspace=self.cfg.workspace,
            compute=self.cfg.compute,
            jobs_dir=str(folder),
        )
        for job in sub.jobs:
            created = ml_client.jobs.create_or_update(
                load_job(folder / "jobs" / f"{job.name}.yaml")
            )
            job.ref, job.state, job.attempts = created.name, "submitted", job.attempts + 1
            sub.save(store.root)

    def refresh(self, sub: Submission, store: ExperimentStore) -> None:
        """Update each job's state from ``ml_client.jobs.get``."""
        if not any(j.ref for j in sub.jobs):
            return
        for job in sub.jobs:
            if job.ref and job.state != "complete":
                status = self.ml_client.jobs.get(job.ref).status
                job.state = _STATES.get(status, "running")
                if job.state == "failed":
                    job.error = f"Azure ML job {job.ref} ended {status}"

    def download(self, sub: Submission, store: ExperimentStore) -> ImportResult:
        """Download the outputs of finished (or failed) jobs and land their complete,
        verified part."""
        from mlvar.backends.kinds import kind_of, read_spec

        self.refresh(sub, store)
        kind = kind_of({"kind": sub.kind})
        total = kind.empty_result()
        specs = Path(sub.options.get("jobs_dir", "")) / "code" / "specs"
        for job in sub.jobs:
            if not job.ref or job.state not in ("finished", "failed"):
                continue
            spec = read_spec(specs / f"{job.name}.json")
            with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=store.root) as tmp:
                self.ml_client.jobs.download(
                    job.ref, download_path=tmp, output_name=kind.output_name
                )
                got = kind.land(Path(tmp), store, spec)
            total.imported += got.imported
            total.skipped += got.skipped
            total.rejected.update(got.rejected)
            if kind.remaining(store, spec) is None:
                job.state = "complete"
        return total
