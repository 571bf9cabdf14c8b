"""Per-sample attributions across seeds: GradCAM maps of image models, gradient x input
of tabular models (DESIGN section 8).

The one analysis module that loads models. :func:`saliency` takes the top ``K`` samples
of a ranking and ``K`` random unaffected ones (seeded, as the report's sample pages:
:func:`mlvar.report.samples.choose_pages`), the first ``S`` runs (by run id) whose
``model.pt`` matches the sha256 in their ``run.json``, and computes with the
``grad-cam`` package (``pytorch_grad_cam.GradCAM``) one map per sample, run and target:
the sample's true class and the class that run predicted (its stored logits' argmax).
Inputs are the prepared scenario's images, normalised exactly as for training
(:class:`mlvar.train.images.ImageData`, statistics of the training split). The target
layer is the model's last ``Conv2d`` unless ``layer`` names another module.

Layout of ``<experiment>/analysis/saliency-<split>/`` (written as one folder, swapped in
when complete)::

    maps.npy          float16 [n_samples, S, 2, H, W]: GradCAM of each run, target 0 the
                      true class, 1 the run's predicted class (each map scaled to [0, 1])
    stats.npy         float16 [n_samples, 3, 2, H, W]: mean, std (ddof 0) and max - min
                      of the maps across the S runs
    samples.parquet   one row per sample, in the order of the arrays: sample_id,
    samples.json      position, rank, kind ("top" | "random unaffected"), affected,
                      label, label_name, pred (one class per run), n_correct,
                      spread_true / spread_pred (mean over pixels of the std map)
    saliency.json     experiment, split, model, layer, runs, by, top, seed, shape, files
    overlays/<sample_id>.png   a strip per sample: rows true / predicted class; columns
                      input, each run, mean, std, max - min (maps over the input, jet)

Tabular models: :func:`gradient_x_input` and :func:`attribution_spread` compute gradient x
input per feature and its spread across seeds for any ``nn.Module``; the MLP runs save no
weights today, so :func:`saliency` refuses them with a hint to train an image model.
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
    shape: tuple[int, int]  # H, W of every map
    path: Path  # the folder
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_seeds(self) -> int:
        return len(self.run_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "split": self.split,
            "model": self.model,
            "layer": self.layer,
            "run_ids": self.run_ids,
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


# ------------------------------------------------------------------ the service


def _image_inputs(
    store: ExperimentStore, data_root: Path, split: str, sample_ids: np.ndarray
) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """The raw images of ``sample_ids`` (in that order), the training data's
    normalisation (an ``ImageData`` of the train split) and the scenario manifest."""
    from mlvar.data.scenario import open_scenario

    name = (store.meta.get("scenario") or {}).get("name")
    if not name:
        raise MlvarError(
            f"experiment '{store.name}' names no prepared scenario (imported predictions?)",
            "saliency needs the images and the weights of mlvar-trained image runs",
        )
    try:
        scenario = open_scenario(Path(data_root), str(name))
    except MlvarError:
        raise MlvarError(
            f"the prepared scenario '{name}' of experiment '{store.name}' is not in the "
            f"data root {data_root}",
            "prepare it again with 'mlvar data prepare', or point data_root at it",
        ) from None
    expected = (store.meta.get("scenario") or {}).get("manifest_sha256")
    if expected and scenario.manifest_sha256 != expected:
        raise MlvarError(
            f"the prepared scenario '{name}' in {data_root} is not the one the runs of "
            f"'{store.name}' were trained on (its manifest changed)",
            "prepare the scenario the runs were trained on",
        )
    kind = (scenario.manifest.get("input") or {}).get("kind")
    if kind != "image":
        raise MlvarError(
            f"scenario '{name}' holds {kind} inputs: GradCAM needs images",
            "train an image model (e.g. 'mlvar train digits --model cnn')",
        )
    data = scenario.load(split)
    index = pd.Index(data.id)
    where = index.get_indexer(sample_ids) if index.is_unique else np.full(len(sample_ids), -1)
    if (where < 0).any():
        raise MlvarError(
            f"split '{split}' of scenario '{name}' lacks {int((where < 0).sum())} of the "
            "chosen samples (or repeats sample ids)",
            "prepare the scenario the runs were trained on",
        )
    import torch

    from mlvar.train import images

    train = data if split == "train" else scenario.load("train")
    # The training split's statistics, computed as training does (one thread per kernel).
    norm = images._build_data({"train": train}, scenario.manifest, torch.device("cpu"))
    return data.x[where], norm, scenario.manifest


def _check_runs(store: ExperimentStore, runs: list[RunRecord]) -> None:
    missing = [r.run_id for r in runs if WEIGHTS_FILE not in r.meta.get("arrays", {})]
    if missing:
        model = store.meta.get("model", "?")
        raise MlvarError(
            f"runs of experiment '{store.name}' (model {model}) saved no model weights "
            f"({WEIGHTS_FILE}; {missing[0]} and {len(missing) - 1} more), so there is "
            "nothing to attribute",
            "saliency needs an image model, e.g. 'mlvar train digits --model cnn'",
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
    """GradCAM of the top ``top`` samples by ``by`` and ``top`` random unaffected ones
    (drawn with ``seed``) under the first ``seeds`` verified runs (by run id), for the
    true and each run's predicted class; written to ``analysis/saliency-<split>/``.

    Everything is checked (arguments, runs, weights, scenario, layer) before anything is
    written; the folder appears complete or not at all.
    """
    from mlvar.analysis import service as analysis
    from mlvar.report.samples import choose_pages
    from mlvar.train.models import IMAGE_MODELS

    started = time.perf_counter()
    by = by or analysis.DEFAULT_RANK_BY
    analysis.check_by(by)
    if top < 1:
        raise MlvarError(f"--top must be at least 1, got {top}", "use e.g. 10")
    if seeds < 1:
        raise MlvarError(f"--seeds must be at least 1, got {seeds}", "use e.g. 8")
    if batch_size < 1:
        raise MlvarError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. 64")
    # The verified runs (a run whose arrays or weights fail their sha256 is left out with
    # a warning, as by every analysis) and the ranking over all of them.
    preds_all = analysis.load_predictions(store, split)
    samples = preds_all.samples
    run_ids_all = [r.run_id for r in preds_all.runs]
    computed = analysis.compute(preds_all)
    ranked = analysis.assemble(store, samples, split, run_ids_all, by, computed, write=False)
    runs = sorted(preds_all.runs, key=lambda r: r.run_id)[:seeds]
    _check_runs(store, runs)
    model_name = str(store.meta.get("model", "?"))
    if model_name not in IMAGE_MODELS:
        raise MlvarError(
            f"experiment '{store.name}' has model '{model_name}': GradCAM needs one of "
            + ", ".join(IMAGE_MODELS),
            "train an image model, e.g. 'mlvar train digits --model cnn'",
        )

    # The samples: top K by `by` and K random unaffected (the report's choice).
    ranking = ranked.ranking
    position_of = pd.Index(samples["sample_id"])
    if not position_of.is_unique:
        raise MlvarError(f"sample ids repeat in split '{split}' of '{store.name}'", "")
    rows = choose_pages(ranking, top, seed)
    chosen = ranking.iloc[rows].reset_index(drop=True)
    ids = chosen["sample_id"].to_numpy(dtype=np.int64)
    positions = position_of.get_indexer(ids)
    x_raw, norm, manifest = _image_inputs(store, data_root, split, ids)

    import torch

    from mlvar.train.images import to_nchw

    x = norm.normalise(to_nchw(x_raw))
    labels = chosen["label"].to_numpy(dtype=np.int64)
    preds = np.stack(
        [np.asarray(r.load_logits(split)[positions]).argmax(axis=1) for r in runs]
    ).astype(np.int64)  # [S, n]
    n_classes = len(store.class_names)
    channels = int(x.shape[1])
    # Build every model (checks weights and the layer) before computing anything.
    models = [build_trained(model_name, channels, n_classes, r) for r in runs]
    layer_name, _ = target_layer(models[0], layer)

    n, (h, w) = len(ids), tuple(int(v) for v in x.shape[2:])
    maps = np.empty((n, len(runs), 2, h, w), dtype=np.float32)
    for s, model in enumerate(models):
        both = torch.cat([x, x])
        targets = np.concatenate([labels, preds[s]])
        out = gradcam(model, both, targets, layer_name, batch_size=2 * batch_size)
        maps[:, s, 0], maps[:, s, 1] = out[:n], out[n:]
        if progress:
            progress(s + 1, len(models))
    stats = np.stack([maps.mean(axis=1), maps.std(axis=1), maps.max(axis=1) - maps.min(axis=1)], 1)

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
            "spread_true": stats[:, 1, 0].mean(axis=(1, 2)).astype(np.float64),
            "spread_pred": stats[:, 1, 1].mean(axis=(1, 2)).astype(np.float64),
            "overlay": [f"overlays/{i}.png" for i in ids],
        }
    )
    max_value = float((manifest.get("input") or {}).get("max_value", 255))
    run_labels = [f"run {r.meta.get('run_index', k)}" for k, r in enumerate(runs)]
    out_dir = folder(store, split)
    maps16, stats16 = maps.astype(np.float16), stats.astype(np.float16)
    with staging_dir(out_dir, replace=True) as tmp:
        atomic_save_npy(tmp / "maps.npy", maps16)
        atomic_save_npy(tmp / "stats.npy", stats16)
        table = pa.Table.from_pandas(index, preserve_index=False)  # pred: list<int64>
        atomic_write_bytes(tmp / "samples.parquet", parquet_bytes(table))
        atomic_write_json(tmp / "samples.json", json.loads(index.to_json(orient="records")))
        for i in range(n):
            atomic_write_bytes(
                tmp / "overlays" / f"{ids[i]}.png",
                overlay_strip(
                    x_raw[i], max_value, maps16[i], stats16[i], run_labels, preds[:, i] != labels[i]
                ),
            )
        meta = {
            "experiment": store.name,
            "split": split,
            "method": "GradCAM (pytorch_grad_cam)",
            "model": model_name,
            "layer": layer_name,
            "run_ids": [r.run_id for r in runs],
            "by": by,
            "top": top,
            "seed": seed,
            "n_samples": n,
            "shape": [h, w],
            "targets": list(TARGETS),
            "stats": list(STATS),
            "maps": "float16 [n_samples, runs, target, H, W]; each map scaled to [0, 1]",
        }
        atomic_write_json(tmp / "saliency.json", meta)
    files = [
        str(out_dir / f)
        for f in ("maps.npy", "stats.npy", "samples.parquet", "samples.json", "saliency.json")
    ] + [str(out_dir / "overlays")]
    return SaliencyResult(
        store.name,
        split,
        model_name,
        layer_name,
        [r.run_id for r in runs],
        index,
        (h, w),
        out_dir,
        files,
        time.perf_counter() - started,
    )


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
