"""A PNG contact sheet of a prepared image scenario: rows of affected and unaffected samples,
each captioned with its id and class, so the injected change can be seen
(``mlvar data info NAME --sheet sheet.png``). matplotlib is imported only to draw it."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data.scenario import Scenario, SplitData
from mlvar.errors import MlvarError
from mlvar.io import atomic_write_bytes


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
