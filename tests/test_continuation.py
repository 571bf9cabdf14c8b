"""Continuation (``mlvar.train.continuation``): a continued run starts from exactly its saved
weights, adds pool rows to its training set, is deterministic, independent of its pack,
resumes after a kill, and lands in the retraining set's store; from scratch it is the
training of the enlarged set."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlvar.config import Config, PathsConfig, TrainConfig
from mlvar.data.registry import prepare
from mlvar.data.scenario import SplitData
from mlvar.errors import MlvarError
from mlvar.recipes import STUDY_MODELS
from mlvar.store import ExperimentStore
from mlvar.train import images
from mlvar.train.continuation import (
    ContinueGenerators,
    added_sha256,
    continue_runs,
    experiment_plan,
    plan_continuation,
)
from mlvar.train.mlp import ENGINES, TrainData, _one_thread_per_kernel
from mlvar.train.models import build_model
from mlvar.train.seeding import RunGenerators, make_generator
from mlvar.train.service import features, train

RUNS = ["run-0000", "run-0001", "run-0002"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Digits with digit 3 held out; MLP experiments (batched and loop engines, 3 runs of
    2 epochs) and a CNN experiment (1 run of 2 epochs, a checkpoint every epoch)."""
    root = tmp_path_factory.mktemp("cont")
    scenario = prepare(root / "data", "digits", mode="holdout", subclass=3)
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    mlp = {"epochs": 2, "hidden": 64}
    made = {
        "batched": train(cfg, "digits", runs=3, name="mlp-b", overrides=mlp),
        "loop": train(cfg, "digits", runs=3, name="mlp-l", overrides={**mlp, "engine": "loop"}),
        "cnn": train(
            cfg,
            "digits",
            runs=1,
            name="cnn",
            overrides={
                "model": "cnn",
                "epochs": 2,
                "batch_size": 64,
                "checkpoint_every": 1,
                "workers": 1,
            },
        ),
    }
    stores = {k: ExperimentStore.open(root / "runs", r.experiment) for k, r in made.items()}
    return {"root": root, "scenario": scenario, "stores": stores, "pool": scenario.load("val")}


def _continue(trained: dict, kind: str, target: Path, added: dict, **kw):
    store = trained["stores"][kind]
    run_ids = kw.pop("run_ids", sorted(added))
    return continue_runs(
        store,
        target,
        kw.pop("set_meta", {"strategy": "test", "budget": 0.0}),
        trained["scenario"],
        trained["pool"],
        added,
        run_ids,
        **kw,
    )


def _weights(store: ExperimentStore, run_id: str) -> dict[str, torch.Tensor]:
    return torch.load(store.run_dir(run_id) / "model.pt", weights_only=True)


class _Log(list):
    """A trace callback keeping (event, run_id, payload)."""

    def append_3(self, event: str, run: str, payload) -> None:
        self.append((event, run, payload))


def _starts(trace_log: list) -> dict[str, dict[str, torch.Tensor]]:
    return {run: payload for event, run, payload in trace_log if event == "start"}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _logits(store: ExperimentStore, run_id: str) -> dict[str, np.ndarray]:
    (run,) = [r for r in store.runs() if r.run_id == run_id]
    return {s: run.load_logits(s, mmap=False) for s in store.splits}


def _none(ids=RUNS) -> dict[str, np.ndarray]:
    return {r: np.zeros(0, dtype=np.int64) for r in ids}


def _some(n_pool: int, k: int, ids=RUNS) -> dict[str, np.ndarray]:
    """k pool rows per run, a different choice for each (equal counts: one pack)."""
    return {r: np.random.default_rng(i).choice(n_pool, k, replace=False) for i, r in enumerate(ids)}


