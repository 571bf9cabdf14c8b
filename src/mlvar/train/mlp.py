"""The MLP of the original study, trained by two engines with identical per-seed semantics.

Architecture: Linear-ReLU-BN-Linear-ReLU-BN-Dropout-Linear, Adam, cross-entropy.

* ``loop`` trains one ``torch.nn`` model at a time: the reference implementation.
* ``batched`` trains a pack of seeds as one set of stacked tensors (``[S, in, out]``
  weights, batched matmuls). Adam is element-wise and the loss is a sum of per-seed mean
  losses, so each seed's update is exactly the update it would get alone.

Both engines draw a run's initial weights, epoch permutations and dropout masks from that
run's own generators, in the same order, so run ``r`` starts from the same weights and
sees the same batches whichever engine trains it and whichever runs share its pack.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlvar.config import TrainConfig
from mlvar.train.seeding import RunGenerators

BN_EPS = 1e-5  # as torch.nn.BatchNorm1d
BN_MOMENTUM = 0.1  # as torch.nn.BatchNorm1d

#: ``trace(event, run_position, payload)``: an optional observer of what each run sees,
#: used by tests to check that both engines start from the same weights and batches.
Trace = Callable[[str, int, object], None]
#: ``progress(epochs_done, epochs_total)`` after every epoch of a pack.
EpochProgress = Callable[[int, int], None]


@dataclass
class TrainData:
    """Inputs for training: features flattened to ``[n, F]`` float32, labels int64."""

    x: torch.Tensor
    y: torch.Tensor
    n_classes: int


def init_params(gen: torch.Generator, dims: list[int]) -> list[torch.Tensor]:
    """Initial weights of one MLP, drawn from ``gen``.

    The distribution is ``torch.nn.Linear``'s default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weights and biases; weights are ``[in, out]``. Order: W1, b1, W2, b2, W3, b3.
    """
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        params.append((torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound)
        params.append((torch.rand(fan_out, generator=gen) * 2 - 1) * bound)
    return params


def epoch_order(gen: torch.Generator, n: int, batch_size: int) -> tuple[torch.Tensor, list[int]]:
    """One epoch's sample order (a fresh permutation) and its batch sizes.

    A trailing batch of a single sample is dropped (batch norm cannot normalise it), so the
    order may be one shorter than ``n``.
    """
    perm = torch.randperm(n, generator=gen)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if sizes[-1] < 2:
        perm = perm[: n - sizes.pop()]
    return perm, sizes


# Dropout keep-masks come from 16-bit uniform integers: three per 64-bit draw, which is
# about 4x cheaper than one float per element. The drop probability is therefore rounded
# to a multiple of 1/65536 (0.1 becomes 0.100006); the survivors are scaled by the exact
# 1/(1 - p_effective), so the expected activation is unchanged.
_LANES = 3  # int64 random_() yields 63 random bits: use the low three 16-bit lanes


def dropout_threshold(p: float) -> tuple[int, float]:
    """The int16 threshold for keep = (lane >= threshold) and the survivors' scale."""
    drop = round(p * 65536)
    return drop - 32768, 65536 / (65536 - drop)


