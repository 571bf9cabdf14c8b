"""The airbench recipe pinned to airbench94's numbers (KellerJordan/airbench): dirac
init, the alternating flip, the whitening bias trained for 3 epochs, the triangular
schedule's first / warm-up peak / last values, the dropped last batch, and lr scaling
with the batch size. The expected values are computed here from the reference's
definitions, independently of mlvar's code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mlvar.config import Config, PathsConfig
from mlvar.recipes import MODELS
from mlvar.train import images
from mlvar.train.models import build_model, init_weights
from mlvar.train.seeding import make_generator
from mlvar.train.service import train, train_config
from tiny_images import write_tiny_scenario

RECIPE = MODELS["airbench"].recipe


def test_recipe_numbers() -> None:
    assert (RECIPE["warmup"], RECIPE["final_lr"], RECIPE["whiten_bias_epochs"]) == (0.23, 0.07, 3)
    assert RECIPE["flip"] == "alternating" and RECIPE["init"] == "dirac"
    assert RECIPE["drop_last"] is True and RECIPE["lr_batch"] == 1024
    # lr 11.5 and wd 0.0153 per 1024 examples on a summed loss, momentum 0.85 (Nesterov)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    assert MODELS["airbench"].defaults["lr"] == pytest.approx(11.5 / kilostep * 1024, rel=1e-3)
    lr_sum, wd_sum = 11.5 / kilostep, 0.0153 * 1024 / kilostep
    # PyTorch adds weight_decay = wd / lr to the summed gradient: the same decay per step
    decay = MODELS["airbench"].defaults["lr"] * MODELS["airbench"].defaults["weight_decay"]
    assert decay == pytest.approx(lr_sum * (wd_sum / lr_sum), rel=2e-3)


def test_dirac_init_of_every_conv_and_a_zero_whitening_bias() -> None:
    net = build_model("airbench", 3, 10)
    init_weights(net, make_generator(0, "init"))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7  # whitening + 3 groups x 2
    for conv in convs:
        w = conv.weight
        c_in, k = conv.in_channels, w.shape[-1]
        identity = torch.zeros(c_in, c_in, k, k)
        for i in range(c_in):
            identity[i, i, k // 2, k // 2] = 1.0  # dirac_: the centre, k // 2
        assert torch.equal(w[:c_in], identity)
        if w.shape[0] > c_in:  # the other filters keep their (seeded) default init
            assert w[c_in:].abs().sum() > 0
    assert torch.equal(net.whiten.bias, torch.zeros_like(net.whiten.bias))
    # a square conv is the identity: it passes its input through
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(net.groups[0].conv2(x), x)
    # the same draws as the default init: the init seed still decides the other filters
    other = build_model("airbench", 3, 10)
    init_weights(other, make_generator(1, "init"))
    assert not torch.equal(net.groups[0].conv1.weight, other.groups[0].conv1.weight)


def test_alternating_flip_order_and_resume() -> None:
    x = torch.zeros(1000, 3, 8, 8, dtype=torch.uint8)
    gen = make_generator(5, "aug")
    aug = images.Augmenter(x, 2, "alternating", gen=gen)
    expected = torch.randint(0, 2, (1000,), generator=make_generator(5, "aug"))
    assert torch.equal(aug.base_flip, expected)  # drawn first from the aug generator
    assert 400 < int(expected.sum()) < 600  # a random half
    flips = [aug.draw(gen, 1000, epoch)[:, 2] for epoch in range(4)]
    assert torch.equal(flips[0], expected) and torch.equal(flips[2], expected)
    assert torch.equal(flips[1], 1 - expected) and torch.equal(flips[3], 1 - expected)
    # The flip is the sample's: in a shuffled epoch position i carries sample order[i]'s.
    order = torch.randperm(1000, generator=make_generator(6, "order"))
    shuffled = aug.draw(gen, 1000, 1, order)[:, 2]
    assert torch.equal(shuffled, 1 - expected[order]) and not torch.equal(shuffled, flips[1])
    # translations are still drawn every epoch, after the base flips; flips draw nothing
    after_base = make_generator(5, "aug")
    torch.randint(0, 2, (1000,), generator=after_base)
    fresh = images.Augmenter(x, 2, "alternating", gen=make_generator(5, "aug"))
    shifts = fresh.draw(after_base, 1000, 0)[:, :2]
    again = make_generator(5, "aug")
    torch.randint(0, 2, (1000,), generator=again)
    assert torch.equal(shifts, torch.randint(0, 5, (1000, 2), generator=again))
    assert after_base.get_state().equal(again.get_state())
    with pytest.raises(ValueError, match="aug generator"):
        images.Augmenter(x, 2, "alternating")


def reference_lr(step: int, total: int) -> float:
    """airbench94's get_lr, as written there (LambdaLR: step 0 is the first step)."""
    warmup_steps = int(total * 0.23)
    warmdown_steps = total - warmup_steps
    if step < warmup_steps:
        frac = step / warmup_steps
        return 0.2 * (1 - frac) + 1.0 * frac
    frac = (step - warmup_steps) / warmdown_steps
    return 1.0 * (1 - frac) + 0.07 * frac


