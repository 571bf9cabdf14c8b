"""Which samples to look at closely: the report's sample pages and the samples saliency
explains are the same choice, the top ``K`` of a ranking plus ``K`` random unaffected
ones (seeded), never the whole split."""

from __future__ import annotations

import numpy as np
import pandas as pd


def choose_samples(ranking: pd.DataFrame, top: int, seed: int = 0) -> list[int]:
    """Row numbers of ``ranking`` chosen: the first ``top`` rows, then up to ``top``
    random unaffected rows from the rest (in ranking order).

    The random rows are a prefix of one seeded shuffle of the unaffected rows, so a
    smaller ``top`` picks a subset of a larger one's samples (saliency computed with
    ``--top 10`` covers pages of a report with ``--top 50``)."""
    first = list(range(min(top, len(ranking))))
    unaffected = np.flatnonzero(~ranking["affected"].to_numpy(dtype=bool))
    shuffled = np.random.default_rng(seed).permutation(unaffected)
    extra = [int(i) for i in shuffled if i >= top][:top]
    return first + sorted(extra)
