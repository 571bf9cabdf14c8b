"""The attributions of a plan's samples under a block of its runs (docs/design.md
section 8), for the true class and each run's predicted class.

* Image models (``cnn``, ``airbench``, ``resnet18``): GradCAM of the ``grad-cam``
  package (``pytorch_grad_cam.GradCAM``) at the model's last ``Conv2d`` unless ``layer``
  names another module; images normalised with the training split's statistics.
* The MLP: gradient x input, ``x * d logit_t / d x`` per input feature, in eval mode.
  On tabular data that is one signed value per feature; on images (an MLP of flattened
  pixels) the absolute values summed over channels also make a map per run.

Each run's attributions depend on that run only, so blocks of runs computed apart (the
shards) stack to the attributions of all runs, bit for bit. Models are loaded by
:mod:`mlvar.train.trained`; torch is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mlvar.analysis.saliency.plan import BATCH_DEFAULT, SaliencyPlan
from mlvar.store import ExperimentStore, RunRecord
from mlvar.train.trained import build_mlp, build_trained, target_layer

if TYPE_CHECKING:
    import torch
    from torch import nn

#: ``progress(done, total)`` in runs.
Progress = Callable[[int, int], None]
#: The ``method`` of image models' maps and of the MLP's attributions.
GRADCAM = "GradCAM (pytorch_grad_cam)"
GRADIENT_X_INPUT = "gradient x input"


@dataclass
class SaliencyArrays:
    """The attributions of the plan's ``n`` samples under ``S`` runs, target 0 the true
    class and 1 each run's predicted class."""

    method: str  # GRADCAM or GRADIENT_X_INPUT
    layer: str  # the module the maps are taken at ("input" for gradient x input)
    maps: np.ndarray | None  # float32 [n, S, 2, H, W] in [0, 1], or None (tabular)
    attributions: np.ndarray | None  # [n, S, 2, F] gradient x input, or None (GradCAM)


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int],
    layer: str | None = None,
    batch_size: int = BATCH_DEFAULT,
) -> np.ndarray:
    """GradCAM maps ``[N, H, W]`` float32 in [0, 1] of the normalised images ``x``
    (``[N, C, H, W]``) for class ``targets[i]`` of image ``i``, ``batch_size`` at a time,
    at the module named ``layer`` of ``model`` (default: its last ``Conv2d``)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _, module = target_layer(model, layer)
    out = np.empty((len(x), *x.shape[2:]), dtype=np.float32)
    with GradCAM(model=model, target_layers=[module]) as cam:
        for a in range(0, len(x), batch_size):
            b = min(a + batch_size, len(x))
            wanted = [ClassifierOutputTarget(int(t)) for t in targets[a:b]]
            out[a:b] = cam(input_tensor=x[a:b], targets=wanted)
    model.zero_grad(set_to_none=True)
    return out


def gradient_x_input(model: nn.Module, x: Any, target: Any) -> np.ndarray:
    """Gradient x input attributions ``[N, F]`` (float64) of the logit of class
    ``target[i]`` at row ``x[i]`` (``x``: ``[N, F]``; ``target``: int or ``[N]``).

    For a linear model ``f(x) = W x + b`` they sum over features to ``f_t(x) - b_t``.
    The model runs in eval mode (no dropout, batch-norm running statistics).
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        dtype = next(model.parameters()).dtype
        xt = torch.as_tensor(np.asarray(x), dtype=dtype).clone().requires_grad_(True)
        t = torch.as_tensor(np.broadcast_to(np.asarray(target), (len(xt),)).copy()).long()
        logits = model(xt)
        (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xt)
        return (grad * xt).detach().double().numpy()
    finally:
        model.train(was_training)


def attribution_spread(models: Sequence[nn.Module], x: Any, targets: Any) -> dict[str, np.ndarray]:
    """Gradient x input of every model (one per seed) and its spread across seeds.

    ``targets``: ``[N]`` (one class per row for every model) or ``[S, N]`` (per model,
    e.g. each seed's prediction). Returns ``per_seed`` ``[S, N, F]`` and ``mean``, ``std``
    (ddof 0), ``range`` (max - min), each ``[N, F]``.
    """
    t = np.asarray(targets)
    per = np.stack(
        [gradient_x_input(m, x, t[s] if t.ndim == 2 else t) for s, m in enumerate(models)]
    )
    return {
        "per_seed": per,
        "mean": per.mean(axis=0),
        "std": per.std(axis=0),
        "range": per.max(axis=0) - per.min(axis=0),
    }


