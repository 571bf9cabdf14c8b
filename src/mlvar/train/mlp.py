"""The MLP of the original study, trained by two engines with identical per-seed semantics.

Architecture: Linear-ReLU-BN-Linear-ReLU-BN-Dropout-Linear, Adam. The head (``mlvar.recipes``)
is ``softmax`` (mlvar: one logit per class, cross-entropy) or ``sigmoid`` (the study's: one
logit ``z``, binary cross-entropy, prediction ``round(sigmoid(z))``); a sigmoid head's
outputs are returned as the two-class logits ``[0, z]`` (:func:`two_class_logits`), whose
softmax is the sigmoid, so the analysis reads them as any other logits.

* ``loop`` trains one ``torch.nn`` model at a time: the reference implementation.
* ``batched`` trains a pack of seeds as one set of stacked tensors (``[S, in, out]``
  weights, batched matmuls) with a hand-written forward and backward pass. Adam is
  element-wise and the loss is a sum of per-seed mean losses, so each seed's update is
  exactly the update it would get alone.

Both engines draw a run's initial weights, epoch permutations and dropout masks from that
run's own generators, in the same order, so run ``r`` starts from the same weights and
sees the same batches whichever engine trains it and whichever runs share its pack. On
the CPU both engines also compute with the same kernels in the same order, so they give
bit-identical logits (tested), and a run's logits do not depend on its pack. (The sigmoid
head's one-wide output layer is the exception: its matmuls take another BLAS path batched
than alone, so the engines agree to ~1e-6 there, not bit for bit.)

Threads (CPU): both engines run every kernel on one intra-op thread. The results then do
not depend on the machine's core count (batch norm's CPU kernel splits its sums across
threads, so its rounding changes with the thread count), and the batched engine instead
uses the cores by training slices of its pack in parallel Python threads (kernels release
the GIL). At these sizes two OpenMP threads per kernel gave at best 1.2x over one, and on
a busy machine were often several times slower (an OpenMP team waits at every kernel's
barrier for its slowest thread); independent slices scale and do not wait on each other.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlvar.config import TrainConfig
from mlvar.recipes import mlp_head
from mlvar.train.optim import Adam
from mlvar.train.seeding import RunGenerators

BN_EPS = 1e-5  # as torch.nn.BatchNorm1d
BN_MOMENTUM = 0.1  # as torch.nn.BatchNorm1d
#: The batched engine gives each CPU worker thread at least this many seeds: below that,
#: the Python overhead of a step outweighs its arithmetic.
MIN_SEEDS_PER_WORKER = 8

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


@contextmanager
def _one_thread_per_kernel(device: torch.device) -> Iterator[None]:
    """Run CPU kernels single-threaded for the duration (see the module docstring)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def head_of(cfg: TrainConfig) -> str:
    """The head of ``cfg``'s MLP under its protocol: ``softmax`` or ``sigmoid``."""
    return mlp_head(cfg.protocol, cfg.model)


def two_class_logits(z: torch.Tensor) -> torch.Tensor:
    """A sigmoid head's outputs ``[..., 1]`` as per-class logits ``[..., 2]``: ``[0, z]``.

    ``softmax([0, z])[1] = sigmoid(z)``, and ``argmax`` picks class 1 exactly when
    ``round(sigmoid(z))`` (float32, round half to even, as the study's ``np.round``) is 1:
    where the two disagree (``0 < z`` so small that the float32 sigmoid is exactly 0.5,
    which rounds to 0) ``z`` is stored as 0, a tie that ``argmax`` gives to class 0.
    """
    z = z[..., 0]
    agree = torch.round(torch.sigmoid(z)) == (z > 0)
    z = torch.where(agree, z, torch.zeros_like(z))
    return torch.stack([torch.zeros_like(z), z], dim=-1)