@pytest.mark.parametrize("engine", ["batched", "loop"])
def test_mlp_starts_from_the_saved_weights(trained: dict, tmp_path: Path, engine: str) -> None:
    log = _Log()
    result = _continue(trained, engine, tmp_path / "b0", _none(), trace=log.append_3)
    assert result.trained == RUNS and result.epochs == 1  # a third of 2 epochs, rounded
    starts = _starts(log)
    assert sorted(starts) == RUNS
    for run_id in RUNS:
        assert _same_state(starts[run_id], _weights(trained["stores"][engine], run_id))
    # Zero epochs evaluate the loaded weights: the source run's logits, bit for bit.
    _continue(trained, engine, tmp_path / "e0", _none(), epochs=0)
    e0 = ExperimentStore.open(tmp_path, "e0")
    for run_id in RUNS:
        for split, logits in _logits(trained["stores"][engine], run_id).items():
            assert np.array_equal(logits, _logits(e0, run_id)[split])


def test_cnn_starts_from_the_saved_weights_and_resumes_identically(
    trained: dict, tmp_path: Path
) -> None:
    store = trained["stores"]["cnn"]
    added = _some(len(trained["pool"]), 20, ["run-0000"])
    log = _Log()
    whole = _continue(trained, "cnn", tmp_path / "whole", added, trace=log.append_3, epochs=2)
    assert _same_state(_starts(log)["run-0000"], _weights(store, "run-0000"))
    _continue(trained, "cnn", tmp_path / "e0", added, epochs=0)
    e0 = ExperimentStore.open(tmp_path, "e0")
    for split, logits in _logits(store, "run-0000").items():
        assert np.array_equal(logits, _logits(e0, "run-0000")[split])
    # The train split + 20 rows in batches of 64, in both epochs: all of them once each.
    n_train = len(trained["scenario"].load("train"))
    batches = [p for e, _, p in log if e == "batch"]
    assert len(batches) == 2 * math.ceil((n_train + 20) / 64)
    first = torch.cat(batches[: len(batches) // 2])
    assert torch.equal(first.sort().values, torch.arange(n_train + 20))

    class Killed(Exception):
        pass

    def kill(done: int, _total: int, _msg: str) -> None:
        if done == 1:
            raise Killed

    with pytest.raises(Killed):
        _continue(trained, "cnn", tmp_path / "killed", added, epochs=2, progress=kill)
    run_dir = tmp_path / "killed" / "runs" / "run-0000"
    assert (run_dir / images.CHECKPOINT_FILE).is_file() and not (run_dir / "run.json").exists()
    resumed = _continue(trained, "cnn", tmp_path / "killed", added, epochs=2)
    assert resumed.trained == ["run-0000"]
    a = ExperimentStore.open(tmp_path, "whole")
    b = ExperimentStore.open(tmp_path, "killed")
    (rb,) = b.runs(verify=True)
    assert rb.meta["resumed_from_epoch"] == 1
    # The source trained with the fused engine, so it continues (tests/test_fused.py).
    assert whole.engine == "fused" and rb.meta["engine"] == "fused" and rb.meta["pack_size"] == 1
    assert _same_state(_weights(a, "run-0000"), _weights(b, "run-0000"))
    for split, logits in _logits(a, "run-0000").items():
        assert np.array_equal(logits, _logits(b, "run-0000")[split])
    assert _continue(trained, "cnn", tmp_path / "killed", added, epochs=2).skipped == ["run-0000"]
    assert whole.trained == ["run-0000"]


def test_mlp_added_rows_matter_deterministic_and_pack_independent(
    trained: dict, tmp_path: Path
) -> None:
    n_pool = len(trained["pool"])
    some = _some(n_pool, 30)
    _continue(trained, "batched", tmp_path / "b0", _none())
    _continue(trained, "batched", tmp_path / "k", some)
    again = tmp_path / "again"
    _continue(trained, "batched", again, some)
    b0, k = ExperimentStore.open(tmp_path, "b0"), ExperimentStore.open(tmp_path, "k")
    same = ExperimentStore.open(tmp_path, "again")
    for run_id in RUNS:
        assert not np.array_equal(_logits(b0, run_id)["test"], _logits(k, run_id)["test"])
        for split, logits in _logits(k, run_id).items():
            assert np.array_equal(logits, _logits(same, run_id)[split])
    # A pack of one gives a run what the pack of three gave it.
    _continue(trained, "batched", tmp_path / "alone", some, run_ids=["run-0001"])
    alone = ExperimentStore.open(tmp_path, "alone")
    for run in alone.runs():
        assert run.meta["pack_size"] == 1
        for split, logits in _logits(alone, run.run_id).items():
            assert np.array_equal(logits, _logits(k, run.run_id)[split])
    # The loop engine continues the same way (the engines agree to float rounding).
    _continue(trained, "loop", tmp_path / "loop", some)
    loop = ExperimentStore.open(tmp_path, "loop")
    for run_id in RUNS:
        np.testing.assert_allclose(
            _logits(loop, run_id)["test"], _logits(k, run_id)["test"], atol=1e-5, rtol=0
        )


def test_mlp_continuation_is_training_from_the_weights_on_the_enlarged_set(
    trained: dict, tmp_path: Path
) -> None:
    """Recomputed here: the engine from the saved weights on train + pool rows, with the
    continuation's generators (the run's seeds and the "continue" tag)."""
    store, scenario, pool = trained["stores"]["loop"], trained["scenario"], trained["pool"]
    some = _some(len(pool), 25)
    result = _continue(trained, "loop", tmp_path / "k", some, epochs=2)
    assert result.epochs == 2
    target = ExperimentStore.open(tmp_path, "k")
    train_split = scenario.load("train")
    for run_id in RUNS:
        run = next(r for r in store.runs() if r.run_id == run_id)
        cfg = TrainConfig(**{k: v for k, v in run.meta["config"].items()})
        cfg.epochs = 2
        rows = np.concatenate(
            [np.arange(len(train_split)), len(train_split) + np.sort(some[run_id])]
        )
        x = np.concatenate(
            [features(train_split, scenario.manifest), features(pool, scenario.manifest)]
        )[rows]
        y = np.concatenate([train_split.y, pool.y])[rows]
        data = TrainData(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), 5)
        gen = ContinueGenerators(run.meta["source_seeds"])
        test = torch.from_numpy(features(scenario.load("test"), scenario.manifest))
        (out,) = ENGINES["loop"](
            data, cfg, [gen], {"test": test}, starts=[_weights(store, run_id)], weights=True
        )
        assert np.array_equal(out["test"].numpy(), _logits(target, run_id)["test"])
        # The continuation's streams are not the original training's.
        original = make_generator(run.meta["source_seeds"]["order"], "order")
        fresh = ContinueGenerators(run.meta["source_seeds"]).order
        assert not torch.equal(
            torch.randperm(50, generator=original), torch.randperm(50, generator=fresh)
        )


def test_mlp_from_scratch_is_normal_training_on_the_enlarged_set(
    trained: dict, tmp_path: Path
) -> None:
    store, scenario, pool = trained["stores"]["batched"], trained["scenario"], trained["pool"]
    # Nothing added: exactly the source runs (same generators, same data, same epochs).
    result = _continue(trained, "batched", tmp_path / "s0", _none(), from_scratch=True)
    assert result.epochs == 2
    s0 = ExperimentStore.open(tmp_path, "s0")
    for run_id in RUNS:
        for split, logits in _logits(store, run_id).items():
            assert np.array_equal(logits, _logits(s0, run_id)[split])
        assert _weights(s0, run_id).keys() == _weights(store, run_id).keys()
    # Rows added: the engine's training from the run's seed on the enlarged data.
    some = _some(len(pool), 40)
    _continue(trained, "batched", tmp_path / "sk", some, from_scratch=True)
    sk = ExperimentStore.open(tmp_path, "sk")
    train_split = scenario.load("train")
    cfg = TrainConfig(**next(iter(store.runs())).meta["config"])
    test = torch.from_numpy(features(scenario.load("test"), scenario.manifest))
    for i, run_id in enumerate(RUNS):
        keep = np.sort(some[run_id])
        x = np.concatenate(
            [features(train_split, scenario.manifest), features(pool, scenario.manifest)[keep]]
        )
        y = np.concatenate([train_split.y, pool.y[keep]])
        data = TrainData(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), 5)
        (out,) = ENGINES["batched"](data, cfg, [RunGenerators(0, i, cfg.vary)], {"test": test})
        assert np.array_equal(out["test"].numpy(), _logits(sk, run_id)["test"])
        meta = next(r for r in sk.runs() if r.run_id == run_id).meta["continued_from"]
        assert meta["from_scratch"] and meta["model_sha256"] is None and meta["start_epoch"] == 0


