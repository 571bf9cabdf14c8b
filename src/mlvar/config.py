"""Configuration: built-in defaults, ``mlvar.toml``, ``MLVAR_*`` environment, CLI flags.

Precedence, highest first: CLI flags > environment (``MLVAR_*``) > ``mlvar.toml`` >
built-in defaults. Unknown keys are rejected with the nearest valid name, so a typo is
never silently ignored. Relative paths in a config file are taken relative to the file's
folder; relative paths from the environment or the command line relative to the current
directory.

The tables this module checks against live below it: the datasets (and their training
defaults) in :mod:`mlvar.data.registry`, the models in :mod:`mlvar.recipes` (``MODELS`` and
``RANDOMNESS_SOURCES`` stay importable from here).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.data.protocol import DEFAULT_PROTOCOL, PROTOCOLS
from mlvar.data.registry import DATASETS, get_dataset
from mlvar.data.scenario import list_scenarios
from mlvar.data.spec import TrainDefaults
from mlvar.data.user import read_info
from mlvar.errors import MlvarError, closest
from mlvar.recipes import (
    IMAGE_MODELS,
    MODELS,
    RANDOMNESS_SOURCES,
    custom_spec,
    is_custom,
    model_engine,
    model_spec,
    models_for,
    protocol_model,
    recipe_models,
)

#: Every --engine value (each model takes two of them: ModelSpec.engines).
ENGINES = ("batched", "loop", "fused", "single")
DEVICES = ("cpu", "cuda")
LOGIT_DTYPES = ("float32", "float16")


@dataclass
class PathsConfig:
    """Where prepared data, run stores and reports live."""

    data_root: Path = Path("mlvar-work/data")
    runs_root: Path = Path("mlvar-work/runs")
    reports_root: Path = Path("mlvar-work/reports")


@dataclass
class TrainConfig:
    """Hyperparameters of one dataset's training; every field has its unit in the comment."""

    model: str = "mlp"  # model name in the registry (mlvar.recipes.MODELS)
    epochs: int = 10  # passes over the training split
    lr: float = 1e-3  # learning rate per step (Adam for the MLP, peak SGD lr for CNNs)
    batch_size: int = 64  # samples per optimiser step, per seed
    hidden: int = 64  # width of both hidden layers
    dropout: float = 0.1  # drop probability before the output layer
    weight_decay: float = 0.0  # L2 coefficient added to the gradient (Adam or SGD)
    engine: str = "batched"  # MLP: batched | loop; image models: fused | single (recipes)
    device: str = "cpu"  # "cpu" or "cuda"
    base_seed: int = 0  # run r uses seed base_seed + r
    vary: list[str] = field(default_factory=lambda: ["init", "order", "dropout"])
    pack_size: int = 50  # seeds trained together (batched/fused; image models 0: automatic)
    logits_dtype: str = "float32"  # dtype of stored logits: float32 or float16
    record_dynamics: bool = False  # also store train-set logits after every epoch (float16)
    checkpoint_every: int = 2  # epochs between checkpoints of image models (0: none)
    workers: int = 0  # processes training image-model runs at once on CPU (0: one per core)
    # Image recipes with test-time augmentation (airbench): also apply it to the train
    # split's logits (False: the train split is evaluated plainly, one forward pass; the
    # other splits keep it). Recorded, and part of the identity, only when False.
    train_tta: bool = True
    # Whose recipe (mlvar.recipes): "mlvar" or "study". Deliberately not a dataclass field:
    # the [train.*] tables and the fields they list stay those of before protocols (the
    # protocol is chosen once, by --protocol or [protocol] name: train.service.
    # train_config), and record() writes it only when it is not mlvar.
    protocol = DEFAULT_PROTOCOL
    # A custom model (``model`` is ``package.module:factory``): what train.custom.describe
    # found (factory, sha256 of its module's source, input kind), set by train.service;
    # not a field either, for the same reason.
    custom = None  # dict[str, Any] | None

    def record(self) -> dict[str, Any]:
        """All the fields, as run.json and job specs record them: ``protocol`` only when
        it is not mlvar, so mlvar records are exactly what they were before protocols;
        ``custom_model`` (factory and source sha256) for a custom model."""
        data = dataclasses.asdict(self)
        if self.protocol != DEFAULT_PROTOCOL:
            data["protocol"] = self.protocol
        if self.custom is not None:
            data["custom_model"] = dict(self.custom)
        if self.train_tta:  # the default: records stay what they were before the option
            data.pop("train_tta")
        return data

    def identity(self) -> dict[str, Any]:
        """The fields that define what a run computes (not where or how fast).

        Image models add their fixed ``recipe``; the MLP's identity is unchanged by the
        image-only fields, so existing MLP experiments stay compatible. A recipe of
        another protocol than mlvar adds ``protocol`` (and the study's MLP its recipe).
        ``train_tta`` False is kept only where it changes the train split's logits (an
        image recipe with test-time augmentation).
        """
        data = self.record()
        for key in (
            "engine",
            "device",
            "pack_size",
            "record_dynamics",
            "checkpoint_every",
            "workers",
        ):
            data.pop(key)
        spec = model_spec(self.protocol, self.model)
        if self.custom is not None:
            spec = custom_spec(self.model, str(self.custom.get("input_kind", "image")))
        if spec is not None and spec.recipe:
            data["recipe"] = dict(spec.recipe)
        if self.model in IMAGE_MODELS or is_custom(self.model):
            data.pop("hidden")
            data.pop("dropout")
        if "train_tta" in data and not (spec is not None and int(spec.recipe.get("tta", 0))):
            data.pop("train_tta")
        return data