@pytest.mark.parametrize("total", [476, 480, 20])
def test_triangular_schedule_first_peak_and_last_steps(total: int) -> None:
    peak = int(total * 0.23)
    for step in (0, 1, peak - 1, peak, peak + 1, total - 1):
        assert images.lr_factor(RECIPE, step, total) == pytest.approx(reference_lr(step, total))
    assert images.lr_factor(RECIPE, 0, total) == pytest.approx(0.2)
    assert images.lr_factor(RECIPE, peak, total) == pytest.approx(1.0)
    last = 1 - 0.93 * (total - 1 - peak) / (total - peak)
    assert images.lr_factor(RECIPE, total - 1, total) == pytest.approx(last)
    assert last > 0.07  # never 0: the last step trains at just above the final fraction
    if total == 476:  # airbench94's own run: ceil(48 batches x 9.9 epochs)
        assert (peak, round(last, 5)) == (109, 0.07253)


def test_last_partial_batch_is_dropped() -> None:
    assert images.steps_per_epoch(50000, 1024, drop_last=True) == [1024] * 48
    assert images.steps_per_epoch(50000, 1024) == [1024] * 48 + [848]
    assert images.steps_per_epoch(45000, 1024, drop_last=True) == [1024] * 43


def test_lr_scales_with_the_batch_size_and_wd_stays() -> None:
    def cfg(**over):
        return train_config(Config(), "cifar10", 1, {"model": "airbench", **over})

    base = cfg()
    assert (base.lr, base.batch_size) == (1.5, 1024)
    half = cfg(batch_size=512)
    assert half.lr == pytest.approx(0.75) and half.weight_decay == base.weight_decay
    # the decay per step, lr x wd, scales with the batch as airbench's wd * batch / kilostep
    assert half.lr * half.weight_decay == pytest.approx(base.lr * base.weight_decay / 2)
    assert cfg(batch_size=512, lr=0.2).lr == 0.2  # an explicit --lr is kept
    cnn = train_config(Config(), "digits", 1, {"model": "cnn", "batch_size": 32})
    assert cnn.lr == MODELS["cnn"].defaults["lr"]  # other recipes' lr is per batch


def test_whitening_bias_trains_for_the_first_3_epochs(tmp_path: Path) -> None:
    assert [images.whitening_bias_trains(RECIPE, e) for e in range(5)] == [True] * 3 + [False] * 2
    write_tiny_scenario(tmp_path / "data")
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "rep"))
    over = {"model": "airbench", "epochs": 5, "batch_size": 24, "lr": 0.2, "workers": 1}
    over["checkpoint_every"] = 1
    momentum = []  # the whitening bias's SGD momentum buffer after each epoch

    def after_epoch(done: int, _total: int, _run: str) -> None:
        ckpt = tmp_path / "runs" / "tiny-airbench" / "runs" / "run-0000" / images.CHECKPOINT_FILE
        if done < 5:
            state = torch.load(ckpt, weights_only=True)
            assert state["epoch"] == done
            momentum.append(state["momentum"][0][0].clone())  # first trained parameter

    train(cfg, "digits", "tiny", runs=1, overrides=over, progress=after_epoch)
    assert len(momentum) == 4 and momentum[0].shape == (8,)  # 2 x 1 channel x 2 x 2
    assert not torch.equal(momentum[0], momentum[1]) and not torch.equal(momentum[1], momentum[2])
    assert torch.equal(momentum[2], momentum[3])  # epoch 4 (index 3): no step on the bias
    assert math.isfinite(float(momentum[3].sum()))


