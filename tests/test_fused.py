"""The fused engine (``mlvar.train.fused``): each seed of a pack starts from the single
engine's weights, sees its batches and augmentations, and ends at its logits to float
tolerance, whatever else is in its pack; checkpoints resume bit for bit; kill and resume
through ``mlvar train`` ends with the uninterrupted runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mlvar.config import TrainConfig, switch_model, validate_train
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore
from mlvar.train import fused, images, models
from mlvar.train.seeding import RunGenerators
from mlvar.train.service import train
from tiny_images import tiny_config, tiny_split, write_tiny_scenario

# Grouped convolutions, a batch norm over the pack's channels and the batched head sum in
# other orders than the single engine's kernels: single steps differ by float32 rounding
# (~1e-7 relative), which a few epochs of SGD on these small, well-conditioned problems
# amplify to ~1e-7 in the logits (measured: at most 6e-8 on logits of size 0.05-0.1).
# The tolerance leaves a factor of ~100; a wrong batch, augmentation, lr or weight decay
# of any seed moves its logits by 1e-3 or more.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def data() -> images.ImageData:
    """16x16 greyscale images of 3 classes: 60 train, 30 test (tests/tiny_images.py)."""
    rng = np.random.default_rng(0)
    splits = {"train": tiny_split(rng, 60, 0), "test": tiny_split(rng, 30, 1000)}
    manifest = {"class_names": ["a", "b", "c"], "input": {"max_value": 16}}
    return images._build_data(splits, manifest, torch.device("cpu"))


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResNet-18 at width 4 and airbench at widths (8, 16, 16): every layer and block of
    the real networks, a sixteenth of the channels (seconds, not minutes)."""
    real = models.build_model

    def build(name: str, channels: int, n_classes: int) -> torch.nn.Module:
        if name == "resnet18":
            return models.ResNet18(channels, n_classes, width=4)
        if name == "airbench":
            return models.AirbenchNet(channels, n_classes, widths=(8, 16, 16))
        return real(name, channels, n_classes)

    monkeypatch.setattr(models, "build_model", build)  # make_network and fused look it up there


def _cfg(model: str, epochs: int = 2, **extra) -> TrainConfig:
    cfg = TrainConfig()
    switch_model(cfg, model)
    cfg.epochs, cfg.batch_size = epochs, 16
    cfg.lr = {"cnn": 0.05, "airbench": 0.2, "resnet18": 0.02}[model]
    for key, value in extra.items():
        setattr(cfg, key, value)
    return validate_train(cfg)


def _gens(cfg: TrainConfig, indices) -> list[RunGenerators]:
    return [RunGenerators(cfg.base_seed, i, cfg.vary) for i in indices]


def _single(data, cfg, index: int, start=None) -> tuple[images.RunOutput, dict]:
    seen: dict = {"batch": []}

    def trace(kind: str, value) -> None:
        if kind == "init":
            seen["init"] = value
        else:
            seen["batch"].append(value.clone())

    with images._one_thread_per_kernel(data.device):
        out = images.train_run(data, cfg, _gens(cfg, [index])[0], trace=trace, start=start)
    return out, seen


def _pack(data, cfg, indices, **kw) -> tuple[list[images.RunOutput], list[dict]]:
    seen = [{"batch": [], "aug": []} for _ in indices]

    def trace(kind: str, pos: int, value) -> None:
        if kind == "init":
            seen[pos]["init"] = value
        else:
            seen[pos][kind].append(value.clone())

    return fused.train_pack(data, cfg, _gens(cfg, indices), trace=trace, **kw), seen


