"""Continue trained runs from their saved weights on their training set plus pool samples.

The retraining service (``mlvar.retrain``) calls :func:`continue_runs` once per retraining
set (a strategy at a budget): every run of the source experiment starts from exactly its
``model.pt``, trains on the scenario's train split plus the pool rows chosen for it, and
lands, in the run format, in the set's own store ``<experiment>/retrain/<set>/``.

The rule of every model (``docs/training.md``, "Continuing a run"), in one place
(:func:`plan_continuation`, from ``ModelSpec.continuation`` in :mod:`mlvar.recipes`):

* length: a third of the run's training epochs (rounded; the study continued its
  ResNet-18 from epoch 150 to 200), unless ``epochs`` is given;
* schedule: ``tail`` for the study's ResNet-18 (its ``CosineAnnealingLR(T_max=200)``
  carried on from the run's last epoch: epochs 150..199), ``restart`` for mlvar's image
  recipes (their own per-step schedule, warm-up and lookahead included, over the
  continuation's steps, from a tenth of the peak lr: their schedules end at 0), and
  ``constant`` for the MLP (Adam at the recipe's lr);
* optimiser: fresh (zero momentum, fresh Adam moments, lookahead average = the loaded
  weights). Finished runs save no optimiser state: it would double the stored size of a
  run, and the study's own continuation started with fresh momentum too (its checkpoint
  resume lost it). ``run.json`` says ``"optimizer": "fresh"``.

The added samples are ordinary training samples (the same augmentation; image inputs are
normalised with the statistics of the scenario's train split that the weights were
trained with; tabular pools of the experiment's own scenario are standardised with its
train statistics already). A continued run's generators (data order, dropout,
augmentation) are the run's own seeds mixed with the fixed tag :data:`CONTINUE_TAG`, so
they are reproducible per run and unrelated to the streams of the original training.
``from_scratch`` trains instead from the run's seed exactly as ``mlvar train`` would on
the enlarged training set (the original generators, the recipe's epochs and schedule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlvar.config import TrainConfig
from mlvar.data.protocol import DEFAULT_PROTOCOL
from mlvar.data.scenario import Scenario, SplitData
from mlvar.errors import MlvarError
from mlvar.recipes import RANDOMNESS_SOURCES, SEEDED_SOURCES, continuation_of, model_spec
from mlvar.store import (
    ExperimentStore,
    RunClaims,
    RunRecord,
    identity_diffs,
    list_experiments,
    run_id_for,
)
from mlvar.train.seeding import RunGenerators
from mlvar.train.service import TrainResult
from mlvar.train.trained import WEIGHTS_FILE, load_weights

#: Mixed into every generator seed of a continued run (``SeedSequence([seed, source's
#: stream, CONTINUE_TAG])``): the bytes ``b"continue"`` as a big-endian integer.
CONTINUE_TAG = int.from_bytes(b"continue", "big")

#: ``trace(event, run_id, payload)`` (tests): ``("start", run_id, state_dict)`` with the
#: weights a continued run's first step starts from (``"init"`` from scratch) and
#: ``("batch", run_id, indices)`` for the batches.
Trace = Callable[[str, str, Any], None]


@dataclass
class ContinueResult(TrainResult):
    """What :func:`continue_runs` did (a :class:`~mlvar.train.service.TrainResult` of the
    set's store: runs trained now, those already finished, their accuracies), and the
    continuation's length in ``epochs``."""

    epochs: int = 0


@dataclass(frozen=True)
class Plan:
    """One continuation: ``epochs`` epochs with ``schedule`` at learning rate ``lr`` (the
    constant lr, a restart's peak, or the base lr whose cosine a tail carries on),
    starting where the source run stopped (``start_epoch``, its training epochs; 0 from
    scratch). ``schedule_offset`` is the epoch of a per-epoch schedule the first
    continued epoch takes its lr from (a tail's ``start_epoch``, else 0)."""

    epochs: int
    schedule: str  # "constant", "tail", "restart" or "scratch"
    lr: float
    start_epoch: int
    schedule_offset: int

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def continuation_epochs(fraction: float, trained_epochs: int) -> int:
    """``fraction`` of ``trained_epochs``, rounded half up, at least 1."""
    return max(1, math.floor(fraction * trained_epochs + 0.5))


def plan_continuation(cfg: TrainConfig, epochs: int | None, from_scratch: bool) -> Plan:
    """The continuation of a run trained with ``cfg``: the rule of its model and protocol
    (``ModelSpec.continuation``), ``epochs`` overriding the length."""
    if from_scratch:
        return Plan(cfg.epochs if epochs is None else epochs, "scratch", cfg.lr, 0, 0)
    rule = continuation_of(cfg.protocol, cfg.model)
    length = continuation_epochs(float(rule["fraction"]), cfg.epochs) if epochs is None else epochs
    schedule = str(rule["schedule"])
    if schedule == "tail":
        spec = model_spec(cfg.protocol, cfg.model)
        if spec is None or spec.recipe.get("schedule") != "cosine-epochs":
            raise ValueError(f"a tail needs a per-epoch schedule ({cfg.model}, {cfg.protocol})")
        return Plan(length, schedule, cfg.lr, cfg.epochs, cfg.epochs)
    if schedule == "restart":
        return Plan(length, schedule, cfg.lr * float(rule["lr_scale"]), cfg.epochs, 0)
    if schedule == "constant":
        return Plan(length, schedule, cfg.lr, cfg.epochs, 0)
    raise ValueError(f"unknown continuation schedule {schedule!r}")


def experiment_plan(
    source: ExperimentStore, epochs: int | None = None, from_scratch: bool = False
) -> Plan:
    """The continuation :func:`continue_runs` would run on ``source`` (its first run's
    config), without training: e.g. to show or record the epochs before starting."""
    runs = source.runs()
    if not runs:
        raise MlvarError(f"experiment '{source.name}' has no finished runs", "train it first")
    return plan_continuation(run_config(runs[0], "cpu"), epochs, from_scratch)


def continue_generator(seed: int, source: str) -> torch.Generator:
    """The CPU generator of ``source`` in a continuation of a run whose ``source`` seed is
    ``seed``: like training's (``seeding.make_generator``), with :data:`CONTINUE_TAG`."""
    stream = RANDOMNESS_SOURCES.index(source) + 1  # training's stream ids (seeding.py)
    state = np.random.SeedSequence([seed, stream, CONTINUE_TAG]).generate_state(1, np.uint64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state[0]) & ((1 << 63) - 1))
    return gen


