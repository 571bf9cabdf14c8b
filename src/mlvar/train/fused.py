"""The ``fused`` engine of the image models: a pack of seeds trained as one network.

A pack of ``S`` runs is one network whose every layer holds the ``S`` runs' layers side by
side: each ``Conv2d(c_in, c_out, groups=g)`` becomes ``Conv2d(S c_in, S c_out,
groups=S g)`` (run ``s`` owns channel block ``s``), each batch norm one over ``S c``
channels (per channel, hence per run: the same statistics as the run's own), the linear
head a batched matmul over ``[S, out, in]`` weights. Element-wise layers, pooling and
residual additions act per channel already, so the models' own ``forward`` runs unchanged
on the fused modules (:func:`fuse`). Measured on the CPU against ``torch.func``'s
``stack_module_state`` + ``vmap`` (``docs/training.md``, "Engines"): the grouped
convolutions were faster, so they are what this engine uses.

Each run keeps everything that is its own: its weights are initialised exactly as the
``single`` engine initialises them (``images.initial_model`` per run, then stacked), its
permutation and augmentation draws come from its own ``order`` and ``aug`` generators
(one batched gather cuts every run's batch), its loss is its own batch-mean loss (the
pack's loss is their sum, so each run's gradient is that of its own loss), and its
momentum buffers and lookahead (EMA) are its slices of the stacked ones, updated by
multi-tensor (``torch._foreach_*``) kernels: element-wise arithmetic, so a slice
evolves as the run's own tensors would. A run's result therefore does not depend on
which runs share its pack: on the CPU not even in its bits (a pack of one trains beside
a discarded twin so that it too runs the grouped kernels); against the ``single``
engine it agrees to float rounding (``tests/test_fused.py``).

The final logits of every split are those of each run's own network with its final
weights (evaluated one run at a time, after training): exactly what its ``model.pt``
computes. Checkpoints are per run: every ``checkpoint_every`` epochs each run's folder gets the
``single`` engine's ``checkpoint.pt`` for that run alone (its weights, momentum, EMA and
generator states cut out of the pack), so a run resumes alone or in any pack, by either
engine. A pack whose runs resume from different epochs trains as sub-packs of runs at
the same epoch.

Pack size: ``TrainConfig.pack_size`` (``--pack-size``), or with 0 (the image models'
default) :func:`auto_pack_size`, from a memory estimate. On the CPU the pack is cut into
slices of at least :data:`MIN_SEEDS_PER_THREAD` seeds trained in parallel Python threads,
one per core, every kernel on one thread (as the MLP's batched engine).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mlvar.config import TrainConfig
from mlvar.data.scenario import Scenario, SplitData
from mlvar.store import ExperimentStore, run_id_for
from mlvar.train import images, models
from mlvar.train.mlp import _one_thread_per_kernel
from mlvar.train.seeding import RunGenerators

#: Each CPU thread trains at least this many seeds of a pack: fewer leave its kernels
#: too small to outweigh the Python overhead of a step (``docs/performance.md``).
MIN_SEEDS_PER_THREAD = 4
#: At most this many seeds in an automatic pack.
MAX_AUTO_PACK = 64
#: Memory the automatic pack size may fill with activations: on CUDA this fraction of
#: the free device memory, on the CPU a fixed budget (bytes).
CUDA_MEMORY_FRACTION = 0.8
CPU_ACTIVATION_BUDGET = 2 << 30
#: Training memory per element of the layers' outputs (those of the leaf modules: the
#: backward's saved tensors, functional GELUs, gradients), as a multiple of one element:
#: calibrated so that airbench at batch 1024 in bf16 needs 1 GB per seed (the issue's
#: figure; 271k leaf outputs per 32x32 image x 1024 x 2 bytes x 1.8).
ACTIVATION_FACTOR = 1.8


class PackedLinear(nn.Module):
    """``S`` linear layers as one batched matmul: ``[B, S * in] -> [S, B, out]``."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.seeds = len(layers)
        self.in_features = layers[0].in_features
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        self.bias = (
            None
            if layers[0].bias is None
            else nn.Parameter(torch.stack([m.bias.detach() for m in layers]))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.seeds, self.in_features).transpose(0, 1)
        w = self.weight.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.unsqueeze(1), x, w)