def default_train(dataset: str, data_root: str | os.PathLike | None = None) -> TrainConfig:
    """The built-in training config of a dataset (a user dataset's of ``data_root``): its
    spec's default model with that model's defaults, and the values the dataset sets on
    top of them. A name known only by its prepared scenarios (a user dataset on a worker
    that got the scenarios but not ``user/<name>/``) gets the plain defaults: a job's
    spec carries its whole training config anyway."""
    try:
        train = get_dataset(dataset, data_root).train
    except MlvarError:
        if data_root is None or not list_scenarios(Path(data_root), dataset):
            raise
        train = TrainDefaults()
    cfg = TrainConfig()
    switch_model(cfg, train.model)
    for key, value in train.values.items():
        setattr(cfg, key, list(value) if isinstance(value, list) else value)
    return cfg


def switch_protocol(
    cfg: TrainConfig,
    dataset: str,
    protocol: str,
    model: str | None = None,
    keep: set[str] | frozenset = frozenset(),
) -> None:
    """Set ``cfg`` to the recipe of ``protocol``: under mlvar, :func:`switch_model` to
    ``model`` when given (``cfg`` unchanged otherwise); under the study, ``model`` or the
    study's model of ``dataset``, with the study's values (epochs, lr, batch size, ...)
    except the fields named in ``keep``. The study's values replace those of the config
    file: a study run is the study's recipe unless a flag says otherwise. A model the
    protocol has no recipe for is left for :func:`validate_train` to report.
    """
    if protocol == DEFAULT_PROTOCOL:
        cfg.protocol = protocol
        if model is not None:
            switch_model(cfg, model, keep, DATASETS[dataset].input_kind)
        return
    cfg.model = model or protocol_model(protocol, dataset) or cfg.model
    cfg.protocol = protocol
    spec = model_spec(protocol, cfg.model)
    for key, value in (spec.defaults if spec is not None else {}).items():
        if key not in keep:
            setattr(cfg, key, list(value) if isinstance(value, list) else value)


def switch_model(
    cfg: TrainConfig,
    model: str,
    keep: set[str] | frozenset = frozenset(),
    input_kind: str = "image",
) -> None:
    """Set ``cfg.model`` and that model's default epochs, lr, batch size, weight decay and
    vary, except the fields named in ``keep`` (given explicitly by the user); a custom
    model takes the recipe of ``input_kind`` (:func:`mlvar.recipes.custom_spec`).

    A no-op when ``model`` is already the configured one, so ``mlvar.toml`` values stay.
    An unknown name is left for :func:`validate_train` to report.
    """
    if model == cfg.model or not (model in MODELS or is_custom(model)):
        cfg.model = model
        return
    cfg.model = model
    spec = custom_spec(model, input_kind) if is_custom(model) else MODELS[model]
    for key, value in spec.defaults.items():
        if key not in keep:
            setattr(cfg, key, list(value) if isinstance(value, list) else value)


