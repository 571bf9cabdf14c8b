"""The ``aml`` backend: one Azure ML (azure-ai-ml v2) command job per pack of runs.

Each job runs ``python -m mlvar.backends.worker`` on the configured compute with:

- ``code``: a snapshot of the mlvar package plus the packs' JSON specs;
- input ``scenario``: the prepared scenario as a ``uri_folder`` data asset
  (``mlvar-<scenario>``, version = the first 12 hex digits of its manifest sha256, so a
  changed scenario is a new version), mounted read-only;
- output ``runs``: a ``uri_folder`` on ``[backend.aml] datastore`` under
  ``mlvar/<experiment>/<submission>/<pack>/``; the worker writes a run store there;
- an environment: ``[backend.aml] environment`` if set, else a conda file of mlvar's own
  requirements on top of ``[backend.aml] image``.

:func:`write_jobs` writes the YAML (``--dry-run``) and validates each file offline with the
SDK's own ``azure.ai.ml.load_job``. The functions that talk to Azure (:func:`client`,
:func:`submit_jobs`, :func:`refresh`, :func:`download_jobs`) are kept small and apart:
they are not exercised by the test suite, which never contacts Azure.

Analysis shards (``mlvar submit analyze``, :func:`write_shard_jobs`) are command jobs of
the same kind: ``python -m mlvar.backends.worker specs/<shard>.json --experiment-dir
${{inputs.experiment}} --out ${{outputs.shards}}``, whose input ``experiment`` is a local
folder (``inputs/r<j>of<m>/``: ``experiment.json``, ``samples/<split>.parquet`` and the runs
of run block j, hard links into the store) that the SDK uploads when the job is created
(once per content: the K jobs of a run block share it), and whose output ``shards`` goes to
``mlvar/<experiment>/<submission>/<shard>/`` on the datastore.

Saliency shards (``mlvar submit saliency``) are the same with a second input,
``scenario``: the prepared scenario's data asset of training jobs (uploaded once per
version), and ``--scenario-dir ${{inputs.scenario}}`` in the command; their input
``experiment`` (``inputs/r<j>of<m>/``) holds every ranked run's logits and the block's
``model.pt``.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlvar import __version__
from mlvar.backends import shard_jobs
from mlvar.backends.common import missing_runs, require
from mlvar.backends.spec import Submission
from mlvar.backends.transfer import ImportResult, import_runs
from mlvar.config import AmlConfig
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


def job_name(sub: Submission, pack: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "_", f"mlvar-{sub.id}-{pack}".lower())


def requirements() -> list[str]:
    """mlvar's runtime requirements (no extras), as installed."""
    try:
        reqs = importlib.metadata.requires("mlvar") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    return [r for r in reqs if "extra ==" not in r]


def _yaml(obj: Any) -> str:
    yaml = require("yaml", "aml")
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=100)