def _cat(tensors: list[torch.Tensor], like: nn.Parameter | None) -> nn.Parameter:
    requires_grad = True if like is None else like.requires_grad
    return nn.Parameter(torch.cat([t.detach() for t in tensors]), requires_grad=requires_grad)


def _fuse_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    c, s = convs[0], len(convs)
    fused = nn.Conv2d(
        s * c.in_channels,
        s * c.out_channels,
        c.kernel_size,
        stride=c.stride,
        padding=c.padding,
        dilation=c.dilation,
        groups=s * c.groups,
        bias=c.bias is not None,
        padding_mode=c.padding_mode,
    )
    fused = fused.to(c.weight.device)
    fused.weight = _cat([m.weight for m in convs], c.weight)
    if c.bias is not None:
        fused.bias = _cat([m.bias for m in convs], c.bias)
    return fused


def _fuse_norm(norms: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    fused = copy.deepcopy(norms[0])  # its class, eps, momentum, affine and frozen flags
    fused.num_features = sum(m.num_features for m in norms)
    if fused.affine:
        fused.weight = _cat([m.weight for m in norms], norms[0].weight)
        fused.bias = _cat([m.bias for m in norms], norms[0].bias)
    if fused.track_running_stats:
        fused.running_mean = torch.cat([m.running_mean for m in norms])
        fused.running_var = torch.cat([m.running_var for m in norms])
    return fused


def fuse(models: list[nn.Module]) -> nn.Module:
    """One network computing ``models`` (of one architecture) side by side: input
    ``[B, S * C, H, W]`` (run ``s``'s images in channels ``s C .. (s + 1) C``), output
    ``[S, B, classes]``."""
    fused = copy.deepcopy(models[0])
    for name, module in list(fused.named_modules()):
        parts = [m.get_submodule(name) for m in models]
        if isinstance(module, nn.Conv2d):
            new: nn.Module = _fuse_conv(parts)
        elif isinstance(module, nn.BatchNorm2d):
            new = _fuse_norm(parts)
        elif isinstance(module, nn.Linear):
            new = PackedLinear(parts)
        elif isinstance(module, (nn.Conv1d, nn.Conv3d, nn.BatchNorm1d, nn.LayerNorm)):
            raise TypeError(f"the fused engine cannot stack {type(module).__name__}")
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(parent) if parent else fused, attr, new)
    return fused


class Slices:
    """How the tensors of a fused network (named as in its ``state_dict``) hold each
    run's: a slice along dim 0 (convs, norms), an index of dim 0 (the head), or the same
    value for every run (``num_batches_tracked``)."""

    def __init__(self, fused: nn.Module, seeds: int) -> None:
        self.seeds = seeds
        self.stacked = {
            f"{name}.{p}" if name else p
            for name, m in fused.named_modules()
            if isinstance(m, PackedLinear)
            for p in ("weight", "bias")
        }
        self.param_names = {id(p): n for n, p in fused.named_parameters()}

    def of(self, name: str, tensor: torch.Tensor, seed: int) -> torch.Tensor:
        """Run ``seed``'s part of ``tensor`` (a view)."""
        if name in self.stacked:
            return tensor[seed]
        if tensor.ndim == 0:
            return tensor
        return tensor.chunk(self.seeds)[seed]


class ForeachSGD(images.SGD):
    """:class:`images.SGD`'s arithmetic as multi-tensor kernels over the stacked
    parameters: a handful of kernels per step whatever the pack size (per-step launch
    overhead is what limits small networks on a GPU)."""

    @torch.no_grad()
    def step(self, lr: float) -> None:
        m = self.momentum
        for group, buffers in zip(self.groups, self.buffers, strict=True):
            pairs = [
                (p, b) for p, b in zip(group["params"], buffers, strict=True) if p.grad is not None
            ]
            if not pairs:
                continue
            params = [p for p, _ in pairs]
            bufs = [b for _, b in pairs]
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=m) if self.nesterov else bufs
            torch._foreach_add_(params, updates, alpha=-lr * group["lr_scale"])


class _SameInput(nn.Module):
    """The fused network fed the same images for every run: ``[n, C, H, W] -> [n, S, K]``
    (what :func:`images.predict` evaluates)."""

    def __init__(self, net: nn.Module, seeds: int) -> None:
        super().__init__()
        self.net, self.seeds = net, seeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat(1, self.seeds, 1, 1)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).transpose(0, 1)