class ContinueGenerators(RunGenerators):
    """A continued run's generators: its per-source seeds (``source_seeds`` of its
    ``run.json``, so sources fixed by ``--vary`` stay shared across runs) on the
    continuation's streams."""

    def __init__(self, source_seeds: Mapping[str, int]) -> None:  # noqa: D107
        self.seeds = {s: int(source_seeds[s]) for s in SEEDED_SOURCES}
        self.init = continue_generator(self.seeds["init"], "init")
        self.order = continue_generator(self.seeds["order"], "order")
        self.dropout = continue_generator(self.seeds["dropout"], "dropout")
        self.aug = continue_generator(self.seeds["aug"], "aug")


def run_config(run: RunRecord, device: str) -> TrainConfig:
    """The training config a run recorded (``run.json`` ``config``), on ``device``."""
    record = dict(run.meta.get("config") or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in record.items() if k in names})
    cfg.protocol = str(record.get("protocol", DEFAULT_PROTOCOL))
    cfg.device = device
    return cfg


def added_sha256(positions: np.ndarray) -> str:
    """The sha256 of sorted pool positions as little-endian int64 (``continued_from``)."""
    return hashlib.sha256(np.asarray(positions, dtype="<i8").tobytes()).hexdigest()


def _positions(run_id: str, value: Any, n_pool: int) -> np.ndarray:
    """``value`` as sorted unique int64 pool positions, or a one-line error."""
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise MlvarError(
            f"the pool positions of run {run_id} are not a list of integers",
            "pass row positions of the pool",
        )
    if arr.min() < 0 or arr.max() >= n_pool:
        raise MlvarError(
            f"run {run_id} adds pool row {int(arr.max() if arr.max() >= n_pool else arr.min())}"
            f", outside the pool's {n_pool} rows",
            "positions are 0-based rows of the pool",
        )
    unique = np.unique(arr).astype(np.int64)
    if len(unique) != len(arr):
        raise MlvarError(f"run {run_id} adds some pool rows twice", "pass each row once")
    return unique


