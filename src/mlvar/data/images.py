"""Image scenarios shared by CIFAR-10 and digits: the four class modes, appearance changes,
and a contact sheet that shows the injected change.

Class modes (docs/design.md section 4), for a target class ``c`` and a ratio ``a``; the affected
training samples are the first ``floor(a * count)`` training samples of class ``c`` in split
order (validation has already been split off):

- ``holdout``: they are deleted.
- ``holdout-dup``: each is replaced by a copy of a random remaining sample of class ``c``
  (``numpy.random.default_rng(seed)``, drawn with replacement), so class sizes stay equal.
- ``augmentation``: their appearance is changed (CIFAR: grayscale; digits: inversion).
- ``augmentation-all``: the first ``a`` fraction of *every* class is changed.

Affected evaluation samples: the target class's validation and test samples (every mode
with a target class); for the appearance modes a changed copy of the test set is written
as split ``test_gray``, with the same ids and the same affected flags as ``test``, except
``augmentation-all``, where every ``test_gray`` sample is affected and no ``test`` sample is.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data.compas import as_int, check_ratio, format_ratio
from mlvar.data.scenario import Scenario, SplitData
from mlvar.errors import MlvarError
from mlvar.io import atomic_write_bytes

CLASS_MODES = ("holdout", "holdout-dup", "augmentation", "augmentation-all")
APPEARANCE_MODES = ("augmentation", "augmentation-all")

Change = Callable[[np.ndarray], np.ndarray]


def n_affected(ratio: float, count: int) -> int:
    """``floor(ratio * count)``, robust to float rounding (0.7 * 10 is 7, not 6)."""
    return min(count, math.floor(ratio * count + 1e-9))


def grayscale(x: np.ndarray) -> np.ndarray:
    """3-channel grayscale of uint8 RGB images ``[..., 3]``: ITU-R 601-2 luma, in integers
    exactly as PIL's ``convert("L")`` (and so torchvision's ``Grayscale(3)``) computes it."""
    x32 = x.astype(np.uint32)
    luma = (x32[..., 0] * 19595 + x32[..., 1] * 38470 + x32[..., 2] * 7471 + 0x8000) >> 16
    return np.repeat(luma.astype(np.uint8)[..., None], 3, axis=-1)


def inverter(max_value: int) -> Change:
    """Colour inversion ``max_value - x`` (digits: ``16 - x``)."""

    def invert(x: np.ndarray) -> np.ndarray:
        return (max_value - x.astype(np.int16)).astype(x.dtype)

    return invert


def _check_seed(seed: Any) -> int:
    value = as_int(seed)
    if value is None or value < 0:
        raise MlvarError(f"seed must be a non-negative integer, got {seed!r}", "e.g. --seed 0")
    return value


def check_class_mode(
    dataset: str,
    mode: str,
    cls: Any,
    ratio: Any,
    seed: Any,
    n_classes: int,
    default_cls: int | None = 0,
) -> tuple[int | None, float | None, int]:
    """Validate the options of ``original`` or a class mode (shared with digits).

    Returns ``(cls, ratio, seed)``; ``cls`` is None for ``original`` and ``augmentation-all``.
    """
    seed_int = _check_seed(seed)
    if mode != "holdout-dup" and seed_int != 0:
        raise MlvarError(f"{dataset} mode '{mode}' takes no --seed", "only --mode holdout-dup does")
    if mode == "original":
        for option, value in (("cls", cls), ("ratio", ratio)):
            if value is not None:
                raise MlvarError(
                    f"{dataset} mode 'original' takes no --{option}",
                    "use --mode " + "|".join(CLASS_MODES),
                )
        return None, None, 0
    if mode == "augmentation-all":
        if cls is not None:
            raise MlvarError(
                f"{dataset} mode 'augmentation-all' takes no --cls",
                "it changes every class; use --mode augmentation for one class",
            )
        cls_int = None
    else:
        if cls is None and default_cls is None:
            raise MlvarError(
                f"{dataset} mode '{mode}' needs --cls", f"e.g. --cls 0 (0-{n_classes - 1})"
            )
        cls_int = as_int(default_cls if cls is None else cls)
        if cls_int is None or not 0 <= cls_int < n_classes:
            raise MlvarError(
                f"{dataset} class {cls!r} is not a class index 0-{n_classes - 1}", "e.g. --cls 0"
            )
    if ratio is None:
        raise MlvarError(f"{dataset} mode '{mode}' needs --ratio", "use a value in [0, 1]")
    ratio_f = check_ratio(ratio, 0.0, 1.0, mode)
    if mode == "holdout-dup" and ratio_f >= 1.0:
        raise MlvarError(
            "holdout-dup with ratio 1.0 leaves no sample of the class to copy",
            "use a ratio below 1.0, or --mode holdout to delete the whole class",
        )
    return cls_int, ratio_f, seed_int


def class_mode_name(
    dataset: str, mode: str, cls: int | None, ratio: float | None, seed: int
) -> str:
    """``<dataset>-<mode>[-cls<c>]-r<ratio>[-s<seed>]`` (``<dataset>-original``)."""
    if mode == "original":
        return f"{dataset}-original"
    name = f"{dataset}-{mode}" + (f"-cls{cls}" if cls is not None else "")
    name += f"-r{format_ratio(ratio)}"  # type: ignore[arg-type]
    return name + (f"-s{seed}" if seed else "")


def class_mode_description(
    mode: str, cls_name: str | None, ratio: float | None, change: str, seed: int
) -> str:
    pct = f"{ratio:.0%}" if ratio is not None else ""
    if mode == "original":
        return "Unchanged data; nothing injected."
    if mode == "holdout":
        return (
            f"Removed the first {pct} of class {cls_name}'s training samples; affected rows "
            f"are its validation and test samples."
        )
    if mode == "holdout-dup":
        return (
            f"Replaced the first {pct} of class {cls_name}'s training samples by copies of "
            f"random remaining samples of the class (seed {seed}); affected rows are the "
            f"copies and the class's validation and test samples."
        )
    if mode == "augmentation":
        return (
            f"Made the first {pct} of class {cls_name}'s training samples {change}; affected "
            f"rows are those and the class's validation and test samples; test_gray is the "
            f"test set made {change}."
        )
    return (
        f"Made the first {pct} of every class's training samples {change}; affected rows are "
        f"those and every sample of test_gray, the test set made {change}."
    )


def class_mode_splits(
    images: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    groups: np.ndarray,
    index: dict[str, np.ndarray],
    mode: str,
    cls: int | None,
    ratio: float,
    seed: int,
    change: Change,
    n_classes: int,
) -> tuple[dict[str, SplitData], dict[str, Any]]:
    """Build the splits of a class mode and a manifest section describing the change.

    ``images``/``labels``/``ids``/``groups`` are indexed by source position (``images`` may
    be a memory map); ``index`` maps ``train``, ``val``, ``test`` to positions in split order.
    """
    assert mode in CLASS_MODES
    train_pos = index["train"]
    x_train = np.ascontiguousarray(images[train_pos])
    y_train = labels[train_pos]
    affected = np.zeros(len(train_pos), dtype=bool)
    keep = np.ones(len(train_pos), dtype=bool)
    info: dict[str, Any] = {
        "rule": "first floor(ratio * count) training samples of the class in split order",
    }
    targets = list(range(n_classes)) if mode == "augmentation-all" else [cls]
    per_class: dict[str, int] = {}
    for c in targets:
        members = np.flatnonzero(y_train == c)
        k = n_affected(ratio, len(members))
        chosen = members[:k]
        per_class[str(c)] = int(k)
        if mode == "holdout":
            keep[chosen] = False
        elif mode == "holdout-dup":
            remaining = members[k:]
            if k and not len(remaining):
                raise MlvarError(
                    f"holdout-dup of class {c} with ratio {ratio} leaves no sample to copy",
                    "use a ratio below 1.0 (holdout deletes the whole class)",
                )
            rng = np.random.default_rng(seed)
            picks = remaining[rng.integers(0, len(remaining), size=k)] if k else chosen
            x_train[chosen] = x_train[picks]
            affected[chosen] = True
            info["copies"] = {
                "ids": ids[train_pos[chosen]].tolist(),
                "source_ids": ids[train_pos[picks]].tolist(),
                "draw": f"numpy.random.default_rng({seed}).integers over the remaining samples",
            }
        else:
            x_train[chosen] = change(x_train[chosen])
            affected[chosen] = True
    info["affected_train_per_class" if mode != "holdout" else "removed_train_per_class"] = per_class
    splits = {
        "train": SplitData(
            x=x_train[keep],
            y=y_train[keep],
            id=ids[train_pos][keep],
            affected=affected[keep],
            group=groups[train_pos][keep],
        )
    }
    for s in ("val", "test"):
        pos = index[s]
        y = labels[pos]
        flags = np.zeros(len(pos), bool) if mode == "augmentation-all" else y == cls
        splits[s] = SplitData(
            x=np.ascontiguousarray(images[pos]), y=y, id=ids[pos], affected=flags, group=groups[pos]
        )
    if mode in APPEARANCE_MODES:
        test = splits["test"]
        flags = np.ones(len(test), bool) if mode == "augmentation-all" else test.affected.copy()
        splits["test_gray"] = SplitData(
            x=change(test.x), y=test.y, id=test.id, affected=flags, group=test.group
        )
    return splits, info


def group_counts(
    splits: dict[str, SplitData], groups: list[int], names: dict[int, str]
) -> dict[str, dict[str, dict[str, int]]]:
    """Per split, total and affected counts of each group in ``groups`` (manifest section)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for s, data in splits.items():
        out[s] = {
            names[g]: {
                "total": int((data.group == g).sum()),
                "affected": int((data.affected & (data.group == g)).sum()),
            }
            for g in groups
        }
    return out


