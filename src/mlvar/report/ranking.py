"""The ranking table's data: the whole ranking as a script file beside ``index.html``.

``index.html`` stays small however many samples the split has: the ranking (column-wise
JSON) is in ``ranking-data.js``, which parses it into ``window.MLVAR_RANKING``; the page
loads it with a ``<script src>`` (a local ``fetch`` is blocked under ``file://``, a
script is not) and its table script shows one page of rows at a time. The JSON escapes
``<``, ``>`` and ``&`` (and the line separators U+2028, U+2029), so no data can end a
script block or open a tag wherever the text is placed, and the table writes every cell
with ``textContent``.

With many classes the "votes per class" column would be a hundred numbers per row (most
of them 0): beyond :data:`VOTES_IN_FULL` classes it names the most voted classes with
their votes instead (and how many other classes got votes).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup

from mlvar.analysis.metrics import METRICS

DATA_FILE = "ranking-data.js"
DATA_VARIABLE = "MLVAR_RANKING"
VOTES_IN_FULL = 20
"""Up to this many classes, votes are shown as one count per class."""
VOTES_NAMED = 3
"""Beyond :data:`VOTES_IN_FULL` classes: how many voted classes a cell names (the sample
page lists them all)."""

_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def json_for_script(obj: Any) -> Markup:
    """``obj`` as JSON safe inside a ``<script>`` block or file: ``<``, ``>``, ``&``,
    U+2028 and U+2029 become ``\\u003c`` etc., so no data can close the block or open a
    tag (the JSON means the same)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escaped in _ESCAPES.items():
        text = text.replace(char, escaped)
    return Markup(text)  # noqa: S704 - escaped above for this context


def data_script(data: dict[str, Any]) -> str:
    """The text of :data:`DATA_FILE`: ``data`` assigned to ``window.MLVAR_RANKING``.

    The JSON is given to ``JSON.parse`` as a string literal rather than written as an
    object literal: browsers parse JSON about ten times faster than a script's object
    literal (50,000 rows: 0.2 s against 2.6 s in Chromium here)."""
    literal = json.dumps(str(json_for_script(data)), ensure_ascii=False)
    return f"window.{DATA_VARIABLE} = JSON.parse({literal});\n"


def votes_texts(votes: list[str], class_names: list[str]) -> list[str]:
    """A ranking's ``votes`` cells (``"0 7 3"``, one count per class) for display:
    unchanged up to :data:`VOTES_IN_FULL` classes, else ``"cat 7 · dog 3 · fox 2 · +4
    more"`` (the classes with votes, most voted first, ties in class order; the first
    :data:`VOTES_NAMED` of them)."""
    k = len(class_names)
    if k <= VOTES_IN_FULL or not votes:
        return list(votes)
    counts = np.fromstring(" ".join(votes), dtype=np.int64, sep=" ").reshape(len(votes), k)
    rows, cols = np.nonzero(counts)
    n = counts[rows, cols]
    order = np.lexsort((cols, -n, rows))  # by row, most votes first, ties in class order
    rows, cols, n = rows[order], cols[order], n[order]
    voted = np.bincount(rows, minlength=len(votes))
    first = np.concatenate([[0], np.cumsum(voted)[:-1]])
    place = np.arange(rows.size) - first[rows]  # 0 for a row's most voted class
    keep = place < VOTES_NAMED + 1  # one more, to tell "+1 more" from naming it
    texts: list[list[str]] = [[] for _ in votes]
    for r, c, v in zip(rows[keep].tolist(), cols[keep].tolist(), n[keep].tolist(), strict=True):
        texts[r].append(f"{class_names[c]} {v}")
    out = []
    for parts, total in zip(texts, voted.tolist(), strict=True):
        more = total - VOTES_NAMED
        if more > 1:  # "+1 more" would take the place of the one class it hides
            parts = [*parts[:VOTES_NAMED], f"+{more} more"]
        out.append(" · ".join(parts))
    return out


def clean_list(values: np.ndarray, digits: int = 6) -> list[float | None]:
    """Values rounded to ``digits`` decimals for JSON; NaN and infinities become None."""
    v = np.round(np.asarray(values, dtype=np.float64), digits)
    return [None if x != x or x in (float("inf"), float("-inf")) else x for x in v.tolist()]


def integral(values: np.ndarray) -> bool:
    """Whether a metric only takes whole values (``n_correct``, ``n_distinct_pred``)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(v.size) and bool(np.all(v == np.round(v)))


def ranking_data(
    ranking: pd.DataFrame, metric_cols: list[str], pages: dict[int, str], class_names: list[str]
) -> dict[str, Any]:
    """The ranking as column-wise data for the table's script: ``n``, ``metrics`` (name,
    formula, orientation, whole values only) and ``columns`` (one list per column, rows
    in ranking order; ``page`` the sample page's path or None)."""
    columns = {
        "rank": ranking["rank"].astype(int).tolist(),
        "sample_id": [str(s) for s in ranking["sample_id"]],
        "label": [str(s) for s in ranking["label_name"]],
        "majority": [str(s) for s in ranking["majority_name"]],
        "votes": votes_texts([str(s) for s in ranking["votes"]], class_names),
        "affected": ranking["affected"].astype(bool).tolist(),
        "group": [int(g) for g in ranking["group"]] if "group" in ranking else None,
    }
    for m in metric_cols:
        columns[m] = clean_list(ranking[m].to_numpy())
    columns["page"] = [pages.get(i) for i in range(len(ranking))]
    return {
        "n": len(ranking),
        "metrics": [
            {
                "name": m,
                "formula": METRICS[m].formula,
                "higher": METRICS[m].higher_is_suspicious,
                "integer": integral(ranking[m].to_numpy()),
            }
            for m in metric_cols
        ],
        "columns": columns,
    }
