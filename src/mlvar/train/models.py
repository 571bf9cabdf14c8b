"""The image networks of the model registry (the registry's data lives in ``mlvar.recipes``).

``cnn``      a small CNN for 8x8 digits (and any small image): three 3x3 conv-BN-GELU
             layers, one max pool, global average pool, linear.
``airbench`` a fast CIFAR network in the spirit of airbench94 (Keller Jordan, 2024): a
             frozen 2x2 patch-whitening first conv initialised from the training images,
             three conv groups (conv-pool-BN-GELU-conv-BN-GELU; widths 64, 256, 256),
             batch norm with frozen scale, a bias-free linear head scaled by 1/9.
``resnet18`` the CIFAR ResNet-18 (3x3 stem, no max pool, [2, 2, 2, 2] basic blocks).

Weights are initialised by :func:`init_weights` from the run's ``init`` generator only, in
module order, with PyTorch's default rules (Kaiming-uniform with a = sqrt(5), biases
uniform in +-1/sqrt(fan_in)), so a run's initial weights depend on its init seed alone.

A user's network (``package.module:factory``, :mod:`mlvar.train.custom`) is built by its
factory, which initialises it with torch's generator seeded from the run's init generator
(:func:`make_network`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mlvar.errors import MlvarError
from mlvar.recipes import IMAGE_MODELS, is_custom
from mlvar.train import custom

__all__ = ["IMAGE_MODELS", "build_model", "init_weights", "make_network"]


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C]``: the mean over the positions. The same bits as
    ``adaptive_avg_pool2d(x, 1)`` on the CPU, but its backward is deterministic on CUDA,
    where ``adaptive_avg_pool2d``'s raises under deterministic algorithms."""
    return x.mean(dim=(2, 3))


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C]``: the maximum over the positions, its gradient to the
    first maximal one, as ``adaptive_max_pool2d(x, 1)`` (whose CUDA backward raises
    under deterministic algorithms); this backward is a deterministic scatter."""
    return x.flatten(2).max(dim=2).values


class GlobalAvgPool(nn.Module):
    """:func:`global_avg_pool` as a layer (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(x)


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class SmallCNN(nn.Module):
    """Conv(16)-Conv(32)-MaxPool-Conv(64)-GlobalAvgPool-Linear, each conv with BN and GELU."""

    def __init__(self, channels: int, n_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(channels, width),
            *conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            *conv_bn(2 * width, 4 * width),
            GlobalAvgPool(),
        )
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _FrozenScaleBN(nn.BatchNorm2d):
    """Batch norm with a trainable bias and a scale fixed at 1 (as airbench); momentum 0.4
    in PyTorch's convention (airbench's 0.6)."""

    def __init__(self, width: int) -> None:
        super().__init__(width, momentum=0.4, eps=1e-12)
        self.weight.requires_grad_(False)


class _ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _FrozenScaleBN(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.norm2 = _FrozenScaleBN(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94's network. Call :meth:`init_whitening` with normalised training images
    before training; the whitening weights stay frozen."""

    def __init__(
        self, channels: int, n_classes: int, widths: tuple[int, int, int] = (64, 256, 256)
    ):
        super().__init__()
        self.whiten = nn.Conv2d(channels, 2 * channels * 4, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.groups = nn.Sequential(
            _ConvGroup(2 * channels * 4, widths[0]),
            _ConvGroup(widths[0], widths[1]),
            _ConvGroup(widths[1], widths[2]),
        )
        self.head = nn.Linear(widths[2], n_classes, bias=False)
        self.scale = 1 / 9

    @torch.no_grad()
    def init_identity(self) -> None:
        """airbench94's conv init after the default one: every conv's first ``c_in``
        filters pass their input channel through (``nn.init.dirac_``; a square conv is the
        identity), and conv biases (the whitening conv's) start at zero."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.dirac_(module.weight[: module.in_channels])
                if module.bias is not None:
                    module.bias.zero_()

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to the ZCA-like whitening of the 2x2 patches of ``x`` ([N, C, H, W],
        normalised): the eigenvectors of their covariance scaled by 1/sqrt(eigenvalue + eps),
        and their negations. It depends on the data only, never on a seed."""
        c = x.shape[1]
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
        patches = patches.transpose(1, 3).reshape(-1, c * 4).double()  # rows of (C, kh, kw)
        patches = patches - patches.mean(0, keepdim=True)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0)
        filters = filters.reshape(c * 4, c, 2, 2).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.groups(x)
        return self.head(global_max_pool(x)) * self.scale


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (as in kuangliu/pytorch-cifar, the study's recipe)."""

    def __init__(self, channels: int, n_classes: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            layers += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.head(global_avg_pool(x))


def build_model(name: str, channels: int | tuple[int, ...], n_classes: int) -> nn.Module:
    """An uninitialised network of the registry (call :func:`init_weights` next), for
    inputs of ``channels`` channels or of shape ``(C, H, W)``; a custom model (its
    factory's initialisation, seed 0) needs the shape."""
    if is_custom(name):
        if isinstance(channels, int):
            raise TypeError(f"custom model '{name}' needs the input shape, not a channel count")
        return custom.build(name, channels, n_classes, 0)
    if not isinstance(channels, int):
        channels = int(channels[0])
    if name == "cnn":
        return SmallCNN(channels, n_classes)
    if name == "airbench":
        return AirbenchNet(channels, n_classes)
    if name == "resnet18":
        return ResNet18(channels, n_classes)
    raise KeyError(f"no image model '{name}'")


def check_input(name: str, input_shape: tuple[int, ...], n_classes: int) -> None:
    """Run the registry network ``name`` once on a zero batch of two inputs of shape
    ``(C, H, W)`` (eval mode, no gradients), before anything is written.

    Raises
    ------
    MlvarError
        The network cannot take such images (airbench's 2x2 whitening and three poolings
        need at least 9x9 pixels; 8x8 digits leave nothing to pool).
    """
    net = build_model(name, input_shape, n_classes)
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, *(int(n) for n in input_shape)))
    except RuntimeError as exc:
        _, h, w = (int(n) for n in input_shape)
        raise MlvarError(
            f"model '{name}' cannot train on {h}x{w} images ({custom._first_line(exc)})",
            "use --model cnn (or resnet18) for small images, or a dataset of larger ones",
        ) from None


def make_network(
    name: str, input_shape: tuple[int, ...], n_classes: int, gen: torch.Generator
) -> nn.Module:
    """A run's initial network: a registry network with :func:`init_weights` from the init
    generator ``gen``, or a custom one built by its factory with torch's generator seeded
    from ``gen`` (:func:`mlvar.train.custom.build`)."""
    if is_custom(name):
        return custom.build(name, input_shape, n_classes, custom.init_seed(gen))
    model = build_model(name, int(input_shape[0]), n_classes)
    init_weights(model, gen)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default initialisation, drawn from ``gen`` in module order; then
    :meth:`AirbenchNet.init_identity` for airbench (its draws are the same)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=gen)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
    if isinstance(model, AirbenchNet):
        model.init_identity()