def test_the_set_store_and_its_records(trained: dict, tmp_path: Path, tree_listing) -> None:
    source, pool = trained["stores"]["batched"], trained["pool"]
    some = _some(len(pool), 10, RUNS[:2])
    set_meta = {"source": source.name, "pool": "val", "strategy": "random", "budget": 0.1}
    target = tmp_path / "retrain" / "random-b0.1"
    result = _continue(trained, "batched", target, some, set_meta=set_meta)
    store = ExperimentStore.open(target.parent, target.name)
    assert store.meta["retrain"] == set_meta and store.splits == source.splits
    assert experiment_plan(source).record().items() <= store.meta["continuation"].items()
    assert store.meta["train"] == source.meta["train"]
    assert store.meta["continuation"]["schedule"] == "constant"
    assert store.meta["continuation"]["optimizer"] == "fresh"
    for split in source.splits:
        assert store.samples(split).equals(source.samples(split))
    for run in store.runs(verify=True):
        assert set(run.meta["arrays"]) == {f"{s}.logits.npy" for s in source.splits} | {"model.pt"}
        src = next(r for r in source.runs() if r.run_id == run.run_id)
        cont = run.meta["continued_from"]
        assert cont["run_id"] == run.run_id and cont["experiment"] == source.name
        assert cont["model_sha256"] == src.meta["arrays"]["model.pt"]["sha256"]
        assert (cont["start_epoch"], cont["epochs"], cont["n_added"]) == (2, 1, 10)
        assert cont["added_sha256"] == added_sha256(np.sort(some[run.run_id]))
        assert run.meta["seed"] == src.meta["seed"] and run.load_logits("train").shape[0] == len(
            trained["scenario"].load("train")
        )
        acc = (run.load_logits("test").argmax(1) == store.samples("test")["label"]).mean()
        assert run.meta["metrics"]["test_accuracy"] == pytest.approx(acc)
    assert result.trained == RUNS[:2]
    # Run again: finished runs are skipped, new ones added.
    more = {**some, "run-0002": np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])}
    again = _continue(trained, "batched", target, more, set_meta=set_meta)
    assert again.skipped == RUNS[:2] and again.trained == ["run-0002"]
    # Refused, nothing written: another identity, other rows for a finished run, bad input.
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=r"another setup \(retrain.budget: 0.1 -> 0.2\)"):
        _continue(trained, "batched", target, more, set_meta={**set_meta, "budget": 0.2})
    with pytest.raises(MlvarError, match="other pool rows"):
        _continue(
            trained, "batched", target, {**more, "run-0000": np.arange(10)}, set_meta=set_meta
        )
    fresh = tmp_path / "retrain" / "bad"
    bad = [
        ({"run-0009": []}, "no finished run run-0009"),
        ({"run-0000": [0, len(pool)]}, "outside the pool's"),
        ({"run-0000": [3, 3]}, "twice"),
        ({"run-0000": [0.5]}, "not a list of integers"),
    ]
    for added, message in bad:
        with pytest.raises(MlvarError, match=message):
            _continue(trained, "batched", fresh, added)
    with pytest.raises(MlvarError, match="must be an integer >= 0"):
        _continue(trained, "batched", fresh, {"run-0000": []}, epochs=-1)
    with pytest.raises(MlvarError, match="no pool positions given for run run-0001"):
        _continue(trained, "batched", fresh, {"run-0000": []}, run_ids=RUNS[:2])
    assert tree_listing(tmp_path) == before


