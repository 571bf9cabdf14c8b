"""Saliency figures: the strip of an image sample's maps across runs and the chart of a
tabular sample's attributions, as PNG bytes.

``mlvar analyze saliency`` (:mod:`mlvar.saliency`) draws one per sample from what
:mod:`mlvar.analysis.saliency` computed and writes them into
``analysis/saliency-<split>/overlays/``; ``mlvar report html`` copies them onto the
sample pages. PIL and matplotlib are imported inside the functions. The same arrays give
the same bytes (no timestamps or software tags in the PNGs).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np

from mlvar.analysis.saliency import STATS, SaliencyContent
from mlvar.report import plots

TILE_PX = 64  # overlays: each map is nearest-neighbour upscaled to about this size


def figures(content: SaliencyContent) -> Iterator[bytes]:
    """One PNG per sample of ``content``, in its index's order: the strip of its maps
    (:func:`overlay_strip`) or, for tabular inputs, its chart (:func:`attribution_chart`)."""
    for i in range(len(content.index)):
        if content.tabular:
            yield attribution_chart(
                content.feature_names,
                content.inputs[i],
                content.attributions[i],
                str(content.index["label_name"][i]),
                content.wrong[i],
            )
        else:
            yield overlay_strip(
                content.inputs[i],
                content.max_value,
                content.maps[i],
                content.stats[i],
                content.run_labels,
                content.wrong[i],
            )


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
    plt = plots._plt()
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
    return plots._png(fig)