# ---------------------------------------------------------------- TTA of the train split


def test_train_tta_is_recorded_and_identified_only_where_it_changes_logits() -> None:
    def cfg(model: str, **over):
        return train_config(Config(), "digits", 1, {"model": model, **over})

    base = cfg("airbench")
    assert base.train_tta is True
    assert "train_tta" not in base.record() and "train_tta" not in base.identity()
    off = cfg("airbench", train_tta=False)
    assert off.record()["train_tta"] is False and off.identity()["train_tta"] is False
    assert off.identity() != base.identity()  # a different experiment, as a recipe change
    cnn = cfg("cnn", train_tta=False)  # no TTA in its recipe: nothing changes
    assert cnn.record()["train_tta"] is False and "train_tta" not in cnn.identity()
    assert cnn.identity() == cfg("cnn").identity()
    assert [images.split_tta(RECIPE, off, s) for s in ("train", "val", "test")] == [0, 2, 2]
    assert [images.split_tta(RECIPE, base, s) for s in ("train", "test")] == [2, 2]


def test_no_train_tta_flag() -> None:
    from mlvar.cli.options import training_overrides

    assert training_overrides(no_train_tta=True)["train_tta"] is False
    assert training_overrides(no_train_tta=False)["train_tta"] is None  # the config's
    assert "train_tta" not in training_overrides(epochs=None)


def test_skipping_train_tta_changes_only_the_train_logits(tmp_path: Path) -> None:
    from mlvar.data.scenario import open_scenario
    from mlvar.store import ExperimentStore

    write_tiny_scenario(tmp_path / "data")
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "rep"))
    over = {"model": "airbench", "epochs": 1, "batch_size": 24, "lr": 0.2, "workers": 1}
    train(cfg, "digits", "tiny", runs=1, overrides=over, name="with")
    train(cfg, "digits", "tiny", runs=1, overrides={**over, "train_tta": False}, name="without")
    runs = {n: ExperimentStore.open(tmp_path / "runs", n).runs()[0] for n in ("with", "without")}
    logits = {n: {s: r.load_logits(s) for s in ("train", "test")} for n, r in runs.items()}
    assert (logits["with"]["test"] == logits["without"]["test"]).all()  # same weights, TTA
    assert not (logits["with"]["train"] == logits["without"]["train"]).all()
    assert runs["without"].meta["config"]["train_tta"] is False
    # the train logits are one plain eval-mode pass of the stored weights
    scenario = open_scenario(tmp_path / "data", "tiny")
    splits = {s: scenario.load(s) for s in scenario.splits}
    net = build_model("airbench", 1, 3)
    net.load_state_dict(torch.load(runs["without"].path / "model.pt", weights_only=True))
    net.eval()
    data = images._build_data(splits, scenario.manifest, torch.device("cpu"))
    with torch.no_grad():
        plain = net(data.normalise(data.eval_x["train"])).numpy()
    assert plain == pytest.approx(logits["without"]["train"], abs=1e-5)


def test_tta_levels_as_airbench94_defines_them() -> None:
    """Level 1: the mean over the mirror; level 2: half that, half the mean of the same
    over the image translated one pixel diagonally each way (reflect padding)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    data = images.ImageData(
        train_x=x,
        train_y=torch.zeros(6, dtype=torch.int64),
        eval_x={},
        n_classes=5,
        max_value=255.0,
        mean=torch.full((1, 3, 1, 1), 0.5),
        std=torch.full((1, 3, 1, 1), 0.25),
    )
    xn = (x.float() / 255 - 0.5) / 0.25
    net(xn)  # materialise the lazy layer
    net.eval()
    with torch.no_grad():

        def mirror(inputs: torch.Tensor) -> torch.Tensor:
            return 0.5 * net(inputs) + 0.5 * net(inputs.flip(-1))

        padded = F.pad(xn, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :8, :8], padded[:, :, 2:, 2:]]
        level2 = 0.5 * mirror(xn) + 0.5 * torch.stack([mirror(s) for s in shifted]).mean(0)
        expected = {0: net(xn), 1: mirror(xn), 2: level2}
    for level, want in expected.items():
        got = images.predict(net, data, x, level)
        assert torch.allclose(got, want, atol=1e-5), level
    assert net.training  # predict puts the model back in training mode