def _split_data(source: ExperimentStore, scenario: Scenario, split: str) -> SplitData:
    """The data of the source experiment's stored split ``split``, in its rows' order."""
    if split in scenario.splits:
        data = scenario.load(split)
    else:  # a split added from another scenario (``mlvar analyze predict``)
        from mlvar.data import scenario as scenarios

        find = getattr(scenarios, "split_source", None)
        if find is None:
            raise MlvarError(
                f"split '{split}' of experiment '{source.name}' is not one of scenario "
                f"'{scenario.name}'",
                "continue an experiment whose splits its scenario has",
            )
        other, name = find(scenario.data_root, source.name, source.meta, split)
        data = other.load(name)
    if not np.array_equal(data.id, source.samples(split)["sample_id"].to_numpy()):
        raise MlvarError(
            f"the samples of split '{split}' differ from those experiment '{source.name}' stored",
            "prepare the scenario the experiment was trained on",
        )
    return data


def _dict_diffs(key: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new), key=str)
            if old.get(k) != new.get(k)
        ]
    return [f"{key}: {old!r} -> {new!r}"]


def _open_target(
    target_root: Path, wanted: dict[str, Any], samples: dict[str, dict[str, np.ndarray]]
) -> ExperimentStore:
    """The set's store: created like a trained experiment's, or the existing one if its
    identity (the source's, ``retrain`` and ``continuation``) is ``wanted``'s."""
    runs_root, name = target_root.parent, target_root.name
    if name in list_experiments(runs_root):
        store = ExperimentStore.open(runs_root, name)
    else:
        store = ExperimentStore.create(runs_root, name, wanted, samples)
    diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in identity_diffs(store.meta, wanted)]
    for key in ("retrain", "continuation"):
        diffs += _dict_diffs(key, store.meta.get(key), wanted.get(key))
    if diffs:
        raise MlvarError(
            f"retraining set '{name}' in {runs_root} was made with another setup "
            f"({'; '.join(diffs)})",
            f"remove {target_root} to redo it, or give the set another name",
        )
    return store


def _target_meta(
    source: ExperimentStore,
    name: str,
    set_meta: dict[str, Any],
    plan: Plan,
    from_scratch: bool,
    pool: SplitData,
) -> dict[str, Any]:
    """The ``experiment.json`` of a set's store (the source's identity, the set's and the
    continuation's)."""
    wanted = {k: v for k, v in source.meta.items() if k not in ("store_format", "splits")}
    wanted["name"] = name
    wanted["retrain"] = set_meta
    wanted["continuation"] = {
        "source_experiment": source.name,
        "from_scratch": bool(from_scratch),
        **plan.record(),
        "optimizer": "fresh",
        "generators": "original" if from_scratch else "continue",
        "pool": {"n": len(pool), "ids_sha256": added_sha256(pool.id)},
    }
    return wanted


def _source_samples(source: ExperimentStore) -> dict[str, dict[str, np.ndarray]]:
    samples = {}
    for split in source.splits:
        table = source.samples(split)
        samples[split] = {c: table[c].to_numpy() for c in table.columns}
    return samples


def open_target_store(
    source: ExperimentStore,
    target_root: Path,
    set_meta: dict[str, Any],
    pool: SplitData,
    epochs: int | None = None,
    from_scratch: bool = False,
) -> ExperimentStore:
    """The set's store at ``target_root``, created (or checked: a one-line error naming
    what differs) exactly as :func:`continue_runs` makes it, continuing nothing: where
    the runs a worker continued elsewhere land (``mlvar submit retrain``)."""
    plan = experiment_plan(source, None if epochs is None else int(epochs), from_scratch)
    target_root = Path(target_root)
    wanted = _target_meta(source, target_root.name, set_meta, plan, from_scratch, pool)
    return _open_target(target_root, wanted, _source_samples(source))