def test_the_rule_of_each_model() -> None:
    cfg = TrainConfig()  # the MLP: Adam at its lr, a third of the epochs
    cfg.epochs = 30
    assert plan_continuation(cfg, None, False).record() == {
        "epochs": 10,
        "schedule": "constant",
        "lr": cfg.lr,
        "start_epoch": 30,
        "schedule_offset": 0,
    }
    cnn = TrainConfig(model="cnn", epochs=10, lr=0.1)
    plan = plan_continuation(cnn, None, False)
    assert (plan.epochs, plan.schedule, plan.lr, plan.schedule_offset) == (
        3,
        "restart",
        0.1 * 0.1,
        0,
    )
    assert plan_continuation(cnn, 7, False).epochs == 7
    assert plan_continuation(cnn, None, True).record() == {
        "epochs": 10,
        "schedule": "scratch",
        "lr": 0.1,
        "start_epoch": 0,
        "schedule_offset": 0,
    }
    study = TrainConfig(model="resnet18", epochs=150, lr=0.1)
    study.protocol = "study"
    plan = plan_continuation(study, None, False)  # the study: epochs 150 to 200
    assert (plan.epochs, plan.schedule, plan.start_epoch, plan.schedule_offset) == (
        50,
        "tail",
        150,
        150,
    )


