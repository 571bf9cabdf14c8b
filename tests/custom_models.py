"""Model factories for tests/test_custom_model.py (``--model tests.custom_models:NAME``)."""

from __future__ import annotations

from torch import nn


class TinyCNN(nn.Module):
    """Conv(8)-GELU-Conv(8)-GELU-GlobalAvgPool-Linear: small enough for a test."""

    def __init__(self, channels: int, n_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GELU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, n_classes)

    def forward(self, x):
        return self.head(self.pool(self.body(x)).flatten(1))


def tiny_cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """An image factory: ``input_shape`` is ``(C, H, W)``."""
    return TinyCNN(input_shape[0], n_classes)


def tiny_mlp(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A tabular factory: ``input_shape`` is ``(F,)``; with dropout (seeded by mlvar)."""
    return nn.Sequential(
        nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, n_classes)
    )


def not_a_module(input_shape: tuple[int, ...], n_classes: int) -> object:
    """Returns something that is not an nn.Module."""
    return {"layers": 2}


def wrong_input(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A network for 5 input features: fails on any other input."""
    return nn.Linear(5, n_classes)


NOT_CALLABLE = 3