def fill_dropout_keep(gen: torch.Generator, out: torch.Tensor, p: float) -> None:
    """Fill the bool tensor ``out`` (any shape) with one epoch's keep-mask drawn from ``gen``."""
    count = out.numel()
    draws = torch.empty(-(-count // _LANES), dtype=torch.int64).random_(generator=gen)
    lanes = draws.view(torch.int16).view(-1, 4)[:, :_LANES].reshape(-1)[:count]
    torch.ge(lanes.view(out.shape), dropout_threshold(p)[0], out=out)


def _scaled_keep(keep: torch.Tensor, p: float, device: torch.device) -> torch.Tensor:
    # A float mask holding 0 or 1/(1-p): one multiply per step, and float*float is far
    # faster than float*bool on the CPU.
    return keep.to(device=device, dtype=torch.float32).mul_(dropout_threshold(p)[1])


def _adam(params, cfg: TrainConfig) -> torch.optim.Adam:
    # The single-tensor implementation in both engines: the same kernels, so the same
    # rounding per element (Adam is element-wise, so one flat tensor updates exactly as
    # its pieces would).
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


class MLP(nn.Module):
    """The study's MLP as an ordinary ``nn.Module`` (used by the ``loop`` engine)."""

    def __init__(self, n_features: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fc3 = nn.Linear(hidden, n_classes)

    def load_init(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, (w, b) in zip(
                (self.fc1, self.fc2, self.fc3),
                zip(params[::2], params[1::2], strict=True),
                strict=True,
            ):
                layer.weight.copy_(w.T)
                layer.bias.copy_(b)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn1(F.relu(self.fc1(x)))
        h = self.bn2(F.relu(self.fc2(h)))
        if keep is not None:  # dropout with a mask from the run's own generator
            h = h * keep
        return self.fc3(h)


def _dims(data: TrainData, cfg: TrainConfig) -> list[int]:
    return [data.x.shape[1], cfg.hidden, cfg.hidden, data.n_classes]


def train_loop(
    data: TrainData,
    cfg: TrainConfig,
    gens: list[RunGenerators],
    eval_x: dict[str, torch.Tensor],
    progress: EpochProgress | None = None,
    trace: Trace | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Train one model per entry of ``gens``, one after the other.

    Returns, per run, the logits ``[n, C]`` of every tensor in ``eval_x`` (on the CPU).
    """
    device = data.x.device
    n = len(data.y)
    results = []
    total = cfg.epochs * len(gens)
    for pos, g in enumerate(gens):
        init = init_params(g.init, _dims(data, cfg))
        if trace:
            trace("init", pos, init)
        model = MLP(data.x.shape[1], cfg.hidden, data.n_classes).to(device)
        model.load_init(init)
        opt = _adam(model.parameters(), cfg)
        model.train()
        keep = torch.empty(n, cfg.hidden, dtype=torch.bool)
        for epoch in range(cfg.epochs):
            order, sizes = epoch_order(g.order, n, cfg.batch_size)
            if cfg.dropout:
                fill_dropout_keep(g.dropout, keep, cfg.dropout)
            order_d, keep_d = order.to(device), _scaled_keep(keep, cfg.dropout, device)
            start = 0
            for step, size in enumerate(sizes):
                idx = order_d[start : start + size]
                if trace:
                    trace("batch", pos, (epoch, step, order[start : start + size]))
                mask = keep_d[start : start + size] if cfg.dropout else None
                start += size
                loss = F.cross_entropy(model(data.x[idx], mask), data.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if progress:
                progress(pos * cfg.epochs + epoch + 1, total)
        model.eval()
        with torch.no_grad():
            results.append({k: model(x).float().cpu() for k, x in eval_x.items()})
    return results


class StackedMLP:
    """``S`` MLPs as stacked parameter tensors (used by the ``batched`` engine)."""

    def __init__(self, inits: list[list[torch.Tensor]], device: torch.device) -> None:
        s, hidden = len(inits), inits[0][0].shape[-1]
        stacked = [torch.stack(ps) for ps in zip(*inits, strict=True)]
        w1, b1, w2, b2, w3, b3 = stacked
        ones, zeros = torch.ones(s, hidden), torch.zeros(s, hidden)
        tensors = [w1, b1, ones, zeros, w2, b2, ones, zeros, w3, b3]
        # All parameters and their gradients live in two flat tensors; the layers are leaf
        # views into them. Autograd accumulates each layer's gradient in place into its
        # view, and the optimiser updates one tensor per step instead of ten small ones.
        self.flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
        self.flat.grad = torch.zeros_like(self.flat)
        self.layers, start = [], 0
        for t in tensors:
            size = t.numel()
            view = self.flat[start : start + size].view(t.shape).requires_grad_()
            view.grad = self.flat.grad[start : start + size].view(t.shape)
            self.layers.append(view)
            start += size
        self.running = [
            [torch.zeros(s * hidden, device=device), torch.ones(s * hidden, device=device)]
            for _ in range(2)
        ]

    def parameters(self) -> list[torch.Tensor]:
        return [self.flat]

    def zero_grad(self) -> None:
        self.flat.grad.zero_()

    def _bn(
        self, h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, layer: int, train: bool
    ) -> torch.Tensor:
        # Batch norm of [S, B, H] as F.batch_norm over [B, S*H]: the very kernel the loop
        # engine's nn.BatchNorm1d runs, so both engines round alike.
        s, b, hidden = h.shape
        flat = h.transpose(0, 1).reshape(b, s * hidden)
        running_mean, running_var = self.running[layer]
        out = F.batch_norm(
            flat,
            running_mean,
            running_var,
            gamma.reshape(-1),
            beta.reshape(-1),
            train,
            BN_MOMENTUM,
            BN_EPS,
        )
        return out.view(b, s, hidden).transpose(0, 1)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor | None = None, train: bool = True
    ) -> torch.Tensor:
        """``x`` is ``[S, B, F]`` (or ``[B, F]``, shared by all seeds); returns ``[S, B, C]``."""
        w1, b1, g1, be1, w2, b2, g2, be2, w3, b3 = self.layers
        h = self._bn(F.relu(torch.matmul(x, w1) + b1.unsqueeze(1)), g1, be1, 0, train)
        h = self._bn(F.relu(torch.matmul(h, w2) + b2.unsqueeze(1)), g2, be2, 1, train)
        if keep is not None:
            h = h * keep
        return torch.matmul(h, w3) + b3.unsqueeze(1)


def train_batched(
    data: TrainData,
    cfg: TrainConfig,
    gens: list[RunGenerators],
    eval_x: dict[str, torch.Tensor],
    progress: EpochProgress | None = None,
    trace: Trace | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Train one model per entry of ``gens`` together as stacked tensors.

    Same contract as :func:`train_loop`.
    """
    device = data.x.device
    n, s = len(data.y), len(gens)
    inits = [init_params(g.init, _dims(data, cfg)) for g in gens]
    if trace:
        for pos, init in enumerate(inits):
            trace("init", pos, init)
    model = StackedMLP(inits, device)
    opt = _adam(model.parameters(), cfg)
    keep = torch.empty(s, n, cfg.hidden, dtype=torch.bool)
    order = torch.empty(s, n, dtype=torch.int64)
    for epoch in range(cfg.epochs):
        # Every run permutes the same n samples, so all runs have the same batch sizes.
        for pos, g in enumerate(gens):
            perm, sizes = epoch_order(g.order, n, cfg.batch_size)
            order[pos, : len(perm)] = perm
            if cfg.dropout:
                fill_dropout_keep(g.dropout, keep[pos], cfg.dropout)
        order_d, keep_d = order.to(device), _scaled_keep(keep, cfg.dropout, device)
        start = 0
        for step, size in enumerate(sizes):
            idx = order_d[:, start : start + size]
            if trace:
                for pos in range(s):
                    trace("batch", pos, (epoch, step, order[pos, start : start + size]))
            mask = keep_d[:, start : start + size] if cfg.dropout else None
            start += size
            logits = model.forward(data.x[idx], mask)
            per_sample = F.cross_entropy(
                logits.reshape(s * size, -1), data.y[idx].reshape(-1), reduction="none"
            )
            loss = per_sample.view(s, size).mean(dim=1).sum()
            model.zero_grad()
            loss.backward()
            opt.step()
        if progress:
            progress((epoch + 1) * s, cfg.epochs * s)
    with torch.no_grad():
        outs = {k: model.forward(x, train=False).float().cpu() for k, x in eval_x.items()}
    return [{k: v[pos] for k, v in outs.items()} for pos in range(s)]


ENGINES = {"batched": train_batched, "loop": train_loop}
