"""Train N seeded copies of a model on a prepared scenario and write them to the run store.

This is the function behind ``mlvar train``; a notebook can call :func:`train` directly.
Importing it loads no torch: :func:`prepare_training` checks a request without it (so a
bad ``mlvar train`` fails fast), and the trainers are imported once training starts.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mlvar import __version__
from mlvar.config import (
    Config,
    TrainConfig,
    check_model_input,
    default_train,
    switch_protocol,
    validate_train,
)
from mlvar.data.protocol import DEFAULT_PROTOCOL, check_protocol, protocol_of
from mlvar.data.scenario import Scenario, SplitData, resolve_scenario
from mlvar.errors import MlvarError
from mlvar.recipes import batch_scaled_lr, is_custom, mlp_head, model_spec
from mlvar.store import (
    ExperimentStore,
    RunClaims,
    check_experiment_name,
    identity_diffs,
    list_experiments,
    run_id_for,
)
from mlvar.train import determinism

#: ``progress(done, total, message)`` in units of run-epochs.
Progress = Callable[[int, int, str], None]


@dataclass
class TrainResult:
    """What :func:`train` did."""

    experiment: str
    path: Path
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)  # unfinished folders removed
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # run -> split -> acc
    wall_time_s: float = 0.0
    device: str = "cpu"
    engine: str = "batched"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data

    def accuracy_summary(self) -> list[dict[str, Any]]:
        """The accuracy of the runs trained now, per split (in the order the runs list
        them): ``split``, ``runs``, ``mean``, ``std`` (over runs, ddof 1; None for one
        run), ``min``, ``max``. Empty when nothing was trained."""
        if not self.accuracy:
            return []
        rows = []
        for split in next(iter(self.accuracy.values())):
            accs = [a[split] for a in self.accuracy.values()]
            mean = sum(accs) / len(accs)
            std = (
                (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
                if len(accs) > 1
                else None
            )
            rows.append(
                {
                    "split": split,
                    "runs": len(accs),
                    "mean": mean,
                    "std": std,
                    "min": min(accs),
                    "max": max(accs),
                }
            )
        return rows


def features(split: SplitData, manifest: dict[str, Any]) -> np.ndarray:
    """Model inputs of one split as float32 ``[n, F]``: images are flattened and scaled."""
    return input_features(split.x, manifest)


def input_features(x: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """The MLP's float32 ``[n, F]`` inputs of the rows ``x`` of a prepared scenario."""
    if manifest.get("input", {}).get("kind") == "image":
        scale = float(manifest["input"].get("max_value", 255))
        return (x.reshape(len(x), -1).astype(np.float32) / scale).astype(np.float32)
    return x.astype(np.float32, copy=False)


def _code_version() -> str:
    """mlvar's version, with the git commit when running from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def _packages() -> dict[str, str]:
    import pandas
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "scikit-learn": sklearn.__version__,
    }


def protocol_record(scenario: Scenario, cfg: TrainConfig) -> dict[str, str]:
    """What a run records of the protocols: the recipe's (``protocol``) and the
    scenario's (``scenario_protocol``); empty when both are mlvar, so such runs record
    exactly what they did before protocols existed."""
    recipe, prepared = cfg.protocol, protocol_of(scenario.manifest)
    if recipe == prepared == DEFAULT_PROTOCOL:
        return {}
    return {"protocol": recipe, "scenario_protocol": prepared}


def protocol_note(scenario: Scenario, cfg: TrainConfig) -> str | None:
    """One line when the recipe's protocol is not the scenario's (allowed, and recorded)."""
    recipe, prepared = cfg.protocol, protocol_of(scenario.manifest)
    if recipe == prepared:
        return None
    return (
        f"note: scenario '{scenario.name}' was prepared under protocol '{prepared}' and is "
        f"trained with the '{recipe}' recipe (recorded in its experiment)"
    )


def experiment_meta(name: str, scenario: Scenario, cfg: TrainConfig) -> dict[str, Any]:
    """The ``experiment.json`` content of an mlvar-trained experiment.

    When the recipe or the scenario is not mlvar's, it records both protocols: the
    recipe's as ``protocol``, the scenario's as ``scenario.protocol``.
    """
    meta: dict[str, Any] = {
        "name": name,
        "dataset": scenario.dataset,
        "scenario": {
            "name": scenario.name,
            "mode": scenario.mode,
            "params": scenario.manifest.get("params", {}),
            "description": scenario.manifest.get("description", ""),
            "manifest_sha256": scenario.manifest_sha256,
        },
        "model": cfg.model,
        "train": cfg.identity(),
        "class_names": scenario.class_names,
        "input": scenario.manifest.get("input", {}),
        "created_by": f"mlvar {__version__}",
    }
    if scenario.manifest.get("detect_split"):  # label noise: the flaw is in train
        meta["scenario"]["detect_split"] = scenario.manifest["detect_split"]
    recorded = protocol_record(scenario, cfg)
    if recorded:
        meta["protocol"] = recorded["protocol"]
        meta["scenario"]["protocol"] = recorded["scenario_protocol"]
    return meta


def check_same_experiment(existing: dict[str, Any], wanted: dict[str, Any], name: str) -> None:
    """Refuse to add runs to the experiment ``name`` when it was set up otherwise."""
    diffs = [f"{key}: {old!r} -> {new!r}" for key, old, new in identity_diffs(existing, wanted)]
    if diffs:
        raise MlvarError(
            f"experiment '{name}' was trained with a different setup ({'; '.join(diffs)})",
            "pass --name NEW for a new experiment, or --force to replace this one",
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def protocol_for(config: Config, overrides: dict[str, Any] | None = None) -> str:
    """The protocol of a training request: ``overrides["protocol"]`` (``--protocol``),
    else the config's ``[protocol] name``; raises :class:`MlvarError` if unknown."""
    return check_protocol((overrides or {}).get("protocol") or config.protocol.name)


