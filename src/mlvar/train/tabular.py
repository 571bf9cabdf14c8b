"""The training loop of a custom model on tabular inputs (``--model package.module:factory``
on a table; docs/training.md, "Your own model").

The MLP's engines are written for the MLP; a user's network trains here in a plain
``torch`` loop with the MLP's settings and the ``loop`` engine's semantics: Adam
(:class:`mlvar.train.optim.Adam`, ``lr``, ``weight_decay``), cross-entropy on the batch
mean, ``batch_size`` rows per step in a fresh permutation per epoch from the run's
``order`` generator (a trailing batch of one row dropped, as the MLP's), initial weights
from the factory with torch's generator seeded from the run's ``init`` generator
(:func:`mlvar.train.custom.build`), and during training torch's default CPU generator
seeded from the run's ``dropout`` generator (restored afterwards), so dropout in the
user's network is seeded too on the CPU. One thread per kernel on the CPU, as the MLP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mlvar.config import TrainConfig
from mlvar.train import custom
from mlvar.train.mlp import EpochProgress, TrainData, _one_thread_per_kernel, epoch_order
from mlvar.train.optim import Adam
from mlvar.train.seeding import RunGenerators

#: What run.json records as the engine of these runs.
ENGINE = "custom-loop"


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model(x).float().cpu()
    model.train()
    return out


def train_loop(
    data: TrainData,
    cfg: TrainConfig,
    gens: list[RunGenerators],
    eval_x: dict[str, torch.Tensor],
    progress: EpochProgress | None = None,
    dynamics: torch.Tensor | None = None,
    weights: bool = False,
) -> list[dict[str, Any]]:
    """Train the custom model ``cfg.model`` once per entry of ``gens``; per run, the
    eval-mode logits ``[n, C]`` of every tensor in ``eval_x`` (CPU), ``"dynamics"``
    (logits of ``dynamics`` after every epoch, ``[E, m, C]``) when asked, and with
    ``weights`` the final ``"state_dict"``: the results of the MLP's engines."""
    device = data.x.device
    n = len(data.y)
    total = cfg.epochs * len(gens)
    results = []
    with _one_thread_per_kernel(device):
        for pos, gen in enumerate(gens):
            seed = custom.init_seed(gen.init)
            model = custom.build(cfg.model, (int(data.x.shape[1]),), data.n_classes, seed)
            model = model.to(device)
            opt = Adam(
                [p for p in model.parameters() if p.requires_grad],
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
            )
            recorded = []
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(custom.init_seed(gen.dropout))
                model.train()
                for epoch in range(cfg.epochs):
                    order, sizes = epoch_order(gen.order, n, cfg.batch_size)
                    order_d = order.to(device)
                    start = 0
                    for size in sizes:
                        idx = order_d[start : start + size]
                        start += size
                        loss = F.cross_entropy(model(data.x[idx]).float(), data.y[idx])
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    if dynamics is not None:
                        recorded.append(_logits(model, dynamics))
                    if progress:
                        progress(pos * cfg.epochs + epoch + 1, total)
            out: dict[str, Any] = {k: _logits(model, x) for k, x in eval_x.items()}
            if dynamics is not None:
                out["dynamics"] = torch.stack(recorded)
            if weights:
                out["state_dict"] = {
                    k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                }
            results.append(out)
    return results
