"""Per-class views that stay readable with many classes.

Up to :data:`CLASSES_IN_FULL` classes every view shows every class. Beyond that (CIFAR-100
has 100) the accuracy table and chart of the index show the :data:`SHOWN_EACH` worst and
best classes by mean accuracy across seeds, and the table of every class is folded in a
``<details>`` element; a sample page lists the classes that got a vote, the label and the
classes of highest mean probability, and folds the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlvar.report import plots

CLASSES_IN_FULL = 20
SHOWN_EACH = 10
"""Beyond :data:`CLASSES_IN_FULL` classes: how many of the worst and of the best are shown."""
TOP_PROBABILITY = 5
"""Classes of highest mean probability a sample page always lists."""

STAT_KEYS = ("mean", "std", "min", "max", "ci_low", "ci_high")


@dataclass
class ClassAccuracy:
    """The index's accuracy table: rows shown, rows folded, and what was left out."""

    rows: list[list[Any]]  # group rows, then the classes shown: [label, *STAT_KEYS values]
    folded: list[list[Any]]  # every class, when only some are shown (else empty)
    note: str  # which classes are shown ("" when all are)


def _class_stats(summary: dict[str, dict[str, Any]], class_names: list[str]) -> list[tuple]:
    """``(class index, name, stats)`` of the classes with samples in the split."""
    out = []
    for i, name in enumerate(class_names):
        s = summary.get(f"acc_class_{i}")
        if s and s.get("n"):
            out.append((i, str(name), s))
    return out


def chosen_classes(summary: dict[str, dict[str, Any]], class_names: list[str]) -> list[tuple]:
    """The classes a view shows: all, or the :data:`SHOWN_EACH` worst then best by mean
    accuracy (ties in class order), worst first."""
    stats = _class_stats(summary, class_names)
    if len(stats) <= CLASSES_IN_FULL:
        return stats
    order = sorted(stats, key=lambda t: (t[2]["mean"], t[0]))
    return order[:SHOWN_EACH] + order[-SHOWN_EACH:]


def accuracy_table(
    summary: dict[str, dict[str, Any]], class_names: list[str], fmt
) -> ClassAccuracy:
    """The rows of the index's accuracy table (``fmt`` formats a number)."""

    def row(label: str, s: dict[str, Any]) -> list[Any]:
        return [label] + [fmt(s.get(k)) for k in STAT_KEYS]

    rows = []
    for key, label in (("accuracy", "all samples"), ("acc_affected", "affected")):
        s = summary.get(key)
        if s and s.get("n"):
            rows.append(row(label, s))
    s = summary.get("acc_unaffected")
    if s and s.get("n"):
        rows.append(row("unaffected", s))
    stats = _class_stats(summary, class_names)
    shown = chosen_classes(summary, class_names)
    rows += [row(f"class {name}", s) for _, name, s in shown]
    if len(shown) == len(stats):
        return ClassAccuracy(rows, [], "")
    note = (
        f"Classes: the {SHOWN_EACH} of lowest and the {SHOWN_EACH} of highest mean accuracy "
        f"of {len(stats)} (lowest first); every class is in the folded table below."
    )
    return ClassAccuracy(rows, [row(f"class {name}", s) for _, name, s in stats], note)


def accuracy_plot(summary: dict[str, dict[str, Any]], class_names: list[str]) -> bytes | None:
    """The chart of the index: mean accuracy of the classes :func:`chosen_classes` picks
    and of the affected / unaffected samples, error bars one std across seeds."""
    names, means, stds = [], [], []
    entries = [(name, s) for _, name, s in chosen_classes(summary, class_names)]
    entries += [(key[4:], summary.get(key)) for key in ("acc_affected", "acc_unaffected")]
    for name, s in entries:
        if s and s.get("n"):
            names.append(name)
            means.append(s["mean"])
            stds.append(np.nan if s.get("std") is None else s["std"])
    if not names:
        return None
    n_classes = len(_class_stats(summary, class_names))
    title = "accuracy per class (mean ± std over seeds)"
    if n_classes > CLASSES_IN_FULL:
        title = f"{SHOWN_EACH} worst and {SHOWN_EACH} best of {n_classes} classes (mean ± std)"
    return plots.class_accuracy(names, np.array(means, float), np.array(stds, float), title)


def vote_rows(classes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A sample page's classes split into those listed and those folded: with more than
    :data:`CLASSES_IN_FULL` classes, the label, every class with a vote and the
    :data:`TOP_PROBABILITY` of highest mean probability are listed (most votes first,
    then by mean probability), the rest folded in class order."""
    if len(classes) <= CLASSES_IN_FULL:
        return classes, []
    by_prob = sorted(range(len(classes)), key=lambda c: (-classes[c]["p"], c))
    keep = {c for c, row in enumerate(classes) if row["votes"] or row["is_label"]}
    keep |= set(by_prob[:TOP_PROBABILITY])
    listed = sorted(keep, key=lambda c: (-classes[c]["votes"], -classes[c]["p"], c))
    return [classes[c] for c in listed], [r for c, r in enumerate(classes) if c not in keep]
