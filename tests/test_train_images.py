"""Image models: every model trains on a tiny CIFAR-format scenario and writes a valid run;
same seed, same run; data-order seeds share the initial weights; kill and resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlvar.config import (
    MODELS,
    Config,
    PathsConfig,
    TrainConfig,
    check_model_input,
    switch_model,
    validate_train,
)
from mlvar.data.scenario import SplitData, open_scenario, write_scenario
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore
from mlvar.train import images
from mlvar.train.models import IMAGE_MODELS
from mlvar.train.seeding import RunGenerators
from mlvar.train.service import train

N_CLASSES = 10


def _split(rng: np.random.Generator, n: int, offset: int) -> SplitData:
    y = np.arange(n, dtype=np.int64) % N_CLASSES
    # Class-dependent brightness so that a model can learn something in one epoch.
    x = rng.integers(0, 64, size=(n, 32, 32, 3)) + (y * 18)[:, None, None, None]
    return SplitData(
        x=x.astype(np.uint8),
        y=y,
        id=np.arange(offset, offset + n, dtype=np.int64),
        affected=(y == 0),
        group=np.full(n, -1, dtype=np.int64),
    )


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10-format scenario: 40 train, 20 val, 20 test and 20 test_gray images."""
    root = tmp_path_factory.mktemp("tinycifar")
    rng = np.random.default_rng(0)
    splits = {
        "train": _split(rng, 40, 0),
        "val": _split(rng, 20, 1000),
        "test": _split(rng, 20, 2000),
        "test_gray": _split(rng, 20, 2000),
    }
    manifest = {
        "dataset": "cifar10",
        "mode": "augmentation",
        "params": {"cls": 0, "ratio": 0.5},
        "class_names": [f"c{i}" for i in range(N_CLASSES)],
        "input": {"kind": "image", "shape": [32, 32, 3], "max_value": 255},
    }
    write_scenario(root / "data", "cifar10-tiny", manifest, splits)
    return root


def _config(root: Path, runs: Path) -> Config:
    return Config(paths=PathsConfig(root / "data", runs, root / "reports"))


def _fast(model: str, **extra) -> dict:
    over = {"model": model, "epochs": 2, "batch_size": 16, "checkpoint_every": 1}
    if model == "airbench":
        over["lr"] = 0.2  # the full-size recipe's lr is tuned for batch 1024
    return {**over, **extra}


def _weights(store: ExperimentStore, run_id: str) -> dict[str, torch.Tensor]:
    return torch.load(store.run_dir(run_id) / images.WEIGHTS_FILE, weights_only=True)


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_every_model_writes_a_valid_run(cifar_root: Path, tmp_path: Path, model: str) -> None:
    cfg = _config(cifar_root, tmp_path / "runs")
    over = _fast(model, record_dynamics=True)
    if model == "resnet18":
        over["epochs"] = 1
    result = train(cfg, "cifar10", runs=1, overrides=over)
    assert result.trained == ["run-0000"]
    store = ExperimentStore.open(tmp_path / "runs", result.experiment)
    assert store.meta["model"] == model and store.meta["train"]["recipe"] == MODELS[model].recipe
    (run,) = store.runs(verify=True)
    assert set(run.meta["arrays"]) == {
        "train.logits.npy",
        "val.logits.npy",
        "test.logits.npy",
        "test_gray.logits.npy",
        "train.dynamics.npy",
        "model.pt",
    }
    for split in store.splits:
        logits = run.load_logits(split)
        assert logits.shape == (store.n_samples(split), N_CLASSES)
        assert np.isfinite(logits).all()
    assert run.load_dynamics().shape == (over["epochs"], 40, N_CLASSES)
    assert not (run.path / images.CHECKPOINT_FILE).exists()
    state = _weights(store, "run-0000")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert run.meta["source_seeds"]["aug"] == 0 and run.meta["vary"] == ["init", "order", "aug"]


def test_same_seed_same_run(cifar_root: Path, tmp_path: Path) -> None:
    cfg = _config(cifar_root, tmp_path / "a")
    over = _fast("cnn")
    first = train(cfg, "cifar10", runs=2, overrides=over)
    cfg.paths.runs_root = tmp_path / "b"
    second = train(cfg, "cifar10", runs=2, overrides=over)
    a = ExperimentStore.open(tmp_path / "a", first.experiment)
    b = ExperimentStore.open(tmp_path / "b", second.experiment)
    for ra, rb in zip(a.runs(), b.runs(), strict=True):
        for split in a.splits:
            assert np.array_equal(ra.load_logits(split), rb.load_logits(split))
        assert ra.meta["arrays"]["model.pt"]["sha256"] == rb.meta["arrays"]["model.pt"]["sha256"]
    # Different seeds give different runs.
    r0, r1 = a.runs()
    assert not np.array_equal(r0.load_logits("test"), r1.load_logits("test"))


