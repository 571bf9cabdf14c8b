"""Per-sample attributions across seeds: GradCAM maps of image models, gradient x input
of the MLP (docs/design.md section 8).

The one analysis module that loads models. :func:`saliency` takes the top ``K`` samples
of a ranking and ``K`` random unaffected ones (seeded, as the report's sample pages:
:func:`mlvar.report.samples.choose_pages`), the first ``S`` runs (by run id) whose
``model.pt`` matches the sha256 in their ``run.json``, and computes one attribution per
sample, run and target: the sample's true class and the class that run predicted (its
stored logits' argmax). Inputs are the prepared scenario's, exactly as in training.

* Image models (``cnn``, ``airbench``, ``resnet18``): GradCAM of the ``grad-cam``
  package (``pytorch_grad_cam.GradCAM``) at the model's last ``Conv2d`` unless ``layer``
  names another module; images normalised with the training split's statistics.
* The MLP: gradient x input, ``x * d logit_t / d x`` per input feature, in eval mode.
  On tabular data that is one signed value per feature; on images (an MLP of flattened
  pixels) the absolute values summed over channels also make a map per run.

Layout of ``<experiment>/analysis/saliency-<split>/`` (written as one folder, swapped in
when complete)::

    maps.npy          images: float16 [n_samples, S, 2, H, W], target 0 the true class,
                      1 the run's predicted class (each map scaled to [0, 1])
    attributions.npy  MLP: float32 [n_samples, S, 2, F], signed gradient x input
    stats.npy         mean, std (ddof 0) and max - min across the S runs: float16
                      [n_samples, 3, 2, H, W] of the maps, or float32 [n_samples, 3, 2, F]
                      of tabular attributions
    samples.parquet   one row per sample, in the order of the arrays: sample_id,
    samples.json      position, rank, kind ("top" | "random unaffected"), affected,
                      label, label_name, pred (one class per run), n_correct,
                      spread_true / spread_pred (mean over pixels or features of the
                      std), overlay; tabular: attr_{true,pred}_{mean,std} per feature
    saliency.json     experiment, split, method, input, model, layer, runs, by, top,
                      seed, shape, feature_names (tabular)
    overlays/<sample_id>.png   images: a strip per sample, rows true / predicted class,
                      columns input, each run, mean, std, max - min (maps over the input,
                      jet); tabular: a bar chart per feature, mean with std whiskers and
                      a dot per run, one panel per target
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mlvar.errors import MlvarError, closest
from mlvar.io import atomic_save_npy, atomic_write_bytes, atomic_write_json, staging_dir
from mlvar.store import ExperimentStore, RunRecord, parquet_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHTS_FILE = "model.pt"  # as mlvar.train.images.WEIGHTS_FILE (not imported: torch)
TARGETS = ("true", "predicted")
STATS = ("mean", "std", "max-min")
TOP_DEFAULT = 10
SEEDS_DEFAULT = 8
BATCH_DEFAULT = 64
TILE_PX = 64  # overlays: each map is nearest-neighbour upscaled to about this size

#: ``progress(done, total)`` in runs.
Progress = Callable[[int, int], None]
#: The ``method`` of image models' maps and of the MLP's attributions.
GRADCAM = "GradCAM (pytorch_grad_cam)"
GRADIENT_X_INPUT = "gradient x input"


def folder(store: ExperimentStore, split: str) -> Path:
    """Where the saliency of ``split`` lives: ``<experiment>/analysis/saliency-<split>/``."""
    return store.root / "analysis" / f"saliency-{split}"


@dataclass
class SaliencyResult:
    experiment: str
    split: str
    model: str
    layer: str
    run_ids: list[str]
    samples: pd.DataFrame  # the index (samples.parquet)
    shape: tuple[int, ...]  # (H, W) of every map, or (F,) for tabular attributions
    path: Path  # the folder
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    method: str = GRADCAM
    feature_names: list[str] = field(default_factory=list)  # tabular inputs only

    @property
    def n_seeds(self) -> int:
        return len(self.run_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "split": self.split,
            "model": self.model,
            "method": self.method,
            "layer": self.layer,
            "run_ids": self.run_ids,
            "feature_names": self.feature_names,
            "shape": list(self.shape),
            "path": str(self.path),
            "seconds": round(self.seconds, 3),
            "samples": json.loads(self.samples.to_json(orient="records")),
            "files": self.files,
        }


# ------------------------------------------------------------------ layers and models


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


def build_trained(model_name: str, channels: int, n_classes: int, run: RunRecord) -> nn.Module:
    """The registry network ``model_name`` with ``run``'s weights, in eval mode."""
    from mlvar.train.models import build_model

    model = build_model(model_name, channels, n_classes)
    try:
        model.load_state_dict(load_weights(run))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MlvarError(
            f"the weights of run {run.run_id} do not fit a {model_name} network: {first}",
            "retrain that run",
        ) from None
    return model.eval()