# --------------------------------------------------------------------------- contact sheet


def _pick(positions: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` positions spread evenly over ``positions`` (deterministic)."""
    if len(positions) <= n:
        return positions
    return positions[np.linspace(0, len(positions) - 1, n).round().astype(int)]


def sheet_rows(scenario: Scenario, per_row: int = 8) -> list[tuple[str, np.ndarray, list[str]]]:
    """The rows of a contact sheet: ``(title, images, captions)``.

    For each split with affected samples: one row of affected samples and one of unaffected
    samples, taken from the affected samples' classes when there are any such. When no split
    has affected samples, one row of each split's samples.
    """
    rows = []
    names = scenario.class_names
    loaded = {s: scenario.load(s) for s in scenario.splits}
    any_affected = any(d.affected.any() for d in loaded.values())
    for s, data in loaded.items():
        if not any_affected:
            chosen = _pick(np.arange(len(data)), per_row)
            rows.append((f"{s}", data.x[chosen], _captions(data, chosen, names)))
            continue
        if not data.affected.any():
            continue
        aff = _pick(np.flatnonzero(data.affected), per_row)
        rows.append((f"{s}: affected", data.x[aff], _captions(data, aff, names)))
        same_class = ~data.affected & np.isin(data.y, np.unique(data.y[data.affected]))
        pool = np.flatnonzero(same_class) if same_class.any() else np.flatnonzero(~data.affected)
        if len(pool):
            un = _pick(pool, per_row)
            rows.append((f"{s}: unaffected", data.x[un], _captions(data, un, names)))
    return rows


def _captions(data: SplitData, chosen: np.ndarray, names: list[str]) -> list[str]:
    return [f"{int(data.id[i])}\n{names[int(data.y[i])]}" for i in chosen]


def write_contact_sheet(
    scenario: Scenario, path: str | os.PathLike, per_row: int = 8
) -> dict[str, Any]:
    """Render a PNG contact sheet of affected and unaffected samples to ``path`` (atomic).

    Raises
    ------
    MlvarError
        The scenario holds no images, or ``path`` is a folder.
    """
    path = Path(path).expanduser()
    kind = scenario.manifest.get("input", {}).get("kind")
    if kind != "image":
        raise MlvarError(
            f"scenario '{scenario.name}' holds {kind or 'non-image'} data, not images",
            "a contact sheet needs an image dataset (cifar10, cifar100, digits)",
        )
    if path.is_dir():
        raise MlvarError(f"--sheet {path} is a folder", "pass a file name such as sheet.png")
    if path.suffix.lower() != ".png":
        raise MlvarError(f"--sheet {path} is not a .png file name", "e.g. --sheet sheet.png")
    max_value = float(scenario.manifest["input"].get("max_value", 255))
    rows = sheet_rows(scenario, per_row)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n_cols = max(len(images) for _, images, _ in rows)
    fig = Figure(figsize=(1.3 * n_cols + 1.6, 1.55 * len(rows) + 0.6))
    fig.suptitle(f"{scenario.name}", fontsize=10)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (title, images, captions) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            img = images[c].astype(np.float32) / max_value
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            ax.set_title(captions[c], fontsize=6)
            if c == 0:
                ax.set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return {"path": str(path), "rows": [title for title, _, _ in rows]}