@dataclass
class AmlConfig:
    """Azure ML workspace and job settings of ``mlvar submit --backend aml`` (no secrets:
    credentials come from ``DefaultAzureCredential``)."""

    subscription_id: str = ""  # Azure subscription id (a GUID)
    resource_group: str = ""  # resource group of the workspace
    workspace: str = ""  # Azure ML workspace name
    compute: str = ""  # compute cluster name the jobs run on
    environment: str = ""  # registered environment ("azureml:name:version"); "": build one
    image: str = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"  # base image
    datastore: str = "workspaceblobstore"  # datastore that receives the job outputs
    experiment_name: str = "mlvar"  # Azure ML experiment the jobs are grouped under


@dataclass
class RayConfig:
    """Ray cluster settings of ``mlvar submit --backend ray``."""

    address: str = ""  # cluster address ("host:6379" or "ray://host:10001"); "": local
    num_cpus: int = 0  # CPUs of a local Ray instance (0: all); ignored with an address
    cpus_per_run: float = 1.0  # CPUs reserved per task (a pack of runs)
    gpus_per_run: float = 1.0  # GPUs per task (one pack, one GPU) on CUDA; fractions share one
    connect_timeout_s: float = 30.0  # seconds to wait for the address to answer


@dataclass
class SlurmConfig:
    """Slurm settings of ``mlvar submit --backend slurm`` (jobs submitted with submitit as
    a job array; one array task per job)."""

    partition: str = ""  # partition the jobs run in (required, also for --dry-run)
    time_limit_min: int = 60  # wall-clock limit per job, minutes (sbatch --time)
    cpus_per_job: int = 1  # CPUs per job (sbatch --cpus-per-task)
    gpus_per_job: int = 0  # GPUs per CUDA job (sbatch --gpus-per-node): 1, a pack uses one
    mem_gb: float = 0.0  # memory per job, GB (sbatch --mem); 0: the partition's default
    account: str = ""  # account charged (sbatch --account); "": the user's default
    qos: str = ""  # quality of service (sbatch --qos); "": the default
    extra_sbatch: list[str] = field(default_factory=list)  # more options: "--constraint=a100"
    setup: list[str] = field(default_factory=list)  # shell lines run before each job
    python: str = ""  # Python on the nodes; "": this interpreter (a shared venv)
    folder: str = ""  # job files and logs (absolute); "": submissions/<id>/slurm/
    array_parallelism: int = 0  # array tasks running at once (0: no limit of mlvar's)
    max_requeues: int = 3  # requeues after preemption or time-out, per job


