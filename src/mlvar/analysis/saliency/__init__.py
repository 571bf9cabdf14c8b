"""Per-sample attributions across seeds: GradCAM maps of image models, gradient x input
of the MLP (docs/design.md section 8). Analysis computes and stores arrays; it draws
nothing (the figures are :mod:`mlvar.report.saliency`'s, and :mod:`mlvar.saliency` is
the service that writes a folder with both).

A computation takes the top ``K`` samples of a ranking and ``K`` random unaffected ones
(seeded, as the report's sample pages: :func:`mlvar.analysis.selection.choose_samples`),
the first ``S`` runs (by run id) whose ``model.pt`` matches the sha256 in their
``run.json``, and computes one attribution per sample, run and target: the sample's true
class and the class that run predicted (its stored logits' argmax). Inputs are the
prepared scenario's, exactly as in training. Its parts, one module each:

* :mod:`~mlvar.analysis.saliency.plan`: what is explained (checks, samples, runs);
* :mod:`~mlvar.analysis.saliency.compute`: the attributions of a block of runs;
* :mod:`~mlvar.analysis.saliency.content`: the folder's content and writing it;
* :mod:`~mlvar.analysis.saliency.shards`: computing blocks of runs apart and combining
  them (``--run-shard j/m``, ``--merge``);
* :mod:`~mlvar.analysis.saliency.index`: reading a folder back (for the report).

Layout of ``<experiment>/analysis/saliency-<split>/`` (written as one folder, swapped in
when complete)::

    maps.npy          images: float16 [n_samples, S, 2, H, W], target 0 the true class,
                      1 the run's predicted class (each map scaled to [0, 1])
    attributions.npy  MLP: float32 [n_samples, S, 2, F], signed gradient x input
    stats.npy         mean, std (ddof 0) and max - min across the S runs: float16
                      [n_samples, 3, 2, H, W] of the maps, or float32 [n_samples, 3, 2, F]
                      of tabular attributions
    samples.parquet   one row per sample, in the order of the arrays: sample_id,
    samples.json      position, rank, kind ("top" | "random unaffected"), affected,
                      label, label_name, pred (one class per run), n_correct,
                      spread_true / spread_pred (mean over pixels or features of the
                      std), overlay; tabular: attr_{true,pred}_{mean,std} per feature
    saliency.json     experiment, split, method, input, model, layer, runs, by, top,
                      seed, shape, feature_names (tabular)
    overlays/<sample_id>.png   images: a strip per sample, rows true / predicted class,
                      columns input, each run, mean, std, max - min (maps over the input,
                      jet); tabular: a bar chart per feature, mean with std whiskers and
                      a dot per run, one panel per target
"""

from mlvar.analysis.saliency.compute import (
    GRADCAM,
    GRADIENT_X_INPUT,
    Progress,
    SaliencyArrays,
    attribution_spread,
    compute,
    gradcam,
    gradient_x_input,
    resolve_layer,
)
from mlvar.analysis.saliency.content import (
    STATS,
    TARGETS,
    SaliencyContent,
    SaliencyResult,
    assemble,
    folder,
    write_saliency,
)
from mlvar.analysis.saliency.index import SaliencyIndex, read_index
from mlvar.analysis.saliency.plan import (
    BATCH_DEFAULT,
    SEEDS_DEFAULT,
    TOP_DEFAULT,
    SaliencyPlan,
    plan_saliency,
    scenario_rows,
)
from mlvar.analysis.saliency.shards import (
    SaliencyShard,
    block_range,
    combine_saliency_shards,
    saliency_shard,
    shard_name,
    shards_folder,
    verify_saliency_shard,
)
from mlvar.train.trained import WEIGHTS_FILE

__all__ = [
    "BATCH_DEFAULT",
    "GRADCAM",
    "GRADIENT_X_INPUT",
    "SEEDS_DEFAULT",
    "STATS",
    "TARGETS",
    "TOP_DEFAULT",
    "WEIGHTS_FILE",
    "Progress",
    "SaliencyArrays",
    "SaliencyContent",
    "SaliencyIndex",
    "SaliencyPlan",
    "SaliencyResult",
    "SaliencyShard",
    "assemble",
    "attribution_spread",
    "block_range",
    "combine_saliency_shards",
    "compute",
    "folder",
    "gradcam",
    "gradient_x_input",
    "plan_saliency",
    "read_index",
    "resolve_layer",
    "saliency_shard",
    "scenario_rows",
    "shard_name",
    "shards_folder",
    "verify_saliency_shard",
    "write_saliency",
]
