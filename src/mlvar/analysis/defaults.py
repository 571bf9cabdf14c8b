"""The defaults of the analysis commands, in a module that imports nothing.

The CLI shows them in its help (``--by``, and ``--top``, ``--seeds``, ``--batch-size`` of
the saliency commands) without loading the modules that compute, which import pandas;
those modules take their defaults from here and keep their own names for them
(:data:`mlvar.analysis.service.DEFAULT_RANK_BY`, :data:`mlvar.analysis.saliency.TOP_DEFAULT`,
``SEEDS_DEFAULT``, ``BATCH_DEFAULT``).
"""

#: The metric a ranking sorts by unless told otherwise (``--by``).
DEFAULT_RANK_BY = "gconf_mean"

#: Saliency: the top-ranked samples explained (plus as many random unaffected ones).
SALIENCY_TOP_DEFAULT = 10
#: Saliency: the runs (seeds) whose models are explained, the first ones by run id.
SALIENCY_SEEDS_DEFAULT = 8
#: Saliency: samples per GradCAM batch.
SALIENCY_BATCH_DEFAULT = 64

#: The split analysed when ``--split`` is not given and the scenario names no other.
DEFAULT_SPLIT = "test"


def detect_split(meta: dict) -> str:
    """The split whose affected samples an experiment's scenario marks as its flaw: the
    ``detect_split`` its ``experiment.json`` records of the scenario (``train`` for label
    noise), else ``test``."""
    scenario = meta.get("scenario") if isinstance(meta, dict) else None
    split = (scenario or {}).get("detect_split") if isinstance(scenario, dict) else None
    return str(split) if split else DEFAULT_SPLIT
