"""The retraining figures (matplotlib, Agg) as PNG bytes: accuracy and gain against the
budget per strategy, for one experiment (from
:func:`mlvar.analysis.retrain_summary_io.summary_stats`) and across the experiments of a
study family.

Three panels each: all test samples, the held-out (affected) ones and the other
(unaffected) ones. Label-aware ("oracle") strategies are drawn dashed and named so in
the legend; ``random`` is grey, the baseline to beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mlvar.report.plots import _plt, _png, _short

PANELS = (("", "all test samples"), ("_affected", "held-out (affected)"), ("_unaffected", "other"))
RANDOM_COLOR = "#7f7f7f"


def strategy_label(strategy: str, oracle: bool, pool: str | None = None) -> str:
    """A strategy's legend entry: ``maxconf_std``, ``gconf_mean (oracle)``, with its
    pool when the figure shows several."""
    text = _short(strategy, 24) + (" (oracle)" if oracle else "")
    return f"{text} [{_short(pool, 16)}]" if pool is not None else text


def _styles(keys: Sequence[tuple[str, str, bool]]) -> dict[tuple[str, str], dict]:
    """Colour and line style per (pool, strategy): random grey, oracles dashed."""
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    out, k = {}, 0
    for pool, strategy, oracle in keys:
        if strategy == "random":
            color = RANDOM_COLOR
        else:
            color = cmap(k % 10)
            k += 1
        out[(pool, strategy)] = {"color": color, "linestyle": "--" if oracle else "-"}
    return out


def _budget_axis(ax, budgets: Sequence[float]) -> None:
    ticks = sorted(set(float(b) for b in budgets))
    ax.set_xticks(ticks, [f"{b:g}" for b in ticks], fontsize=7)
    ax.set_xlabel("budget (fraction of the pool)", fontsize=8)
    ax.tick_params(labelsize=7)


def against_budget(stats: pd.DataFrame, title: str) -> bytes:
    """Test accuracy (top row) and gain over budget 0 (bottom row) against the budget,
    one line per strategy: the mean over runs with a band of one std (ddof 1) either
    side; columns all, held-out and other samples. ``stats``: rows of ``summary_stats``."""
    plt = _plt()
    fig, grid = plt.subplots(2, 3, figsize=(11.0, 5.6), sharex=True, squeeze=False)
    # Fixed margins: tight_layout would cost as much as drawing the figure.
    fig.subplots_adjust(left=0.07, right=0.80, top=0.90, bottom=0.10, wspace=0.28, hspace=0.2)
    keys = list(dict.fromkeys(zip(stats["pool"], stats["strategy"], stats["oracle"], strict=True)))
    styles = _styles(keys)
    several_pools = stats["pool"].nunique() > 1
    for axes, quantity in zip(grid, ("acc", "gain"), strict=True):
        for ax, (suffix, panel) in zip(axes, PANELS, strict=True):
            col = f"{quantity}{suffix}"
            drawn = False
            for pool, strategy, oracle in keys:
                g = stats[(stats["pool"] == pool) & (stats["strategy"] == strategy)]
                x = g["budget"].to_numpy(dtype=float)
                mean = g[f"{col}_mean"].to_numpy(dtype=float)
                if np.isnan(mean).all():
                    continue
                std = np.nan_to_num(g[f"{col}_std"].to_numpy(dtype=float))
                style = styles[(pool, strategy)]
                label = strategy_label(strategy, oracle, pool if several_pools else None)
                ax.plot(x, mean, marker="o", markersize=3, linewidth=1.4, label=label, **style)
                ax.fill_between(x, mean - std, mean + std, color=style["color"], alpha=0.12)
                drawn = True
            if quantity == "gain":
                ax.axhline(0, color="#999", linewidth=0.8)
            else:
                ax.set_title(panel, fontsize=9)
            if not drawn:
                ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            ax.tick_params(labelsize=7)
    for ax in grid[1]:
        _budget_axis(ax, stats["budget"])
    grid[0, 0].set_ylabel("test accuracy", fontsize=8)
    grid[1, 0].set_ylabel("gain over budget 0", fontsize=8)
    handles, labels = _legend_entries(grid.ravel())
    fig.legend(
        handles, labels, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(0.81, 0.5)
    )
    fig.suptitle(_short(title, 110), fontsize=10)
    return _png(fig)


def _legend_entries(axes) -> tuple[list, list]:
    """Each label once, over every panel (a strategy may have no line in one)."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    return handles, labels


def family_gains(
    points: pd.DataFrame, panel_key: str | None, title: str, column: str = "gain_affected"
) -> bytes:
    """Mean ``column`` against the budget per strategy across experiments: one panel per
    value of ``panel_key`` (e.g. ``ratio``; one panel of every experiment when None).

    ``points``: one row per experiment x strategy x budget with that experiment's mean
    over runs in ``<column>_mean``, ``strategy``, ``oracle``, ``budget`` and the
    ``panel_key`` column. A point is the mean over the panel's experiments; bars their
    min and max.
    """
    plt = _plt()
    values = [None] if panel_key is None else sorted(points[panel_key].dropna().unique())
    n = len(values)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols + 1.8, 2.6 * rows + 0.5), squeeze=False, sharey=True
    )
    # Fixed margins below: tight_layout would cost as much as drawing the figure.
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    keys = list(dict.fromkeys(zip(points["strategy"], points["oracle"], strict=True)))
    styles = _styles([("", s, o) for s, o in keys])
    for ax, value in zip(axes.ravel(), values, strict=False):
        sub = points if value is None else points[points[panel_key] == value]
        for strategy, oracle in keys:
            g = sub[sub["strategy"] == strategy]
            agg = g.groupby("budget")[f"{column}_mean"].agg(["mean", "min", "max", "count"])
            agg = agg.dropna(subset=["mean"])
            if agg.empty:
                continue
            x = agg.index.to_numpy(dtype=float)
            ax.errorbar(
                x,
                agg["mean"],
                yerr=[agg["mean"] - agg["min"], agg["max"] - agg["mean"]],
                marker="o",
                markersize=3,
                capsize=2,
                linewidth=1.3,
                label=strategy_label(strategy, oracle),
                **styles[("", strategy)],
            )
        ax.axhline(0, color="#999", linewidth=0.8)
        n_exp = sub["experiment"].nunique()
        head = (
            "every experiment"
            if value is None
            else f"{_short(panel_key, 16)} = {_short(value, 12)}"
        )
        ax.set_title(f"{head} ({n_exp} exp.)", fontsize=9)
        _budget_axis(ax, points["budget"])
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out gain" if column == "gain_affected" else column, fontsize=8)
    handles, labels = _legend_entries(axes.ravel()[:n])
    width = 3.0 * cols + 1.8
    height = 2.6 * rows + 0.5
    right = 1 - 1.8 / width
    fig.subplots_adjust(
        left=0.95 / width,
        right=right - 0.02,
        top=1 - 0.5 / height,
        bottom=0.45 / height,
        wspace=0.15,
        hspace=0.45,
    )
    fig.legend(
        handles, labels, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(right, 0.5)
    )
    fig.suptitle(_short(title, 110), fontsize=10)
    return _png(fig)