def test_resnet18_continues_on_the_tail_of_its_cosine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's ResNet-18 continued at epoch 150 takes the lr of epochs 150, 151 of its
    T_max=200 cosine (4 tiny images: one step an epoch)."""
    rng = np.random.default_rng(0)
    split = SplitData(
        x=rng.integers(0, 255, (4, 8, 8, 3)).astype(np.uint8),
        y=np.arange(4) % 2,
        id=np.arange(4),
        affected=np.zeros(4, bool),
        group=np.full(4, -1),
    )
    manifest = {"class_names": ["a", "b"], "input": {"kind": "image", "max_value": 255}}
    cfg = TrainConfig(model="resnet18", epochs=2, lr=0.1, batch_size=4, vary=["init"])
    cfg.protocol = "study"
    recipe = STUDY_MODELS["resnet18"].recipe
    data = images.ImageData.build(
        {"train": split}, manifest, torch.device("cpu"), recipe["normalise"]
    )
    model = build_model("resnet18", 3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list = []
    lrs: list[float] = []
    step = images.SGD.step
    monkeypatch.setattr(images.SGD, "step", lambda self, lr: (lrs.append(lr), step(self, lr)))
    with _one_thread_per_kernel(torch.device("cpu")):  # as continue_runs trains
        images.train_run(
            data,
            cfg,
            RunGenerators(0, 0, ["init"]),
            trace=lambda kind, value: seen.append((kind, value)),
            start=images.Start(start, schedule_offset=150),
        )
    assert _same_state(seen[0][1], start)
    tail = images.epoch_lrs(recipe, 0.1, 152)[150:]
    assert lrs == tail
    assert abs(tail[0] - 0.1 * (1 + math.cos(math.pi * 150 / 200)) / 2) < 1e-12


def test_a_scenario_with_another_manifest_is_refused(trained: dict, tmp_path: Path) -> None:
    scenario = trained["scenario"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({**scenario.manifest, "x": 1}))
    other = dataclasses.replace(scenario, path=tmp_path / "other")
    with pytest.raises(MlvarError, match="is not the one experiment"):
        continue_runs(
            trained["stores"]["batched"],
            tmp_path / "x",
            {},
            other,
            trained["pool"],
            _none(RUNS[:1]),
            RUNS[:1],
        )
    assert not (tmp_path / "x").exists()