def _adam(params, cfg: TrainConfig) -> Adam:
    # The same optimiser in both engines: the same kernels, so the same rounding per
    # element (Adam is element-wise, so one flat tensor updates exactly as its pieces would).
    return Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class MLP(nn.Module):
    """The study's MLP as an ordinary ``nn.Module`` (used by the ``loop`` engine)."""

    def __init__(self, n_features: int, hidden: int, n_classes: int, outputs: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fc3 = nn.Linear(hidden, outputs or n_classes)  # outputs=1: a sigmoid head

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


class TwoClassLogits(nn.Module):
    """A sigmoid-head :class:`MLP` seen as a two-class model: ``[0, z]`` per sample."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x)
        return torch.cat([torch.zeros_like(z), z], dim=-1)


def _outputs(data: TrainData, cfg: TrainConfig) -> int:
    return 1 if head_of(cfg) == "sigmoid" else data.n_classes


def _dims(data: TrainData, cfg: TrainConfig) -> list[int]:
    return [data.x.shape[1], cfg.hidden, cfg.hidden, _outputs(data, cfg)]


def _class_logits(out: torch.Tensor, head: str) -> torch.Tensor:
    return two_class_logits(out) if head == "sigmoid" else out


def train_loop(
    data: TrainData,
    cfg: TrainConfig,
    gens: list[RunGenerators],
    eval_x: dict[str, torch.Tensor],
    progress: EpochProgress | None = None,
    trace: Trace | None = None,
    dynamics: torch.Tensor | None = None,
    weights: bool = False,
    starts: list[dict[str, torch.Tensor]] | None = None,
    rows: list[torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Train one model per entry of ``gens``, one after the other.

    Returns, per run, the logits ``[n, C]`` of every tensor in ``eval_x`` (on the CPU).
    With ``dynamics`` (inputs ``[m, F]``, usually the training set), each run's result also
    holds ``"dynamics"``: eval-mode logits of those inputs after every epoch, ``[E, m, C]``.
    Recording reads the model only; it changes nothing in training. With ``weights``, it
    holds ``"state_dict"``: the trained :class:`MLP`'s ``state_dict`` (CPU tensors).

    Continuation (``mlvar.train.continuation``): ``starts`` gives each run's initial
    :class:`MLP` ``state_dict`` (batch-norm statistics included) instead of drawing it
    from its ``init`` generator, and ``trace("start", pos, state_dict)`` then reports the
    weights the first step starts from; ``rows`` gives each run's training set as indices
    of ``data``'s rows (CPU int64; default all of them, in order): an epoch permutes
    ``len(rows[pos])`` positions and trains on those rows, exactly as it would on the
    data ``data.x[rows[pos]]``.
    """
    device = data.x.device
    results = []
    total = cfg.epochs * len(gens)
    head = head_of(cfg)
    # The study's loss: BCEWithLogitsLoss on [B, 1] outputs and float targets.
    targets = data.y.float().unsqueeze(1) if head == "sigmoid" else data.y
    loss_of = F.binary_cross_entropy_with_logits if head == "sigmoid" else F.cross_entropy
    with _one_thread_per_kernel(device):
        for pos, g in enumerate(gens):
            n = len(data.y) if rows is None else len(rows[pos])
            model = MLP(data.x.shape[1], cfg.hidden, data.n_classes, _outputs(data, cfg))
            model = model.to(device)
            if starts is None:
                init = init_params(g.init, _dims(data, cfg))
                if trace:
                    trace("init", pos, init)
                model.load_init(init)
            else:
                model.load_state_dict(starts[pos])
                if trace:
                    trace("start", pos, _state_copy(model))
            opt = _adam(model.parameters(), cfg)
            model.train()
            keep = torch.empty(n, cfg.hidden, dtype=torch.bool)
            recorded = []
            for epoch in range(cfg.epochs):
                order, sizes = epoch_order(g.order, n, cfg.batch_size)
                if rows is not None:
                    order = rows[pos][order]
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
                    loss = loss_of(model(data.x[idx], mask), targets[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if dynamics is not None:
                    model.eval()
                    with torch.no_grad():
                        recorded.append(_class_logits(model(dynamics).float().cpu(), head))
                    model.train()
                if progress:
                    progress(pos * cfg.epochs + epoch + 1, total)
            model.eval()
            with torch.no_grad():
                results.append(
                    {k: _class_logits(model(x).float().cpu(), head) for k, x in eval_x.items()}
                )
            if dynamics is not None:
                results[-1]["dynamics"] = torch.stack(recorded)
            if weights:
                results[-1]["state_dict"] = _state_copy(model)
    return results


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _stacked_states(
    states: list[dict[str, torch.Tensor]],
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """:class:`MLP` state dicts as :class:`_Pack`'s stacked parameters (its order and
    layouts), running statistics ``[S * H]`` and per-seed ``num_batches_tracked``."""

    def stack(key: str, transpose: bool = False) -> torch.Tensor:
        return torch.stack([st[key].T if transpose else st[key] for st in states]).float()

    tensors = []
    for k in (1, 2):
        tensors += [stack(f"fc{k}.weight", True), stack(f"fc{k}.bias")]
        tensors += [stack(f"bn{k}.weight"), stack(f"bn{k}.bias")]
    tensors += [stack("fc3.weight"), stack("fc3.bias")]  # [S, C, H]: W3 stored transposed
    running = [
        (stack(f"bn{k}.running_mean").reshape(-1), stack(f"bn{k}.running_var").reshape(-1))
        for k in (1, 2)
    ]
    tracked = [int(st["bn1.num_batches_tracked"]) for st in states]
    return tensors, running, tracked


class _Pack:
    """``S`` MLPs as stacked tensors, trained by a hand-written forward and backward pass.

    Layouts (``S`` seeds, ``B`` batch rows, ``H`` hidden units, ``C`` classes):

    * Parameters and their gradients live in two flat tensors (Adam updates one tensor, in
      ~7 kernels, instead of ten small ones); the layers are views: ``W1 [S, F, H]``,
      ``b1, g1, be1 [S, H]``, ``W2 [S, H, H]``, ``b2, g2, be2 [S, H]``, ``W3t [S, C, H]``
      (the output layer is stored transposed: batched matmuls with an output only ``C`` = 2
      wide are ~4x slower on the CPU than with ``C`` as the rows), ``b3 [S, C]``.
    * The activations that batch norm sees are kept as ``[B, S, H]``, that is ``[B, S*H]``:
      ``torch.native_batch_norm`` over ``S*H`` channels is then a plain call on contiguous
      memory, the very kernel ``nn.BatchNorm1d`` runs on the loop engine's ``[B, H]``, so
      both engines round alike (a custom batch norm made a seed diverge chaotically). The
      batched matmuls read that layout through a transposed view (``bmm`` takes strided
      operands without copying) and write ``[S, B, H]``; the ReLU that follows writes the
      result back into ``[B, S, H]``, so the transposition costs no extra pass.
    * Gradients are written straight into the flat gradient tensor (``out=``), so there is
      no zeroing and no accumulation.

    Doing without autograd saves its bookkeeping, which at these sizes (a step is ~100
    small kernels) costs as much as the arithmetic, and lets every intermediate buffer be
    reused from step to step.
    """

    def __init__(
        self,
        inits: list[list[torch.Tensor]],
        device: torch.device,
        head: str = "softmax",
        states: list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Seeds from initial weights ``inits`` (:func:`init_params`), or, with ``states``
        (``inits`` then ignored), from trained :class:`MLP` state dicts: the inverse of
        :meth:`state_dicts`."""
        if states is not None:
            tensors, running, tracked = _stacked_states(states)
            s, hidden = len(states), tensors[0].shape[-1]
        else:
            s, hidden = len(inits), inits[0][0].shape[-1]
            stacked = [torch.stack(ps) for ps in zip(*inits, strict=True)]
            w1, b1, w2, b2, w3, b3 = stacked
            ones, zeros = torch.ones(s, hidden), torch.zeros(s, hidden)
            tensors = [w1, b1, ones, zeros, w2, b2, ones, zeros, w3.transpose(1, 2), b3]
            running = [(torch.zeros(s * hidden), torch.ones(s * hidden)) for _ in range(2)]
            tracked = [0] * s
        self.head = head
        self.flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
        self.flat.grad = torch.zeros_like(self.flat)
        self.params, self.grads, start = [], [], 0
        for t in tensors:
            size = t.numel()
            self.params.append(self.flat[start : start + size].view(t.shape))
            self.grads.append(self.flat.grad[start : start + size].view(t.shape))
            start += size
        self.running = [(m.to(device), v.to(device)) for m, v in running]
        self.s, self.hidden = s, hidden
        self.steps = 0  # training steps taken here (batch norm's num_batches_tracked)
        self.tracked = tracked  # each seed's num_batches_tracked before them
        self._buffers: dict[int, list[torch.Tensor]] = {}

    def parameters(self) -> list[torch.Tensor]:
        return [self.flat]

    def _workspace(self, b: int) -> list[torch.Tensor]:
        # Step buffers in the [B, S, H] layout, one set per batch size (at most two sizes).
        if b not in self._buffers:
            shape = (b, self.s, self.hidden)
            self._buffers[b] = [torch.empty(shape, device=self.flat.device) for _ in range(4)]
        return self._buffers[b]

    def train_step(self, x: torch.Tensor, onehot: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Gradients of the summed per-seed mean cross-entropy, written to ``flat.grad``.

        ``x`` is ``[S, B, F]``, ``onehot`` the float targets ``[S, B, C]``, ``keep`` the
        scaled dropout mask ``[B, S, H]`` (or None).
        """
        w1, b1, g1, be1, w2, b2, g2, be2, w3t, b3 = self.params
        gw1, gb1, gg1, gbe1, gw2, gb2, gg2, gbe2, gw3t, gb3 = self.grads
        (rm1, rv1), (rm2, rv2) = self.running
        s, b, h = x.shape[0], x.shape[1], self.hidden
        a1, a2, dy, dz = self._workspace(b)  # all [B, S, H]

        # Forward. native_batch_norm also updates the running statistics, as in train mode.
        z1 = torch.baddbmm(b1.unsqueeze(1), x, w1)  # [S, B, H]
        torch.clamp_min(z1.transpose(0, 1), 0, out=a1)  # ReLU (what F.relu runs)
        y1, mean1, invstd1 = torch.native_batch_norm(
            a1.view(b, s * h), g1.view(-1), be1.view(-1), rm1, rv1, True, BN_MOMENTUM, BN_EPS
        )
        y1 = y1.view(b, s, h).transpose(0, 1)  # [S, B, H] view for the matmuls
        z2 = torch.baddbmm(b2.unsqueeze(1), y1, w2)
        torch.clamp_min(z2.transpose(0, 1), 0, out=a2)
        y2, mean2, invstd2 = torch.native_batch_norm(
            a2.view(b, s * h), g2.view(-1), be2.view(-1), rm2, rv2, True, BN_MOMENTUM, BN_EPS
        )
        if keep is not None:
            y2.mul_(keep.view(b, s * h))
        y2 = y2.view(b, s, h).transpose(0, 1)
        logits = torch.baddbmm(b3.unsqueeze(1), y2, w3t.transpose(1, 2))  # [S, B, C]

        if self.head == "sigmoid":
            # Binary cross-entropy with logits, mean over the batch (``onehot`` holds the
            # float targets [S, B, 1]): autograd's (sigmoid(z) - y) * 1, divided by B.
            dlogits = torch.sigmoid(logits).sub_(onehot).div_(b)
        else:
            # Cross-entropy, mean over the batch: the kernels and constants autograd uses
            # for F.cross_entropy (nll_loss puts -1/B at the target, then log_softmax's
            # backward).
            log_p = torch.log_softmax(logits, -1)
            dlogits = torch._log_softmax_backward_data(onehot * (-1.0 / b), log_p, -1, log_p.dtype)

        # Backward, layer 3.
        torch.bmm(dlogits.transpose(1, 2), y2, out=gw3t)
        torch.sum(dlogits, 1, out=gb3)
        dy_sbh = torch.bmm(dlogits, w3t)  # [S, B, H]
        if keep is not None:
            torch.mul(dy_sbh.transpose(0, 1), keep, out=dy)
        else:
            dy.copy_(dy_sbh.transpose(0, 1))
        # Layer 2 (batch norm, ReLU, linear).
        dz2 = self._bn_relu_backward(dy, a2, g2, rm2, rv2, mean2, invstd2, gg2, gbe2, dz)
        torch.bmm(y1.transpose(1, 2), dz2, out=gw2)
        torch.sum(dz2, 1, out=gb2)
        dy.copy_(torch.bmm(dz2, w2.transpose(1, 2)).transpose(0, 1))
        # Layer 1.
        dz1 = self._bn_relu_backward(dy, a1, g1, rm1, rv1, mean1, invstd1, gg1, gbe1, dz)
        torch.bmm(x.transpose(1, 2), dz1, out=gw1)
        torch.sum(dz1, 1, out=gb1)
        self.steps += 1

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each seed's weights as the ``state_dict`` of an :class:`MLP` (CPU copies), so a
        batched run loads into the ``nn.Module`` exactly as a loop run does."""
        w1, b1, g1, be1, w2, b2, g2, be2, w3t, b3 = (p.detach().cpu() for p in self.params)
        (rm1, rv1), (rm2, rv2) = (
            (m.detach().cpu().view(self.s, -1), v.detach().cpu().view(self.s, -1))
            for m, v in self.running
        )
        out = []
        for i in range(self.s):
            tracked = torch.tensor(self.tracked[i] + self.steps, dtype=torch.int64)
            state = {}
            for k, w, b in ((1, w1, b1), (2, w2, b2)):
                gamma, beta, rm, rv = (g1, be1, rm1, rv1) if k == 1 else (g2, be2, rm2, rv2)
                state[f"fc{k}.weight"] = w[i].T.contiguous()
                state[f"fc{k}.bias"] = b[i].clone()
                state[f"bn{k}.weight"] = gamma[i].clone()
                state[f"bn{k}.bias"] = beta[i].clone()
                state[f"bn{k}.running_mean"] = rm[i].clone()
                state[f"bn{k}.running_var"] = rv[i].clone()
                state[f"bn{k}.num_batches_tracked"] = tracked.clone()
            state["fc3.weight"] = w3t[i].clone()  # stored [C, H], as nn.Linear
            state["fc3.bias"] = b3[i].clone()
            out.append(state)
        return out

    @staticmethod
    def _bn_relu_backward(dy, a, gamma, rm, rv, mean, invstd, g_gamma, g_beta, out):
        """Backward of ``batch_norm(relu(z))``; returns dL/dz as an ``[S, B, H]`` view."""
        b, s, h = a.shape
        da, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            dy.view(b, s * h),
            a.view(b, s * h),
            gamma.view(-1),
            rm,
            rv,
            mean,
            invstd,
            True,
            BN_EPS,
            [True, True, True],
        )
        g_gamma.view(-1).copy_(dgamma)
        g_beta.view(-1).copy_(dbeta)
        # ReLU's backward from its output, as autograd does: pass where a > 0.
        torch.ops.aten.threshold_backward.grad_input(da.view(b, s, h), a, 0, grad_input=out)
        return out.transpose(0, 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits ``[S, n, C]`` of the ``[n, F]`` inputs ``x``, for every seed."""
        w1, b1, g1, be1, w2, b2, g2, be2, w3t, b3 = self.params
        (rm1, rv1), (rm2, rv2) = self.running
        n, s, h = x.shape[0], self.s, self.hidden

        def bn(z: torch.Tensor, gamma, beta, rm, rv) -> torch.Tensor:
            flat = F.relu(z).transpose(0, 1).reshape(n, s * h)
            out = F.batch_norm(flat, rm, rv, gamma.view(-1), beta.view(-1), False, 0.0, BN_EPS)
            return out.view(n, s, h).transpose(0, 1)

        y1 = bn(torch.baddbmm(b1.unsqueeze(1), x.expand(s, -1, -1), w1), g1, be1, rm1, rv1)
        y2 = bn(torch.baddbmm(b2.unsqueeze(1), y1, w2), g2, be2, rm2, rv2)
        return torch.baddbmm(b3.unsqueeze(1), y2, w3t.transpose(1, 2))


def train_batched(
    data: TrainData,
    cfg: TrainConfig,
    gens: list[RunGenerators],
    eval_x: dict[str, torch.Tensor],
    progress: EpochProgress | None = None,
    trace: Trace | None = None,
    dynamics: torch.Tensor | None = None,
    weights: bool = False,
    starts: list[dict[str, torch.Tensor]] | None = None,
    rows: list[torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Train one model per entry of ``gens`` together as stacked tensors.

    Same contract as :func:`train_loop` (``rows`` must all have one length: the runs of a
    pack share their batch sizes). On the CPU the pack is cut into slices of at least
    :data:`MIN_SEEDS_PER_WORKER` seeds, trained in parallel threads (one per core at most);
    the callbacks are still made in the calling thread.
    """
    device = data.x.device
    s = len(gens)
    if rows is not None and len({len(r) for r in rows}) > 1:
        raise ValueError("the runs of a pack must train on equally many rows")
    inits: list[list[torch.Tensor]] = []
    if starts is None:
        inits = [init_params(g.init, _dims(data, cfg)) for g in gens]
        if trace:
            for pos, init in enumerate(inits):
                trace("init", pos, init)
    workers = _cpu_workers(s) if device.type == "cpu" else 1
    bounds = [round(i * s / workers) for i in range(workers + 1)]
    slices = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    done = 0  # run-epochs

    def dispatch(kind: str, *payload) -> None:  # makes the callbacks
        nonlocal done
        if kind == "epoch":
            done += payload[0]
            if progress:
                progress(done, cfg.epochs * s)
        elif trace:
            trace(kind, *payload)

    job = _Job(
        data,
        cfg,
        gens,
        inits,
        eval_x,
        tracing=trace is not None,
        dynamics=dynamics,
        weights=weights,
        starts=starts,
        rows=rows,
    )
    with _one_thread_per_kernel(device):
        if workers == 1:
            outs = [job.train(slices[0], dispatch)]
        else:
            outs = job.train_in_threads(slices, dispatch)
    return [
        {k: v[i] for k, v in out.items()}
        for out, runs in zip(outs, slices, strict=True)
        for i in range(len(runs))
    ]


def _cpu_workers(seeds: int) -> int:
    """Threads for a pack of ``seeds`` on the CPU: one per core, MIN_SEEDS_PER_WORKER each."""
    return max(1, min(torch.get_num_threads(), seeds // MIN_SEEDS_PER_WORKER))


@dataclass
class _Job:
    """What the slices of one :func:`train_batched` call share."""

    data: TrainData
    cfg: TrainConfig
    gens: list[RunGenerators]
    inits: list[list[torch.Tensor]]
    eval_x: dict[str, torch.Tensor]
    tracing: bool
    dynamics: torch.Tensor | None = None  # inputs evaluated after every epoch
    weights: bool = False  # also return each run's state_dict
    starts: list[dict[str, torch.Tensor]] | None = None  # trained weights to continue
    rows: list[torch.Tensor] | None = None  # each run's training rows of data
    stop: threading.Event = field(default_factory=threading.Event)

    def train_in_threads(self, slices: list[range], dispatch: Callable[..., None]) -> list:
        """Train each slice in its own thread; make the workers' callbacks in this one."""
        events: queue.SimpleQueue = queue.SimpleQueue()

        def work(runs: range) -> dict[str, Any]:
            try:
                torch.set_num_threads(1)  # this thread's OpenMP setting, as the caller's
                return self.train(runs, lambda *event: events.put(event))
            finally:
                events.put(("done",))

        with ThreadPoolExecutor(len(slices), thread_name_prefix="mlvar-pack") as pool:
            futures = [pool.submit(work, runs) for runs in slices]
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
                        dispatch(*event)
            except BaseException:
                self.stop.set()  # e.g. Ctrl-C: workers end at their next epoch
                raise
            return [f.result() for f in futures]

    def train(self, runs: range, emit: Callable[..., None]) -> dict[str, Any]:
        """Train the runs ``runs`` together; return their eval logits ``[S, n, C]`` (and,
        with ``weights``, ``"state_dict"``: a list of ``S`` state dicts).

        Calls ``emit("epoch", len(runs))`` after every epoch and, when tracing,
        ``emit("batch", run, (epoch, step, indices))`` for every batch of every run (and
        ``emit("start", run, state_dict)`` before the first, when continuing).
        """
        data, cfg, gens, run_rows = self.data, self.cfg, self.gens, self.rows
        device = data.x.device
        n, s = (len(data.y) if run_rows is None else len(run_rows[runs[0]])), len(runs)
        head = head_of(cfg)
        if self.starts is None:
            model = _Pack([self.inits[r] for r in runs], device, head)
        else:
            model = _Pack([], device, head, states=[self.starts[r] for r in runs])
            if self.tracing:
                for r, state in zip(runs, model.state_dicts(), strict=True):
                    emit("start", r, state)
        opt = _adam(model.parameters(), cfg)
        if head == "sigmoid":  # the float targets of binary cross-entropy, [n, 1]
            onehot_all = data.y.float().unsqueeze(1)
        else:
            onehot_all = F.one_hot(data.y, data.n_classes).float()
        # One epoch's keep-masks as [n, S, H], the layout _Pack wants.
        keep = torch.empty((n, s, cfg.hidden) if cfg.dropout else (0,), dtype=torch.bool)
        scale = dropout_threshold(cfg.dropout)[1]
        order = torch.empty(s, n, dtype=torch.int64)
        recorded = []
        for epoch in range(cfg.epochs):
            if self.stop.is_set():
                raise RuntimeError("training was stopped")
            # Every run permutes the same n samples, so all runs have the same batch sizes.
            for i, r in enumerate(runs):
                perm, sizes = epoch_order(gens[r].order, n, cfg.batch_size)
                order[i, : len(perm)] = perm if run_rows is None else run_rows[r][perm]
                if cfg.dropout:
                    fill_dropout_keep(gens[r].dropout, keep[:, i], cfg.dropout)
            # One gather per epoch, not two per step: each step's batch is then a view.
            # (index_select is ~4x faster than advanced indexing here.)
            order_d = order.to(device).view(-1)
            x_epoch = data.x.index_select(0, order_d).view(s, n, -1)  # [S, n, F]
            onehot_epoch = onehot_all.index_select(0, order_d).view(s, n, -1)  # [S, n, C]
            keep_d = keep.to(device) if cfg.dropout else None
            start = 0
            for step, size in enumerate(sizes):
                if self.tracing:
                    for i, r in enumerate(runs):
                        emit("batch", r, (epoch, step, order[i, start : start + size].clone()))
                rows = slice(start, start + size)
                start += size
                # The float mask (0 or the survivors' scale, the loop engine's values) is
                # made per step, in cache; from uint8 as bool->float is ~4x slower.
                mask = torch.mul(keep_d[rows].view(torch.uint8), scale) if cfg.dropout else None
                model.train_step(x_epoch[:, rows], onehot_epoch[:, rows], mask)
                opt.step()
            if self.dynamics is not None:
                recorded.append(_class_logits(model.predict(self.dynamics).float().cpu(), head))
            emit("epoch", s)
        out = {
            k: _class_logits(model.predict(x).float().cpu(), head) for k, x in self.eval_x.items()
        }
        if self.dynamics is not None:
            out["dynamics"] = torch.stack(recorded, dim=1)  # [S, E, m, C]
        if self.weights:
            out["state_dict"] = model.state_dicts()
        return out


ENGINES = {"batched": train_batched, "loop": train_loop}