def _record(cifar_root: Path, vary: list[str], index: int) -> dict:
    scenario = open_scenario(cifar_root / "data", "cifar10-tiny")
    splits = {s: scenario.load(s) for s in ("train", "test")}
    manifest = json.loads((cifar_root / "data/cifar10-tiny/manifest.json").read_text())
    data = images.ImageData.build(splits, manifest, torch.device("cpu"))
    cfg = TrainConfig()
    switch_model(cfg, "cnn")
    cfg.epochs, cfg.batch_size, cfg.vary = 1, 16, vary
    validate_train(cfg)
    seen: dict = {"batch": []}

    def trace(kind: str, value) -> None:
        if kind == "init":
            seen["init"] = value
        else:
            seen["batch"].append(value.clone())

    gen = RunGenerators(0, index, cfg.vary)
    draws = images.Augmenter(data.train_x, 1, False).draw(RunGenerators(0, index, cfg.vary).aug, 40)
    images.train_run(data, cfg, gen, trace=trace)
    seen["aug"] = draws
    return seen


def test_vary_order_shares_init_and_differs_in_batches(cifar_root: Path) -> None:
    a, b = _record(cifar_root, ["order"], 0), _record(cifar_root, ["order"], 1)
    assert all(torch.equal(a["init"][k], b["init"][k]) for k in a["init"])
    assert not all(torch.equal(x, y) for x, y in zip(a["batch"], b["batch"], strict=True))
    assert torch.equal(a["aug"], b["aug"])
    c, d = _record(cifar_root, ["init"], 0), _record(cifar_root, ["init"], 1)
    assert not all(torch.equal(c["init"][k], d["init"][k]) for k in c["init"])
    assert all(torch.equal(x, y) for x, y in zip(c["batch"], d["batch"], strict=True))
    e, f = _record(cifar_root, ["aug"], 0), _record(cifar_root, ["aug"], 1)
    assert all(torch.equal(e["init"][k], f["init"][k]) for k in e["init"])
    assert all(torch.equal(x, y) for x, y in zip(e["batch"], f["batch"], strict=True))
    assert not torch.equal(e["aug"], f["aug"])


class _Killed(Exception):
    pass


def test_kill_and_resume_gives_the_uninterrupted_weights(cifar_root: Path, tmp_path: Path) -> None:
    over = _fast("airbench", epochs=3, record_dynamics=True)
    cfg = _config(cifar_root, tmp_path / "whole")
    whole = train(cfg, "cifar10", runs=1, overrides=over)
    cfg.paths.runs_root = tmp_path / "killed"

    def kill_after_two(done: int, _total: int, _msg: str) -> None:
        if done == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train(cfg, "cifar10", runs=1, overrides=over, progress=kill_after_two)
    run_dir = tmp_path / "killed" / whole.experiment / "runs" / "run-0000"
    assert (run_dir / images.CHECKPOINT_FILE).is_file() and not (run_dir / "run.json").exists()
    resumed = train(cfg, "cifar10", runs=1, overrides=over)
    assert resumed.trained == ["run-0000"] and resumed.cleaned == []
    a = ExperimentStore.open(tmp_path / "whole", whole.experiment)
    b = ExperimentStore.open(tmp_path / "killed", whole.experiment)
    (ra,), (rb,) = a.runs(verify=True), b.runs(verify=True)
    assert rb.meta["resumed_from_epoch"] == 2
    wa, wb = _weights(a, "run-0000"), _weights(b, "run-0000")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for split in a.splits:
        assert np.array_equal(ra.load_logits(split), rb.load_logits(split))
    assert np.array_equal(ra.load_dynamics(), rb.load_dynamics())
    # A finished run is skipped.
    assert train(cfg, "cifar10", runs=1, overrides=over).skipped == ["run-0000"]


def test_model_checks(cifar_root: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="cnn", vary=["init", "dropout"])
    with pytest.raises(MlvarError, match="does not draw"):
        validate_train(cfg)
    with pytest.raises(MlvarError, match="not a known model"):
        validate_train(TrainConfig(model="resnet"))
    with pytest.raises(MlvarError, match="'aug'.*does not draw"):
        validate_train(TrainConfig(vary=["aug"]))
    with pytest.raises(MlvarError, match="needs image inputs"):
        check_model_input(TrainConfig(model="airbench", vary=["init"]), "tabular")
    check_model_input(TrainConfig(), "image")  # the MLP reads flattened images
    # --model brings the model's recipe unless a field is given explicitly.
    cfg = TrainConfig()
    switch_model(cfg, "resnet18", keep={"epochs"})
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.epochs) == (0.1, 128, 5e-4, 10)
    assert cfg.vary == ["init", "order", "aug"]