# ---------------------------------------------------------------- pack size


def activation_bytes(
    cfg: TrainConfig, data: images.ImageData, element_bytes: int | None = None
) -> int:
    """Estimated training memory of one seed's activations at ``cfg.batch_size``: the
    elements its layers output per image (counted on one forward pass of two images on
    the CPU) times the batch, ``element_bytes`` (default 2 in bf16 on CUDA, else 4) and
    :data:`ACTIVATION_FACTOR`."""
    model = models.build_model(cfg.model, data.train_x.shape[1], data.n_classes)
    counted = [0]

    def count(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        counted[0] += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    x = torch.zeros(2, *data.train_x.shape[1:])
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    precision = str(images.recipe_of(cfg).get("precision", "bf16"))
    size = element_bytes or (2 if data.device.type == "cuda" and precision != "fp32" else 4)
    return int(counted[0] / 2 * cfg.batch_size * size * ACTIVATION_FACTOR)


def auto_pack_size(cfg: TrainConfig, data: images.ImageData, pending: int) -> int:
    """``cfg.pack_size``, or with 0 as many seeds as fit the activation budget (CUDA:
    :data:`CUDA_MEMORY_FRACTION` of the free memory; CPU: :data:`CPU_ACTIVATION_BUDGET`),
    at most :data:`MAX_AUTO_PACK`; never more than the pending runs."""
    if cfg.pack_size:
        return max(1, min(cfg.pack_size, pending))
    if data.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(data.device)
        budget = int(free * CUDA_MEMORY_FRACTION)
    else:
        budget = CPU_ACTIVATION_BUDGET
    fits = budget // max(1, activation_bytes(cfg, data))
    return max(1, min(pending, MAX_AUTO_PACK, fits))


# ---------------------------------------------------------------- training a pack

#: ``trace(kind, position, value)`` (tests): ``("init", s, state_dict)``, ``("aug", s,
#: draws)`` every epoch (``Augmenter.draw``) and ``("batch", s, indices)`` for the run
#: at position ``s`` of the pack.
Trace = Callable[[str, int, Any], None]


@dataclass
class Continuation:
    """What makes the runs of a pack continued runs (``mlvar.train.continuation``).

    ``starts``: each run's :class:`images.Start` (its weights, or None to initialise from
    its ``init`` generator; one ``schedule_offset`` for the pack); ``rows``: ``[S, n]``
    rows of ``data.train_x`` each run trains on, in the order of its own training set
    (its epoch permutations index these), equally many for every run; ``stats``: each
    run's ``(mean, std)`` normalisation, or None for ``data``'s (a retraining from scratch
    normalises with its enlarged set's statistics, as ``mlvar train`` would).
    """

    starts: list[images.Start]
    rows: torch.Tensor
    stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def pick(self, positions: list[int]) -> Continuation:
        """The continuation of the runs at ``positions`` of the pack."""
        return Continuation(
            [self.starts[p] for p in positions],
            self.rows[positions],
            None if self.stats is None else [self.stats[p] for p in positions],
        )

    def run_data(self, data: images.ImageData, p: int, whitening: bool) -> images.ImageData:
        """``data`` as run ``p`` sees it: its normalisation, and with ``whitening`` (a
        network initialised from its generator computes its whitening from its first
        training images) its own training rows."""
        run = data
        if self.stats is not None:
            mean, std = self.stats[p]
            run = replace(run, mean=mean, std=std)
        if whitening:
            rows = self.rows[p]
            run = replace(run, train_x=data.train_x[rows], train_y=data.train_y[rows])
        return run


@dataclass
class _Group:
    """Runs of a pack that start at one epoch (a fresh pack: all of them)."""

    positions: list[int]
    states: list[dict[str, Any] | None]  # each run's checkpoint (None: from scratch)


def train_pack(
    data: images.ImageData,
    cfg: TrainConfig,
    gens: list[RunGenerators],
    run_dirs: list[Path | None] | None = None,
    progress: images.EpochProgress | None = None,
    record_dynamics: bool = False,
    trace: Trace | None = None,
    threads: int | None = None,
    continuation: Continuation | None = None,
) -> list[images.RunOutput]:
    """Train the runs of ``gens`` as fused packs; one :class:`images.RunOutput` per run.

    ``run_dirs`` (one per run) get per-run checkpoints and are resumed from;
    ``progress(done, total)`` counts run-epochs of the whole pack; ``threads`` (CPU;
    default one per core torch would use) train slices of the pack in parallel;
    ``continuation`` continues trained runs, each on its own rows (:class:`Continuation`).
    """
    s = len(gens)
    dirs = run_dirs or [None] * s
    extras = [None] * s if continuation is None else [st.identity for st in continuation.starts]
    identities = [
        images._identity_hash(cfg, g.seeds, extra) for g, extra in zip(gens, extras, strict=True)
    ]
    by_epoch: dict[int, _Group] = {}
    for pos, (run_dir, identity) in enumerate(zip(dirs, identities, strict=True)):
        state = (
            None if run_dir is None else images.load_checkpoint(run_dir / images.CHECKPOINT_FILE)
        )
        if state is not None and (
            state.get("format") != images.CHECKPOINT_FORMAT or state.get("identity") != identity
        ):
            state = None
        group = by_epoch.setdefault(0 if state is None else int(state["epoch"]), _Group([], []))
        group.positions.append(pos)
        group.states.append(state)
    wanted = (threads or torch.get_num_threads()) if data.device.type == "cpu" else 1
    slices: list[tuple[list[int], list[dict[str, Any] | None]]] = []
    for group in by_epoch.values():
        n = len(group.positions)
        k = max(1, min(wanted, n // MIN_SEEDS_PER_THREAD))
        bounds = [round(i * n / k) for i in range(k + 1)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            slices.append((group.positions[a:b], group.states[a:b]))
    outputs: list[images.RunOutput | None] = [None] * s
    done = 0

    def on_event(kind: str, *payload: Any) -> None:
        nonlocal done
        if kind == "epoch":
            done += payload[0]
            if progress:
                progress(done, cfg.epochs * s)
        elif trace:
            trace(kind, *payload)

    def work(positions: list[int], states: list, emit: Callable[..., None], stop) -> None:
        if trace is None:  # the per-step events only when someone looks

            def emit(kind: str, *payload: Any, _emit: Callable[..., None] = emit) -> None:
                if kind == "epoch":
                    _emit(kind, *payload)

        outs = _train_slice(
            data,
            cfg,
            [gens[p] for p in positions],
            [dirs[p] for p in positions],
            [identities[p] for p in positions],
            states,
            positions,
            emit,
            record_dynamics,
            stop,
            None if continuation is None else continuation.pick(positions),
        )
        for p, out in zip(positions, outs, strict=True):
            outputs[p] = out

    recipe = images.recipe_of(cfg)
    with (
        images._full_fp32(str(recipe.get("precision", "bf16"))),
        _one_thread_per_kernel(data.device),
    ):
        if len(slices) == 1:
            work(*slices[0], on_event, threading.Event())
        else:
            _in_threads(slices, work, on_event)
    return [o for o in outputs if o is not None]


def _in_threads(
    slices: list[tuple[list[int], list]],
    work: Callable[..., None],
    on_event: Callable[..., None],
) -> None:
    """Run ``work`` on every slice in its own thread; make their callbacks in this one
    (an exception there, e.g. Ctrl-C, stops the threads at their next epoch)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def run(positions: list[int], states: list) -> None:
        try:
            torch.set_num_threads(1)  # this thread's OpenMP setting, as the caller's
            work(positions, states, lambda *e: events.put(e), stop)
        finally:
            events.put(("done",))

    with ThreadPoolExecutor(len(slices), thread_name_prefix="mlvar-fused") as pool:
        futures = [pool.submit(run, *sl) for sl in slices]
        running = len(futures)
        try:
            while running:
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if event[0] == "done":
                    running -= 1
                else:
                    on_event(*event)
        except BaseException:
            stop.set()
            raise
        for f in futures:
            f.result()


class _Stopped(Exception):
    """The pack's caller stopped it (another slice's callback raised)."""


def _train_slice(
    data: images.ImageData,
    cfg: TrainConfig,
    gens: list[RunGenerators],
    run_dirs: list[Path | None],
    identities: list[str],
    states: list[dict[str, Any] | None],
    positions: list[int],
    emit: Callable[..., None],
    record_dynamics: bool,
    stop: threading.Event,
    continuation: Continuation | None = None,
) -> list[images.RunOutput]:
    """Train runs that start at one epoch as one fused network (``continuation``: continued
    runs, see :class:`Continuation`).

    A single run trains beside a twin (a copy of it with copies of its generators,
    discarded), so that it too computes with the grouped kernels: a run's bits then do
    not depend on its pack (on the CPU, packs of 2 and 3 measured bit-identical per run
    for all three models, a plain convolution is not), which concurrent writers of one
    experiment and resumed sub-packs rely on."""
    recipe = images.recipe_of(cfg)
    precision = str(recipe.get("precision", "bf16"))
    device = data.device
    real = len(gens)
    if real == 1:
        gens = [gens[0], _twin(gens[0])]
        run_dirs, identities = [run_dirs[0], None], identities * 2
        states, positions = states * 2, [positions[0], -1]
        if continuation is not None:
            continuation = continuation.pick([0, 0])
    s = len(gens)
    if continuation is None:
        run_data = [data] * s
        models = [images.initial_model(data, cfg, g) for g in gens]
    else:
        starts = continuation.starts
        run_data = [continuation.run_data(data, p, False) for p in range(s)]
        models = [
            images.initial_model(
                continuation.run_data(data, p, starts[p].state_dict is None), cfg, g, starts[p]
            )
            for p, g in enumerate(gens)
        ]
    for pos, model in zip(positions, models, strict=True):
        if pos >= 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            emit("init", pos, state)
    net = fuse(models)
    del models
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    cut = Slices(net, s)
    single = images.make_optimizer(net, cfg, recipe)
    opt = ForeachSGD(single.groups, single.momentum, single.nesterov)
    ema = [t.clone() for t in images._ema_tensors(net)] if recipe["lookahead"] else []
    ema_names = [k for k, v in net.state_dict().items() if v.dtype.is_floating_point][: len(ema)]
    rows = None if continuation is None else continuation.rows.to(device)
    n = len(data.train_y) if rows is None else rows.shape[1]
    shared = images.Augmenter(
        data.train_x,
        int(recipe["translate"]),
        recipe["flip"],
        str(recipe.get("pad", "reflect")),
        gens[0].aug,
        n,
    )
    augs = [shared] + [shared.for_run(g.aug) for g in gens[1:]]
    offset = 0 if continuation is None else continuation.starts[0].schedule_offset
    per_epoch = images.epoch_lrs(recipe, cfg.lr, offset + cfg.epochs)
    if per_epoch is not None:
        per_epoch = per_epoch[offset:]
    elif offset:
        raise ValueError(f"schedule {recipe['schedule']!r} has no epoch offset")
    norm = _pack_normaliser(data, continuation, s)
    sizes = images.steps_per_epoch(n, cfg.batch_size, bool(recipe.get("drop_last", False)))
    total = cfg.epochs * len(sizes)
    recorded: list[list[torch.Tensor]] = [[] for _ in range(s)]
    start_epoch, step = 0, 0
    if states[0] is not None:
        _restore(net, opt, ema, ema_names, cut, gens, states, recorded, record_dynamics)
        start_epoch, step = int(states[0]["epoch"]), int(states[0]["step"])
    label_smoothing = float(recipe["label_smoothing"])
    amp = images._autocast(device, precision)
    net.train()
    for epoch in range(start_epoch, cfg.epochs):
        images._train_whitening_bias(net, recipe, epoch)
        perms = torch.stack([torch.randperm(n, generator=g.order) for g in gens])
        draws = torch.stack(
            [
                a.draw(g.aug, n, epoch, perms[p])
                for p, (a, g) in enumerate(zip(augs, gens, strict=True))
            ]
        )
        for p, run_pos in enumerate(positions):
            if run_pos >= 0:
                emit("aug", run_pos, draws[p])
        perm_d = perms.to(device, non_blocking=True)
        draws_d = draws.to(device, non_blocking=True)
        pos = 0
        for size in sizes:
            idx = perm_d[:, pos : pos + size]  # [S, B]
            for p, run_pos in enumerate(positions):
                if run_pos >= 0:
                    emit("batch", run_pos, perms[p, pos : pos + size])
            if rows is not None:  # each run's positions -> rows of the shared table
                idx = rows.gather(1, idx)
            xb = shared.batch(idx.reshape(-1), draws_d[:, pos : pos + size].reshape(-1, 3))
            xb = norm(xb).reshape(s, size, *xb.shape[1:])  # [S, B, C, H, W]
            xb = xb.transpose(0, 1).reshape(size, -1, *xb.shape[3:])
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            pos += size
            with amp:
                logits = net(xb).float()  # [S, B, K]
            losses = F.cross_entropy(
                logits.reshape(s * size, -1),
                data.train_y[idx].reshape(-1),
                label_smoothing=label_smoothing,
                reduction="none",
            )
            loss = losses.view(s, size).mean(1).sum()  # each run's gradient: its own loss's
            opt.zero_grad()
            loss.backward()
            step_lr = (
                per_epoch[epoch] if per_epoch else cfg.lr * images.lr_factor(recipe, step, total)
            )
            opt.step(step_lr)
            step += 1
            if ema and step % images.LOOKAHEAD_EVERY == 0:
                decay = 0.95**images.LOOKAHEAD_EVERY * (step / total) ** 3
                with torch.no_grad():
                    tensors = images._ema_tensors(net)
                    torch._foreach_lerp_(ema, tensors, 1 - decay)
                    torch._foreach_copy_(tensors, ema)
        if record_dynamics:
            train_logits = images.predict(
                _SameInput(net, s), data, data.eval_x["train"], 0, precision
            )
            for p in range(s):
                recorded[p].append(train_logits[:, p].half().clone())
        done = epoch + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.epochs:
            for p, run_dir in enumerate(run_dirs):
                if run_dir is not None:
                    state = _run_state(net, opt, ema, ema_names, cut, p)
                    images._save_checkpoint(
                        run_dir / images.CHECKPOINT_FILE,
                        {
                            "format": images.CHECKPOINT_FORMAT,
                            "identity": identities[p],
                            "epoch": done,
                            "step": step,
                            **state,
                            "gen_order": gens[p].order.get_state(),
                            "gen_aug": gens[p].aug.get_state(),
                            "dynamics": recorded[p] if record_dynamics else [],
                        },
                    )
        emit("epoch", real)
        if stop.is_set():
            raise _Stopped
    if ema:  # the final weights are the lookahead average, as the single engine's
        with torch.no_grad():
            torch._foreach_copy_(images._ema_tensors(net), ema)
    weights = net.state_dict()
    outputs = []
    for p, gen in enumerate(gens[:real]):
        state = {k: cut.of(k, v, p).detach().cpu().clone() for k, v in weights.items()}
        outputs.append(
            images.RunOutput(
                logits=_evaluate(run_data[p], cfg, gen, state, recipe),
                dynamics=torch.stack(recorded[p]) if record_dynamics else None,
                state_dict=state,
                resumed_from=start_epoch,
            )
        )
    return outputs


def _evaluate(
    data: images.ImageData,
    cfg: TrainConfig,
    gen: RunGenerators,
    state: dict[str, torch.Tensor],
    recipe: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """A run's final logits on every split, computed by the registry's network with its
    weights (the single engine's kernels): the stored logits are then exactly what its
    ``model.pt`` gives (a continuation of 0 epochs, saliency), not the pack's rounding."""
    model = images.initial_model(data, cfg, gen, images.Start(state))
    if data.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    precision = str(recipe.get("precision", "bf16"))
    return {
        split: images.predict(model, data, x, images.split_tta(recipe, cfg, split), precision)
        for split, x in data.eval_x.items()
    }


def _pack_normaliser(
    data: images.ImageData, continuation: Continuation | None, s: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [S B, C, H, W] -> normalised``: with ``data``'s statistics, or each run's own
    (a retraining from scratch), by the same element-wise arithmetic as
    :meth:`images.ImageData.normalise`, so a run's inputs are its own engine's bits."""
    if continuation is None or continuation.stats is None:
        return data.normalise
    mean = torch.stack([m for m, _ in continuation.stats]).to(data.device)  # [S, 1, C, 1, 1]
    std = torch.stack([d for _, d in continuation.stats]).to(data.device)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        shaped = x.reshape(s, -1, *x.shape[1:]).float()
        out = ((shaped / data.max_value - mean) / std).reshape(x.shape)
        if out.device.type == "cuda":
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    return normalise


def _twin(gen: RunGenerators) -> RunGenerators:
    """A copy of ``gen`` whose generators continue from the same states."""
    twin = copy.copy(gen)
    for source in ("init", "order", "dropout", "aug"):
        g = torch.Generator()
        g.set_state(getattr(gen, source).get_state())
        setattr(twin, source, g)
    return twin


def _run_state(
    net: nn.Module,
    opt: ForeachSGD,
    ema: list[torch.Tensor],
    ema_names: list[str],
    cut: Slices,
    p: int,
) -> dict[str, Any]:
    """Run ``p``'s weights, momentum buffers and EMA, as the single engine saves them."""
    return {
        "model": {k: cut.of(k, v, p).detach().cpu().clone() for k, v in net.state_dict().items()},
        "momentum": [
            [
                cut.of(cut.param_names[id(param)], buf, p).cpu().clone()
                for param, buf in zip(group["params"], bufs, strict=True)
            ]
            for group, bufs in zip(opt.groups, opt.buffers, strict=True)
        ],
        "ema": [cut.of(k, e, p).cpu().clone() for k, e in zip(ema_names, ema, strict=True)],
    }


@torch.no_grad()
def _restore(
    net: nn.Module,
    opt: ForeachSGD,
    ema: list[torch.Tensor],
    ema_names: list[str],
    cut: Slices,
    gens: list[RunGenerators],
    states: list[dict[str, Any] | None],
    recorded: list[list[torch.Tensor]],
    record_dynamics: bool,
) -> None:
    """Load each run's checkpoint into its slices of the pack."""
    weights = net.state_dict()
    for p, state in enumerate(states):
        assert state is not None  # a group's runs all resume, or none does
        for k, v in state["model"].items():
            cut.of(k, weights[k], p).copy_(v)
        for group, bufs, saved in zip(opt.groups, opt.buffers, state["momentum"], strict=True):
            for param, buf, value in zip(group["params"], bufs, saved, strict=True):
                cut.of(cut.param_names[id(param)], buf, p).copy_(value)
        for k, e, value in zip(ema_names, ema, state["ema"], strict=True):
            cut.of(k, e, p).copy_(value)
        gens[p].order.set_state(state["gen_order"])
        gens[p].aug.set_state(state["gen_aug"])
        recorded[p] = list(state["dynamics"]) if record_dynamics else []


# ---------------------------------------------------------------- mlvar train


def train_runs(
    store: ExperimentStore,
    scenario: Scenario,
    splits: dict[str, SplitData],
    cfg: TrainConfig,
    pending: list[int],
    extra_meta: dict[str, Any],
    progress: Callable[[int, int, str], None] | None = None,
    schedule: images.Schedule = images._in_order,
) -> Iterator[tuple[str, dict[str, float]]]:
    """:func:`images.train_runs` for ``cfg.engine == "fused"``: the runs ``pending`` in
    packs of :func:`auto_pack_size`, each written as the single engine writes a run
    (``run.json`` records engine ``fused`` and the pack's size)."""
    data = images._build_data(splits, scenario.manifest, torch.device(cfg.device), cfg)
    size = auto_pack_size(cfg, data, len(pending))
    total = len(pending) * cfg.epochs
    base = 0
    for pack in schedule(pending, size):
        label = f"runs {run_id_for(pack[0])}..{run_id_for(pack[-1])}"

        def on_epoch(done: int, _total: int, base: int = base, label: str = label) -> None:
            if progress:
                progress(base + done, total, label)

        gens = [RunGenerators(cfg.base_seed, i, cfg.vary) for i in pack]
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        outputs = train_pack(
            data,
            cfg,
            gens,
            [store.run_dir(run_id_for(i)) for i in pack],
            on_epoch,
            record_dynamics=cfg.record_dynamics,
        )
        wall = time.perf_counter() - t0
        for index, gen, out in zip(pack, gens, outputs, strict=True):
            yield images.finish_run(
                store, splits, cfg, index, gen, out, extra_meta, started_at, wall, len(pack)
            )
        base += len(pack) * cfg.epochs