def _close(a: images.RunOutput, b: images.RunOutput) -> None:
    for split in a.logits:
        torch.testing.assert_close(b.logits[split], a.logits[split], rtol=RTOL, atol=ATOL)
    assert a.state_dict.keys() == b.state_dict.keys()
    for k, v in a.state_dict.items():
        assert b.state_dict[k].shape == v.shape, k
        torch.testing.assert_close(b.state_dict[k], v, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("model", ["cnn", "airbench", "resnet18"])
def test_each_seed_is_its_single_run(data, model: str, narrow: None) -> None:
    """Same initial weights (bit for bit), same batches, same augmentation draws (from
    each seed's own generators), logits and weights to float tolerance after 2 epochs."""
    cfg = _cfg(model)
    outs, seen = _pack(data, cfg, [0, 1])
    for pos, index in enumerate([0, 1]):
        single, alone = _single(data, cfg, index)
        assert all(torch.equal(seen[pos]["init"][k], v) for k, v in alone["init"].items())
        assert len(seen[pos]["batch"]) == len(alone["batch"]) > 0
        assert all(
            torch.equal(a, b) for a, b in zip(seen[pos]["batch"], alone["batch"], strict=True)
        )
        _close(single, outs[pos])
        # The augmentation draws of an independent Augmenter on the seed's aug generator.
        gen = _gens(cfg, [index])[0]
        recipe = images.recipe_of(cfg)
        aug = images.Augmenter(data.train_x, int(recipe["translate"]), recipe["flip"], gen=gen.aug)
        n = len(data.train_y)
        flips = torch.zeros(len(seen[pos]["aug"]), n, dtype=torch.int64)
        for epoch, draws in enumerate(seen[pos]["aug"]):
            order = torch.randperm(n, generator=gen.order)  # the epoch's, as training draws it
            assert torch.equal(draws, aug.draw(gen.aug, n, epoch, order))
            flips[epoch, order] = draws[:, 2]  # by sample
        if recipe["flip"] == "alternating":  # every image flipped in every other epoch
            assert torch.equal(flips[1], 1 - flips[0]) and 0 < flips[0].sum() < n
    # The seeds differ from each other (the test would pass trivially otherwise).
    assert not torch.allclose(outs[0].logits["test"], outs[1].logits["test"], atol=1e-3)


def test_a_seed_does_not_depend_on_its_pack(data) -> None:
    """Bit for bit on the CPU: every seed computes with the grouped kernels (a pack of one
    trains beside a discarded twin), which compute each seed's channel block alike
    whatever the number of blocks; also in threaded slices."""
    cfg = _cfg("cnn")
    alone, seen = _pack(data, cfg, [1])
    assert len(alone) == 1 and len(seen[0]["aug"]) == cfg.epochs  # the twin is not traced
    (in_three, _), (in_five, _) = _pack(data, cfg, [0, 1, 2]), _pack(data, cfg, [4, 3, 2, 1, 0])
    threaded, _ = _pack(data, cfg, list(range(8)), threads=2)  # 2 slices of 4 seeds
    for other in (in_three[1], in_five[3], threaded[1]):
        assert all(torch.equal(alone[0].logits[s], other.logits[s]) for s in data.eval_x)
        assert all(torch.equal(v, other.state_dict[k]) for k, v in alone[0].state_dict.items())
    assert not torch.equal(in_three[0].logits["test"], in_three[1].logits["test"])


class _Killed(Exception):
    pass


def test_checkpoint_resume_is_bit_identical(data, tmp_path: Path, narrow: None) -> None:
    cfg = _cfg("airbench", epochs=3, checkpoint_every=1)  # lookahead, whitening-bias epochs
    gens = _gens(cfg, [0, 1])
    whole = fused.train_pack(data, cfg, gens, record_dynamics=True)
    dirs = [tmp_path / "a", tmp_path / "b"]

    def kill_after_two(done: int, _total: int) -> None:
        if done == 2 * 2:  # run-epochs of the pack
            raise _Killed

    with pytest.raises(_Killed):
        fused.train_pack(data, cfg, _gens(cfg, [0, 1]), dirs, kill_after_two, True)
    assert all((d / images.CHECKPOINT_FILE).is_file() for d in dirs)
    resumed = fused.train_pack(data, cfg, _gens(cfg, [0, 1]), dirs, record_dynamics=True)
    for a, b in zip(whole, resumed, strict=True):
        assert b.resumed_from == 2
        assert all(torch.equal(a.logits[s], b.logits[s]) for s in a.logits)
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
        assert torch.equal(a.dynamics, b.dynamics)
    # A run's checkpoint is the single engine's: run 1 resumes alone, by that engine.
    with images._one_thread_per_kernel(data.device):
        single = images.train_run(data, cfg, _gens(cfg, [1])[0], dirs[1], record_dynamics=True)
    assert single.resumed_from == 2
    _close(whole[1], single)


def test_kill_and_resume_through_train_ends_with_the_same_runs(tmp_path: Path) -> None:
    write_tiny_scenario(tmp_path / "data")
    over = {"model": "cnn", "engine": "fused", "epochs": 3, "batch_size": 16}
    over |= {"checkpoint_every": 1, "pack_size": 2}
    cfg = tiny_config(tmp_path)
    whole = train(cfg, "digits", scenario="tiny", runs=3, name="whole", overrides=over)

    def kill(done: int, _total: int, _msg: str) -> None:
        if done == 2 * 2:  # after the first pack's second epoch
            raise _Killed

    with pytest.raises(_Killed):
        train(cfg, "digits", scenario="tiny", runs=3, name="killed", overrides=over, progress=kill)
    resumed = train(cfg, "digits", scenario="tiny", runs=3, name="killed", overrides=over)
    assert resumed.trained == whole.trained == ["run-0000", "run-0001", "run-0002"]
    assert resumed.engine == "fused"
    a = ExperimentStore.open(tmp_path / "runs", "whole")
    b = ExperimentStore.open(tmp_path / "runs", "killed")
    assert a.meta["train"] == b.meta["train"] and "engine" not in a.meta["train"]
    for ra, rb in zip(a.runs(verify=True), b.runs(verify=True), strict=True):
        for split in a.splits:
            assert np.array_equal(ra.load_logits(split), rb.load_logits(split))
        assert ra.meta["arrays"]["model.pt"]["sha256"] == rb.meta["arrays"]["model.pt"]["sha256"]
        assert ra.meta["engine"] == "fused" and ra.meta["config"]["engine"] == "fused"
    assert [r.meta["pack_size"] for r in a.runs()] == [2, 2, 1]
    assert [r.meta["resumed_from_epoch"] for r in b.runs()] == [2, 2, 0]


def test_engine_names_and_pack_size() -> None:
    assert _cfg("cnn").engine == "fused" and _cfg("airbench").engine == "single"
    # The other family's names: stacked = batched = fused, one at a time = loop = single.
    assert _cfg("cnn", engine="loop").engine == "single"
    assert _cfg("airbench", engine="batched").engine == "fused"
    assert validate_train(TrainConfig(engine="fused")).engine == "batched"
    with pytest.raises(MlvarError, match="pack_size must be at least 1"):
        validate_train(TrainConfig(pack_size=0))  # automatic only for the image models
    with pytest.raises(MlvarError, match="'sideways' is not one of"):
        _cfg("cnn", engine="sideways")
    # The memory estimate: ~1 GB per airbench seed at batch 1024 in bf16 (the calibration).
    cfg = TrainConfig()
    switch_model(cfg, "airbench")
    cifar = SimpleNamespace(
        train_x=torch.zeros(1, 3, 32, 32), n_classes=10, device=torch.device("cpu")
    )
    assert fused.activation_bytes(cfg, cifar, element_bytes=2) == pytest.approx(1e9, rel=0.01)
    per_seed = fused.activation_bytes(cfg, cifar)  # fp32 on the CPU: twice that
    assert fused.auto_pack_size(cfg, cifar, 100) == fused.CPU_ACTIVATION_BUDGET // per_seed
    cfg.pack_size = 8
    assert fused.auto_pack_size(cfg, cifar, 100) == 8 and fused.auto_pack_size(cfg, cifar, 3) == 3


# ---------------------------------------------------------------- continued runs


def _continued_single(data, pool_x, pool_y, cfg, index, add, start, stats):
    """The single engine's continuation of run ``index`` (as ``mlvar.train.continuation``
    trains it): the train split then pool rows ``add``, from ``start``."""
    run = dataclasses.replace(
        data,
        train_x=torch.cat([data.train_x, pool_x[add]]),
        train_y=torch.cat([data.train_y, pool_y[add]]),
    )
    if stats is not None:
        run = dataclasses.replace(run, mean=stats[0], std=stats[1])
    return _single(run, cfg, index, start)


@pytest.mark.parametrize("model", ["cnn", "airbench"])
@pytest.mark.parametrize("from_scratch", [False, True])
def test_a_continued_seed_is_its_single_continuation(
    data, model: str, from_scratch: bool, narrow: None
) -> None:
    """Continued runs of one pack, each on the train split plus its own 5 pool rows (one
    shared table), from given weights or from scratch with its own enlarged set's
    normalisation: each starts where the single engine starts (bit for bit), sees its
    batches and ends at its logits to float tolerance; a run's result does not depend on
    its pack."""
    cfg = _cfg(model)
    rng = np.random.default_rng(1)
    pool = tiny_split(rng, 20, 2000)
    pool_x, pool_y = images.to_nchw(pool.x), torch.from_numpy(pool.y)
    n = len(data.train_y)
    table = dataclasses.replace(
        data, train_x=torch.cat([data.train_x, pool_x]), train_y=torch.cat([data.train_y, pool_y])
    )
    adds = {0: torch.tensor([1, 4, 7, 9, 15]), 1: torch.tensor([0, 2, 3, 12, 19])}
    trained = _single(data, cfg, 5)[0].state_dict  # weights some training reached
    starts, stats = {}, {}
    for index, add in adds.items():
        weights = (
            None
            if from_scratch
            else {k: v + 0.01 * index if v.is_floating_point() else v for k, v in trained.items()}
        )
        starts[index] = images.Start(weights, identity={"added": add.tolist()})
        if from_scratch:
            enlarged = torch.cat([data.train_x, pool_x[add]])
            stats[index] = tuple(t.float() for t in images.channel_stats(enlarged, 16))

    def continuation(indices):
        return fused.Continuation(
            [starts[i] for i in indices],
            torch.stack([torch.cat([torch.arange(n), n + adds[i]]) for i in indices]),
            [stats[i] for i in indices] if from_scratch else None,
        )

    outs, seen = _pack(table, cfg, [0, 1], continuation=continuation([0, 1]))
    for pos, index in enumerate([0, 1]):
        single, alone = _continued_single(
            data, pool_x, pool_y, cfg, index, adds[index], starts[index], stats.get(index)
        )
        assert all(torch.equal(seen[pos]["init"][k], v) for k, v in alone["init"].items())
        if not from_scratch:
            assert all(
                torch.equal(alone["init"][k], v) for k, v in starts[index].state_dict.items()
            )
        assert len(seen[pos]["batch"]) == len(alone["batch"]) > 0
        assert all(
            torch.equal(a, b) for a, b in zip(seen[pos]["batch"], alone["batch"], strict=True)
        )
        # An epoch's batches draw from the run's n + 5 rows, its pool rows included.
        first = torch.cat(seen[pos]["batch"][: len(alone["batch"]) // cfg.epochs])
        assert len(first.unique()) == len(first) and n < first.max() < n + 5
        _close(single, outs[pos])
    assert not torch.allclose(outs[0].logits["test"], outs[1].logits["test"], atol=1e-3)
    (alone,), _ = _pack(table, cfg, [1], continuation=continuation([1]))
    assert all(torch.equal(alone.logits[s], outs[1].logits[s]) for s in data.eval_x)


def test_the_train_split_without_tta(data, narrow: None) -> None:
    """``--no-train-tta``: the fused engine's train logits are one plain pass, as the
    single engine's (airbench's recipe flips and translates at test time)."""
    cfg = _cfg("airbench", epochs=1, train_tta=False)
    assert (
        images.split_tta(images.recipe_of(cfg), cfg, "train")
        == 0
        < int(images.recipe_of(cfg)["tta"])
    )
    (out,), _ = _pack(data, cfg, [0])
    single, _ = _single(data, cfg, 0)
    _close(single, out)
