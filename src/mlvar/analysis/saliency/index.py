"""Reading a saliency folder back: what the report needs of ``analysis/saliency-<split>/``
(its ``saliency.json`` and each sample's figure and row)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlvar.analysis.saliency.content import folder
from mlvar.store import ExperimentStore


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