@dataclass
class BackendConfig:
    """The ``[backend.<name>]`` tables, one per backend that has settings."""

    aml: AmlConfig = field(default_factory=AmlConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class SubmitConfig:
    """How ``mlvar submit`` splits runs into jobs and handles failures."""

    runs_per_job: int = 8  # runs packed into one job / task / worker call
    retries: int = 2  # extra attempts of a failing job before its runs are reported
    local_workers: int = 0  # local backend processes (0: in process on CPU, 1 per GPU)


@dataclass
class ProtocolConfig:
    """``[protocol]``: whose conventions ``data prepare`` and ``train`` follow by default
    (:mod:`mlvar.data.protocol`; ``--protocol`` overrides it)."""

    name: str = DEFAULT_PROTOCOL  # "mlvar" or "study"


@dataclass
class Config:
    """The resolved configuration."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    train: dict[str, TrainConfig] = field(
        default_factory=lambda: {name: default_train(name) for name in DATASETS}
    )
    backend: BackendConfig = field(default_factory=BackendConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    source: Path | None = None  # the config file that was read, if any

    def train_for(self, dataset: str) -> TrainConfig:
        """Return a copy of the training config of ``dataset`` (a user dataset of the data
        root: its kind's defaults)."""
        if dataset not in self.train:
            return default_train(dataset, self.paths.data_root)
        return dataclasses.replace(self.train[dataset], vary=list(self.train[dataset].vary))


_ENV_PATHS = {
    "MLVAR_DATA_ROOT": "data_root",
    "MLVAR_RUNS_ROOT": "runs_root",
    "MLVAR_REPORTS_ROOT": "reports_root",
}


def _check_keys(table: dict[str, Any], valid: list[str], where: str, file: Path) -> None:
    for key in table:
        if key not in valid:
            near = closest(key, valid)
            hint = f"did you mean '{near}'?" if near else "valid keys: " + ", ".join(valid)
            raise MlvarError(f"unknown key '{where}{key}' in {file}", hint)


def _coerce(value: Any, template: Any, key: str, file: Path) -> Any:
    """Check ``value`` has the type of the default ``template`` (ints accepted for floats)."""
    if isinstance(template, bool):
        ok = isinstance(value, bool)
    elif isinstance(template, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(template, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(template, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = "list of strings" if isinstance(template, list) else type(template).__name__
        raise MlvarError(
            f"'{key}' in {file} must be a {expected}, got {value!r}",
            "fix the value's type in the config file",
        )
    return value


def validate_train(cfg: TrainConfig, where: str = "train") -> TrainConfig:
    """Check the values of a training config; raise :class:`MlvarError` naming the bad one."""

    def bad(key: str, why: str, hint: str) -> MlvarError:
        return MlvarError(f"{where}.{key} {why}", hint)

    if cfg.epochs < 1:
        raise bad("epochs", f"must be at least 1, got {cfg.epochs}", "use a positive count")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise bad("lr", f"must be positive, got {cfg.lr}", "try 1e-3")
    if cfg.batch_size < 2:
        raise bad("batch_size", f"must be at least 2, got {cfg.batch_size}", "try 64")
    if cfg.hidden < 1:
        raise bad("hidden", f"must be at least 1, got {cfg.hidden}", "try 64")
    if not 0 <= cfg.dropout < 1:
        raise bad("dropout", f"must lie in [0, 1), got {cfg.dropout}", "try 0.1")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise bad("weight_decay", f"must be >= 0, got {cfg.weight_decay}", "try 0")
    if cfg.base_seed < 0:
        raise bad("base_seed", f"must be >= 0, got {cfg.base_seed}", "seeds are non-negative")
    # Image models (and users' models, which take the cnn's defaults) may leave the pack
    # size to a memory estimate (0); the MLP's batched engine needs one.
    auto_pack = cfg.model in IMAGE_MODELS or is_custom(cfg.model)
    if cfg.pack_size < (0 if auto_pack else 1):
        raise bad(
            "pack_size",
            f"must be at least {0 if auto_pack else 1}, got {cfg.pack_size}",
            "0: from a memory estimate" if auto_pack else "try 50",
        )
    if cfg.checkpoint_every < 0:
        raise bad(
            "checkpoint_every", f"must be >= 0, got {cfg.checkpoint_every}", "0 disables, try 2"
        )
    if cfg.workers < 0:
        raise bad(
            "workers", f"must be >= 0, got {cfg.workers}", "0: one per core, 1: one run at a time"
        )
    if cfg.model not in MODELS and not is_custom(cfg.model):
        near = closest(cfg.model, list(MODELS))
        hint = f"did you mean '{near}'?" if near else "valid: " + ", ".join(MODELS)
        hint += " (or your own network as package.module:factory)"
        raise bad("model", f"'{cfg.model}' is not a known model", hint)
    if cfg.protocol not in PROTOCOLS:
        raise bad(
            "protocol", f"'{cfg.protocol}' is not a protocol", "valid: " + ", ".join(PROTOCOLS)
        )
    if model_spec(cfg.protocol, cfg.model) is None:
        raise bad(
            "model",
            f"'{cfg.model}' has no recipe under protocol '{cfg.protocol}'",
            f"the {cfg.protocol} protocol trains: {recipe_models(cfg.protocol)}",
        )
    dataset = where.split(".", 1)[1] if where.startswith("train.") else ""
    if dataset in DATASETS:
        check_model_input(cfg, DATASETS[dataset].input_kind, where)
    for key, value, valid in (
        ("engine", cfg.engine, ENGINES),
        ("device", cfg.device, DEVICES),
        ("logits_dtype", cfg.logits_dtype, LOGIT_DTYPES),
    ):
        if value not in valid:
            near = closest(value, valid)
            hint = f"did you mean '{near}'?" if near else "valid: " + ", ".join(valid)
            raise bad(key, f"'{value}' is not one of {', '.join(valid)}", hint)
    if is_custom(cfg.model):
        kind = DATASETS[dataset].input_kind if dataset in DATASETS else "image"
        sources = custom_spec(cfg.model, kind).sources
        if kind == "image":  # a user's network is trained as it is: one seed at a time
            cfg.engine = "single"
    else:
        engine = model_engine(cfg.model, cfg.engine)
        if engine is None:
            raise bad(
                "engine",
                f"'{cfg.engine}' is no engine of model '{cfg.model}'",
                "valid: " + ", ".join(MODELS[cfg.model].engines),
            )
        cfg.engine = engine
        sources = MODELS[cfg.model].sources
    for source in cfg.vary:
        if source not in RANDOMNESS_SOURCES:
            near = closest(source, sources)
            hint = f"did you mean '{near}'? " if near else ""
            raise bad(
                "vary",
                f"has unknown source '{source}'",
                hint + "valid: " + ", ".join(sources) + f" (model {cfg.model})",
            )
        if source not in sources:
            raise bad(
                "vary",
                f"has source '{source}', which model '{cfg.model}' does not draw",
                "valid: " + ", ".join(sources) + f" (model {cfg.model})",
            )
    if len(set(cfg.vary)) != len(cfg.vary):
        raise bad("vary", "lists a source twice", "name each source once")
    # A canonical order keeps the experiment identity independent of how the user spelled it.
    cfg.vary = [s for s in RANDOMNESS_SOURCES if s in cfg.vary]
    return cfg


def _apply_table(target: Any, table: dict[str, Any], where: str, file: Path) -> None:
    valid = [f.name for f in dataclasses.fields(target)]
    _check_keys(table, valid, where, file)
    for key, value in table.items():
        template = getattr(target, key)
        if isinstance(template, Path):
            if not isinstance(value, str):
                raise MlvarError(f"'{where}{key}' in {file} must be a string path", "quote it")
            path = Path(value).expanduser()
            setattr(target, key, path if path.is_absolute() else file.parent / path)
        else:
            setattr(target, key, _coerce(value, template, where + key, file))


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Load the configuration.

    Parameters
    ----------
    path
        A ``mlvar.toml`` to read. When None, ``$MLVAR_CONFIG`` is used, else ``./mlvar.toml``
        if it exists, else only defaults and environment apply.
    env
        The environment to read ``MLVAR_*`` variables from (default ``os.environ``).

    Raises
    ------
    MlvarError
        When the file is missing (if named explicitly), is not valid TOML, has an unknown
        key, or a value of the wrong type or out of range.
    """
    env = dict(os.environ if env is None else env)
    cfg = Config()
    file: Path | None = None
    if path is not None:
        file = Path(path)
    elif env.get("MLVAR_CONFIG"):
        file = Path(env["MLVAR_CONFIG"])
    elif Path("mlvar.toml").is_file():
        file = Path("mlvar.toml")
    if file is not None:
        if not file.is_file():
            raise MlvarError(f"config file {file} does not exist", "check the --config path")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise MlvarError(
                f"config file {file} is not valid TOML: {exc}",
                "compare with mlvar.toml.example",
            ) from None
        file = file.resolve()
        cfg.source = file
        _check_keys(data, ["paths", "protocol", "train", "backend", "submit"], "", file)
        paths = data.get("paths", {})
        if not isinstance(paths, dict):
            raise MlvarError(f"'paths' in {file} must be a table", "write it as [paths]")
        _apply_table(cfg.paths, paths, "paths.", file)
        protocol = data.get("protocol", {})
        if not isinstance(protocol, dict):
            raise MlvarError(f"'protocol' in {file} must be a table", "write it as [protocol]")
        _apply_table(cfg.protocol, protocol, "protocol.", file)
        if cfg.protocol.name not in PROTOCOLS:
            near = closest(cfg.protocol.name, list(PROTOCOLS))
            hint = f"did you mean '{near}'? " if near else ""
            raise MlvarError(
                f"protocol.name in {file} is '{cfg.protocol.name}', not a known protocol",
                hint + "valid: " + ", ".join(PROTOCOLS),
            )
        train = data.get("train", {})
        if not isinstance(train, dict):
            raise MlvarError(f"'train' in {file} must be a table", "write it as [train.compas]")
        # [train.<name>] of a user dataset fetched into the data root (the environment's
        # when it sets one) starts from its kind's defaults.
        data_root = (
            Path(env["MLVAR_DATA_ROOT"]).expanduser() if env.get("MLVAR_DATA_ROOT") else None
        )
        data_root = data_root or cfg.paths.data_root
        for dataset in train:
            if dataset not in cfg.train and read_info(data_root, str(dataset)) is not None:
                cfg.train[dataset] = default_train(dataset, data_root)
        _check_keys(train, list(cfg.train), "train.", file)
        for dataset, table in train.items():
            if not isinstance(table, dict):
                raise MlvarError(
                    f"'train.{dataset}' in {file} must be a table",
                    f"write it as [train.{dataset}]",
                )
            if "protocol" in table:  # a field of TrainConfig, but chosen once for all
                raise MlvarError(
                    f"unknown key 'train.{dataset}.protocol' in {file}",
                    "set the protocol in [protocol] name, or pass --protocol",
                )
            if isinstance(table.get("model"), str):  # the model's recipe, then the keys given
                kind = DATASETS[dataset].input_kind
                switch_model(cfg.train[dataset], table["model"], set(table), kind)
            _apply_table(cfg.train[dataset], table, f"train.{dataset}.", file)
            validate_train(cfg.train[dataset], f"train.{dataset}")
    if file is not None:
        _load_backend_tables(cfg, data, file)
    origins = {
        attr: f"[paths] {attr} in {file}" if file is not None and attr in paths else None
        for attr in _ENV_PATHS.values()
    }
    for var, attr in _ENV_PATHS.items():
        if env.get(var):
            setattr(cfg.paths, attr, Path(env[var]).expanduser())
            origins[attr] = var
    check_paths(cfg.paths, origins)
    if env.get("MLVAR_RAY_TIMEOUT"):
        try:
            cfg.backend.ray.connect_timeout_s = float(env["MLVAR_RAY_TIMEOUT"])
        except ValueError:
            raise MlvarError(
                f"MLVAR_RAY_TIMEOUT must be a number of seconds, got {env['MLVAR_RAY_TIMEOUT']!r}",
                "e.g. MLVAR_RAY_TIMEOUT=30",
            ) from None
    validate_backend(cfg)
    return cfg


def check_paths(paths: PathsConfig, origins: dict[str, str | None] | None = None) -> None:
    """Refuse a data, runs or reports root that cannot be a folder: it, or a folder above
    it, is a file. ``origins[attr]`` says where the value came from, for the hint.

    A root that does not exist yet is fine (it is made when first written), and so is one
    this process may not write to: commands that only read must work on a read-only
    store, and one that writes gets one line naming the path (``cli/common.py``).
    """
    origins = origins or {}
    for var, attr in _ENV_PATHS.items():
        root = Path(getattr(paths, attr))
        blocker = next((p for p in (root, *root.parents) if p.exists()), None)
        if blocker is None or blocker.is_dir():
            continue
        what = attr.replace("_", " ")
        where = origins.get(attr) or f"[paths] {attr} in mlvar.toml or {var}"
        raise MlvarError(
            f"the {what} {root} is not a folder: {blocker} is a file",
            f"point {where} at a folder, or move the file away",
        )


def _load_backend_tables(cfg: Config, data: dict[str, Any], file: Path) -> None:
    """Apply the ``[backend.<name>]`` tables and ``[submit]``."""
    backend = data.get("backend", {})
    if not isinstance(backend, dict):
        raise MlvarError(f"'backend' in {file} must be a table", "write it as [backend.ray]")
    _check_keys(backend, [f.name for f in dataclasses.fields(BackendConfig)], "backend.", file)
    for name, table in backend.items():
        if not isinstance(table, dict):
            raise MlvarError(
                f"'backend.{name}' in {file} must be a table", f"write it as [backend.{name}]"
            )
        _apply_table(getattr(cfg.backend, name), table, f"backend.{name}.", file)
    submit = data.get("submit", {})
    if not isinstance(submit, dict):
        raise MlvarError(f"'submit' in {file} must be a table", "write it as [submit]")
    _apply_table(cfg.submit, submit, "submit.", file)


def validate_backend(cfg: Config) -> None:
    """Check the ranges of the ``[backend.*]`` and ``[submit]`` values."""
    ray, slurm, sub = cfg.backend.ray, cfg.backend.slurm, cfg.submit
    checks = (
        ("submit.runs_per_job", sub.runs_per_job >= 1, sub.runs_per_job, "try 8"),
        ("submit.retries", sub.retries >= 0, sub.retries, "0 disables retries"),
        ("submit.local_workers", sub.local_workers >= 0, sub.local_workers, "0: automatic"),
        ("backend.ray.num_cpus", ray.num_cpus >= 0, ray.num_cpus, "0: all CPUs"),
        ("backend.ray.cpus_per_run", ray.cpus_per_run > 0, ray.cpus_per_run, "try 1"),
        ("backend.ray.gpus_per_run", ray.gpus_per_run >= 0, ray.gpus_per_run, "try 0.25"),
        (
            "backend.ray.connect_timeout_s",
            math.isfinite(ray.connect_timeout_s) and ray.connect_timeout_s > 0,
            ray.connect_timeout_s,
            "try 30",
        ),
        ("backend.slurm.time_limit_min", slurm.time_limit_min >= 1, slurm.time_limit_min, "try 60"),
        ("backend.slurm.cpus_per_job", slurm.cpus_per_job >= 1, slurm.cpus_per_job, "try 1"),
        ("backend.slurm.gpus_per_job", slurm.gpus_per_job >= 0, slurm.gpus_per_job, "0: none"),
        (
            "backend.slurm.mem_gb",
            math.isfinite(slurm.mem_gb) and slurm.mem_gb >= 0,
            slurm.mem_gb,
            "0: the partition's default",
        ),
        (
            "backend.slurm.array_parallelism",
            slurm.array_parallelism >= 0,
            slurm.array_parallelism,
            "0: no limit",
        ),
        ("backend.slurm.max_requeues", slurm.max_requeues >= 0, slurm.max_requeues, "try 3"),
        (
            "backend.slurm.folder",
            not slurm.folder or Path(slurm.folder).expanduser().is_absolute(),
            slurm.folder,
            'an absolute path on the shared filesystem, or "" for submissions/<id>/slurm/',
        ),
    )
    for key, ok, value, hint in checks:
        if not ok:
            raise MlvarError(f"{key} is out of range: {value!r}", hint)


def check_model_input(cfg: TrainConfig, input_kind: str, where: str = "train") -> None:
    """Refuse a model that cannot read the dataset's inputs (a CNN on tabular data)."""
    inputs = (model_spec(cfg.protocol, cfg.model) or MODELS[cfg.model]).inputs
    if input_kind not in inputs:
        fits = models_for(input_kind)
        raise MlvarError(
            f"{where}.model '{cfg.model}' needs {' or '.join(inputs)} inputs, "
            f"but the data is {input_kind}",
            "valid here: " + ", ".join(fits),
        )
