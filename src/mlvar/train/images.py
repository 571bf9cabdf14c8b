"""Seeded training of the image models (``cnn``, ``airbench``, ``resnet18``) on one device:
the ``single`` engine, one model at a time (``mlvar.train.fused`` is the ``fused`` one,
built on the pieces here).

The data pipeline lives on the device: every split is one uint8 ``[N, C, H, W]`` tensor,
the training split is reflect-padded once, and each batch is cut out of it by one gather
that applies the per-sample translation and horizontal flip. A run draws, at the start of
every epoch and on the CPU, its permutation from its ``order`` generator and its
translations and flips from its ``aug`` generator (one host-to-device copy per epoch, no
host sync per step); weights come from its ``init`` generator. On CUDA the forward pass
runs under bf16 autocast with channels_last tensors; on the CPU everything is float32,
every kernel runs on one thread, and a run is reproducible bit for bit however runs are
scheduled: alone, one after the other in this process, or in worker processes (on the
CPU, several pending runs train in ``TrainConfig.workers`` spawned processes at once,
one per core by default: :func:`train_runs`).

Every ``checkpoint_every`` epochs the run folder gets ``checkpoint.pt`` (model, optimiser
and lookahead state, generator states, recorded dynamics), written atomically; a killed
run restarts from it and ends with the same weights as an uninterrupted one. A finished
run writes its logits for every split, optionally ``train.dynamics.npy``, and ``model.pt``
(the final ``state_dict``, load with ``torch.load(path, weights_only=True)``), then
``run.json`` listing them all with their sha256, in a temporary folder that then replaces
the run folder and its checkpoint (a failed write keeps the checkpoint to resume from).

A continuation (``mlvar.train.continuation``) passes :class:`Start` to :func:`train_run`:
the run then starts from given weights, at an epoch offset of a per-epoch schedule, and
trains on the rows ``ImageData.train_x`` holds (train split plus pool rows) while every
split is normalised with the train split's statistics.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mlvar.config import TrainConfig
from mlvar.data.scenario import Scenario, SplitData
from mlvar.errors import ExitCode
from mlvar.io import atomic_write_bytes
from mlvar.recipes import MODELS, model_spec
from mlvar.store import ExperimentStore, RunRecord, run_id_for
from mlvar.train.mlp import _one_thread_per_kernel
from mlvar.train.models import make_network
from mlvar.train.seeding import RunGenerators, run_seed
from mlvar.train.trained import WEIGHTS_FILE

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
EVAL_BATCH = 1024
LOOKAHEAD_EVERY = 5  # steps between lookahead (EMA) updates, as airbench

#: ``progress(done, total)`` in epochs of one run.
EpochProgress = Callable[[int, int], None]


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or NHW) images as a uint8 ``[N, C, H, W]`` tensor."""
    if x.ndim == 3:
        x = x[..., None]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@dataclass
