"""The report's figures: matplotlib (Agg) figures saved as PNG bytes.

Every function takes plain arrays or data frames and returns the PNG's bytes; saving
drops the variable metadata so that the same data give the same file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

AFFECTED_COLOR = "#dd8452"
UNAFFECTED_COLOR = "#4c72b0"
DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def accuracy_histogram(per_run_acc: np.ndarray, split: str) -> bytes:
    """Histogram of the per-run accuracy with its mean."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = min(30, max(5, len(per_run_acc) // 2))
    ax.hist(per_run_acc, bins=bins, color=UNAFFECTED_COLOR, edgecolor="white")
    mean = float(np.mean(per_run_acc))
    ax.axvline(mean, color="#c44e52", linestyle="--", label=f"mean {mean:.4f}")
    ax.set_xlabel(f"{split} accuracy")
    ax.set_ylabel("runs")
    ax.set_title(f"{split} accuracy of {len(per_run_acc)} seeds")
    ax.legend(frameon=False)
    fig.tight_layout()
    return _png(fig)


def class_accuracy(
    names: Sequence[str],
    means: np.ndarray,
    stds: np.ndarray,
    title: str = "accuracy per class (mean ± std over seeds)",
) -> bytes:
    """Mean accuracy per class (and group) with error bars of one std across seeds."""
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4.0, min(12.0, 0.55 * n + 2.0)), 3.2))
    x = np.arange(n)
    colors = [
        AFFECTED_COLOR
        if name == "affected"
        else "#8c8c8c"
        if name == "unaffected"
        else UNAFFECTED_COLOR
        for name in names
    ]
    ax.bar(x, means, yerr=np.nan_to_num(stds), color=colors, capsize=3, ecolor="#333")
    ax.set_xticks(
        x,
        [_short(s, 14) for s in names],
        rotation=45 if n > 6 else 0,
        ha="right" if n > 6 else "center",
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(_short(title, 90))
    fig.tight_layout()
    return _png(fig)


def roc_points(score: np.ndarray, affected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve of ``score`` (higher = more suspicious) for finding ``affected``:
    false and true positive rates at every distinct threshold, from (0, 0), keeping only
    the points where the curve changes direction (the others lie on a straight segment).
    Needs both classes in ``affected`` and no NaN in ``score``."""
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    s, a = score[order], np.asarray(affected, dtype=bool)[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # end of each tie group
    tps = np.cumsum(a)[last].astype(np.float64)
    fps = (last + 1) - tps
    if tps.size > 2:
        corner = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        keep = np.r_[True, corner, True]
        tps, fps = tps[keep], fps[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return fps / fps[-1], tps / tps[-1]


def roc_curves(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]]) -> bytes:
    """One small ROC panel per metric: ``(title, fpr, tpr, auroc)``."""
    plt = _plt()
    cols = 4
    rows = max(1, math.ceil(len(curves) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.ravel()[len(curves) :]:
        ax.set_visible(False)
    for ax, (title, fpr, tpr, auc) in zip(axes.ravel(), curves, strict=False):
        ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8, linestyle=":")
        ax.plot(fpr, tpr, color=UNAFFECTED_COLOR, linewidth=1.4)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"{_short(title, 22)}\nAUROC {auc:.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("false positive rate", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def auroc_vs_runs(summary: pd.DataFrame, highlight: str) -> bytes:
    """Mean AUROC (over subsets) against the number of runs, one line per metric."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    cmap = plt.get_cmap("tab20")
    for i, (metric, g) in enumerate(summary.groupby("metric", sort=False)):
        g = g.sort_values("n_runs")
        bold = metric == highlight
        ax.plot(
            g["n_runs"],
            g["auroc_mean"],
            marker="o",
            markersize=3,
            linewidth=2.6 if bold else 1.1,
            color="#c44e52" if bold else cmap(i % 20),
            label=metric,
            zorder=3 if bold else 2,
        )
    sizes = sorted(summary["n_runs"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("number of runs (seeds)")
    ax.set_ylabel("AUROC (mean over subsets)")
    ax.set_title("detection AUROC against the number of runs")
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _png(fig)


def confidence_scatter(mean: np.ndarray, std: np.ndarray, affected: np.ndarray) -> bytes:
    """Mean against std over seeds of the true-class confidence, coloured by affected."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    affected = np.asarray(affected, dtype=bool)
    size = 6 if len(mean) > 2000 else 12
    ax.scatter(
        mean[~affected],
        std[~affected],
        s=size,
        alpha=0.5,
        color=UNAFFECTED_COLOR,
        linewidths=0,
        label=f"unaffected ({int((~affected).sum())})",
        rasterized=True,
    )
    if affected.any():
        ax.scatter(
            mean[affected],
            std[affected],
            s=size + 4,
            alpha=0.8,
            color=AFFECTED_COLOR,
            linewidths=0,
            label=f"affected ({int(affected.sum())})",
        )
    ax.set_xlabel("gconf_mean (true-class confidence, mean over seeds)")
    ax.set_ylabel("gconf_std (std over seeds)")
    ax.set_title("confidence: mean against spread across seeds")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def study_auroc(table: pd.DataFrame, param: str, title: str, highlight: str | None = None) -> bytes:
    """AUROC per metric against one scenario parameter (mean over experiments sharing a
    value, with their min-max as error bars)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    cmap = plt.get_cmap("tab20")
    values = table[param]
    numeric = pd.api.types.is_numeric_dtype(values)
    order = sorted(values.unique()) if numeric else sorted(values.astype(str).unique())
    pos = {v: i for i, v in enumerate(order)}
    for i, (metric, g) in enumerate(table.groupby("metric", sort=False)):
        key = g[param] if numeric else g[param].astype(str)
        agg = g.groupby(key)["auroc"].agg(["mean", "min", "max"]).reindex(order).dropna()
        if agg.empty:
            continue
        x = agg.index.to_numpy(dtype=float) if numeric else np.array([pos[v] for v in agg.index])
        bold = metric == highlight
        ax.errorbar(
            x,
            agg["mean"],
            yerr=[agg["mean"] - agg["min"], agg["max"] - agg["mean"]],
            marker="o",
            markersize=3,
            linewidth=2.6 if bold else 1.1,
            capsize=2,
            color="#c44e52" if bold else cmap(i % 20),
            label=metric,
        )
    if not numeric:
        ax.set_xticks(range(len(order)), [_short(str(v), 12) for v in order])
    ax.set_xlabel(param)
    ax.set_ylabel("AUROC")
    ax.set_title(_short(title, 80))
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _png(fig)


def thumbnail(x: np.ndarray, max_value: float, target: int = 96) -> bytes:
    """One image (``H x W x C`` or ``H x W``) as a PNG, nearest-neighbour upscaled so its
    longer side is about ``target`` pixels."""
    from PIL import Image

    img = np.asarray(x, dtype=np.float64)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    scale = 255.0 / max_value if max_value > 0 else 1.0
    img = np.clip(np.rint(img * scale), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)  # 2-D: greyscale ("L"), H x W x 3: RGB
    factor = max(1, target // max(img.shape[:2]))
    if factor > 1:
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _short(text: str, n: int) -> str:
    """Shorten ``text`` for a label; ``$`` is escaped so data never turns into mathtext."""
    text = str(text)
    text = text if len(text) <= n else text[: n - 1] + "…"
    return text.replace("$", r"\$")