def train_config(
    config: Config, dataset: str, runs: int, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The checked training config of ``dataset`` with ``overrides`` applied (no disk).

    ``overrides["protocol"]`` (else the config's ``[protocol] name``) chooses the recipe:
    under ``study``, the study's model and values for the dataset
    (:func:`mlvar.config.switch_protocol`), then the other overrides.
    """
    default_train(dataset, config.paths.data_root)  # a known dataset, else refused
    protocol = protocol_for(config, overrides)
    if runs < 1:
        raise MlvarError(f"--runs must be at least 1, got {runs}", "e.g. --runs 20")
    cfg = config.train_for(dataset)
    # protocol: chosen above; custom_model: what a job spec's record says of a custom
    # model, found again from its factory (prepare_training) and checked by identity.
    given = {
        k: v
        for k, v in (overrides or {}).items()
        if v is not None and k not in ("protocol", "custom_model")
    }
    # Another model (or protocol) brings its own recipe defaults (epochs, lr, ...).
    switch_protocol(cfg, dataset, protocol, given.get("model"), keep=set(given))
    for key, value in given.items():
        setattr(cfg, key, list(value) if key == "vary" else value)
    if "batch_size" in given and "lr" not in given:  # airbench's lr is per 1024 examples
        cfg.lr = batch_scaled_lr(model_spec(cfg.protocol, cfg.model), cfg.lr, cfg.batch_size)
    validate_train(cfg, f"train.{dataset}")
    if cfg.device == "cuda" and not _cuda_available():
        raise MlvarError(
            "--device cuda was asked for, but CUDA is not available here", "use --device cpu"
        )
    determinism.check_environment(determinism.settings_for(cfg.device, cfg.vary))
    return cfg


def experiment_for(found: Scenario, cfg: TrainConfig, name: str | None = None) -> str:
    """The experiment of ``found`` trained with ``cfg``: ``name``, else
    ``<scenario>-<model>`` (a custom model's ``package.module:factory`` written
    ``package.module.factory``), and ``-<protocol>`` after it when the recipe's protocol is
    not the scenario's (a study scenario's name ends in ``-study`` already); refuses a
    model that cannot read the scenario's inputs or classes."""
    where = f"train.{found.dataset}"
    check_model_input(cfg, found.manifest.get("input", {}).get("kind", "tabular"), where)
    if mlp_head(cfg.protocol, cfg.model) == "sigmoid" and len(found.class_names) != 2:
        raise MlvarError(
            f"{where}: the {cfg.protocol} protocol's MLP has one output (a sigmoid for two "
            f"classes), but scenario '{found.name}' has {len(found.class_names)} classes",
            "train it under --protocol mlvar",
        )
    if name is None:  # a custom model by its import path: pkg.mod:f as pkg.mod.f
        name = f"{found.name}-{cfg.model.replace(':', '.')}"
        if cfg.protocol != protocol_of(found.manifest):
            name += f"-{cfg.protocol}"
    return check_experiment_name(name)


def prepare_training(
    config: Config,
    dataset: str,
    scenario: str | None,
    runs: int,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Scenario, TrainConfig, str]:
    """Validate a training request without touching the disk.

    Returns the scenario, the resolved training config and the experiment name.
    """
    cfg = train_config(config, dataset, runs, overrides)
    found = resolve_scenario(config.paths.data_root, dataset, scenario)
    exp_name = experiment_for(found, cfg, name)
    if is_custom(cfg.model):  # torch and the user's module: only for a custom model
        from mlvar.train import custom

        kind = found.manifest.get("input", {}).get("kind", "tabular")
        n_classes = len(found.class_names)
        cfg.custom = custom.check(cfg.model, input_shape(found), n_classes, kind)
    elif cfg.model != "mlp" and found.manifest.get("input", {}).get("kind") == "image":
        from mlvar.train import models

        models.check_input(cfg.model, input_shape(found), len(found.class_names))
    return found, cfg, exp_name


def input_shape(scenario: Scenario) -> tuple[int, ...]:
    """The shape of one model input of ``scenario``: ``(C, H, W)`` for images (the
    manifest's ``input.shape`` is ``H, W, C``), ``(F,)`` for tables; read from the train
    split where the manifest does not say."""
    info = scenario.manifest.get("input", {})
    if info.get("kind") == "image":
        shape = info.get("shape") or list(scenario.load("train").x.shape[1:])
        h, w, *c = (int(n) for n in shape)
        return (c[0] if c else 1, h, w)
    n = info.get("n_features") or scenario.load("train").x.shape[1]
    return (int(n),)


def train(
    config: Config,
    dataset: str,
    scenario: str | None = None,
    runs: int = 10,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    *,
    run_indices: Sequence[int] | None = None,
) -> TrainResult:
    """Train runs ``0 .. runs-1`` of an experiment, skipping those already finished.

    Parameters
    ----------
    config
        The resolved configuration (paths and per-dataset training defaults).
    dataset, scenario
        The dataset, and the prepared scenario (name, mode, or None when unambiguous).
    runs
        How many seeded runs the experiment should have.
    name
        Experiment name; defaults to ``<scenario>-<model>``.
    overrides
        Training-config fields to override (``epochs``, ``lr``, ``engine``, ``vary``...).
    force
        Replace an existing experiment of the same name.
    progress
        Called as ``progress(done, total, message)`` in run-epochs.
    run_indices
        Train exactly these run indices (finished ones skipped) instead of
        ``range(runs)``; used by the submit backends to train one pack of runs.
    """
    found, cfg, exp_name = prepare_training(config, dataset, scenario, runs, name, overrides)
    from mlvar.train import images  # torch: the request is valid, training starts

    runs_root = Path(config.paths.runs_root)
    meta = experiment_meta(exp_name, found, cfg)
    root = runs_root / exp_name
    if force and root.exists():
        shutil.rmtree(root)
    if exp_name in list_experiments(runs_root):
        store = ExperimentStore.open(runs_root, exp_name)
    else:
        splits = {s: found.load(s) for s in found.splits}
        samples = {
            s: {"sample_id": d.id, "label": d.y, "affected": d.affected, "group": d.group}
            for s, d in splits.items()
        }
        # Or the experiment another process created meanwhile: its setup is checked below.
        store = ExperimentStore.create(runs_root, exp_name, meta, samples)
    check_same_experiment(store.meta, meta, exp_name)

    result = TrainResult(exp_name, store.root, device=cfg.device, engine=cfg.engine)
    wanted = range(runs) if run_indices is None else sorted({int(i) for i in run_indices})
    if any(i < 0 for i in wanted):
        raise MlvarError("run indices must be >= 0", "run r has seed base_seed + r")

    def resumable(path: Path) -> bool:  # an image run killed after a checkpoint
        return cfg.model != "mlp" and (path / images.CHECKPOINT_FILE).is_file()

    # Other processes may train this experiment at once: every run is claimed first
    # (store.RunClaims); one they hold is waited for, one they finish counts as skipped.
    # On CUDA: deterministic kernels unless --vary impl (train/determinism.py).
    settings = determinism.settings_for(cfg.device, cfg.vary)
    with RunClaims(store, keep=resumable) as claims, determinism.applied(settings) as kernels:
        _train_claimed(store, found, cfg, claims, wanted, result, progress, kernels)
    result.trained.sort()  # a run waited for may be trained after later ones
    result.accuracy = dict(sorted(result.accuracy.items()))
    result.skipped = sorted(result.skipped + claims.finished)
    result.cleaned = claims.cleaned
    return result


def _train_claimed(
    store: ExperimentStore,
    found: Scenario,
    cfg: TrainConfig,
    claims: RunClaims,
    wanted: Sequence[int],
    result: TrainResult,
    progress: Progress | None,
    kernels: dict[str, Any],
) -> None:
    """Train the runs ``wanted`` of ``store`` that are not finished, as ``claims`` allows;
    ``kernels`` is the ``run.json`` record of the kernel settings in effect."""
    import torch

    from mlvar.train import images
    from mlvar.train.mlp import ENGINES, TrainData
    from mlvar.train.seeding import RunGenerators, run_seed

    for path in store.unfinished_run_dirs():  # left by killed processes: removed if free
        if claims.claim(path.name):
            claims.release(path.name)
    done = {r.run_id for r in store.runs()}
    pending = [i for i in wanted if run_id_for(i) not in done]
    result.skipped = [run_id_for(i) for i in wanted if run_id_for(i) in done]
    if not pending:
        return

    total = len(pending) * cfg.epochs
    trained_epochs = 0  # run-epochs of the runs trained so far, for the progress bar

    def on_wait(run_id: str, holder: str) -> None:
        if progress:
            progress(trained_epochs, total, f"waiting for {run_id}, held by {holder or '?'}")

    claims.on_wait = on_wait
    splits = {s: found.load(s) for s in found.splits}
    tabular_custom = is_custom(cfg.model) and (cfg.custom or {}).get("input_kind") != "image"
    if cfg.model != "mlp" and not tabular_custom:
        started_all = time.perf_counter()
        extra = {
            "code_version": _code_version(),
            "packages": _packages(),
            "determinism": kernels,
            **protocol_record(found, cfg),
        }
        # On the CPU several runs may train at once in worker processes (cfg.workers):
        # they are yielded as they finish, and listed here in run order.
        # The single engine here, the fused one (packs of seeds as one network) there.
        from mlvar.train import fused

        runner = fused.train_runs if cfg.engine == "fused" else images.train_runs
        for run_id, acc in runner(
            store, found, splits, cfg, pending, extra, progress, schedule=claims.packs
        ):
            result.trained.append(run_id)
            result.accuracy[run_id] = acc
            trained_epochs += cfg.epochs
        result.engine = cfg.engine
        result.wall_time_s = time.perf_counter() - started_all
        return
    device = torch.device(cfg.device)
    data = TrainData(
        x=torch.from_numpy(features(splits["train"], found.manifest)).to(device),
        y=torch.from_numpy(splits["train"].y).to(device),
        n_classes=len(found.class_names),
    )
    eval_x = {
        s: torch.from_numpy(features(d, found.manifest)).to(device) for s, d in splits.items()
    }
    engine = ENGINES[cfg.engine]
    pack = cfg.pack_size if cfg.engine == "batched" else 1
    engine_name = cfg.engine
    if tabular_custom:  # a user's network: the plain loop of train.tabular, one at a time
        from mlvar.train import tabular

        engine, pack, engine_name = tabular.train_loop, 1, tabular.ENGINE
        result.engine = engine_name
    code_version, packages = _code_version(), _packages()
    started_all = time.perf_counter()
    for indices in claims.packs(pending, pack):
        gens = [RunGenerators(cfg.base_seed, i, cfg.vary) for i in indices]
        offset = trained_epochs
        label = f"runs {run_id_for(indices[0])}..{run_id_for(indices[-1])}"

        def on_epoch(done_: int, _total: int, offset: int = offset, label: str = label) -> None:
            if progress:
                progress(offset + done_, total, label)

        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        outputs = engine(
            data,
            cfg,
            gens,
            eval_x,
            progress=on_epoch,
            dynamics=eval_x["train"] if cfg.record_dynamics else None,
            weights=True,
        )
        pack_wall = time.perf_counter() - t0
        for index, gen, logits in zip(indices, gens, outputs, strict=True):
            recorded = logits.pop("dynamics", None)
            weights = images.weights_file(logits.pop("state_dict"))
            arrays = {s: v.numpy().astype(cfg.logits_dtype) for s, v in logits.items()}
            acc = {s: float((arrays[s].argmax(axis=1) == splits[s].y).mean()) for s in arrays}
            run_meta = {
                "run_index": index,
                "seed": run_seed(cfg.base_seed, index),
                "source_seeds": gen.seeds,
                "vary": cfg.vary,
                "config": cfg.record(),
                "engine": engine_name,
                "device": cfg.device,
                "pack_size": len(indices),
                "started_at": started_at,
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "wall_time_s": pack_wall / len(indices),
                "pack_wall_time_s": pack_wall,
                "metrics": {f"{s}_accuracy": a for s, a in acc.items()},
                "code_version": code_version,
                "packages": packages,
                "determinism": kernels,
                **protocol_record(found, cfg),
            }
            record = store.write_run(
                run_id_for(index),
                arrays,
                run_meta,
                dynamics=None if recorded is None else recorded.numpy().astype(np.float16),
                files={images.WEIGHTS_FILE: weights},
            )
            result.trained.append(record.run_id)
            result.accuracy[record.run_id] = acc
        trained_epochs += len(indices) * cfg.epochs
    result.wall_time_s = time.perf_counter() - started_all
