"""``mlvar retrain`` as a service: variance-guided acquisition and retraining
(docs/retrain.md).

The layers meet here, as in :mod:`mlvar.saliency`: :mod:`mlvar.analysis.acquisition`
orders the pool from the stored pool logits, :mod:`mlvar.train.continuation` continues
each run from its saved weights with the chosen samples added, and
:mod:`mlvar.analysis.retrain` computes the summary from the continued runs' test logits.
"""

from mlvar.retrain.service import RetrainResult, plan_retrain, retrain

__all__ = ["RetrainResult", "plan_retrain", "retrain"]