def write_specs(sub: Submission, specs: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """Dry run of ``local`` and ``ray``: the plan and one JSON spec per job."""
    with staging_dir(Path(out), replace=True) as tmp:
        atomic_write_json(tmp / "submission.json", sub.to_dict())
        for name, spec in specs.items():
            atomic_write_json(tmp / "specs" / f"{name}.json", spec)
    return ["submission.json"] + [f"specs/{n}.json" for n in specs]


def _environment(cfg: AmlConfig) -> Any:
    return cfg.environment or {"image": cfg.image, "conda_file": "../environment/conda.yaml"}


def _command_job(
    sub: Submission,
    name: str,
    cfg: AmlConfig,
    text: dict[str, str],
    tags: dict[str, str],
    inputs: dict[str, Any],
    output: str,
) -> dict:
    """A command job running the worker on ``specs/<name>.json`` (``text``: its
    ``display_name``, ``description`` and ``command``), output ``output`` on the datastore
    under ``mlvar/<experiment>/<submission>/<name>/``."""
    return {
        "$schema": JOB_SCHEMA,
        "type": "command",
        "name": job_name(sub, name),
        "display_name": text["display_name"],
        "experiment_name": cfg.experiment_name,
        "description": text["description"],
        "tags": {"mlvar_version": __version__, **tags},
        "code": "../code",
        "command": text["command"],
        "inputs": inputs,
        "outputs": {
            output: {
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


def _scenario_input(scenario: Scenario) -> dict[str, str]:
    """The prepared scenario's data asset, mounted read-only."""
    return {
        "type": "uri_folder",
        "path": f"azureml:{asset_name(scenario)}:{asset_version(scenario)}",
        "mode": "ro_mount",
    }


def _folder_input(spec: dict[str, Any]) -> dict[str, str]:
    """A shard job's local input folder ``inputs/r<j>of<m>/`` (uploaded by the SDK)."""
    return {"type": "uri_folder", "path": f"../inputs/{run_block(spec)}", "mode": "ro_mount"}


def job_dict(sub: Submission, spec: dict[str, Any], scenario: Scenario, cfg: AmlConfig) -> dict:
    """The command job of one pack, as the YAML mapping."""
    pack = spec["job"]
    indices = spec["run_indices"]
    text = {
        "display_name": f"{sub.experiment} {pack} (runs {indices[0]}-{indices[-1]})",
        "description": f"mlvar: train runs {', '.join(map(str, indices))} of {sub.experiment}",
        "command": (
            f"python -m mlvar.backends.worker specs/{pack}.json "
            "--scenario-dir ${{inputs.scenario}} --runs-root ${{outputs.runs}}"
        ),
    }
    tags = {
        "mlvar_experiment": sub.experiment,
        "mlvar_submission": sub.id,
        "mlvar_pack": pack,
        "mlvar_runs": ",".join(map(str, indices)),
    }
    return _command_job(sub, pack, cfg, text, tags, {"scenario": _scenario_input(scenario)}, "runs")


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


def write_jobs(
    sub: Submission,
    specs: dict[str, dict[str, Any]],
    scenario: Scenario,
    cfg: AmlConfig,
    out: Path,
) -> list[str]:
    """Write the job YAML files, specs, environment, data asset and code snapshot to
    ``out`` (replacing it) and validate every YAML offline with ``load_job``/``load_data``.

    Layout: ``jobs/<pack>.yaml``, ``code/mlvar/`` + ``code/specs/<pack>.json``,
    ``environment/conda.yaml`` (when no registered environment is named),
    ``data-asset.yaml``, ``submission.json``. Returns the paths written (relative).
    """
    require("azure.ai.ml", "aml")
    from azure.ai.ml import load_data

    with staging_dir(Path(out), replace=True) as tmp:
        written = _code_and_environment(tmp, cfg)
        atomic_write_text(tmp / "data-asset.yaml", _yaml(data_asset_dict(scenario)))
        written.append("data-asset.yaml")
        for name, spec in specs.items():
            atomic_write_json(tmp / "code" / "specs" / f"{name}.json", spec)
            atomic_write_text(
                tmp / "jobs" / f"{name}.yaml", _yaml(job_dict(sub, spec, scenario, cfg))
            )
            written += [f"code/specs/{name}.json", f"jobs/{name}.yaml"]
        atomic_write_json(tmp / "submission.json", sub.to_dict())
        written.append("submission.json")
        _validate(tmp, specs)
        load_data(tmp / "data-asset.yaml")
    return written


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


def run_block(spec: dict[str, Any]) -> str:
    """``r<j>of<m>``: the input folder a shard's job reads (shared by its run block)."""
    j, m = spec["run_shard"]
    return f"r{j}of{m}"


def _shard_tags(sub: Submission, spec: dict[str, Any]) -> dict[str, str]:
    return {
        "mlvar_kind": spec["kind"],
        "mlvar_experiment": sub.experiment,
        "mlvar_submission": sub.id,
        "mlvar_split": spec["split"],
        "mlvar_shard": spec["job"],
    }


def shard_job_dict(sub: Submission, spec: dict[str, Any], cfg: AmlConfig) -> dict:
    """The command job of one analysis shard, as the YAML mapping."""
    name = spec["job"]
    (i, k), (j, m) = spec["shard"], spec["run_shard"]
    expect = spec["expect"]
    block = expect["run_ids"]
    text = {
        "display_name": f"{sub.experiment} analysis {name}",
        "description": (
            f"mlvar: analyze rank {sub.experiment} --split {spec['split']} --shard {i}/{k} "
            f"--run-shard {j}/{m} (samples {expect['start']}..{expect['stop'] - 1}, "
            f"runs {block[0]}..{block[-1]})"
        ),
        "command": (
            f"python -m mlvar.backends.worker specs/{name}.json "
            "--experiment-dir ${{inputs.experiment}} --out ${{outputs.shards}}"
        ),
    }
    inputs = {"experiment": _folder_input(spec)}
    return _command_job(sub, name, cfg, text, _shard_tags(sub, spec), inputs, "shards")


def saliency_job_dict(
    sub: Submission, spec: dict[str, Any], scenario: Scenario, cfg: AmlConfig
) -> dict:
    """The command job of one saliency run block, as the YAML mapping."""
    name = spec["job"]
    j, m = spec["run_shard"]
    opts, block = spec["options"], spec["expect"]["block_run_ids"]
    layer = f" --layer {opts['layer']}" if opts.get("layer") else ""
    runs = block[0] if len(block) == 1 else f"{block[0]}..{block[-1]}"
    text = {
        "display_name": f"{sub.experiment} saliency {name}",
        "description": (
            f"mlvar: analyze saliency {sub.experiment} --split {spec['split']} --run-shard "
            f"{j}/{m} --top {opts['top']} --seeds {opts['seeds']} --by {opts['by']}{layer} "
            f"--seed {opts['seed']} (runs {runs})"
        ),
        "command": (
            f"python -m mlvar.backends.worker specs/{name}.json "
            "--experiment-dir ${{inputs.experiment}} --scenario-dir ${{inputs.scenario}} "
            "--out ${{outputs.shards}}"
        ),
    }
    inputs = {"experiment": _folder_input(spec), "scenario": _scenario_input(scenario)}
    return _command_job(sub, name, cfg, text, _shard_tags(sub, spec), inputs, "shards")


def write_shard_jobs(
    sub: Submission,
    specs: dict[str, dict[str, Any]],
    store: ExperimentStore,
    cfg: AmlConfig,
    out: Path,
    scenario: Scenario | None = None,
) -> list[str]:
    """Write the shard job YAML files (analysis; saliency when ``scenario`` is given),
    specs, inputs, environment and code snapshot to ``out`` (replacing it) and validate
    every YAML offline with ``load_job`` (and the data asset with ``load_data``).

    Layout: ``jobs/<shard>.yaml``, ``code/mlvar/`` + ``code/specs/<shard>.json``,
    ``inputs/r<j>of<m>/`` (what the shards of run block j read; hard links into the store
    where possible), ``environment/conda.yaml`` (when no registered environment is named),
    saliency: ``data-asset.yaml`` (the prepared scenario), ``submission.json``. Returns the
    paths written (relative; inputs as folders).
    """
    require("azure.ai.ml", "aml")
    from azure.ai.ml import load_data

    with staging_dir(Path(out), replace=True) as tmp:
        written = _code_and_environment(tmp, cfg)
        if scenario is not None:
            atomic_write_text(tmp / "data-asset.yaml", _yaml(data_asset_dict(scenario)))
            written.append("data-asset.yaml")
        staged: set[str] = set()
        for name, spec in specs.items():
            block = run_block(spec)
            if block not in staged:
                shard_jobs.stage_inputs(store, spec, tmp / "inputs" / block)
                staged.add(block)
                written.append(f"inputs/{block}/")
            job = (
                shard_job_dict(sub, spec, cfg)
                if scenario is None
                else saliency_job_dict(sub, spec, scenario, cfg)
            )
            atomic_write_json(tmp / "code" / "specs" / f"{name}.json", spec)
            atomic_write_text(tmp / "jobs" / f"{name}.yaml", _yaml(job))
            written += [f"code/specs/{name}.json", f"jobs/{name}.yaml"]
        atomic_write_json(tmp / "submission.json", sub.to_dict())
        written.append("submission.json")
        _validate(tmp, specs)
        if scenario is not None:
            load_data(tmp / "data-asset.yaml")
    return written


# ------------------------------------------------------------------------ talks to Azure
# Untested here: nothing below runs in the test suite (it needs a workspace).


def client(cfg: AmlConfig) -> Any:
    """``MLClient(DefaultAzureCredential(), ...)``: credentials are never stored."""
    check_settings(cfg, dry_run=False)
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    return MLClient(
        DefaultAzureCredential(), cfg.subscription_id, cfg.resource_group, cfg.workspace
    )


def submit_jobs(
    ml_client: Any,
    sub: Submission,
    specs: dict[str, dict[str, Any]],
    scenario: Scenario,
    cfg: AmlConfig,
    store: ExperimentStore,
) -> None:
    """Upload the scenario (once per version) and create one command job per pack."""
    from azure.ai.ml import load_job

    folder = store.root / "submissions" / sub.id / "aml"
    write_jobs(sub, specs, scenario, cfg, folder)
    _ensure_data_asset(ml_client, scenario, folder / "data-asset.yaml")
    sub.options = {"workspace": cfg.workspace, "compute": cfg.compute, "jobs_dir": str(folder)}
    for job in sub.jobs:
        created = ml_client.jobs.create_or_update(load_job(folder / "jobs" / f"{job.name}.yaml"))
        job.ref, job.state, job.attempts = created.name, "submitted", job.attempts + 1
        sub.save(store.root)


def _ensure_data_asset(ml_client: Any, scenario: Scenario, yaml_file: Path) -> None:
    """Create the scenario's data asset (uploading its folder) unless that version exists."""
    from azure.ai.ml import load_data
    from azure.core.exceptions import ResourceNotFoundError

    try:
        ml_client.data.get(asset_name(scenario), version=asset_version(scenario))
    except ResourceNotFoundError:
        ml_client.data.create_or_update(load_data(yaml_file))


def refresh(ml_client: Any, sub: Submission) -> None:
    """Update each job's state from ``ml_client.jobs.get``."""
    for job in sub.jobs:
        if job.ref and job.state not in ("complete",):
            status = ml_client.jobs.get(job.ref).status
            job.state = _STATES.get(status, "running")
            if job.state == "failed":
                job.error = f"Azure ML job {job.ref} ended {status}"


def download_jobs(ml_client: Any, sub: Submission, store: ExperimentStore) -> ImportResult:
    """Download the outputs of finished (or failed) jobs and import their complete runs."""
    refresh(ml_client, sub)
    total = ImportResult()
    for job in sub.jobs:
        if not job.ref or job.state not in ("finished", "failed"):
            continue
        with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=store.root) as tmp:
            ml_client.jobs.download(job.ref, download_path=tmp, output_name="runs")
            found = [p.parent for p in Path(tmp).rglob("experiment.json")]
            for folder in found:
                res = import_runs(folder, store)
                total.imported += res.imported
                total.skipped += res.skipped
                total.rejected.update(res.rejected)
        if not missing_runs(store, job.run_indices):
            job.state = "complete"
    return total


def submit_shard_jobs(
    ml_client: Any,
    sub: Submission,
    specs: dict[str, dict[str, Any]],
    store: ExperimentStore,
    cfg: AmlConfig,
    scenario: Scenario | None = None,
) -> None:
    """Create one command job per shard (the SDK uploads each run block's input folder
    when the first job using it is created); saliency shards also read ``scenario``'s data
    asset, uploaded once per version as for training."""
    from azure.ai.ml import load_job

    folder = store.root / "submissions" / sub.id / "aml"
    write_shard_jobs(sub, specs, store, cfg, folder, scenario)
    if scenario is not None:
        _ensure_data_asset(ml_client, scenario, folder / "data-asset.yaml")
    sub.options = dict(
        sub.options, workspace=cfg.workspace, compute=cfg.compute, jobs_dir=str(folder)
    )
    for job in sub.jobs:
        created = ml_client.jobs.create_or_update(load_job(folder / "jobs" / f"{job.name}.yaml"))
        job.ref, job.state, job.attempts = created.name, "submitted", job.attempts + 1
        sub.save(store.root)


def download_shard_jobs(ml_client: Any, sub: Submission, store: ExperimentStore) -> ImportResult:
    """Download the outputs of finished (or failed) shard jobs (analysis or saliency) and
    land their complete, verified shards."""
    import json

    refresh(ml_client, sub)
    total = ImportResult(kind="shards")
    specs_dir = Path(sub.options.get("jobs_dir", "")) / "code" / "specs"
    for job in sub.jobs:
        if not job.ref or job.state not in ("finished", "failed"):
            continue
        spec_file = specs_dir / f"{job.name}.json"
        expect = json.loads(spec_file.read_text())["expect"] if spec_file.is_file() else None
        with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=store.root) as tmp:
            ml_client.jobs.download(job.ref, download_path=tmp, output_name="shards")
            res = shard_jobs.import_shards(Path(tmp), store, {job.name: expect} if expect else None)
        total.imported += res.imported
        total.skipped += res.skipped
        total.rejected.update(res.rejected)
        if expect is not None and shard_jobs.shard_ok(store, expect):
            job.state = "complete"
    return total
