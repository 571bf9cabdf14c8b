"""The study site's figures (matplotlib, Agg), from rows of the study table
(:mod:`mlvar.analysis.study`): what the original study plotted across its scenarios.

* :func:`metric_panels`: per metric, AUROC against a scenario parameter, the ensemble
  metric beside the worst and the median single model (its matched baseline);
* :func:`accuracy_plot`: accuracy of the affected (held-out) and of the other samples
  against the parameter, mean with one-std bars;
* :func:`rank_panels`: the normalised rank summaries of the affected samples against the
  parameter, one line per metric;
* :func:`auroc_box`: AUROC of each metric (and of the single models) over experiments;
* :func:`subclass_scatter`: the study's KMeans groups of subclasses (held-out accuracy at
  ratio 0 against its drop at ratio 1), from :mod:`mlvar.analysis.study_accuracy`.

Where several experiments share a parameter value (they differ in another parameter),
a point is their mean; the captions in the pages say what the bars are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mlvar.report.plots import AFFECTED_COLOR, UNAFFECTED_COLOR, _plt, _png, _short

ENSEMBLE_COLOR = "#4c72b0"
WORST_COLOR = "#c44e52"
MEDIAN_COLOR = "#dd8452"
RANK_KEYS = (
    ("rank_first_norm", "first affected"),
    ("rank_median_norm", "median affected"),
    ("rank_top10_mean_norm", "mean of the 10 best affected"),
    ("rank_mean_norm", "mean affected"),
)
"""Study-table columns of the rank summaries and their panel titles."""


def parameter_axis(values: pd.Series) -> tuple[bool, list]:
    """Whether a parameter is numeric, and its values in plotting order."""
    numeric = pd.api.types.is_numeric_dtype(values)
    present = values.dropna()
    if numeric:
        return True, sorted(present.unique())
    return False, sorted(present.astype(str).unique())


def _key(values: pd.Series, numeric: bool) -> pd.Series:
    return values if numeric else values.astype(str)


def _positions(index: Sequence, order: list, numeric: bool) -> np.ndarray:
    if numeric:
        return np.asarray(index, dtype=float)
    where = {v: i for i, v in enumerate(order)}
    return np.array([where[v] for v in index], dtype=float)


def _label_axis(ax, order: list, numeric: bool, param: str, fontsize: int = 8) -> None:
    if not numeric:
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_xticks(
            range(len(order)),
            [_short(str(v), 12) for v in order],
            rotation=45 if len(order) > 4 else 0,
            ha="right" if len(order) > 4 else "center",
            fontsize=fontsize - 1,
        )
    ax.set_xlabel(_short(param, 30), fontsize=fontsize)


def _grid(plt, n: int, cols: int = 4, width: float = 2.9, height: float = 2.4):
    rows = max(1, math.ceil(n / cols))
    cols = min(cols, max(1, n))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.4), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def metric_panels(
    rows: pd.DataFrame, param: str, metrics: Sequence[str], highlight: str, title: str
) -> bytes:
    """One panel per metric: AUROC against ``param`` of the ensemble metric (mean over
    experiments sharing a value; bars their min and max) and the mean worst and median
    AUROC of its single-model baseline. ``rows``: metric rows of the study table."""
    plt = _plt()
    numeric, order = parameter_axis(rows[param])
    fig, axes = _grid(plt, len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        g = rows[rows["metric"] == metric]
        agg = g.groupby(_key(g[param], numeric)).agg(
            mean=("auroc", "mean"),
            low=("auroc", "min"),
            high=("auroc", "max"),
            worst=("baseline_worst_auroc", "mean"),
            median=("baseline_median_auroc", "mean"),
        )
        agg = agg.reindex([v for v in order if v in agg.index])
        x = _positions(agg.index, order, numeric)
        ax.errorbar(
            x,
            agg["mean"],
            yerr=[agg["mean"] - agg["low"], agg["high"] - agg["mean"]],
            marker="o",
            markersize=3,
            capsize=2,
            linewidth=1.6,
            color=ENSEMBLE_COLOR,
            label="ensemble metric",
        )
        baseline = g["baseline"].dropna()
        name = str(baseline.iloc[0]) if len(baseline) else "single model"
        ax.plot(x, agg["worst"], "--", color=WORST_COLOR, linewidth=1.1, label="worst")
        ax.plot(x, agg["median"], ":", color=MEDIAN_COLOR, linewidth=1.4, label="median")
        ax.set_title(
            f"{_short(metric, 24)} (vs {_short(name, 14)})",
            fontsize=9,
            fontweight="bold" if metric == highlight else "normal",
        )
        ax.set_ylim(min(0.4, float(np.nanmin([agg["low"].min(), agg["worst"].min(), 1.0]))), 1.02)
        ax.tick_params(labelsize=7)
        _label_axis(ax, order, numeric, param)
    axes[0].set_ylabel("AUROC", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    names = {"worst": "worst single model", "median": "median single model"}
    rank = {"ensemble metric": 0, "worst": 1, "median": 2}
    pairs = sorted(zip(handles, labels, strict=True), key=lambda hl: rank.get(hl[1], 3))
    handles, labels = [h for h, _ in pairs], [x for _, x in pairs]
    top = 1.0 - 0.75 / fig.get_figheight()  # room for the title and the legend
    fig.suptitle(_short(title, 100), fontsize=10, y=0.995)
    fig.legend(
        handles,
        [names.get(x, x) for x in labels],
        loc="upper center",
        bbox_to_anchor=(0.5, 1.0 - 0.3 / fig.get_figheight()),
        ncol=3,
        frameon=False,
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, top))
    return _png(fig)


def accuracy_points(per_experiment: pd.DataFrame, param: str, group: str) -> pd.DataFrame:
    """Per value of ``param``: the mean accuracy of ``group`` (``acc``, ``acc_affected``,
    ``acc_unaffected``) and its bar: the experiment's std across seeds when one
    experiment has the value, else the std (ddof 1) of the experiments' means. Columns
    ``mean``, ``std``, ``n`` (experiments), in plotting order."""
    numeric, order = parameter_axis(per_experiment[param])
    out = []
    for value, g in per_experiment.groupby(_key(per_experiment[param], numeric)):
        means = g[f"{group}_mean"].dropna()
        if means.empty:
            continue
        if len(means) == 1:
            std = float(g.loc[means.index, f"{group}_std"].iloc[0])
        else:
            std = float(means.std(ddof=1))
        out.append({"value": value, "mean": float(means.mean()), "std": std, "n": len(means)})
    frame = pd.DataFrame(out, columns=["value", "mean", "std", "n"]).set_index("value")
    return frame.reindex([v for v in order if v in frame.index])


def accuracy_plot(per_experiment: pd.DataFrame, param: str, title: str) -> bytes | None:
    """Accuracy of the affected and of the unaffected samples against ``param`` (see
    :func:`accuracy_points`); None when no experiment has accuracy results."""
    plt = _plt()
    numeric, order = parameter_axis(per_experiment[param])
    lines = [
        ("acc_affected", "affected (held-out) samples", AFFECTED_COLOR),
        ("acc_unaffected", "other samples", UNAFFECTED_COLOR),
    ]
    points = [(accuracy_points(per_experiment, param, g), label, c) for g, label, c in lines]
    if all(p.empty for p, _, _ in points):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for frame, label, color in points:
        if frame.empty:
            continue
        ax.errorbar(
            _positions(frame.index, order, numeric),
            frame["mean"],
            yerr=np.nan_to_num(frame["std"].to_numpy(dtype=float)),
            marker="o",
            markersize=3,
            capsize=3,
            linewidth=1.4,
            color=color,
            label=label,
        )
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (mean ± std)")
    _label_axis(ax, order, numeric, param, 9)
    ax.set_title(_short(title, 80), fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def rank_panels(
    rows: pd.DataFrame,
    param: str,
    metrics: Sequence[str],
    highlight: str,
    title: str,
    baselines: Sequence[str] = (),
) -> bytes:
    """The rank summaries of the affected samples (first, median, mean of the 10 best,
    mean; divided by the population, log scale) against ``param``: one line per metric
    (mean over experiments sharing a value), dashed for the single-model ``baselines``
    (study-table names such as ``neg_gconf[median]``)."""
    plt = _plt()
    numeric, order = parameter_axis(rows[param])
    cmap = plt.get_cmap("tab20")
    from matplotlib import ticker

    fig, axes = _grid(plt, len(RANK_KEYS), cols=2, width=5.2, height=3.0)
    fig.set_figwidth(fig.get_figwidth() + 1.9)
    names = [*metrics, *baselines]
    for ax, (key, label) in zip(axes, RANK_KEYS, strict=True):
        for i, metric in enumerate(names):
            g = rows[rows["metric"] == metric]
            agg = g.groupby(_key(g[param], numeric))[key].mean()
            agg = agg.reindex([v for v in order if v in agg.index]).dropna()
            agg = agg[agg > 0]
            if agg.empty:
                continue
            bold = metric == highlight
            single = metric in baselines
            ax.plot(
                _positions(agg.index, order, numeric),
                agg.to_numpy(),
                linestyle="--" if single else "-",
                marker="o",
                markersize=2.5,
                linewidth=2.4 if bold else 1.0,
                color="#c44e52" if bold else ("#555555" if single else cmap(i % 20)),
                label=metric,
                zorder=3 if bold else 2,
            )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"rank of the {label} / n", fontsize=9)
        ax.tick_params(labelsize=7)
        _label_axis(ax, order, numeric, param)
    axes[0].set_ylabel("normalised rank (lower: found earlier)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    right = 1.0 - 1.9 / fig.get_figwidth()  # room for the legend
    fig.legend(
        handles,
        [_short(x, 26) for x in labels],
        loc="center left",
        bbox_to_anchor=(right, 0.5),
        frameon=False,
        fontsize=7,
    )
    fig.suptitle(_short(title, 100), fontsize=10)
    fig.tight_layout(rect=(0, 0, right, 1))
    return _png(fig)


def auroc_box(
    rows: pd.DataFrame, names: Sequence[tuple[str, str]], highlight: str, title: str
) -> bytes:
    """A horizontal box per entry of ``names`` (study-table metric, label): its AUROC
    over the experiments in ``rows``, the median drawn, each experiment a dot."""
    plt = _plt()
    data, labels = [], []
    for metric, label in names:
        v = rows.loc[rows["metric"] == metric, "auroc"].to_numpy(dtype=float)
        v = v[~np.isnan(v)]
        if v.size:
            data.append(v)
            labels.append((metric, label))
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.28 * max(1, len(data))))
    if data:
        positions = np.arange(len(data), 0, -1)  # the first entry on top
        parts = ax.boxplot(
            data,
            positions=positions,
            orientation="horizontal",
            widths=0.6,
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "#222222"},
        )
        for box, (metric, _) in zip(parts["boxes"], labels, strict=True):
            box.set_facecolor("#f3c6c7" if metric == highlight else "#dbe4f0")
        rng = np.random.default_rng(0)  # fixed jitter: the same figure every time
        for y, v in zip(positions, data, strict=True):
            ax.scatter(v, y + rng.uniform(-0.15, 0.15, v.size), s=6, color="#333333", zorder=3)
        ax.set_yticks(positions, [_short(label, 34) for _, label in labels], fontsize=8)
    ax.set_xlabel("AUROC")
    ax.set_title(_short(title, 90), fontsize=10)
    fig.tight_layout()
    return _png(fig)


def subclass_scatter(subclasses: pd.DataFrame, title: str) -> bytes:
    """The study's grouping of subclasses: held-out accuracy at ratio 0 (x) against its
    drop at ratio 1 (y), one colour per KMeans group, each point labelled with its
    subclass (``subclasses``: rows of ``study-subclasses``); the legend lists each group's
    subclasses."""
    plt = _plt()
    n_groups = int(subclasses["group"].max()) + 1 if len(subclasses) else 0
    cmap = plt.get_cmap("tab10" if n_groups <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8.5, 6.0))
    for group in range(n_groups):
        one = subclasses[subclasses["group"] == group]
        if one.empty:
            continue
        names = " ".join(one["subclass"].astype(str))
        ax.scatter(
            one["acc_ratio0"],
            one["drop"],
            s=22,
            alpha=0.8,
            color=cmap(group % cmap.N),
            label=_short(f"{group}: {names}", 70),
        )
        for x, y, name in zip(one["acc_ratio0"], one["drop"], one["subclass"], strict=True):
            # Data text is drawn verbatim (no mathtext, so no escaping), clipped to the axes.
            ax.annotate(
                str(name)[:24],
                (x, y),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=6,
                parse_math=False,
                annotation_clip=True,
            )
    ax.set_xlabel("held-out test accuracy at ratio 0 (mean over runs)")
    ax.set_ylabel("its drop at ratio 1 (accuracy at 0 minus at 1)")
    ax.set_title(_short(title, 90), fontsize=10)
    ax.legend(
        frameon=False,
        fontsize=6,
        title="group: subclasses",
        bbox_to_anchor=(1.02, 1),
        loc="upper left",
    )
    fig.tight_layout()
    return _png(fig)
