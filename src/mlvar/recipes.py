"""The models mlvar trains, as data: what each reads, which randomness it draws, the training
values ``--model`` switches to, and the fixed recipe recorded in an experiment's identity.

The networks themselves live in :mod:`mlvar.train.models` and the loops in
:mod:`mlvar.train.images` and :mod:`mlvar.train.mlp`. This table sits apart from them, in a
module that imports nothing of mlvar, because :mod:`mlvar.config` validates model names,
randomness sources and input kinds against it, ``mlvar.train`` imports ``mlvar.config``, and
the CLI lists the models in its help without importing torch.

Units: lr per optimiser step on the batch-mean loss, weight decay as the L2 coefficient
added to the gradient, ``translate`` and ``pad`` in pixels, ``warmup`` as a fraction of all
steps, ``bias_lr_scale`` multiplies lr for batch-norm biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Sources of randomness in training that can follow the run seed (``--vary``). New sources
#: are appended: a source's position fixes its generator stream (see ``train/seeding.py``).
RANDOMNESS_SOURCES = ("init", "order", "dropout", "aug")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the registry.

    Parameters
    ----------
    name
        The ``--model`` value.
    inputs
        The input kinds it reads (``tabular``, ``image``).
    sources
        The randomness sources it draws (the valid ``vary`` entries).
    defaults
        The TrainConfig values ``--model`` switches to (epochs, lr, batch size, ...).
    recipe
        Fixed training details recorded in the experiment identity; empty for the MLP,
        whose identity predates recipes.
    """

    name: str
    inputs: tuple[str, ...]
    sources: tuple[str, ...]
    defaults: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)


_IMAGE_SOURCES = ("init", "order", "aug")

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mlp",
            inputs=("tabular", "image"),
            sources=("init", "order", "dropout"),
            defaults={
                "epochs": 10,
                "lr": 1e-3,
                "batch_size": 64,
                "weight_decay": 0.0,
                "vary": ["init", "order", "dropout"],
            },
        ),
        ModelSpec(
            name="cnn",
            inputs=("image",),
            sources=_IMAGE_SOURCES,
            defaults={
                "epochs": 10,
                "lr": 0.1,
                "batch_size": 64,
                "weight_decay": 5e-4,
                "vary": list(_IMAGE_SOURCES),
            },
            recipe={
                "optimizer": "sgd",
                "momentum": 0.9,
                "nesterov": True,
                "label_smoothing": 0.0,
                "schedule": "cosine",
                "warmup": 0.0,
                "bias_lr_scale": 1.0,
                "lookahead": False,
                "flip": False,
                "translate": 1,
                "tta": 0,
                "whiten": False,
            },
        ),
        # airbench94's hyperparameters (lr 11.5, wd 0.0153 on a summed loss at batch 1024,
        # momentum 0.85) converted to PyTorch SGD on the batch-mean loss.
        ModelSpec(
            name="airbench",
            inputs=("image",),
            sources=_IMAGE_SOURCES,
            defaults={
                "epochs": 10,
                "lr": 1.5,
                "batch_size": 1024,
                "weight_decay": 0.00133,
                "vary": list(_IMAGE_SOURCES),
            },
            recipe={
                "optimizer": "sgd",
                "momentum": 0.85,
                "nesterov": True,
                "label_smoothing": 0.2,
                "schedule": "triangle",
                "warmup": 0.23,
                "bias_lr_scale": 64.0,
                "lookahead": True,
                "flip": True,
                "translate": 2,
                "tta": 2,
                "whiten": True,
            },
        ),
        ModelSpec(
            name="resnet18",
            inputs=("image",),
            sources=_IMAGE_SOURCES,
            defaults={
                "epochs": 200,
                "lr": 0.1,
                "batch_size": 128,
                "weight_decay": 5e-4,
                "vary": list(_IMAGE_SOURCES),
            },
            recipe={
                "optimizer": "sgd",
                "momentum": 0.9,
                "nesterov": False,
                "label_smoothing": 0.0,
                "schedule": "cosine",
                "warmup": 0.0,
                "bias_lr_scale": 1.0,
                "lookahead": False,
                "flip": True,
                "translate": 4,
                "tta": 0,
                "whiten": False,
            },
        ),
    )
}

#: The models trained by the image loop (those with a recipe), in registry order.
IMAGE_MODELS = tuple(name for name, spec in MODELS.items() if spec.recipe)


def models_for(input_kind: str) -> list[str]:
    """The models that read inputs of ``input_kind``, in registry order."""
    return [name for name, spec in MODELS.items() if input_kind in spec.inputs]