def mlp_inputs(x_raw: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """The MLP's float32 ``[n, F]`` inputs of the prepared rows ``x_raw``, as in training."""
    from mlvar.train.service import input_features

    return input_features(np.asarray(x_raw), manifest)


def recipe_normalise(run: RunRecord, model_name: str) -> dict[str, list[float]] | None:
    """The fixed normalisation constants the run's recipe trained with (the study's
    ResNet-18: ``{"mean": [...], "std": [...]}``), or None where training normalised with
    the training split's statistics. The protocol is the one run.json's config records."""
    from mlvar.data.protocol import DEFAULT_PROTOCOL
    from mlvar.recipes import MODELS, model_spec

    protocol = (run.meta.get("config") or {}).get("protocol", DEFAULT_PROTOCOL)
    spec = model_spec(protocol, model_name) or MODELS.get(model_name)
    return None if spec is None else spec.recipe.get("normalise")


def training_norm(scenario: Any, normalise: dict[str, list[float]] | None = None) -> Any:
    """The image normalisation of training: an ``ImageData`` of the train split, with the
    recipe's fixed constants ``normalise``, or else with statistics computed as training
    computes them (one thread per kernel)."""
    import torch

    from mlvar.train import images

    train = scenario.load("train")
    if normalise is not None:
        return images.ImageData.build(
            {"train": train}, scenario.manifest, torch.device("cpu"), normalise
        )
    return images._build_data({"train": train}, scenario.manifest, torch.device("cpu"))


def resolve_layer(plan: SaliencyPlan, layer: str | None = None) -> tuple[str, str]:
    """``(method, layer)`` a computation of ``plan`` reports, checked on an untrained
    network of the plan's model (no weights are read): the MLP's gradient x input at
    ``input``; GradCAM at ``layer`` (default: the last ``Conv2d``), an unknown name being an
    error that names the conv layers."""
    if plan.model_name == "mlp":
        return GRADIENT_X_INPUT, "input"
    from mlvar.train.images import to_nchw
    from mlvar.train.models import build_model

    shape = tuple(int(n) for n in to_nchw(plan.x_raw[:1]).shape[1:])  # (C, H, W)
    model = build_model(plan.model_name, shape, len(plan.scenario.class_names))
    return GRADCAM, target_layer(model, layer)[0]


def _gradient_x_input_of_runs(
    store: ExperimentStore,
    runs: list[RunRecord],
    x_raw: np.ndarray,
    manifest: dict[str, Any],
    labels: np.ndarray,
    preds: np.ndarray,
    progress: Progress | None,
) -> SaliencyArrays:
    """Gradient x input of each run's MLP for the true and its predicted class:
    ``attributions`` ``[n, S, 2, F]`` (signed, logit units); for image inputs also
    ``maps`` ``[n, S, 2, H, W]``: the absolute attributions summed over channels, each map
    scaled to [0, 1] as GradCAM's."""
    x = mlp_inputs(x_raw, manifest)
    n, n_feat = x.shape
    models = [build_mlp(store, n_feat, r) for r in runs]  # every run checked first
    attributions = np.empty((n, len(runs), 2, n_feat), dtype=np.float64)
    for s, model in enumerate(models):
        attributions[:, s, 0] = gradient_x_input(model, x, labels)
        attributions[:, s, 1] = gradient_x_input(model, x, preds[s])
        if progress:
            progress(s + 1, len(models))
    if (manifest.get("input") or {}).get("kind") != "image":
        return SaliencyArrays(GRADIENT_X_INPUT, "input", None, attributions)
    pixels = np.abs(attributions).reshape(n, len(runs), 2, *x_raw.shape[1:])
    if pixels.ndim == 6:  # [n, S, 2, H, W, C]: sum over channels
        pixels = pixels.sum(axis=-1)
    peak = pixels.max(axis=(-2, -1), keepdims=True)
    maps = np.divide(pixels, peak, out=np.zeros_like(pixels), where=peak > 0)
    return SaliencyArrays(GRADIENT_X_INPUT, "input", maps.astype(np.float32), attributions)


def _gradcam_of_runs(
    scenario: Any,
    runs: list[RunRecord],
    x_raw: np.ndarray,
    model_name: str,
    labels: np.ndarray,
    preds: np.ndarray,
    layer: str | None,
    batch_size: int,
    progress: Progress | None,
) -> SaliencyArrays:
    """GradCAM ``[n, S, 2, H, W]`` of each run's image model, true and predicted class."""
    import torch

    from mlvar.train.images import to_nchw

    # Every run of an experiment shares its recipe (its identity), so the first one says.
    x = training_norm(scenario, recipe_normalise(runs[0], model_name)).normalise(to_nchw(x_raw))
    n_classes = len(scenario.class_names)
    shape = tuple(int(n) for n in x.shape[1:])  # (C, H, W): custom models need it all
    # Build every model (checks weights and the layer) before computing anything.
    models = [build_trained(model_name, shape, n_classes, r) for r in runs]
    layer_name, _ = target_layer(models[0], layer)
    n, (h, w) = len(x), tuple(int(v) for v in x.shape[2:])
    maps = np.empty((n, len(runs), 2, h, w), dtype=np.float32)
    for s, model in enumerate(models):
        both = torch.cat([x, x])
        targets = np.concatenate([labels, preds[s]])
        out = gradcam(model, both, targets, layer_name, batch_size=2 * batch_size)
        maps[:, s, 0], maps[:, s, 1] = out[:n], out[n:]
        if progress:
            progress(s + 1, len(models))
    return SaliencyArrays(GRADCAM, layer_name, maps, None)


def compute(
    store: ExperimentStore,
    plan: SaliencyPlan,
    block: range,
    layer: str | None = None,
    batch_size: int = BATCH_DEFAULT,
    progress: Progress | None = None,
) -> SaliencyArrays:
    """The attributions of the plan's samples under the runs ``plan.runs[block]``."""
    runs = [plan.runs[i] for i in block]
    preds = plan.preds[block.start : block.stop]
    if plan.model_name == "mlp":
        return _gradient_x_input_of_runs(
            store, runs, plan.x_raw, plan.scenario.manifest, plan.labels, preds, progress
        )
    return _gradcam_of_runs(
        plan.scenario,
        runs,
        plan.x_raw,
        plan.model_name,
        plan.labels,
        preds,
        layer,
        batch_size,
        progress,
    )