# ------------------------------------------------------------------ the maps


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


# ------------------------------------------------------------------ overlays


def _jet() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _base_rgb(x: np.ndarray, max_value: float) -> np.ndarray:
    """The image (``H x W x C`` or ``H x W``) as float RGB in [0, 1]."""
    img = np.asarray(x, dtype=np.float32) / (max_value if max_value > 0 else 1.0)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.clip(img[:, :, :3], 0.0, 1.0)


def overlay_strip(
    x: np.ndarray,
    max_value: float,
    maps: np.ndarray,
    stats: np.ndarray,
    run_labels: Sequence[str],
    pred_marks: np.ndarray,
) -> bytes:
    """One PNG: rows the true / predicted class; columns the input, each run's map, the
    mean, std and max - min across runs, every map over the greyscale input (jet,
    alpha 0.5). ``maps``: ``[S, 2, H, W]``; ``stats``: ``[3, 2, H, W]``; std is shown
    on 0..0.5 (its largest possible value), the rest on 0..1. ``pred_marks[s]``: run s
    predicted a wrong class (its tile in the predicted row gets a red frame)."""
    from PIL import Image, ImageDraw

    lut = _jet()
    base = _base_rgb(x, max_value)
    grey = base.mean(axis=2, keepdims=True)
    h, w = base.shape[:2]
    f = max(1, round(TILE_PX / max(h, w)))
    th, tw = h * f, w * f
    gap, left, top = 2, 34, 14
    n_cols = 1 + len(maps) + len(STATS)
    width = left + n_cols * (tw + gap)
    height = top + 2 * (th + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def tile(m: np.ndarray | None) -> Image.Image:
        if m is None:
            rgb = base
        else:
            v = np.clip(np.nan_to_num(m.astype(np.float32)), 0.0, 1.0)
            heat = lut[np.rint(v * 255).astype(np.int64)].astype(np.float32) / 255
            rgb = 0.5 * grey + 0.5 * heat
        img = Image.fromarray(np.rint(rgb * 255).astype(np.uint8))
        return img.resize((tw, th), Image.NEAREST) if f > 1 else img

    titles = ["input", *run_labels, *STATS]
    for c, title in enumerate(titles):
        draw.text((left + c * (tw + gap) + 1, 1), title[: max(3, tw // 6)], fill="black")
    scale = np.array([1.0, 2.0, 1.0], dtype=np.float32)[:, None, None]
    for r, row_title in enumerate(("true", "pred")):
        y0 = top + r * (th + gap)
        draw.text((2, y0 + th // 2 - 5), row_title, fill="black")
        columns = [None, *[maps[s, r] for s in range(len(maps))]]
        columns += list(stats[:, r].astype(np.float32) * scale)
        for c, m in enumerate(columns):
            x0 = left + c * (tw + gap)
            canvas.paste(tile(m), (x0, y0))
            if r == 1 and 1 <= c <= len(maps) and pred_marks[c - 1]:
                draw.rectangle((x0, y0, x0 + tw - 1, y0 + th - 1), outline=(220, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------ tabular charts


def attribution_chart(
    names: Sequence[str],
    values: np.ndarray,
    per_seed: np.ndarray,
    label_name: str,
    wrong: np.ndarray,
) -> bytes:
    """One PNG of a tabular sample's gradient x input across seeds: a panel per target
    (the true class, each run's predicted class); per feature a bar for the mean over
    runs, a whisker for the std and a dot per run (red: that run predicted a wrong class).

    ``values``: the sample's features ``[F]``; ``per_seed``: ``[S, 2, F]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_runs, _, n_feat = per_seed.shape
    labels = [f"{n} = {v:.3g}" for n, v in zip(names, values, strict=True)]
    y = np.arange(n_feat)[::-1]
    height = 0.9 + 0.28 * n_feat  # inches
    fig, axes = plt.subplots(1, 2, figsize=(8.6, height), sharey=True)
    # Fixed margins (constrained layout would cost a third of the time): room on the
    # left for the longest label at ~0.065 in per character of the 7 pt font.
    left = min(0.45, (0.2 + 0.065 * max(len(t) for t in labels)) / 8.6)
    fig.subplots_adjust(left=left, right=0.98, top=1 - 0.35 / height, bottom=0.55 / height)
    fig.subplots_adjust(wspace=0.08)
    titles = (f"true class ({label_name})", "each run's predicted class")
    jitter = (np.arange(n_runs) - (n_runs - 1) / 2) * (0.5 / max(n_runs, 1))
    for t, ax in enumerate(axes):
        a = per_seed[:, t].astype(np.float64)
        mean, std = a.mean(axis=0), a.std(axis=0)
        ax.barh(y, mean, xerr=std, color="#8fb3d9", ecolor="#333333", capsize=2, height=0.6)
        bad = np.broadcast_to((wrong if t == 1 else np.zeros(n_runs, bool))[:, None], a.shape)
        ax.scatter(
            a.ravel(),
            (y[None, :] + jitter[:, None]).ravel(),
            s=6,
            c=np.where(bad.ravel(), "#d62728", "#222222"),
            alpha=0.8,
            linewidths=0,
        )
        ax.axvline(0, color="#999999", lw=0.8)
        ax.set_title(titles[t], fontsize=9)
        ax.set_xlabel("gradient x input (logit units)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(y, labels)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------ the service


def _scenario_rows(
    store: ExperimentStore, data_root: Path, split: str, sample_ids: np.ndarray
) -> tuple[np.ndarray, Any]:
    """The raw inputs of ``sample_ids`` (in that order) and the prepared scenario the runs
    were trained on (checked by its manifest sha256)."""
    from mlvar.data.scenario import experiment_scenario

    scenario = experiment_scenario(Path(data_root), store.name, store.meta)
    name = scenario.name
    data = scenario.load(split)
    index = pd.Index(data.id)
    where = index.get_indexer(sample_ids) if index.is_unique else np.full(len(sample_ids), -1)
    if (where < 0).any():
        raise MlvarError(
            f"split '{split}' of scenario '{name}' lacks {int((where < 0).sum())} of the "
            "chosen samples (or repeats sample ids)",
            "prepare the scenario the runs were trained on",
        )
    return data.x[where], scenario


def _input_kind(scenario: Any) -> str:
    return str((scenario.manifest.get("input") or {}).get("kind", "tabular"))


def _check_runs(store: ExperimentStore, runs: list[RunRecord]) -> None:
    missing = [r.run_id for r in runs if WEIGHTS_FILE not in r.meta.get("arrays", {})]
    if missing:
        model = store.meta.get("model", "?")
        raise MlvarError(
            f"runs of experiment '{store.name}' (model {model}) saved no model weights "
            f"({WEIGHTS_FILE}; {missing[0]} and {len(missing) - 1} more), so there is "
            "nothing to attribute",
            "retrain them with this mlvar (runs save model.pt), e.g. under a new --name",
        )


def build_mlp(store: ExperimentStore, n_features: int, run: RunRecord) -> nn.Module:
    """The study's MLP with ``run``'s weights, in eval mode."""
    from mlvar.train.mlp import MLP

    hidden = int((store.meta.get("train") or {}).get("hidden", 0))
    model = MLP(n_features, hidden, len(store.class_names))
    try:
        model.load_state_dict(load_weights(run))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MlvarError(
            f"the weights of run {run.run_id} do not fit an MLP with {n_features} inputs and "
            f"{hidden} hidden units: {first}",
            "retrain that run",
        ) from None
    return model.eval()


def _summary(maps: np.ndarray) -> np.ndarray:
    """Mean, std (ddof 0) and max - min across runs (axis 1): ``[n, 3, ...]``."""
    return np.stack([maps.mean(axis=1), maps.std(axis=1), maps.max(axis=1) - maps.min(axis=1)], 1)


@dataclass
class _Plan:
    """What one saliency computation explains, under which runs: fixed by the store, the
    ranking and the arguments, so every shard of a sharded saliency plans the same."""

    split: str
    by: str
    top: int
    seed: int
    seeds: int
    model_name: str
    runs: list[RunRecord]  # the first `seeds` verified runs, by run id
    rows: list[int]  # ranking rows of the samples
    chosen: pd.DataFrame  # those ranking rows
    ids: np.ndarray  # their sample ids
    positions: np.ndarray  # their row numbers in the split
    x_raw: np.ndarray  # their inputs, as prepared
    scenario: Any
    labels: np.ndarray  # [n]
    preds: np.ndarray  # [S, n]: each run's predicted class
    ranked_run_ids: list[str] = field(default_factory=list)  # every run the ranking used

    def fingerprint(self) -> dict[str, Any]:
        """What shards must agree on to be merged."""
        return {
            "split": self.split,
            "by": self.by,
            "top": self.top,
            "seed": self.seed,
            "seeds": self.seeds,
            "model": self.model_name,
            "run_ids": [r.run_id for r in self.runs],
            "sample_ids": [int(i) for i in self.ids],
        }


def plan_saliency(
    store: ExperimentStore,
    data_root: Path,
    split: str = "test",
    top: int = TOP_DEFAULT,
    seeds: int = SEEDS_DEFAULT,
    by: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH_DEFAULT,
) -> _Plan:
    """What :func:`saliency` (and every :func:`saliency_shard`) explains, with the checks
    they make before computing (arguments, runs, weights listed, scenario): the ranking's
    runs, the chosen samples and the runs to explain, with their inputs. Nothing is
    computed or written."""
    from mlvar.analysis import service as analysis
    from mlvar.report.samples import choose_pages
    from mlvar.train.models import IMAGE_MODELS

    by = by or analysis.DEFAULT_RANK_BY
    analysis.check_by(by)
    if top < 1:
        raise MlvarError(f"--top must be at least 1, got {top}", "use e.g. 10")
    if seeds < 1:
        raise MlvarError(f"--seeds must be at least 1, got {seeds}", "use e.g. 8")
    if batch_size < 1:
        raise MlvarError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. 64")
    model_name = str(store.meta.get("model", "?"))
    if model_name not in (*IMAGE_MODELS, "mlp"):
        raise MlvarError(
            f"experiment '{store.name}' has model '{model_name}', which mlvar cannot load",
            "saliency needs runs trained by mlvar: mlp, " + ", ".join(IMAGE_MODELS),
        )
    if model_name == "mlp" and layer is not None:
        raise MlvarError(
            f"--layer applies to GradCAM, but experiment '{store.name}' has an MLP "
            "(gradient x input attributes to the inputs)",
            "leave out --layer",
        )
    # The verified runs (a run whose arrays or weights fail their sha256 is left out with
    # a warning, as by every analysis) and the ranking over all of them.
    preds_all = analysis.load_predictions(store, split)
    samples = preds_all.samples
    run_ids_all = [r.run_id for r in preds_all.runs]
    computed = analysis.compute(preds_all)
    ranked = analysis.assemble(store, samples, split, run_ids_all, by, computed, write=False)
    runs = sorted(preds_all.runs, key=lambda r: r.run_id)[:seeds]
    _check_runs(store, runs)

    # The samples: top K by `by` and K random unaffected (the report's choice).
    ranking = ranked.ranking
    position_of = pd.Index(samples["sample_id"])
    if not position_of.is_unique:
        raise MlvarError(f"sample ids repeat in split '{split}' of '{store.name}'", "")
    rows = choose_pages(ranking, top, seed)
    chosen = ranking.iloc[rows].reset_index(drop=True)
    ids = chosen["sample_id"].to_numpy(dtype=np.int64)
    positions = position_of.get_indexer(ids)
    x_raw, scenario = _scenario_rows(store, data_root, split, ids)
    kind = _input_kind(scenario)
    if model_name != "mlp" and kind != "image":
        raise MlvarError(
            f"scenario '{scenario.name}' holds {kind} inputs: GradCAM needs images",
            "train an image model (e.g. 'mlvar train digits --model cnn')",
        )
    labels = chosen["label"].to_numpy(dtype=np.int64)
    preds = np.stack(
        [np.asarray(r.load_logits(split)[positions]).argmax(axis=1) for r in runs]
    ).astype(np.int64)  # [S, n]
    return _Plan(
        split,
        by,
        top,
        seed,
        seeds,
        model_name,
        runs,
        rows,
        chosen,
        ids,
        positions,
        x_raw,
        scenario,
        labels,
        preds,
        ranked_run_ids=run_ids_all,
    )


def resolve_layer(plan: _Plan, layer: str | None = None) -> tuple[str, str]:
    """``(method, layer)`` a computation of ``plan`` reports, checked on an untrained
    network of the plan's model (no weights are read): the MLP's gradient x input at
    ``input``; GradCAM at ``layer`` (default: the last ``Conv2d``), an unknown name being an
    error that names the conv layers."""
    if plan.model_name == "mlp":
        return GRADIENT_X_INPUT, "input"
    from mlvar.train.images import to_nchw
    from mlvar.train.models import build_model

    channels = int(to_nchw(plan.x_raw[:1]).shape[1])
    model = build_model(plan.model_name, channels, len(plan.scenario.class_names))
    return GRADCAM, target_layer(model, layer)[0]


def _compute(
    store: ExperimentStore,
    plan: _Plan,
    block: range,
    layer: str | None,
    batch_size: int,
    progress: Progress | None,
) -> tuple[str, str, np.ndarray | None, np.ndarray | None]:
    """The attributions of the plan's samples under the runs ``plan.runs[block]``:
    ``(method, layer, maps [n, S_block, 2, H, W] or None, attributions or None)``."""
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


def saliency(
    store: ExperimentStore,
    data_root: Path,
    split: str = "test",
    top: int = TOP_DEFAULT,
    seeds: int = SEEDS_DEFAULT,
    by: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH_DEFAULT,
    progress: Progress | None = None,
) -> SaliencyResult:
    """Attributions of the top ``top`` samples by ``by`` and ``top`` random unaffected ones
    (drawn with ``seed``) under the first ``seeds`` verified runs (by run id), for the
    true and each run's predicted class; written to ``analysis/saliency-<split>/``.

    Image models get GradCAM at ``layer`` (default: the last ``Conv2d``); the MLP gets
    gradient x input (``layer`` must then be None). Everything is checked (arguments,
    runs, weights, scenario, layer) before anything is written; the folder appears
    complete or not at all.
    """
    started = time.perf_counter()
    plan = plan_saliency(store, data_root, split, top, seeds, by, layer, seed, batch_size)
    computed = _compute(store, plan, range(len(plan.runs)), layer, batch_size, progress)
    return _write(store, plan, *computed, started)


# ------------------------------------------------------------------ sharded by runs


def shards_folder(store: ExperimentStore, split: str) -> Path:
    """``analysis/saliency-shards/<split>/``: one ``r<j>of<m>`` folder per run block."""
    return store.root / "analysis" / "saliency-shards" / split


def shard_name(j: int, m: int) -> str:
    """``r<j>of<m>``: the folder of block ``j`` of ``m`` in :func:`shards_folder`."""
    return f"r{j}of{m}"


def block_range(j: int, m: int, n_runs: int) -> range:
    """Runs of block ``j`` of ``m`` (1-based, contiguous): ``[(j-1)S/m, jS/m)``."""
    return range((j - 1) * n_runs // m, j * n_runs // m)


@dataclass
class SaliencyShard:
    """One block of runs' attributions, written by :func:`saliency_shard`."""

    path: Path
    shard: tuple[int, int]
    run_ids: list[str]  # the block's runs
    n_samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "run_ids": self.run_ids,
            "n_samples": self.n_samples,
            "seconds": round(self.seconds, 3),
        }


def saliency_shard(
    store: ExperimentStore,
    data_root: Path,
    shard: tuple[int, int],
    split: str = "test",
    top: int = TOP_DEFAULT,
    seeds: int = SEEDS_DEFAULT,
    by: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH_DEFAULT,
    progress: Progress | None = None,
    out: Path | None = None,
) -> SaliencyShard:
    """The attributions of block ``shard = (j, m)`` of the runs :func:`saliency` would use,
    written to ``out`` (default ``analysis/saliency-shards/<split>/r<j>of<m>/``).

    Every shard plans alike (the same ranking, samples and runs), computes only its runs
    and writes float32 ``maps.npy`` and/or ``attributions.npy`` ``[n, S_block, 2, ...]``,
    then ``meta.json`` last, listing each file's sha256; the folder appears in one rename.
    :func:`merge_saliency_shards` combines a complete set into what :func:`saliency`
    writes, bit for bit (each run's attributions depend on that run only).
    """
    started = time.perf_counter()
    j, m = shard
    if not 1 <= j <= m:
        raise MlvarError(f"--run-shard must be j/m with 1 <= j <= m, got {j}/{m}", "e.g. 1/4")
    plan = plan_saliency(store, data_root, split, top, seeds, by, layer, seed, batch_size)
    if m > len(plan.runs):
        raise MlvarError(
            f"--run-shard {j}/{m}: there are only {len(plan.runs)} runs to explain "
            f"(--seeds {seeds})",
            f"use at most {len(plan.runs)} run blocks",
        )
    block = block_range(j, m, len(plan.runs))
    method, layer_name, maps, attributions = _compute(
        store, plan, block, layer, batch_size, progress
    )
    target = Path(out) if out is not None else shards_folder(store, split) / shard_name(j, m)
    arrays = {"maps.npy": maps, "attributions.npy": attributions}
    with staging_dir(target, replace=True) as tmp:
        files = {}
        for name, array in arrays.items():
            if array is not None:
                files[name] = atomic_save_npy(tmp / name, array.astype(np.float32))
        meta = {
            "kind": "saliency",
            "experiment": store.name,
            "shard": [j, m],
            "block_run_ids": [plan.runs[i].run_id for i in block],
            "method": method,
            "layer": layer_name,
            **plan.fingerprint(),
            "files": files,
        }
        atomic_write_json(tmp / "meta.json", meta)
    return SaliencyShard(
        target, (j, m), meta["block_run_ids"], len(plan.ids), time.perf_counter() - started
    )


def verify_saliency_shard(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """``(meta, "")`` for a complete saliency shard whose files match their sha256."""
    from mlvar.io import read_meta, sha256_file

    meta, why = read_meta(folder)
    if meta is None:
        return None, why
    if not isinstance(meta, dict) or meta.get("kind") != "saliency":
        return None, "meta.json is not a saliency shard's"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return meta, "meta.json lists no files"
    for name, digest in files.items():
        if name not in ("maps.npy", "attributions.npy"):
            return meta, f"unexpected file {name!r}"
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            return meta, f"{name} is missing or does not match its sha256"
    return meta, ""


def merge_saliency_shards(
    store: ExperimentStore, data_root: Path, split: str = "test", layer: str | None = None
) -> SaliencyResult:
    """Combine the shards in ``analysis/saliency-shards/<split>/`` into
    ``analysis/saliency-<split>/``, exactly as an unsharded :func:`saliency` writes it.

    The shards must form one complete set (every block ``j`` of one ``m``), agree on what
    they explain, and match the store now (the same runs and samples: the plan is redone
    and compared); anything else is an error naming the problem, and nothing is written.
    """
    started = time.perf_counter()
    root = shards_folder(store, split)
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not found:
        raise MlvarError(
            f"no saliency shards of split '{split}' in {root}",
            f"compute them first: mlvar analyze saliency {store.name} --run-shard j/m",
        )
    metas = []
    for folder_ in found:
        meta, why = verify_saliency_shard(folder_)
        if why:
            raise MlvarError(
                f"saliency shard {folder_.name} of '{store.name}' is not usable: {why}",
                "recompute it (mlvar analyze saliency --run-shard j/m) or remove it",
            )
        metas.append((folder_, meta))
    sizes = {tuple(m["shard"])[1] for _, m in metas}
    if len(sizes) != 1:
        raise MlvarError(
            f"saliency shards of '{store.name}' mix block counts {sorted(sizes)}",
            f"keep one set in {root}",
        )
    m = sizes.pop()
    have = sorted(int(meta["shard"][0]) for _, meta in metas)
    if have != list(range(1, m + 1)):
        missing = sorted(set(range(1, m + 1)) - set(have))
        raise MlvarError(
            f"saliency shards of '{store.name}': blocks {missing} of {m} are missing",
            f"compute them: mlvar analyze saliency {store.name} --run-shard j/{m}",
        )
    first = metas[0][1]
    keys = ("split", "by", "top", "seed", "seeds", "model", "run_ids", "sample_ids", "method")
    for folder_, meta in metas[1:]:
        differs = [k for k in keys if meta.get(k) != first.get(k)]
        if differs:
            raise MlvarError(
                f"saliency shards {metas[0][0].name} and {folder_.name} of '{store.name}' "
                f"explain different things ({', '.join(differs)})",
                f"recompute the shards with the same arguments, or remove {root}",
            )
    plan = plan_saliency(
        store,
        data_root,
        split,
        first["top"],
        first["seeds"],
        first["by"],
        layer if layer is not None else (None if first["model"] == "mlp" else first["layer"]),
        first["seed"],
        BATCH_DEFAULT,
    )
    now = plan.fingerprint()
    differs = [k for k in now if now[k] != first.get(k)]
    if differs:
        raise MlvarError(
            f"the saliency shards of '{store.name}' were computed on other runs or samples "
            f"than the store holds now ({', '.join(differs)})",
            "recompute the shards",
        )
    metas.sort(key=lambda fm: int(fm[1]["shard"][0]))
    for (_, meta), j in zip(metas, range(1, m + 1), strict=True):
        expected = [plan.runs[i].run_id for i in block_range(j, m, len(plan.runs))]
        if meta.get("block_run_ids") != expected:
            raise MlvarError(
                f"saliency shard r{j}of{m} of '{store.name}' holds runs "
                f"{meta.get('block_run_ids')}, expected {expected}",
                "recompute that shard",
            )

    def stacked(name: str) -> np.ndarray | None:
        if name not in first["files"]:
            return None
        return np.concatenate([np.load(f / name, allow_pickle=False) for f, _ in metas], axis=1)

    return _write(
        store,
        plan,
        str(first["method"]),
        str(first["layer"]),
        stacked("maps.npy"),
        stacked("attributions.npy"),
        started,
    )


def _write(
    store: ExperimentStore,
    plan: _Plan,
    method: str,
    layer_name: str,
    maps: np.ndarray | None,
    attributions: np.ndarray | None,
    started: float,
) -> SaliencyResult:
    """Write ``analysis/saliency-<split>/`` for the plan's samples under all its runs."""
    split, top, by, seed, model_name = plan.split, plan.top, plan.by, plan.seed, plan.model_name
    runs, rows, chosen, ids = plan.runs, plan.rows, plan.chosen, plan.ids
    positions, x_raw, labels, preds = plan.positions, plan.x_raw, plan.labels, plan.preds
    manifest = plan.scenario.manifest
    if attributions is not None:  # float32-exact values; summaries in float64 either way
        attributions = attributions.astype(np.float64)
    n = len(ids)
    tabular = maps is None
    if tabular:
        stats = _summary(attributions)  # [n, 3, 2, F]
        spread = stats[:, 1].mean(axis=-1)  # [n, 2]: mean over features of the std
    else:
        stats = _summary(maps)  # [n, 3, 2, H, W]
        spread = stats[:, 1].mean(axis=(-2, -1))
    index = pd.DataFrame(
        {
            "sample_id": ids,
            "position": positions.astype(np.int64),
            "rank": chosen["rank"].to_numpy(dtype=np.int64),
            "kind": ["top" if r < top else "random unaffected" for r in rows],
            "affected": chosen["affected"].to_numpy(dtype=bool),
            "label": labels,
            "label_name": chosen["label_name"].astype(str).to_numpy(),
            "pred": [p.tolist() for p in preds.T],
            "n_correct": (preds == labels[None, :]).sum(axis=0).astype(np.int64),
            "spread_true": spread[:, 0].astype(np.float64),
            "spread_pred": spread[:, 1].astype(np.float64),
            "overlay": [f"overlays/{i}.png" for i in ids],
        }
    )
    feature_names: list[str] = []
    if tabular:
        n_feat = attributions.shape[-1]
        given = [str(f) for f in manifest.get("feature_names", [])]
        feature_names = [given[i] if i < len(given) else f"feature {i}" for i in range(n_feat)]
        for t, target in enumerate(("true", "pred")):
            index[f"attr_{target}_mean"] = [r.tolist() for r in stats[:, 0, t]]
            index[f"attr_{target}_std"] = [r.tolist() for r in stats[:, 1, t]]
    max_value = float((manifest.get("input") or {}).get("max_value", 255))
    run_labels = [f"run {r.meta.get('run_index', k)}" for k, r in enumerate(runs)]
    out_dir = folder(store, split)
    shape = list(attributions.shape[-1:]) if tabular else list(maps.shape[-2:])
    with staging_dir(out_dir, replace=True) as tmp:
        if tabular:
            atomic_save_npy(tmp / "attributions.npy", attributions.astype(np.float32))
            atomic_save_npy(tmp / "stats.npy", stats.astype(np.float32))
            x_feat = _mlp_inputs(x_raw, manifest)
            for i in range(n):
                png = attribution_chart(
                    feature_names,
                    x_feat[i],
                    attributions[i],
                    str(index["label_name"][i]),
                    preds[:, i] != labels[i],
                )
                atomic_write_bytes(tmp / "overlays" / f"{ids[i]}.png", png)
        else:
            maps16, stats16 = maps.astype(np.float16), stats.astype(np.float16)
            atomic_save_npy(tmp / "maps.npy", maps16)
            atomic_save_npy(tmp / "stats.npy", stats16)
            if attributions is not None:
                atomic_save_npy(tmp / "attributions.npy", attributions.astype(np.float32))
            for i in range(n):
                atomic_write_bytes(
                    tmp / "overlays" / f"{ids[i]}.png",
                    overlay_strip(
                        x_raw[i],
                        max_value,
                        maps16[i],
                        stats16[i],
                        run_labels,
                        preds[:, i] != labels[i],
                    ),
                )
        table = pa.Table.from_pandas(index, preserve_index=False)  # pred: list<int64>
        atomic_write_bytes(tmp / "samples.parquet", parquet_bytes(table))
        atomic_write_json(tmp / "samples.json", json.loads(index.to_json(orient="records")))
        meta = {
            "experiment": store.name,
            "split": split,
            "method": method,
            "input": "tabular" if tabular else "image",
            "model": model_name,
            "layer": layer_name,
            "run_ids": [r.run_id for r in runs],
            "by": by,
            "top": top,
            "seed": seed,
            "n_samples": n,
            "shape": shape,
            "targets": list(TARGETS),
            "stats": list(STATS),
        }
        if tabular:
            meta["feature_names"] = feature_names
            meta["attributions"] = (
                "float32 [n_samples, runs, target, features]: gradient x input of the "
                "target's logit (sums to logit - its value at input 0 for a linear model)"
            )
        else:
            meta["maps"] = "float16 [n_samples, runs, target, H, W]; each map scaled to [0, 1]"
            if attributions is not None:
                meta["attributions"] = (
                    "float32 [n_samples, runs, target, features]: signed gradient x "
                    "input of the flattened image (maps: |.| summed over channels)"
                )
        atomic_write_json(tmp / "saliency.json", meta)
    names = ["stats.npy", "samples.parquet", "samples.json", "saliency.json"]
    names = (["attributions.npy"] if attributions is not None else []) + names
    names = (["maps.npy"] if maps is not None else []) + names
    files = [str(out_dir / f) for f in names] + [str(out_dir / "overlays")]
    return SaliencyResult(
        store.name,
        split,
        model_name,
        layer_name,
        [r.run_id for r in runs],
        index,
        tuple(shape),
        out_dir,
        files,
        time.perf_counter() - started,
        method=method,
        feature_names=feature_names,
    )


def _mlp_inputs(x_raw: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    from mlvar.train.service import input_features

    return input_features(np.asarray(x_raw), manifest)


def _gradient_x_input_of_runs(
    store: ExperimentStore,
    runs: list[RunRecord],
    x_raw: np.ndarray,
    manifest: dict[str, Any],
    labels: np.ndarray,
    preds: np.ndarray,
    progress: Progress | None,
) -> tuple[str, str, np.ndarray | None, np.ndarray]:
    """Gradient x input of each run's MLP for the true and its predicted class.

    Returns ``(method, layer, maps, attributions)``: ``attributions`` ``[n, S, 2, F]``
    (signed, logit units); for image inputs also ``maps`` ``[n, S, 2, H, W]``: the
    absolute attributions summed over channels, each map scaled to [0, 1] as GradCAM's.
    """
    x = _mlp_inputs(x_raw, manifest)
    n, n_feat = x.shape
    models = [build_mlp(store, n_feat, r) for r in runs]  # every run checked first
    attributions = np.empty((n, len(runs), 2, n_feat), dtype=np.float64)
    for s, model in enumerate(models):
        attributions[:, s, 0] = gradient_x_input(model, x, labels)
        attributions[:, s, 1] = gradient_x_input(model, x, preds[s])
        if progress:
            progress(s + 1, len(models))
    if (manifest.get("input") or {}).get("kind") != "image":
        return GRADIENT_X_INPUT, "input", None, attributions
    pixels = np.abs(attributions).reshape(n, len(runs), 2, *x_raw.shape[1:])
    if pixels.ndim == 6:  # [n, S, 2, H, W, C]: sum over channels
        pixels = pixels.sum(axis=-1)
    peak = pixels.max(axis=(-2, -1), keepdims=True)
    maps = np.divide(pixels, peak, out=np.zeros_like(pixels), where=peak > 0)
    return GRADIENT_X_INPUT, "input", maps.astype(np.float32), attributions


def _training_norm(scenario: Any) -> Any:
    """The image normalisation of training: an ``ImageData`` of the train split, whose
    statistics are computed as training does (one thread per kernel)."""
    import torch

    from mlvar.train import images

    train = scenario.load("train")
    return images._build_data({"train": train}, scenario.manifest, torch.device("cpu"))


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
) -> tuple[str, str, np.ndarray, None]:
    """GradCAM ``[n, S, 2, H, W]`` of each run's image model, true and predicted class."""
    import torch

    from mlvar.train.images import to_nchw

    x = _training_norm(scenario).normalise(to_nchw(x_raw))
    n_classes = len(scenario.class_names)
    channels = int(x.shape[1])
    # Build every model (checks weights and the layer) before computing anything.
    models = [build_trained(model_name, channels, n_classes, r) for r in runs]
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
    return GRADCAM, layer_name, maps, None


@dataclass
class SaliencyIndex:
    """What the report needs of a saliency folder: its meta and each sample's strip."""

    meta: dict[str, Any]
    overlays: dict[str, Path]  # sample id (str) -> overlay PNG
    rows: dict[str, dict[str, Any]]  # sample id (str) -> its samples.json row


def read_index(store: ExperimentStore, split: str) -> SaliencyIndex | None:
    """The saliency of ``split`` if it was computed (None otherwise or when unreadable)."""
    base = folder(store, split)
    try:
        meta = json.loads((base / "saliency.json").read_text())
        rows = json.loads((base / "samples.json").read_text())
    except (OSError, ValueError):
        return None
    overlays, by_id = {}, {}
    for row in rows:
        sid = str(row.get("sample_id"))
        png = base / str(row.get("overlay", ""))
        if png.is_file() and png.parent == base / "overlays":
            overlays[sid] = png
            by_id[sid] = row
    return SaliencyIndex(meta, overlays, by_id)