def _check_request(
    source: ExperimentStore,
    run_ids: Sequence[str],
    added: Mapping[str, np.ndarray],
    pool: SplitData,
    epochs: int | None,
    from_scratch: bool,
    device: str,
) -> tuple[dict[str, RunRecord], dict[str, np.ndarray]]:
    """The source runs and each one's sorted pool positions; a one-line error for bad
    input, before anything is written."""
    runs = {r.run_id: r for r in source.runs()}
    missing = [r for r in run_ids if r not in runs]
    if missing:
        raise MlvarError(
            f"experiment '{source.name}' has no finished run {missing[0]}",
            f"it has {len(runs)} runs" + (f": {', '.join(sorted(runs)[:5])}, ..." if runs else ""),
        )
    if epochs is not None and (isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0):
        raise MlvarError(f"--epochs must be an integer >= 0, got {epochs!r}", "e.g. --epochs 5")
    if device not in ("cpu", "cuda"):
        raise MlvarError(f"unknown device '{device}'", "use --device cpu or --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise MlvarError(
            "--device cuda was asked for, but CUDA is not available here", "use --device cpu"
        )
    positions = {}
    for run_id in run_ids:
        run = runs[run_id]
        if run.meta.get("run_index") is None or run_id_for(int(run.meta["run_index"])) != run_id:
            raise MlvarError(
                f"run {run_id} of '{source.name}' was not trained by mlvar",
                "only mlvar-trained runs can continue",
            )
        if not from_scratch and WEIGHTS_FILE not in run.meta.get("arrays", {}):
            raise MlvarError(
                f"run {run_id} of '{source.name}' has no saved weights ({WEIGHTS_FILE})",
                "retrain the experiment with this mlvar (runs save their weights), "
                "or retrain from scratch",
            )
        if run_id not in added:
            raise MlvarError(f"no pool positions given for run {run_id}", "pass [] to add none")
        positions[run_id] = _positions(run_id, added[run_id], len(pool))
    return runs, positions


def continue_runs(
    source: ExperimentStore,
    target_root: Path,
    set_meta: dict[str, Any],
    scenario: Scenario,
    pool: SplitData,
    added: Mapping[str, np.ndarray],
    run_ids: Sequence[str],
    epochs: int | None = None,
    from_scratch: bool = False,
    device: str = "cpu",
    progress: Callable[..., None] | None = None,
    *,
    trace: Trace | None = None,
) -> ContinueResult:
    """Continue the runs ``run_ids`` of ``source`` with pool samples added to their
    training sets; the continued runs land in the store at ``target_root``.

    Parameters
    ----------
    source
        The trained experiment; its runs have ``model.pt`` (unless ``from_scratch``).
    target_root
        ``<experiment>/retrain/<set>``: created like a trained experiment (the source's
        splits and samples tables, ``experiment.json`` with ``"retrain": set_meta`` and
        ``"continuation"``: the plan), or opened when its identity is the same (else a
        one-line error naming the keys that differ).
    set_meta
        The set's identity (source, pool, strategy, budget, ...), recorded as is.
    scenario
        The source experiment's scenario (its manifest sha256 must match).
    pool
        The pool's samples; ``added[run_id]`` are the rows of it added to that run.
    run_ids
        The runs to continue; those complete in the target are skipped (a complete run
        that continued another model or other pool rows is refused).
    epochs
        The continuation's length; None: the model's rule (:func:`plan_continuation`),
        or the recipe's epochs ``from_scratch``. 0 re-evaluates the saved weights.
    from_scratch
        Train from the run's seed (its original generators) instead of its weights.
    device
        ``cpu`` or ``cuda``.
    progress
        ``progress(done, total, message)`` in run-epochs.
    trace
        Tests: see :data:`Trace`.

    Returns
    -------
    ContinueResult
        The runs trained now and skipped, the continuation's epochs, accuracies.
    """
    if not list(source.runs()):
        raise MlvarError(f"experiment '{source.name}' has no finished runs", "train it first")
    runs, positions = _check_request(source, run_ids, added, pool, epochs, from_scratch, device)
    expected = (source.meta.get("scenario") or {}).get("manifest_sha256")
    if expected and scenario.manifest_sha256 != expected:
        raise MlvarError(
            f"scenario '{scenario.name}' is not the one experiment '{source.name}' was "
            "trained on (its manifest changed)",
            "prepare the scenario the runs were trained on",
        )
    cfgs = {r: run_config(runs[r], device) for r in run_ids}
    cfg = cfgs[run_ids[0]] if run_ids else run_config(next(iter(runs.values())), device)
    for run_id, run_cfg in cfgs.items():
        if run_cfg.identity() != source.meta.get("train"):
            raise MlvarError(
                f"run {run_id} records another training config than experiment '{source.name}'",
                "the experiment's runs must share its setup",
            )
    plan = plan_continuation(cfg, None if epochs is None else int(epochs), from_scratch)
    splits = {s: _split_data(source, scenario, s) for s in source.splits}
    train_split = splits["train"] if "train" in splits else scenario.load("train")
    n_classes = len(source.class_names)
    _check_pool(pool, train_split, n_classes)

    wanted = _target_meta(source, Path(target_root).name, set_meta, plan, from_scratch, pool)
    # Complete runs that continued something else are refused before anything is written.
    target_root = Path(target_root)
    if target_root.name in list_experiments(target_root.parent):
        existing = ExperimentStore.open(target_root.parent, target_root.name)
        for record in existing.runs():
            if record.run_id in positions:
                _check_finished(record, runs[record.run_id], positions[record.run_id])
    target = _open_target(target_root, wanted, _source_samples(source))

    job = _Job(
        source=source,
        target=target,
        scenario=scenario,
        cfg=cfg,
        plan=plan,
        splits=splits,
        train=train_split,
        pool=pool,
        runs=runs,
        positions=positions,
        from_scratch=from_scratch,
        progress=progress,
        trace=trace,
    )
    result = ContinueResult(
        target.name,
        target.root,
        device=cfg.device,
        engine=cfg.engine if cfg.model == "mlp" or cfg.engine == "fused" else "single",
        epochs=plan.epochs,
    )
    started = time.perf_counter()
    job.run(list(run_ids), result)
    result.wall_time_s = time.perf_counter() - started
    result.trained.sort()
    result.skipped.sort()
    result.accuracy = dict(sorted(result.accuracy.items()))
    return result


