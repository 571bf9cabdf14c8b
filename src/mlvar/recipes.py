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

Two protocols (:mod:`mlvar.data.protocol`) have recipes: ``mlvar`` (:data:`MODELS`, mlvar's
own) and ``study`` (:data:`STUDY_MODELS`, the original study's exactly, for the models it
trained; ``docs/training.md``, "The study protocol"). :func:`model_spec` looks one up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Sources of randomness in training that can follow the run seed (``--vary``). New sources
#: are appended: a source's position fixes its generator stream (see ``train/seeding.py``).
#: ``impl`` is the non-determinism of CUDA kernels: it draws no seed, and varying it
#: allows non-deterministic kernels (``train/determinism.py``); no model varies it by
#: default.
RANDOMNESS_SOURCES = ("init", "order", "dropout", "aug", "impl")
#: The sources that draw from a seeded generator (all but ``impl``).
SEEDED_SOURCES = tuple(s for s in RANDOMNESS_SOURCES if s != "impl")


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
    engines
        The ``--engine`` values that train it, its default first in ``defaults``. The MLP:
        ``batched`` (a pack of seeds stacked) and ``loop`` (one model at a time); the image
        models: ``fused`` (a pack of seeds as one network, ``train/fused.py``) and
        ``single`` (one model at a time). Each family's name for the other's engine of the
        same kind is accepted (:data:`ENGINE_ALIASES`).
    continuation
        How a trained run of this model continues (``mlvar.train.continuation``): not part
        of the experiment identity (each retraining set records what it used). Keys:
        ``fraction`` (the continuation's length as a fraction of the run's training epochs,
        rounded, at least 1; ``--epochs`` overrides), ``schedule`` (``constant``: the
        recipe's lr, as the MLP's Adam; ``tail``: the original per-epoch schedule carried on
        from the run's last epoch; ``restart``: the recipe's own schedule over the
        continuation's steps with its peak lr times ``lr_scale``). Empty:
        :data:`DEFAULT_CONTINUATION`.
    """

    name: str
    inputs: tuple[str, ...]
    sources: tuple[str, ...]
    defaults: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)
    continuation: dict[str, Any] = field(default_factory=dict)
    engines: tuple[str, ...] = ("batched", "loop")


MLP_ENGINES = ("batched", "loop")
IMAGE_ENGINES = ("fused", "single")
#: An engine name of the other family read as this family's engine of the same kind
#: (seeds stacked / one model at a time): ``engine = "batched"`` in a config file means
#: stacking for every model, and a model switch never leaves an invalid engine behind.
ENGINE_ALIASES = {"batched": "fused", "loop": "single", "fused": "batched", "single": "loop"}
#: The image models' defaults for the engine settings: one model at a time (for the
#: ``cnn`` on the CPU, ``fused`` measured faster: ``docs/performance.md``) and the pack
#: size 0 (automatic: from a memory estimate, ``train/fused.py``).
_SINGLE = {"engine": "single", "pack_size": 0}
_FUSED = {"engine": "fused", "pack_size": 0}


_IMAGE_SOURCES = ("init", "order", "aug", "impl")
_IMAGE_VARY = ["init", "order", "aug"]  # the default: every seeded source an image model draws

# Continuation (docs/training.md, "Continuing a run"). The study continued its ResNet-18 50
# epochs after 150, a third as long as it had trained: every model continues for a third
# of its training epochs. mlvar's image schedules end at lr 0, so a continuation restarts
# its schedule at a tenth of the peak (a fine-tuning lr); the MLP's Adam has no schedule.
_CONSTANT = {"fraction": 1 / 3, "schedule": "constant"}
_RESTART = {"fraction": 1 / 3, "schedule": "restart", "lr_scale": 0.1}
#: The continuation of a model whose spec sets none.
DEFAULT_CONTINUATION = _RESTART

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mlp",
            inputs=("tabular", "image"),
            sources=("init", "order", "dropout", "impl"),
            defaults={
                "epochs": 10,
                "lr": 1e-3,
                "batch_size": 64,
                "weight_decay": 0.0,
                "vary": ["init", "order", "dropout"],
                "engine": "batched",
                "pack_size": 50,
            },
            continuation=_CONSTANT,
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
                "vary": list(_IMAGE_VARY),
                **_FUSED,
            },
            engines=IMAGE_ENGINES,
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
            continuation=_RESTART,
        ),
        # airbench94's hyperparameters (lr 11.5, wd 0.0153 on a summed loss at batch 1024,
        # momentum 0.85) converted to PyTorch SGD on the batch-mean loss: lr 11.5 * 1024 /
        # (1024 * (1 + 1 / (1 - 0.85))) = 1.5, wd 0.0153 / 11.5 = 0.00133. Its lr is per
        # 1024 examples (lr_batch): --batch-size b without --lr trains at 1.5 * b / 1024,
        # the same step per example; the L2 coefficient wd stays, so the decay per step
        # (lr x wd) scales with b as airbench's does. Also airbench94's: dirac (identity)
        # init of each conv's first input-channel filters with zero conv biases, the
        # alternating flip, the whitening bias trained for the first 3 epochs only, the
        # triangular lr from 0.2 to 1 (23% warm-up) down to 0.07, the last partial batch
        # dropped, TTA level 2 (mirror and 1-pixel shifts) on every split's final logits
        # (TrainConfig.train_tta False: not on the train split). Its 94% is on 50,000
        # training images: scenarios prepared with --val-fraction 0.
        ModelSpec(
            name="airbench",
            inputs=("image",),
            sources=_IMAGE_SOURCES,
            defaults={
                "epochs": 10,
                "lr": 1.5,
                "batch_size": 1024,
                "weight_decay": 0.00133,
                "vary": list(_IMAGE_VARY),
                **_SINGLE,
            },
            engines=IMAGE_ENGINES,
            recipe={
                "optimizer": "sgd",
                "momentum": 0.85,
                "nesterov": True,
                "label_smoothing": 0.2,
                "schedule": "triangle",
                "warmup": 0.23,
                "final_lr": 0.07,
                "bias_lr_scale": 64.0,
                "lookahead": True,
                "flip": "alternating",
                "translate": 2,
                "tta": 2,
                "whiten": True,
                "whiten_bias_epochs": 3,
                "init": "dirac",
                "drop_last": True,
                "lr_batch": 1024,
            },
            continuation=_RESTART,
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
                "vary": list(_IMAGE_VARY),
                **_SINGLE,
            },
            engines=IMAGE_ENGINES,
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
            continuation=_RESTART,
        ),
    )
}

#: The models trained by the image loop (those with a recipe), in registry order.
IMAGE_MODELS = tuple(name for name, spec in MODELS.items() if spec.recipe)

#: The study's normalisation constants (kuangliu/pytorch-cifar's), for CIFAR-10 and
#: CIFAR-100 alike: per channel, applied to ``x / 255``.
STUDY_MEAN = (0.4914, 0.4822, 0.4465)
STUDY_STD = (0.2023, 0.1994, 0.2010)

#: The study's recipes (``--protocol study``), for the two models it trained.
STUDY_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # models/simple_binary.py: Linear-ReLU-BN-Linear-ReLU-BN-Dropout(0.1)-Linear(h, 1),
        # BCEWithLogitsLoss, Adam without weight decay, batch 64, prediction
        # round(sigmoid). Its configurations (epochs, lr, hidden) were (10, 1e-3, 64),
        # (10, 1e-4, 64), (1000, 1e-4, 64) and (1000, 1e-4, 128); the holdout and
        # artificial analyses used (10, 1e-4, 64), the default here.
        ModelSpec(
            name="mlp",
            inputs=MODELS["mlp"].inputs,  # binary data only: a check of the scenario
            sources=MODELS["mlp"].sources,
            # mlvar's (10 epochs, batch 64, no weight decay) but lr 1e-4; hidden 64 and
            # dropout 0.1 are TrainConfig's defaults, which [train.compas] may change.
            defaults={**MODELS["mlp"].defaults, "lr": 1e-4},
            recipe={"head": "sigmoid"},
            continuation=_CONSTANT,
        ),
        # main_cifar10.py / cluster_single_cifar100.py: SGD(0.1, momentum 0.9, wd 5e-4),
        # batch 128, RandomCrop(32, padding=4) (zero fill) + horizontal flip, the fixed
        # normalisation, fp32, 150 epochs of CosineAnnealingLR(T_max=200) stepped per epoch.
        ModelSpec(
            name="resnet18",
            inputs=("image",),
            sources=_IMAGE_SOURCES,
            defaults={**MODELS["resnet18"].defaults, "epochs": 150},  # lr 0.1, batch 128, wd 5e-4
            engines=IMAGE_ENGINES,
            recipe={
                **MODELS["resnet18"].recipe,
                "schedule": "cosine-epochs",
                "t_max": 200,
                "pad": "zero",
                "normalise": {"mean": list(STUDY_MEAN), "std": list(STUDY_STD)},
                "precision": "fp32",
            },
            # The study's retraining: from epoch 150 to 200 on the same T_max=200 cosine.
            continuation={"fraction": 1 / 3, "schedule": "tail"},
        ),
    )
}

#: The model the study trained on each of its datasets (the default under ``study``).
STUDY_DATASET_MODELS = {"compas": "mlp", "cifar10": "resnet18", "cifar100": "resnet18"}
#: The study's run counts, the default ``--runs`` under ``study`` (CIFAR-10: 10 to 25,
#: CIFAR-100: 25, later 100; 25 for both here). Other datasets and protocols: 10.
STUDY_RUNS = {"compas": 100, "cifar10": 25, "cifar100": 25}
DEFAULT_RUNS = 10

RECIPES: dict[str, dict[str, ModelSpec]] = {"mlvar": MODELS, "study": STUDY_MODELS}


def batch_scaled_lr(spec: ModelSpec | None, lr: float, batch_size: int) -> float:
    """``lr`` for ``batch_size`` when the recipe's lr is per ``lr_batch`` examples
    (airbench: 1024): ``lr * batch_size / lr_batch``; unchanged for other recipes."""
    per = spec.recipe.get("lr_batch") if spec is not None else None
    return lr * batch_size / per if per else lr


#: ``--model package.module:factory``: a user's network (docs/training.md, "Your own model").
#: Its name holds this separator; registry names never do.
CUSTOM_SEPARATOR = ":"
#: The custom tabular loop's fixed recipe: the MLP's optimiser, a plain ``torch`` loop.
CUSTOM_TABULAR_RECIPE = {"optimizer": "adam", "loop": "plain"}


def is_custom(model: str) -> bool:
    """Whether ``model`` names a user's factory (``package.module:factory``)."""
    return CUSTOM_SEPARATOR in str(model)


def custom_spec(model: str, input_kind: str = "image") -> ModelSpec:
    """The recipe of the custom model ``model`` on ``input_kind`` inputs: on images the
    cnn's (its defaults and fixed recipe; randomness init, order, aug), on tables the MLP's
    defaults (Adam, lr, batch size, epochs) in a plain training loop (init, order, and
    dropout: torch's CPU generator during training)."""
    base = MODELS["cnn"] if input_kind == "image" else MODELS["mlp"]
    recipe = dict(base.recipe) if input_kind == "image" else dict(CUSTOM_TABULAR_RECIPE)
    return ModelSpec(model, ("image", "tabular"), base.sources, dict(base.defaults), recipe)


def model_engine(model: str, engine: str) -> str | None:
    """``engine`` as ``model``'s engine (an alias of the other family's name mapped, see
    :data:`ENGINE_ALIASES`), or None when it is no engine of ``model``."""
    engines = MODELS[model].engines if model in MODELS else MLP_ENGINES
    if engine in engines:
        return engine
    alias = ENGINE_ALIASES.get(engine)
    return alias if alias in engines else None


def model_spec(protocol: str, model: str) -> ModelSpec | None:
    """The recipe of ``model`` under ``protocol`` (None: that protocol has none); a custom
    model's image recipe under mlvar (:func:`custom_spec` gives the tabular one; the study
    protocol has none)."""
    if is_custom(model):
        return custom_spec(model) if protocol == "mlvar" else None
    return RECIPES.get(protocol, {}).get(model)


def protocol_model(protocol: str, dataset: str) -> str | None:
    """The model ``protocol`` trains on ``dataset`` by default (None: the config's)."""
    return STUDY_DATASET_MODELS.get(dataset) if protocol == "study" else None


def continuation_of(protocol: str, model: str) -> dict[str, Any]:
    """How a run of ``model`` trained under ``protocol`` continues (``ModelSpec.continuation``;
    :data:`DEFAULT_CONTINUATION` for a model that sets none)."""
    spec = model_spec(protocol, model) or MODELS.get(model)
    return dict((spec.continuation if spec is not None else None) or DEFAULT_CONTINUATION)


def recipe_models(protocol: str) -> str:
    """The models ``protocol`` has recipes for, and the study's datasets, for hints."""
    models = RECIPES.get(protocol, {})
    if protocol != "study":
        return ", ".join(models)
    on = {m: [d for d, dm in STUDY_DATASET_MODELS.items() if dm == m] for m in models}
    return ", ".join(f"{m} ({', '.join(on[m])})" for m in models)


def mlp_head(protocol: str, model: str) -> str:
    """The output of ``model`` under ``protocol``: ``softmax`` (one logit per class,
    cross-entropy) or ``sigmoid`` (the study's MLP: one logit, binary cross-entropy)."""
    spec = model_spec(protocol, model)
    return str(spec.recipe.get("head", "softmax")) if spec is not None else "softmax"


def default_runs(dataset: str, protocol: str) -> int:
    """How many runs ``mlvar train`` trains when ``--runs`` is not given."""
    return STUDY_RUNS.get(dataset, DEFAULT_RUNS) if protocol == "study" else DEFAULT_RUNS


def models_for(input_kind: str) -> list[str]:
    """The models that read inputs of ``input_kind``, in registry order."""
    return [name for name, spec in MODELS.items() if input_kind in spec.inputs]
