"""Scenario modes of tabular datasets written once: COMPAS's ``artificial`` shortcut feature
and its decision-tree clusters, shared by ``compas`` and user tables (:mod:`mlvar.data.table`).

- ``artificial --ratio a``: a binary feature equal to the label, flipped with probability
  ``a`` in train and validation and with probability 0.5 in test (a shortcut that carries no
  signal at test time). Affected: rows where the feature disagrees with the label.
- clusters: the leaves of ``DecisionTreeClassifier(random_state=0, min_samples_leaf=m)``
  fitted on every row's unstandardised features and labels, numbered by their training rows
  ascending (ties by leaf node id); holding one out removes its training rows, and its
  validation and test rows are the affected ones.

scikit-learn is imported where a tree is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlvar.data import params as p
from mlvar.data.modes import unchanged_splits
from mlvar.data.scenario import SplitData
from mlvar.data.spec import BaseData, ModeResult

ARTIFICIAL_TEST_FLIP = 0.5
TREE_RANDOM_STATE = 0


# --------------------------------------------------------------------------- artificial


@dataclass(frozen=True)
class ArtificialParams(p.Params):
    ratio: float = p.ratio(
        0.0, 0.5, help="label-flip probability of the added feature, in [0, 0.5]"
    )
    seed: int = p.seed(help="seed of the label flips")


def artificial_result(
    base: BaseData, ratio: float, seed: int, feature_names: list[str]
) -> ModeResult:
    """The ``artificial`` scenario of ``base`` (binary labels): its splits with the added
    feature ``artificial`` last, the description and the manifest entries."""
    splits = unchanged_splits(base)
    # Draw order is fixed (train, val, test), so a seed gives the same feature everywhere.
    rng = np.random.default_rng(seed)
    flip_p = {"train": ratio, "val": ratio, "test": ARTIFICIAL_TEST_FLIP}
    feature_names = [*feature_names, "artificial"]
    for s in ("train", "val", "test"):
        data = splits[s]
        flips = rng.random(len(data)) < flip_p[s]
        feature = np.where(flips, 1 - data.y, data.y)
        data.x = np.concatenate([data.x, feature[:, None].astype(np.float32)], axis=1)
        data.affected = feature != data.y
    description = (
        f"Added a binary feature 'artificial' equal to the label flipped with probability "
        f"{ratio} in train and validation and 0.5 in test; affected rows are those where it "
        f"disagrees with the label."
    )
    manifest = {
        "feature_names": feature_names,
        "input": {"kind": "tabular", "n_features": len(feature_names)},
        "artificial": {
            "feature": "artificial",
            "flip_probability": flip_p,
            "rng": "numpy.random.default_rng(seed).random(n) < p, drawn for train, val, test",
        },
    }
    return ModeResult(splits, description, manifest)


# --------------------------------------------------------------------------- tree clusters


def tree_leaves(x: np.ndarray, y: np.ndarray, min_samples_leaf: int) -> np.ndarray:
    """Every row's leaf of ``DecisionTreeClassifier(random_state=0, min_samples_leaf)``
    fitted on all rows ``x`` (unstandardised features) and labels ``y``."""
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier(random_state=TREE_RANDOM_STATE, min_samples_leaf=min_samples_leaf)
    tree.fit(x, y)
    return tree.apply(x)


def number_leaves(
    leaves: np.ndarray, leaf_ids: np.ndarray, counted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's cluster and the clusters' leaf ids, ``leaf_ids`` numbered by their rows
    among the positions ``counted``, ascending, ties by leaf node id (-1: a row whose leaf
    is not among ``leaf_ids``)."""
    counts = np.array([(leaves[counted] == leaf).sum() for leaf in leaf_ids])
    # lexsort: the last key is the primary one.
    leaf_ids = leaf_ids[np.lexsort((leaf_ids, counts))]
    cluster_of_leaf = {int(leaf): k for k, leaf in enumerate(leaf_ids)}
    group = np.array([cluster_of_leaf.get(int(leaf), -1) for leaf in leaves], dtype=np.int64)
    return group, leaf_ids


def clusters_manifest(
    leaf_ids: np.ndarray,
    sizes: dict[str, list[int]],
    order: str,
    min_samples_leaf: int,
    fit_on: str,
    **removed: int,
) -> dict[str, Any]:
    """The manifest's ``clusters``: the tree, the leaves in cluster order, their sizes."""
    return {
        "n_clusters": len(leaf_ids),
        "leaf_ids": [int(leaf) for leaf in leaf_ids],
        "sizes": sizes,
        "tree": {
            "class": "sklearn.tree.DecisionTreeClassifier",
            "random_state": TREE_RANDOM_STATE,
            "min_samples_leaf": min_samples_leaf,
            "fit_on": fit_on,
        },
        "order": order,
        **removed,
    }


def cluster_holdout(
    base: BaseData,
    clusters: tuple[np.ndarray, np.ndarray],
    k: int,
    min_samples_leaf: int,
    fit_on: str,
) -> ModeResult:
    """Cluster ``k`` of ``clusters`` (every row's cluster, the clusters' leaf ids) held out:
    its training rows removed, its validation and test rows affected; every row's group is
    its cluster."""
    group_all, leaf_ids = clusters
    n_clusters = len(leaf_ids)
    sizes = {
        s: [int((group_all[idx] == c).sum()) for c in range(n_clusters)]
        for s, idx in base.index.items()
    }
    splits = unchanged_splits(base)
    for s, idx in base.index.items():
        splits[s].group = group_all[idx]
        splits[s].affected = splits[s].group == k
    train = splits["train"]
    keep = train.group != k
    splits["train"] = SplitData(
        x=train.x[keep],
        y=train.y[keep],
        id=train.id[keep],
        affected=train.affected[keep],
        group=train.group[keep],
    )
    description = (
        f"Removed the {sizes['train'][k]} training rows of decision-tree cluster "
        f"{k} (of {n_clusters}); affected rows are its validation and test rows."
    )
    manifest = {
        "clusters": clusters_manifest(
            leaf_ids,
            sizes,
            order="training rows ascending, ties by leaf node id",
            min_samples_leaf=min_samples_leaf,
            fit_on=fit_on,
            removed_train_rows=int(sizes["train"][k]),
        )
    }
    return ModeResult(splits, description, manifest)