# ---------------------------------------------------------------- worker processes


def _trained(root: Path, cifar_root: Path, workers: int, progress=None) -> ExperimentStore:
    cfg = _config(cifar_root, root)
    result = train(
        cfg,
        "cifar10",
        runs=3,
        overrides=_fast("cnn", workers=workers, engine="single"),
        progress=progress,
    )
    assert result.trained == ["run-0000", "run-0001", "run-0002"]
    return ExperimentStore.open(root, result.experiment)


def test_worker_processes_give_the_in_process_runs_bit_for_bit(
    cifar_root: Path, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []
    runs_dir = tmp_path / "two" / "cifar10-tiny-cnn" / "runs"

    def hold(done: int, total: int, _run: str) -> None:
        # This process takes run 0 and holds it until the worker process has trained
        # into another run (a checkpoint), so that both processes train some runs.
        seen.append((done, total))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            (runs_dir / r / f).exists()
            for r in ("run-0001", "run-0002")
            for f in (images.CHECKPOINT_FILE, "run.json")
        ):
            time.sleep(0.05)

    parallel = _trained(tmp_path / "two", cifar_root, 2, hold)
    alone = _trained(tmp_path / "one", cifar_root, 1)
    assert parallel.meta["train"] == alone.meta["train"]  # workers is not in the identity
    for ra, rb in zip(parallel.runs(verify=True), alone.runs(verify=True), strict=True):
        assert ra.run_id == rb.run_id
        for split in parallel.splits:
            assert np.array_equal(ra.load_logits(split), rb.load_logits(split))
        assert ra.meta["arrays"]["model.pt"]["sha256"] == rb.meta["arrays"]["model.pt"]["sha256"]
        wa, wb = _weights(parallel, ra.run_id), _weights(alone, rb.run_id)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert ra.meta["config"]["workers"] == 2 and rb.meta["config"]["workers"] == 1
    # Progress is relayed from the workers in run-epochs, up to the total.
    total = 3 * 2
    assert seen and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == total


def test_a_worker_error_is_raised_in_the_parent(cifar_root: Path, tmp_path: Path) -> None:
    cfg = _config(cifar_root, tmp_path)
    result = train(cfg, "cifar10", runs=1, overrides=_fast("cnn", workers=1))
    store = ExperimentStore.open(tmp_path, result.experiment)
    scenario = open_scenario(cifar_root / "data", "cifar10-tiny")
    splits = {s: scenario.load(s) for s in scenario.splits}
    tcfg = TrainConfig()
    switch_model(tcfg, "cnn")
    tcfg.epochs, tcfg.batch_size, tcfg.checkpoint_every, tcfg.workers = 2, 16, 1, 2
    # This process takes run 1 and holds it until the worker process, which takes run 0,
    # has checkpointed it; run 0 is complete already, so the worker fails to write it.
    checkpoint = store.run_dir("run-0000") / images.CHECKPOINT_FILE

    def hold(_done: int, _total: int, _run: str) -> None:
        deadline = time.monotonic() + 60
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    with pytest.raises(FileExistsError, match="run-0000 .* already complete") as info:
        list(images.train_runs(store, scenario, splits, tcfg, [1, 0], {}, hold))
    assert any("worker process while training run-0000" in n for n in info.value.__notes__)


def test_worker_errors_keep_their_type_and_hint() -> None:
    try:
        raise MlvarError("bad thing", "do this")
    except MlvarError as exc:
        payload = images._error_payload(exc)
    err = images._worker_error("run-0003", *payload)
    assert isinstance(err, MlvarError) and (err.message, err.hint) == ("bad thing", "do this")
    assert "run-0003" in err.__notes__[0]

    class Local(Exception):  # not picklable: becomes a RuntimeError with the text
        pass

    try:
        raise Local("oops")
    except Local as exc:
        payload = images._error_payload(exc)
    err = images._worker_error(None, *payload)
    assert isinstance(err, RuntimeError) and "Local: oops" in str(err)


def test_worker_count() -> None:
    cfg = TrainConfig(model="cnn", vary=["init"])
    assert images.resolve_workers(cfg, 1) == 1
    assert images.resolve_workers(cfg, 100) == min(100, torch.get_num_threads())
    cfg.workers = 3
    assert images.resolve_workers(cfg, 2) == 2 and images.resolve_workers(cfg, 5) == 3
    cfg.device = "cuda"
    assert images.resolve_workers(cfg, 5) == 1
    with pytest.raises(MlvarError, match="workers must be >= 0"):
        validate_train(TrainConfig(workers=-1))
