"""Configuration: built-in defaults, ``mlvar.toml``, ``MLVAR_*`` environment, CLI flags.

Precedence, highest first: CLI flags > environment (``MLVAR_*``) > ``mlvar.toml`` >
built-in defaults. Unknown keys are rejected with the nearest valid name, so a typo is
never silently ignored. Relative paths in a config file are taken relative to the file's
folder; relative paths from the environment or the command line relative to the current
directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.errors import MlvarError, closest

#: Sources of randomness in training that can follow the run seed (``--vary``).
RANDOMNESS_SOURCES = ("init", "order", "dropout")
ENGINES = ("batched", "loop")
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

    model: str = "mlp"  # model name in the registry
    epochs: int = 10  # passes over the training split
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 64  # samples per optimiser step, per seed
    hidden: int = 64  # width of both hidden layers
    dropout: float = 0.1  # drop probability before the output layer
    weight_decay: float = 0.0  # L2 coefficient in Adam
    engine: str = "batched"  # "batched" (all seeds stacked) or "loop" (one model at a time)
    device: str = "cpu"  # "cpu" or "cuda"
    base_seed: int = 0  # run r uses seed base_seed + r
    vary: list[str] = field(default_factory=lambda: list(RANDOMNESS_SOURCES))
    pack_size: int = 50  # seeds trained together by the batched engine (bounds memory)
    logits_dtype: str = "float32"  # dtype of stored logits: float32 or float16
    record_dynamics: bool = False  # also store train-set logits after every epoch (float16)

    def identity(self) -> dict[str, Any]:
        """The fields that define what a run computes (not where or how fast)."""
        data = dataclasses.asdict(self)
        for key in ("engine", "device", "pack_size", "record_dynamics"):
            data.pop(key)
        return data


#: Built-in per-dataset training defaults (the COMPAS values are the original study's first
#: configuration: 10 epochs at lr 1e-3).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "compas": {"epochs": 10, "lr": 1e-3, "batch_size": 64},
    "digits": {"epochs": 30, "lr": 3e-3, "batch_size": 64},
}


@dataclass
class Config:
    """The resolved configuration."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    train: dict[str, TrainConfig] = field(
        default_factory=lambda: {name: TrainConfig(**v) for name, v in TRAIN_DEFAULTS.items()}
    )
    source: Path | None = None  # the config file that was read, if any

    def train_for(self, dataset: str) -> TrainConfig:
        """Return a copy of the training config of ``dataset``."""
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
    if cfg.pack_size < 1:
        raise bad("pack_size", f"must be at least 1, got {cfg.pack_size}", "try 50")
    if cfg.model != "mlp":
        raise bad("model", f"'{cfg.model}' is not a known model", "valid: mlp")
    for key, value, valid in (
        ("engine", cfg.engine, ENGINES),
        ("device", cfg.device, DEVICES),
        ("logits_dtype", cfg.logits_dtype, LOGIT_DTYPES),
    ):
        if value not in valid:
            near = closest(value, valid)
            hint = f"did you mean '{near}'?" if near else "valid: " + ", ".join(valid)
            raise bad(key, f"'{value}' is not one of {', '.join(valid)}", hint)
    for source in cfg.vary:
        if source not in RANDOMNESS_SOURCES:
            near = closest(source, RANDOMNESS_SOURCES)
            hint = f"did you mean '{near}'? " if near else ""
            raise bad(
                "vary",
                f"has unknown source '{source}'",
                hint + "valid: " + ", ".join(RANDOMNESS_SOURCES),
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
        _check_keys(data, ["paths", "train"], "", file)
        paths = data.get("paths", {})
        if not isinstance(paths, dict):
            raise MlvarError(f"'paths' in {file} must be a table", "write it as [paths]")
        _apply_table(cfg.paths, paths, "paths.", file)
        train = data.get("train", {})
        if not isinstance(train, dict):
            raise MlvarError(f"'train' in {file} must be a table", "write it as [train.compas]")
        _check_keys(train, list(cfg.train), "train.", file)
        for dataset, table in train.items():
            if not isinstance(table, dict):
                raise MlvarError(
                    f"'train.{dataset}' in {file} must be a table",
                    f"write it as [train.{dataset}]",
                )
            _apply_table(cfg.train[dataset], table, f"train.{dataset}.", file)
            validate_train(cfg.train[dataset], f"train.{dataset}")
    for var, attr in _ENV_PATHS.items():
        if env.get(var):
            setattr(cfg.paths, attr, Path(env[var]).expanduser())
    return cfg