class ImageData:
    """The device-resident data of one experiment."""

    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    eval_x: dict[str, torch.Tensor]  # split -> uint8 [n, C, H, W]
    n_classes: int
    max_value: float
    mean: torch.Tensor  # [1, C, 1, 1] of x / max_value over the training split
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @classmethod
    def build(
        cls,
        splits: dict[str, SplitData],
        manifest: dict[str, Any],
        device: torch.device,
        normalise: dict[str, list[float]] | None = None,
        train: SplitData | None = None,
        stats: SplitData | None = None,
    ) -> ImageData:
        """The data on ``device``, normalised with the training split's per-channel mean
        and std, or with the fixed constants ``normalise`` (``{"mean": [...], "std":
        [...]}``, per channel of ``x / max_value``: the study's recipe).

        ``train`` (default ``splits["train"]``) is what the run trains on, ``stats``
        (default ``train``) whose statistics normalise every split: a continued run trains
        on more samples than its scenario's train split but keeps the normalisation its
        weights were trained with (``mlvar.train.continuation``). ``eval_x`` holds every
        split of ``splits``.
        """
        max_value = float(manifest.get("input", {}).get("max_value", 255))
        train = splits["train"] if train is None else train
        train_x = to_nchw(train.x)
        stats_x = train_x if stats is None else to_nchw(stats.x)
        mean, std = channel_stats(stats_x, max_value, normalise)
        return cls(
            train_x=train_x.to(device),
            train_y=torch.from_numpy(train.y).to(device),
            eval_x={s: to_nchw(d.x).to(device) for s, d in splits.items()},
            n_classes=len(manifest["class_names"]),
            max_value=max_value,
            mean=mean.float().to(device),
            std=std.float().to(device),
        )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() / self.max_value - self.mean) / self.std
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def channel_stats(
    x: torch.Tensor, max_value: float, normalise: dict[str, list[float]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std ``[1, C, 1, 1]`` of the uint8 images ``x / max_value``
    (float64), or the recipe's fixed constants ``normalise`` (float32)."""
    if normalise is not None:
        mean = torch.tensor(normalise["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(normalise["std"], dtype=torch.float32).view(1, -1, 1, 1)
        if mean.shape[1] != x.shape[1]:
            raise ValueError(
                f"the recipe normalises {mean.shape[1]} channels, the images have {x.shape[1]}"
            )
        return mean, std
    scaled = x.double() / max_value
    mean = scaled.mean(dim=(0, 2, 3), keepdim=True)
    return mean, scaled.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)


def _reflect_index(size: int, pad: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(idx >= size, 2 * (size - 1) - idx, idx)


class Augmenter:
    """Random translation and horizontal flip, as batched gathers. The translation pads
    by reflection (``pad="reflect"``, mlvar's) or with zero pixels (``"zero"``: the
    study's ``RandomCrop(32, padding=4)``, which pads the uint8 image with 0 before
    ``ToTensor`` and ``Normalize``).

    ``flip``: ``True`` flips each image with probability 1/2 in every epoch;
    ``"alternating"`` (airbench's) flips a random half, drawn once from ``gen`` here,
    in even epochs and the other half in odd ones, so every image is seen both ways
    every two epochs. (Drawn at construction, before a checkpoint restores ``gen``, so a
    resumed run has the same half.)"""

    def __init__(
        self,
        x: torch.Tensor,
        translate: int,
        flip: bool | str,
        pad: str = "reflect",
        gen: torch.Generator | None = None,
        n: int | None = None,
    ) -> None:
        self.translate, self.flip = translate, flip
        self.base_flip: torch.Tensor | None = None
        if flip == "alternating":
            if gen is None:
                raise ValueError("alternating flips need the run's aug generator")
            # ``n``: the run's training-set size where ``x`` holds more rows than it trains
            # on (the fused engine's continued runs index one table of train + pool rows).
            self.base_flip = _flip_half(gen, len(x) if n is None else n)
        _, c, h, w = x.shape
        device = x.device
        if translate and pad == "zero":
            x = F.pad(x, (translate,) * 4, mode="constant", value=0)
        elif translate:
            x = x[:, :, _reflect_index(h, translate, device)][
                :, :, :, _reflect_index(w, translate, device)
            ]
        self.padded = x
        self.rows = torch.arange(h, device=device)
        self.cols = torch.arange(w, device=device)
        self.channels = torch.arange(c, device=device)

    def for_run(self, gen: torch.Generator) -> Augmenter:
        """This augmenter for another run (the fused engine's seeds): the same padded
        images, shared, and that run's alternating-flip half drawn from its ``gen``, as
        its own augmenter would draw it."""
        other = copy.copy(self)
        if self.base_flip is not None:
            other.base_flip = _flip_half(gen, len(self.base_flip))
        return other

    def draw(
        self, gen: torch.Generator, n: int, epoch: int = 0, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Epoch ``epoch``'s draws ``[n, 3]`` (dy, dx, flip) from the run's ``aug``
        generator, one per position of the epoch's sample ``order`` (its permutation;
        default the samples in order). An alternating flip belongs to the sample, not to
        the position: position ``i`` gets sample ``order[i]``'s flip of this epoch."""
        draws = torch.zeros(n, 3, dtype=torch.int64)
        if self.translate:
            draws[:, :2] = torch.randint(0, 2 * self.translate + 1, (n, 2), generator=gen)
        else:
            draws[:, :2] = 0
        if self.base_flip is not None:
            base = self.base_flip if order is None else self.base_flip[order]
            draws[:, 2] = base ^ (epoch % 2)
        elif self.flip:
            draws[:, 2] = torch.randint(0, 2, (n,), generator=gen)
        return draws

    def batch(self, idx: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The augmented uint8 images of ``idx`` with per-sample ``draws``."""
        rows = draws[:, 0:1] + self.rows
        cols = draws[:, 1:2] + self.cols
        cols = torch.where(draws[:, 2:3].bool(), cols.flip(1), cols)
        return self.padded[
            idx[:, None, None, None],
            self.channels[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]


def _flip_half(gen: torch.Generator, n: int) -> torch.Tensor:
    """The images an alternating flip flips in even epochs (1) and odd ones (0)."""
    return torch.randint(0, 2, (n,), generator=gen)


class SGD:
    """SGD with (Nesterov) momentum, L2 weight decay added to the gradient and one lr per
    group; the arithmetic of ``torch.optim.SGD`` (written out for the reason given in
    ``optim.py``)."""

    def __init__(self, groups: list[dict[str, Any]], momentum: float, nesterov: bool) -> None:
        self.groups = groups
        self.momentum, self.nesterov = momentum, nesterov
        self.buffers = [[torch.zeros_like(p) for p in g["params"]] for g in groups]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        m = self.momentum
        for group, buffers in zip(self.groups, self.buffers, strict=True):
            group_lr, wd = lr * group["lr_scale"], group["weight_decay"]
            for p, buf in zip(group["params"], buffers, strict=True):
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=wd) if wd else p.grad
                buf.mul_(m).add_(grad)
                update = grad.add(buf, alpha=m) if self.nesterov else buf
                p.add_(update, alpha=-group_lr)

    def zero_grad(self) -> None:
        for group in self.groups:
            for p in group["params"]:
                p.grad = None


def make_optimizer(model: nn.Module, cfg: TrainConfig, recipe: dict[str, Any]) -> SGD:
    scale = float(recipe["bias_lr_scale"])
    norm_biases = [
        m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.bias is not None
    ]
    ids = {id(p) for p in norm_biases}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [
        {"params": others, "lr_scale": 1.0, "weight_decay": cfg.weight_decay},
        # The decay step lr * wd stays that of the other weights, as in airbench.
        {"params": norm_biases, "lr_scale": scale, "weight_decay": cfg.weight_decay / scale},
    ]
    return SGD(groups, float(recipe["momentum"]), bool(recipe["nesterov"]))


def epoch_lrs(recipe: dict[str, Any], lr: float, epochs: int) -> list[float] | None:
    """The learning rate of each epoch of a recipe whose lr changes once per epoch (the
    study's ``cosine-epochs``: ``CosineAnnealingLR(T_max)`` stepped after every epoch,
    ``eta_min`` 0), else None (:func:`lr_factor` gives it per step).

    The values follow PyTorch's recursive (chainable) form step by step, the form its
    scheduler computes, so they equal the scheduler's to the last bit (tested), not only
    the closed form ``lr (1 + cos(pi e / T_max)) / 2``. Past ``T_max`` they rise again,
    as the scheduler's do.
    """
    if recipe["schedule"] != "cosine-epochs":
        return None
    t_max = int(recipe["t_max"])
    lrs = [lr]
    for epoch in range(1, epochs):
        last = lrs[-1]
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            lrs.append(last + lr * (1 - math.cos(math.pi / t_max)) / 2)
        else:
            ratio = (1 + math.cos(math.pi * epoch / t_max)) / (
                1 + math.cos(math.pi * (epoch - 1) / t_max)
            )
            lrs.append(ratio * last)  # PyTorch's ratio * (lr - eta_min) + eta_min, eta_min 0
    return lrs


def lr_factor(recipe: dict[str, Any], step: int, total: int) -> float:
    """The learning-rate multiplier of step ``step`` (from 0) of ``total``.

    ``cosine``: ``(1 + cos(pi step / total)) / 2``. ``triangle`` (airbench94's): from 0.2
    up to 1 over the first ``int(total * warmup)`` steps, then linearly down to
    ``final_lr`` (0.07 for airbench), the value step ``total`` would have, so the last
    step trains at a little more than it.
    """
    if recipe["schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    warm = int(total * float(recipe["warmup"]))
    final = float(recipe.get("final_lr", 0.0))
    if step < warm:
        return 0.2 + 0.8 * step / warm
    return 1.0 - (1.0 - final) * (step - warm) / max(total - warm, 1)


def whitening_bias_trains(recipe: dict[str, Any], epoch: int) -> bool:
    """Whether the whitening conv's bias takes optimiser steps in epoch ``epoch`` (from
    0): in the first ``whiten_bias_epochs`` (airbench: 3), then it is frozen."""
    return epoch < int(recipe.get("whiten_bias_epochs", 1 << 30))


def _train_whitening_bias(model: nn.Module, recipe: dict[str, Any], epoch: int) -> None:
    # A bias without a gradient takes no SGD step (nor weight decay), as in airbench; the
    # lookahead still averages it, as airbench's does.
    whiten = getattr(model, "whiten", None)
    if whiten is not None and whiten.bias is not None:
        whiten.bias.requires_grad_(whitening_bias_trains(recipe, epoch))


def _ema_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in model.state_dict().values() if t.dtype.is_floating_point]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """Batch sizes of one epoch: full batches, and the remainder unless ``drop_last``
    (airbench's recipe) or it is a single sample (batch norm cannot normalise one)."""
    sizes = [batch_size] * (n // batch_size)
    if not drop_last and n % batch_size >= 2:
        sizes.append(n % batch_size)
    return sizes


@torch.no_grad()
def predict(
    model: nn.Module, data: ImageData, x: torch.Tensor, tta: int, precision: str = "bf16"
) -> torch.Tensor:
    """Eval-mode logits ``[n, C]`` (float32, CPU) with test-time augmentation: level 1 adds
    the mirror image, level 2 also the images shifted by one pixel both ways."""
    model.eval()
    out = []
    amp = _autocast(data.device, precision)
    for start in range(0, len(x), EVAL_BATCH):
        xb = data.normalise(x[start : start + EVAL_BATCH])
        with amp:
            logits = model(xb).float()
            if tta >= 1:
                logits = 0.5 * logits + 0.5 * model(xb.flip(3)).float()
            if tta >= 2:
                padded = F.pad(xb, (1, 1, 1, 1), mode="reflect")
                h, w = xb.shape[2:]
                shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
                extra = sum(
                    0.5 * model(s).float() + 0.5 * model(s.flip(3)).float() for s in shifted
                )
                logits = 0.5 * logits + 0.25 * extra
        out.append(logits.cpu())
    model.train()
    return torch.cat(out)


def split_tta(recipe: dict[str, Any], cfg: TrainConfig, split: str) -> int:
    """The test-time augmentation level of ``split``'s final logits: the recipe's
    ``tta`` on every split, except the train split under ``cfg.train_tta`` False (0:
    one plain forward pass; it costs the most there, and only the train-split metrics
    read it)."""
    if split == "train" and not cfg.train_tta:
        return 0
    return int(recipe["tta"])


def _autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA (mlvar's recipes), none under ``precision="fp32"`` (the
    study's) or on the CPU."""
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@contextmanager
def _full_fp32(precision: str) -> Iterator[None]:
    """Under ``precision="fp32"``: no TF32 in CUDA matmuls and convolutions (PyTorch
    allows TF32 convolutions by default; the study's torch 1.4 had no TF32)."""
    if precision != "fp32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def recipe_of(cfg: TrainConfig) -> dict[str, Any]:
    """The fixed recipe of ``cfg``'s image model under its protocol."""
    spec = model_spec(cfg.protocol, cfg.model)
    return (spec or MODELS[cfg.model]).recipe


def _identity_hash(
    cfg: TrainConfig, seeds: dict[str, int], extra: dict[str, Any] | None = None
) -> str:
    what: dict[str, Any] = {"train": cfg.identity(), "seeds": seeds}
    if extra is not None:  # a continuation: its source weights, added samples, schedule
        what["continue"] = extra
    text = json.dumps(what, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A run's checkpoint (tensors only, never pickled objects), or None if unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a corrupt checkpoint only means starting over
        return None


@dataclass
class RunOutput:
    logits: dict[str, torch.Tensor]  # split -> [n, C] float32, CPU
    dynamics: torch.Tensor | None  # [E, n_train, C] float16, CPU
    state_dict: dict[str, torch.Tensor]  # final weights, CPU
    resumed_from: int  # epoch the run restarted at (0: from scratch)


def train_run(
    data: ImageData,
    cfg: TrainConfig,
    gen: RunGenerators,
    run_dir: Path | None = None,
    progress: EpochProgress | None = None,
    record_dynamics: bool = False,
    trace: Callable[[str, Any], None] | None = None,
    start: Start | None = None,
) -> RunOutput:
    """Train one image model; checkpoint to and resume from ``run_dir`` when given.

    ``start`` continues a trained model instead of initialising one (:class:`Start`).
    ``trace(kind, value)`` (tests) sees ``("init", state_dict)`` (the weights the first
    step starts from) and ``("batch", indices)``.
    """
    recipe = recipe_of(cfg)
    precision = str(recipe.get("precision", "bf16"))
    with _full_fp32(precision):
        return _train_run(data, cfg, gen, recipe, run_dir, progress, record_dynamics, trace, start)


@dataclass
class Start:
    """Where a continued run starts (``mlvar.train.continuation``).

    ``state_dict``: the trained weights (for airbench including its frozen whitening, which
    is not recomputed; None: initialised from the ``init`` generator as in training, for a
    retraining from scratch); ``schedule_offset``: the epoch of a per-epoch schedule
    (``cosine-epochs``) the continuation starts at, so that its epochs take that
    schedule's learning rates from there on (0 for per-step schedules); ``identity``:
    what makes the continuation what it is, part of its checkpoints' identity.
    """

    state_dict: dict[str, torch.Tensor] | None
    schedule_offset: int = 0
    identity: dict[str, Any] | None = None


def initial_model(
    data: ImageData, cfg: TrainConfig, gen: RunGenerators, start: Start | None = None
) -> nn.Module:
    """The network a run starts from, on ``data``'s device: ``start``'s weights, or
    initialised from the run's ``init`` generator (airbench: then its whitening)."""
    model = make_network(cfg.model, tuple(data.train_x.shape[1:]), data.n_classes, gen.init)
    if start is not None and start.state_dict is not None:  # a continuation: its weights
        model.load_state_dict(start.state_dict)
        return model.to(data.device)
    model.to(data.device)
    if hasattr(model, "init_whitening"):
        model.init_whitening(data.normalise(data.train_x[:5000]))
    return model


def _train_run(
    data: ImageData,
    cfg: TrainConfig,
    gen: RunGenerators,
    recipe: dict[str, Any],
    run_dir: Path | None,
    progress: EpochProgress | None,
    record_dynamics: bool,
    trace: Callable[[str, Any], None] | None,
    start: Start | None = None,
) -> RunOutput:
    precision = str(recipe.get("precision", "bf16"))
    device = data.device
    model = initial_model(data, cfg, gen, start)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if trace:
        trace("init", {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    opt = make_optimizer(model, cfg, recipe)
    ema = [t.clone() for t in _ema_tensors(model)] if recipe["lookahead"] else []
    aug = Augmenter(
        data.train_x,
        int(recipe["translate"]),
        recipe["flip"],
        str(recipe.get("pad", "reflect")),
        gen.aug,
    )
    offset = 0 if start is None else start.schedule_offset
    per_epoch = epoch_lrs(recipe, cfg.lr, offset + cfg.epochs)
    if per_epoch is not None:
        per_epoch = per_epoch[offset:]
    elif offset:
        raise ValueError(f"schedule {recipe['schedule']!r} has no epoch offset")
    n = len(data.train_y)
    sizes = steps_per_epoch(n, cfg.batch_size, bool(recipe.get("drop_last", False)))
    total = cfg.epochs * len(sizes)
    recorded: list[torch.Tensor] = []
    start_epoch, step = 0, 0
    identity = _identity_hash(cfg, gen.seeds, None if start is None else start.identity)
    ckpt_path = None if run_dir is None else run_dir / CHECKPOINT_FILE
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        if (
            state is not None
            and state.get("format") == CHECKPOINT_FORMAT
            and state.get("identity") == identity
        ):
            model.load_state_dict(state["model"])
            for bufs, saved in zip(opt.buffers, state["momentum"], strict=True):
                for b, s in zip(bufs, saved, strict=True):
                    b.copy_(s)
            for e, s in zip(ema, state["ema"], strict=True):
                e.copy_(s)
            gen.order.set_state(state["gen_order"])
            gen.aug.set_state(state["gen_aug"])
            recorded = list(state["dynamics"]) if record_dynamics else []
            start_epoch, step = int(state["epoch"]), int(state["step"])
    label_smoothing = float(recipe["label_smoothing"])
    amp = _autocast(device, precision)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        _train_whitening_bias(model, recipe, epoch)
        perm = torch.randperm(n, generator=gen.order)
        draws = aug.draw(gen.aug, n, epoch, perm)
        perm_d = perm.to(device, non_blocking=True)
        draws_d = draws.to(device, non_blocking=True)
        pos = 0
        for size in sizes:
            idx = perm_d[pos : pos + size]
            if trace:
                trace("batch", perm[pos : pos + size])
            xb = data.normalise(aug.batch(idx, draws_d[pos : pos + size]))
            pos += size
            with amp:
                loss = F.cross_entropy(
                    model(xb).float(), data.train_y[idx], label_smoothing=label_smoothing
                )
            opt.zero_grad()
            loss.backward()
            opt.step(per_epoch[epoch] if per_epoch else cfg.lr * lr_factor(recipe, step, total))
            step += 1
            if ema and step % LOOKAHEAD_EVERY == 0:
                decay = 0.95**LOOKAHEAD_EVERY * (step / total) ** 3
                with torch.no_grad():
                    for e, t in zip(ema, _ema_tensors(model), strict=True):
                        e.lerp_(t, 1 - decay)
                        t.copy_(e)
        if record_dynamics:
            recorded.append(predict(model, data, data.eval_x["train"], 0, precision).half())
        done = epoch + 1
        if (
            ckpt_path is not None
            and cfg.checkpoint_every
            and done % cfg.checkpoint_every == 0
            and done < cfg.epochs
        ):
            _save_checkpoint(
                ckpt_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "identity": identity,
                    "epoch": done,
                    "step": step,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "momentum": [[b.cpu() for b in bufs] for bufs in opt.buffers],
                    "ema": [e.cpu() for e in ema],
                    "gen_order": gen.order.get_state(),
                    "gen_aug": gen.aug.get_state(),
                    "dynamics": recorded if record_dynamics else [],
                },
            )
        if progress:
            progress(done, cfg.epochs)
    if ema:  # the final weights are the lookahead average (airbench's decay=1.0 update)
        with torch.no_grad():
            for e, t in zip(ema, _ema_tensors(model), strict=True):
                t.copy_(e)
    logits = {
        s: predict(model, data, x, split_tta(recipe, cfg, s), precision)
        for s, x in data.eval_x.items()
    }
    return RunOutput(
        logits=logits,
        dynamics=torch.stack(recorded) if record_dynamics else None,
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        resumed_from=start_epoch,
    )


def weights_file(state_dict: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, Any]]:
    """The bytes of ``model.pt`` for ``state_dict`` and what ``run.json`` says of them."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    info = {
        "format": "torch.save(state_dict); torch.load(weights_only=True)",
        "tensors": len(state_dict),
    }
    return buf.getvalue(), info


def write_run(
    store: ExperimentStore,
    run_id: str,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    dynamics: np.ndarray | None = None,
) -> RunRecord:
    """Write a finished image run: logits, dynamics, ``model.pt``, then ``run.json`` last.

    :meth:`ExperimentStore.write_run` with the weights file: the run is built beside its
    folder and replaces it (and the checkpoint in it) once complete, so a failed write
    keeps the checkpoint to resume from.
    """
    return store.write_run(
        run_id, arrays, meta, dynamics, files={WEIGHTS_FILE: weights_file(state_dict)}
    )


def resolve_workers(cfg: TrainConfig, n_pending: int) -> int:
    """How many processes train ``n_pending`` runs: 1 (in this process) on CUDA or for a
    single run; else ``cfg.workers``, where 0 means one per CPU thread torch would use
    (``torch.get_num_threads()``, else the core count); never more than the runs."""
    if cfg.device != "cpu" or n_pending <= 1:
        return 1
    wanted = cfg.workers or torch.get_num_threads() or os.cpu_count() or 1
    return max(1, min(wanted, n_pending))


def _train_and_write(
    store: ExperimentStore,
    data: ImageData,
    splits: dict[str, SplitData],
    cfg: TrainConfig,
    index: int,
    extra_meta: dict[str, Any],
    on_epoch: EpochProgress,
) -> tuple[str, dict[str, float]]:
    """Train run ``index`` with one thread per kernel and write it; its id and accuracy."""
    run_id = run_id_for(index)
    gen = RunGenerators(cfg.base_seed, index, cfg.vary)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    with _one_thread_per_kernel(data.device):
        result = train_run(
            data, cfg, gen, store.run_dir(run_id), on_epoch, record_dynamics=cfg.record_dynamics
        )
    wall = time.perf_counter() - t0
    return finish_run(store, splits, cfg, index, gen, result, extra_meta, started_at, wall)


def finish_run(
    store: ExperimentStore,
    splits: dict[str, SplitData],
    cfg: TrainConfig,
    index: int,
    gen: RunGenerators,
    result: RunOutput,
    extra_meta: dict[str, Any],
    started_at: str,
    pack_wall: float,
    pack_size: int = 1,
) -> tuple[str, dict[str, float]]:
    """Write run ``index``'s ``result`` (trained by ``cfg.engine`` in a pack of
    ``pack_size`` runs that took ``pack_wall`` seconds); its id and accuracy."""
    run_id = run_id_for(index)
    arrays = {s: v.numpy().astype(cfg.logits_dtype) for s, v in result.logits.items()}
    acc = {s: float((arrays[s].argmax(axis=1) == splits[s].y).mean()) for s in arrays}
    meta = {
        "run_index": index,
        "seed": run_seed(cfg.base_seed, index),
        "source_seeds": gen.seeds,
        "vary": cfg.vary,
        "config": cfg.record(),
        "engine": cfg.engine,
        "device": cfg.device,
        "pack_size": pack_size,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_time_s": pack_wall / pack_size,
        "pack_wall_time_s": pack_wall,
        "resumed_from_epoch": result.resumed_from,
        "metrics": {f"{s}_accuracy": a for s, a in acc.items()},
        **extra_meta,
    }
    dyn = None if result.dynamics is None else result.dynamics.numpy().astype(np.float16)
    write_run(store, run_id, arrays, meta, result.state_dict, dyn)
    return run_id, acc


def _build_data(
    splits: dict[str, SplitData],
    manifest: dict[str, Any],
    device: torch.device,
    cfg: TrainConfig | None = None,
    train: SplitData | None = None,
    stats: SplitData | None = None,
) -> ImageData:
    """The device data of a training run of ``cfg`` (normalised as its recipe says; no
    ``cfg``: with the training split's statistics); ``train`` and ``stats`` as in
    :meth:`ImageData.build`."""
    normalise = None if cfg is None else recipe_of(cfg).get("normalise")
    # One thread here too: the normalisation statistics are reductions whose rounding
    # would otherwise depend on the thread count.
    with _one_thread_per_kernel(device):
        return ImageData.build(splits, manifest, device, normalise, train, stats)


#: ``schedule(indices, size)`` yields the packs of at most ``size`` of ``indices`` to
#: train now (``store.RunClaims.packs``: the runs this process has claimed).
Schedule = Callable[[list[int], int], Iterator[list[int]]]


def _in_order(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def train_runs(
    store: ExperimentStore,
    scenario: Scenario,
    splits: dict[str, SplitData],
    cfg: TrainConfig,
    pending: list[int],
    extra_meta: dict[str, Any],
    progress: Callable[[int, int, str], None] | None = None,
    schedule: Schedule = _in_order,
) -> Iterator[tuple[str, dict[str, float]]]:
    """Train and write the runs ``pending``; yield ``(run_id, accuracy)`` as each finishes.

    Every run computes with one CPU thread per kernel, so its numbers do not depend on
    how runs are scheduled. On the CPU, with more than one pending run, the runs are
    shared out among :func:`resolve_workers` processes (``cfg.workers``; by default one
    per core, the fastest on a 2-core CPU, see ``benchmarks/train_speed.py``); otherwise
    they train one after the other in this process. ``progress(done, total, run_id)``
    counts run-epochs. ``schedule`` hands out the runs: by default all of them, in
    order; ``train.service`` passes the runs it has claimed, one at a time in this
    process (so that other processes training the experiment share the runs) and all it
    can claim at once for worker processes (which start once).
    """
    workers = resolve_workers(cfg, len(pending))
    total = len(pending) * cfg.epochs
    data: ImageData | None = None
    base = 0  # run-epochs of the packs trained before
    for pack in schedule(pending, len(pending) if workers > 1 else 1):

        def relay(done: int, _total: int, run_id: str, base: int = base) -> None:
            if progress:
                progress(base + done, total, run_id)

        if resolve_workers(cfg, len(pack)) > 1:
            yield from _train_in_workers(
                store,
                scenario.manifest,
                splits,
                cfg,
                pack,
                extra_meta,
                relay,
                resolve_workers(cfg, len(pack)),
            )
        else:
            if data is None:
                data = _build_data(splits, scenario.manifest, torch.device(cfg.device), cfg)
            for pos, index in enumerate(pack):

                def on_epoch(done: int, _total: int, pos: int = pos, index: int = index) -> None:
                    relay(pos * cfg.epochs + done, total, run_id_for(index))

                yield _train_and_write(store, data, splits, cfg, index, extra_meta, on_epoch)
        base += len(pack) * cfg.epochs


# ---------------------------------------------------------------- worker processes
#
# The parent puts every pending run index, then one None per process, on a task queue.
# This process and ``workers - 1`` spawned ones each take indices until they read None,
# so a slow run never holds up a fixed share of the others, and this process trains
# while the others start (importing torch takes seconds). The spawned workers report
# ("start" | "epoch" | "done" | "error", slot, ...) on an event queue, which this process
# reads after each of its own epochs and, once its share is done, until every run has
# finished: it relays epochs to ``progress``, yields finished runs and re-raises the
# first error. Each run writes its own folder atomically (run.json last), so a process
# killed at any point leaves no finished-looking run, only a folder that resumes from
# its checkpoint or is removed by the next ``mlvar train``.

_POLL_S = 0.5  # seconds between checks that the workers are alive


def _error_payload(exc: BaseException) -> tuple[bytes | None, str, str]:
    """An exception as (pickle or None, "Type: message", traceback) for the parent."""
    try:
        blob: bytes | None = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - not picklable: the parent gets the text
        blob = None
    return blob, f"{type(exc).__name__}: {exc}", traceback.format_exc()


def _worker_error(run_id: str | None, blob: bytes | None, text: str, tb: str) -> Exception:
    """The worker's exception rebuilt in the parent (an MlvarError stays one, with its
    hint), its traceback attached as a note; a RuntimeError with its text otherwise."""
    exc: Any = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001
            exc = None
    if not isinstance(exc, Exception):
        exc = RuntimeError(f"a training worker process failed: {text}")
    where = f"training {run_id}" if run_id else "loading the data"
    exc.add_note(f"raised in a training worker process while {where}:\n{tb.rstrip()}")
    return exc


def _worker(
    slot: int,
    store: ExperimentStore,
    manifest: dict[str, Any],
    splits: dict[str, SplitData],
    cfg: TrainConfig,
    extra_meta: dict[str, Any],
    tasks: Any,
    events: Any,
) -> None:
    """One worker process: train run indices from ``tasks`` until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers
    torch.set_num_threads(1)
    parent = mp.parent_process()

    def orphaned() -> None:
        if parent is not None and not parent.is_alive():
            events.cancel_join_thread()  # nobody reads the queue: do not wait to flush it
            os._exit(ExitCode.INTERNAL)  # the run folder keeps its last checkpoint

    run_id: str | None = None
    try:
        data = _build_data(splits, manifest, torch.device(cfg.device), cfg)
        while (index := tasks.get()) is not None:
            orphaned()
            run_id = run_id_for(index)
            events.put(("start", slot, run_id))

            def on_epoch(done: int, _total: int, run_id: str = run_id) -> None:
                orphaned()
                events.put(("epoch", slot, run_id, done))

            _, acc = _train_and_write(store, data, splits, cfg, index, extra_meta, on_epoch)
            events.put(("done", slot, run_id, acc))
            run_id = None
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
        events.put(("error", slot, run_id, *_error_payload(exc)))


def _train_in_workers(
    store: ExperimentStore,
    manifest: dict[str, Any],
    splits: dict[str, SplitData],
    cfg: TrainConfig,
    pending: list[int],
    extra_meta: dict[str, Any],
    progress: Callable[[int, int, str], None] | None,
    workers: int,
) -> Iterator[tuple[str, dict[str, float]]]:
    ctx = mp.get_context("spawn")  # never fork a process that has torch threads
    tasks, events = ctx.Queue(), ctx.Queue()
    for index in pending:
        tasks.put(index)
    for _ in range(workers):
        tasks.put(None)
    procs = {
        slot: ctx.Process(
            target=_worker,
            args=(slot, store, manifest, splits, cfg, extra_meta, tasks, events),
            name=f"mlvar-train-{slot}",
            daemon=True,
        )
        for slot in range(1, workers)  # slot 0 is this process
    }
    total = len(pending) * cfg.epochs
    epochs_done: dict[str, int] = {}
    training: dict[int, str] = {}  # slot -> the run it trains
    ready: list[tuple[str, dict[str, float]]] = []  # finished by workers, not yet yielded
    n_done = 0

    def report(run_id: str, done: int) -> None:
        epochs_done[run_id] = done
        if progress:
            progress(sum(epochs_done.values()), total, run_id)

    def pump(wait: bool) -> None:
        """Handle the workers' events that are there (with ``wait``, wait for one)."""
        first = wait
        while True:
            try:
                event = events.get(timeout=_POLL_S) if first else events.get_nowait()
            except queue.Empty:
                # Only once this process has done its share must the workers be running.
                _check_alive(procs, training, events, this_done=wait)
                return
            first = False
            kind, slot = event[0], event[1]
            if kind == "start":
                training[slot] = event[2]
            elif kind == "epoch":
                report(event[2], event[3])
            elif kind == "done":
                training.pop(slot, None)
                ready.append((event[2], event[3]))
            else:
                raise _worker_error(*event[2:])

    try:
        # This process takes its first run before the workers start, so which process
        # trains which run does not depend on how fast they start.
        index = tasks.get()
        for proc in procs.values():
            proc.start()
        data = _build_data(splits, manifest, torch.device(cfg.device), cfg)
        while index is not None:

            def on_epoch(done: int, _total: int, run_id: str = run_id_for(index)) -> None:
                report(run_id, done)
                pump(wait=False)

            finished = _train_and_write(store, data, splits, cfg, index, extra_meta, on_epoch)
            n_done += 1
            yield finished
            while ready:
                n_done += 1
                yield ready.pop(0)
            index = tasks.get()
        while n_done < len(pending):
            pump(wait=True)
            while ready:
                n_done += 1
                yield ready.pop(0)
    finally:
        if n_done < len(pending):  # an error, Ctrl-C, or a consumer that stopped early
            tasks.cancel_join_thread()
            for proc in procs.values():
                if proc.is_alive():
                    proc.terminate()
        for proc in procs.values():
            if proc.pid is not None:
                proc.join()
        tasks.close()
        events.close()


def _check_alive(
    procs: dict[int, Any], training: dict[int, str], events: Any, this_done: bool
) -> None:
    """Raise if a worker died without reporting (killed, out of memory, crashed), or if
    this process has done its share and every worker has exited with runs missing."""
    for slot, proc in procs.items():
        if proc.exitcode not in (None, ExitCode.OK):
            try:  # an error it reported just before dying explains more
                event = events.get(timeout=_POLL_S)
            except queue.Empty:
                event = None
            if event is not None and event[0] == "error":
                raise _worker_error(*event[2:])
            run = training.get(slot)
            raise RuntimeError(
                f"training worker process {slot} exited with code {proc.exitcode}"
                + (f" while training {run}" if run else "")
            )
    # An exited worker has flushed its events, so an empty queue is final.
    if this_done and all(p.exitcode == ExitCode.OK for p in procs.values()) and events.empty():
        raise RuntimeError("the training worker processes exited before every run finished")
