"""mlvar's Adam rounds exactly like torch.optim.Adam (single-tensor path)."""

from __future__ import annotations

import pytest
import torch

from mlvar.train.optim import Adam


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_adam_matches_torch_bit_for_bit(weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen)]
    theirs = [t.clone().requires_grad_() for t in ours]
    reference = torch.optim.Adam(theirs, lr=1e-2, weight_decay=weight_decay, foreach=False)
    adam = Adam(ours, lr=1e-2, weight_decay=weight_decay)
    for _ in range(50):
        grads = [torch.randn(t.shape, generator=gen) for t in ours]
        for t, g in zip(ours, grads, strict=True):
            t.grad = g.clone()
        for t, g in zip(theirs, grads, strict=True):
            t.grad = g.clone()
        adam.step()
        reference.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b.detach())
    assert adam.steps == 50


def test_parameters_without_gradient_are_left_alone() -> None:
    p = torch.ones(3)
    adam = Adam([p], lr=0.1)
    adam.step()
    assert torch.equal(p, torch.ones(3))