def _check_pool(pool: SplitData, train: SplitData, n_classes: int) -> None:
    if pool.x.shape[1:] != train.x.shape[1:]:
        raise MlvarError(
            f"the pool's inputs have shape {pool.x.shape[1:]}, the training set's "
            f"{train.x.shape[1:]}",
            "use a pool of the same dataset",
        )
    if len(pool) and (pool.y.min() < 0 or pool.y.max() >= n_classes):
        raise MlvarError(
            f"the pool has labels outside the experiment's {n_classes} classes",
            "use a labelled pool of the same dataset",
        )


def _check_finished(record: RunRecord, source_run: RunRecord, positions: np.ndarray) -> None:
    """Refuse a complete continued run whose source weights or added rows differ."""
    done = record.meta.get("continued_from") or {}
    model = (source_run.meta.get("arrays", {}).get(WEIGHTS_FILE) or {}).get("sha256")
    if done.get("added_sha256") != added_sha256(positions) or (
        done.get("model_sha256") not in (None, model)
    ):
        raise MlvarError(
            f"run {record.run_id} of retraining set '{record.path.parent.parent.name}' "
            "continued other weights or other pool rows",
            f"remove {record.path} to redo it",
        )


@dataclass
class _Job:
    """One :func:`continue_runs` call's shared state."""

    source: ExperimentStore
    target: ExperimentStore
    scenario: Scenario
    cfg: TrainConfig
    plan: Plan
    splits: dict[str, SplitData]
    train: SplitData
    pool: SplitData
    runs: dict[str, RunRecord]
    positions: dict[str, np.ndarray]
    from_scratch: bool
    progress: Callable[..., None] | None
    trace: Trace | None
    done_epochs: int = 0
    total_epochs: int = 0
    code: tuple[str, dict[str, str]] = ("", {})  # code version and packages, for run.json

    @property
    def image(self) -> bool:
        return self.cfg.model != "mlp"

    def run(self, run_ids: list[str], result: ContinueResult) -> None:
        from mlvar.train import images

        def resumable(path: Path) -> bool:  # an image continuation killed after a checkpoint
            return self.image and (path / images.CHECKPOINT_FILE).is_file()

        with RunClaims(self.target, keep=resumable) as claims:
            for path in self.target.unfinished_run_dirs():  # left by killed processes
                if claims.claim(path.name):
                    claims.release(path.name)
            finished = {r.run_id for r in self.target.runs()}
            result.skipped = [r for r in run_ids if r in finished]
            pending = [r for r in run_ids if r not in finished]
            self.total_epochs = len(pending) * self.plan.epochs
            if pending:
                self.code = _code_and_packages()
                if self.image:
                    self._images(pending, claims, result)
                else:
                    self._mlp(pending, claims, result)
            result.skipped += claims.finished
            result.cleaned = list(claims.cleaned)

    # ---------------------------------------------------------------- shared pieces

    def _index(self, run_id: str) -> int:
        return int(self.runs[run_id].meta["run_index"])

    def _generators(self, run_id: str) -> RunGenerators:
        run = self.runs[run_id]
        if self.from_scratch:
            return RunGenerators(self.cfg.base_seed, self._index(run_id), self.cfg.vary)
        return ContinueGenerators(run.meta["source_seeds"])

    def _continued_from(self, run_id: str) -> dict[str, Any]:
        run = self.runs[run_id]
        model = (run.meta.get("arrays", {}).get(WEIGHTS_FILE) or {}).get("sha256")
        return {
            "experiment": self.source.name,
            "run_id": run_id,
            "model_sha256": None if self.from_scratch else model,
            "from_scratch": self.from_scratch,
            "start_epoch": self.plan.start_epoch,
            "epochs": self.plan.epochs,
            "schedule": self.plan.schedule,
            "lr": self.plan.lr,
            "optimizer": "fresh",
            "n_added": len(self.positions[run_id]),
            "added_sha256": added_sha256(self.positions[run_id]),
        }

    def _start_weights(self, run_id: str) -> dict[str, torch.Tensor] | None:
        return None if self.from_scratch else load_weights(self.runs[run_id])

    def _report(self, epochs: int, label: str) -> None:
        if self.progress:
            self.progress(self.done_epochs + epochs, self.total_epochs, label)

    def _write(
        self,
        run_id: str,
        arrays: dict[str, np.ndarray],
        weights: dict[str, torch.Tensor],
        gen: RunGenerators,
        extra: dict[str, Any],
        result: ContinueResult,
    ) -> None:
        from mlvar.train import images

        run = self.runs[run_id]
        acc = {s: float((arrays[s].argmax(axis=1) == self.splits[s].y).mean()) for s in arrays}
        code_version, packages = self.code
        meta = {
            "run_index": self._index(run_id),
            "seed": run.meta.get("seed"),
            "source_seeds": gen.seeds,
            "vary": self.cfg.vary,
            "config": self.cfg.record(),
            "device": self.cfg.device,
            **extra,
            "metrics": {f"{s}_accuracy": a for s, a in acc.items()},
            "continued_from": self._continued_from(run_id),
            "code_version": code_version,
            "packages": packages,
            **{k: run.meta[k] for k in ("protocol", "scenario_protocol") if k in run.meta},
        }
        self.target.write_run(
            run_id, arrays, meta, files={WEIGHTS_FILE: images.weights_file(weights)}
        )
        result.trained.append(run_id)
        result.accuracy[run_id] = acc

    # ---------------------------------------------------------------- the MLP

    def _mlp(self, pending: list[str], claims: RunClaims, result: ContinueResult) -> None:
        from mlvar.train.mlp import ENGINES, TrainData
        from mlvar.train.service import features, input_features

        cfg = dataclasses.replace(self.cfg, epochs=self.plan.epochs, lr=self.plan.lr)
        cfg.protocol = self.cfg.protocol
        device = torch.device(cfg.device)
        manifest = self.scenario.manifest
        n_train = len(self.train)
        # One table of every row a run may train on: the train split, then the pool; each
        # run trains on the train rows and its pool rows (``rows``), in that order.
        x = np.concatenate([features(self.train, manifest), input_features(self.pool.x, manifest)])
        data = TrainData(
            x=torch.from_numpy(x).to(device),
            y=torch.from_numpy(np.concatenate([self.train.y, self.pool.y])).to(device),
            n_classes=len(self.source.class_names),
        )
        eval_x = {
            s: torch.from_numpy(features(d, manifest)).to(device) for s, d in self.splits.items()
        }
        rows = {
            r: torch.cat([torch.arange(n_train), n_train + torch.from_numpy(self.positions[r])])
            for r in pending
        }
        engine = ENGINES[cfg.engine]
        size = cfg.pack_size if cfg.engine == "batched" else 1
        # Runs of one pack share their batch sizes, so packs are made of runs that train on
        # equally many rows; a run's results do not depend on its pack (mlvar.train.mlp).
        by_size: dict[int, list[int]] = {}
        for r in pending:
            by_size.setdefault(len(rows[r]), []).append(self._index(r))
        for indices in by_size.values():
            for pack in claims.packs(indices, size):
                ids = [run_id_for(i) for i in pack]
                gens = [self._generators(r) for r in ids]
                starts = None if self.from_scratch else [self._start_weights(r) for r in ids]
                label = f"runs {ids[0]}..{ids[-1]}"
                trace = None
                if self.trace is not None:
                    user = self.trace

                    def trace(event: str, pos: int, payload: Any, ids=ids, user=user) -> None:
                        user(event, ids[pos], payload)

                started_at = datetime.now(UTC).isoformat(timespec="seconds")
                t0 = time.perf_counter()
                outputs = engine(
                    data,
                    cfg,
                    gens,
                    eval_x,
                    progress=lambda done, _total, label=label: self._report(done, label),
                    trace=trace,
                    weights=True,
                    starts=starts,
                    rows=[rows[r] for r in ids],
                )
                wall = time.perf_counter() - t0
                for run_id, gen, out in zip(ids, gens, outputs, strict=True):
                    weights = out.pop("state_dict")
                    arrays = {s: v.numpy().astype(cfg.logits_dtype) for s, v in out.items()}
                    extra = {
                        "engine": cfg.engine,
                        "pack_size": len(ids),
                        "started_at": started_at,
                        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                        "wall_time_s": wall / len(ids),
                        "pack_wall_time_s": wall,
                    }
                    self._write(run_id, arrays, weights, gen, extra, result)
                self.done_epochs += len(ids) * cfg.epochs

    # ---------------------------------------------------------------- image models

    def _images(self, pending: list[str], claims: RunClaims, result: ContinueResult) -> None:
        from mlvar.train import images

        cfg = dataclasses.replace(
            self.cfg, epochs=self.plan.epochs, lr=self.plan.lr, record_dynamics=False
        )
        cfg.protocol = self.cfg.protocol
        device = torch.device(cfg.device)
        # Normalised with the train split's statistics, which the weights were trained with.
        manifest = self.scenario.manifest
        base = images._build_data(self.splits, manifest, device, cfg, train=self.train)
        pool = (images.to_nchw(self.pool.x).to(device), torch.from_numpy(self.pool.y).to(device))
        if cfg.engine == "fused":
            self._images_fused(pending, claims, result, cfg, base, pool)
        else:
            self._images_single(pending, claims, result, cfg, base, pool)

    def _image_start(self, run_id: str) -> Any:
        from mlvar.train import images

        return images.Start(
            state_dict=self._start_weights(run_id),
            schedule_offset=self.plan.schedule_offset,
            identity=dict(self._continued_from(run_id)),
        )

    def _scratch_stats(
        self, run_id: str, cfg: TrainConfig, max_value: float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation a retraining from scratch uses: as ``mlvar train`` on the
        enlarged set would, that set's statistics (or the recipe's constants)."""
        from mlvar.train import images
        from mlvar.train.mlp import _one_thread_per_kernel

        enlarged = np.concatenate([self.train.x, self.pool.x[self.positions[run_id]]])
        with _one_thread_per_kernel(device):
            mean, std = images.channel_stats(
                images.to_nchw(enlarged), max_value, images.recipe_of(cfg).get("normalise")
            )
        return mean.float().to(device), std.float().to(device)

    def _image_trace(self, run_id_of: Callable[[Any], str]) -> Callable[..., None] | None:
        """The engines' trace events (``init`` -> ``start`` when continuing) under the
        continuation's run ids (``run_id_of(position or None)``)."""
        if self.trace is None:
            return None
        user = self.trace

        def trace(kind: str, *payload: Any) -> None:
            where, value = (None, payload[0]) if len(payload) == 1 else payload
            if kind == "init" and not self.from_scratch:
                kind = "start"
            user(kind, run_id_of(where), value)

        return trace

    def _write_image_run(
        self,
        run_id: str,
        out: Any,
        gen: RunGenerators,
        cfg: TrainConfig,
        timing: dict[str, Any],
        result: ContinueResult,
    ) -> None:
        arrays = {s: v.numpy().astype(cfg.logits_dtype) for s, v in out.logits.items()}
        extra = {
            **timing,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "resumed_from_epoch": out.resumed_from,
        }
        self._write(run_id, arrays, out.state_dict, gen, extra, result)

    def _images_fused(
        self,
        pending: list[str],
        claims: RunClaims,
        result: ContinueResult,
        cfg: TrainConfig,
        base: Any,
        pool: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Continued runs as the fused engine trains runs (``mlvar.train.fused``): packs of
        runs that train on equally many rows (a set's runs all add the same number), one
        table of train + pool rows, each run indexing its own."""
        from mlvar.train import fused

        n_train = len(base.train_y)
        table = dataclasses.replace(
            base,
            train_x=torch.cat([base.train_x, pool[0]]),
            train_y=torch.cat([base.train_y, pool[1]]),
        )
        rows = {
            r: torch.cat([torch.arange(n_train), n_train + torch.from_numpy(self.positions[r])])
            for r in pending
        }
        by_size: dict[int, list[int]] = {}
        for r in pending:
            by_size.setdefault(len(rows[r]), []).append(self._index(r))
        for indices in by_size.values():
            size = fused.auto_pack_size(cfg, base, len(indices))
            for pack in claims.packs(indices, size):
                ids = [run_id_for(i) for i in pack]
                gens = [self._generators(r) for r in ids]
                stats = None
                if self.from_scratch:
                    stats = [self._scratch_stats(r, cfg, base.max_value, base.device) for r in ids]
                continuation = fused.Continuation(
                    starts=[self._image_start(r) for r in ids],
                    rows=torch.stack([rows[r] for r in ids]),
                    stats=stats,
                )
                label = f"runs {ids[0]}..{ids[-1]}"
                started_at = datetime.now(UTC).isoformat(timespec="seconds")
                t0 = time.perf_counter()
                outputs = fused.train_pack(
                    table,
                    cfg,
                    gens,
                    [self.target.run_dir(r) for r in ids],
                    lambda done, _total, label=label: self._report(done, label),
                    trace=self._image_trace(lambda pos, ids=ids: ids[pos]),
                    continuation=continuation,
                )
                wall = time.perf_counter() - t0
                timing = {
                    "engine": "fused",
                    "pack_size": len(ids),
                    "started_at": started_at,
                    "wall_time_s": wall / len(ids),
                    "pack_wall_time_s": wall,
                }
                for run_id, gen, out in zip(ids, gens, outputs, strict=True):
                    self._write_image_run(run_id, out, gen, cfg, timing, result)
                self.done_epochs += len(ids) * cfg.epochs

    def _images_single(
        self,
        pending: list[str],
        claims: RunClaims,
        result: ContinueResult,
        cfg: TrainConfig,
        base: Any,
        pool: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Continued runs one at a time in this process (each trains on its own rows)."""
        from mlvar.train import images
        from mlvar.train.mlp import _one_thread_per_kernel

        device = base.device
        for pack in claims.packs([self._index(r) for r in pending], 1):
            run_id = run_id_for(pack[0])
            add = torch.from_numpy(self.positions[run_id]).to(device)
            data = dataclasses.replace(
                base,
                train_x=torch.cat([base.train_x, pool[0][add]]),
                train_y=torch.cat([base.train_y, pool[1][add]]),
            )
            if self.from_scratch:  # as mlvar train on the enlarged set: its statistics
                mean, std = self._scratch_stats(run_id, cfg, base.max_value, device)
                data = dataclasses.replace(data, mean=mean, std=std)
            gen = self._generators(run_id)
            started_at = datetime.now(UTC).isoformat(timespec="seconds")
            t0 = time.perf_counter()
            with _one_thread_per_kernel(device):
                out = images.train_run(
                    data,
                    cfg,
                    gen,
                    self.target.run_dir(run_id),
                    lambda done, _total, run_id=run_id: self._report(done, run_id),
                    trace=self._image_trace(lambda _pos, run_id=run_id: run_id),
                    start=self._image_start(run_id),
                )
            wall = time.perf_counter() - t0
            timing = {
                "engine": "single",
                "pack_size": 1,
                "started_at": started_at,
                "wall_time_s": wall,
                "pack_wall_time_s": wall,
            }
            self._write_image_run(run_id, out, gen, cfg, timing, result)
            self.done_epochs += cfg.epochs


def _code_and_packages() -> tuple[str, dict[str, str]]:
    from mlvar.train.service import _code_version, _packages

    return _code_version(), _packages()
