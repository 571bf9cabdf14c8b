"""A trained run's model, loaded back: its ``model.pt`` checked against the sha256 in
``run.json``, then the registry network or the study's MLP with those weights, in eval
mode; and the module GradCAM hooks.

torch is imported inside the functions: the saliency planner imports this module, and
the CLI imports the planner at start-up.
"""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

from mlvar.errors import MlvarError, closest
from mlvar.store import ExperimentStore, RunRecord

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The weights file of a trained run (image models and the MLP save it).
WEIGHTS_FILE = "model.pt"


def load_weights(run: RunRecord) -> dict[str, torch.Tensor]:
    """The run's ``model.pt`` state dict, after checking its sha256 against ``run.json``."""
    import torch

    info = run.meta.get("arrays", {}).get(WEIGHTS_FILE)
    path = run.path / WEIGHTS_FILE
    if not info or not path.is_file():
        raise MlvarError(
            f"run {run.run_id} has no {WEIGHTS_FILE}",
            "retrain it (image runs save their weights)",
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise MlvarError(
            f"{path} does not match the sha256 in its run.json", "remove or retrain that run"
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def build_trained(
    model_name: str, channels: int | tuple[int, ...], n_classes: int, run: RunRecord
) -> nn.Module:
    """The registry network ``model_name`` (for ``channels`` channels, or inputs of shape
    ``(C, H, W)``), or the custom one its factory builds (``package.module:factory``: it
    needs the shape), with ``run``'s weights (``torch.load(weights_only=True)``), in eval
    mode."""
    from mlvar.train.models import build_model

    model = build_model(model_name, channels, n_classes)
    try:
        model.load_state_dict(load_weights(run))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MlvarError(
            f"the weights of run {run.run_id} do not fit a {model_name} network: {first}",
            "retrain that run (or restore the factory's source it was trained with)",
        ) from None
    return model.eval()


def build_mlp(store: ExperimentStore, n_features: int, run: RunRecord) -> nn.Module:
    """The study's MLP of ``store`` (its hidden units and classes) with ``run``'s weights,
    in eval mode; a sigmoid head's as :class:`~mlvar.train.mlp.TwoClassLogits`."""
    from mlvar.train.mlp import MLP, TwoClassLogits

    train = store.meta.get("train") or {}
    hidden = int(train.get("hidden", 0))
    sigmoid = (train.get("recipe") or {}).get("head") == "sigmoid"  # the study's MLP
    model = MLP(n_features, hidden, len(store.class_names), 1 if sigmoid else 0)
    try:
        model.load_state_dict(load_weights(run))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MlvarError(
            f"the weights of run {run.run_id} do not fit an MLP with {n_features} inputs and "
            f"{hidden} hidden units: {first}",
            "retrain that run",
        ) from None
    return (TwoClassLogits(model) if sigmoid else model).eval()


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the model's ``Conv2d`` modules, in registration order."""
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def target_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The module GradCAM hooks: ``name`` (validated), else the model's last ``Conv2d``."""
    modules = dict(model.named_modules())
    if name is None:
        convs = conv_layers(model)
        if not convs:
            raise MlvarError(
                f"model {type(model).__name__} has no Conv2d layer for GradCAM",
                "name a layer with --layer",
            )
        return convs[-1], modules[convs[-1]]
    if not name or name not in modules:
        near = closest(name, [n for n in modules if n])
        hint = f"did you mean '{near}'? " if near else ""
        raise MlvarError(
            f"model {type(model).__name__} has no layer '{name}'",
            hint + "conv layers: " + ", ".join(conv_layers(model)),
        )
    return name, modules[name]
