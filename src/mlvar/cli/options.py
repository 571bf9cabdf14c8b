"""The options and arguments of the CLI, defined once: the ones several commands share and
every one whose help lists a registry's choices (datasets, modes, models, metrics,
backends), with the parsing of the shared training options.

Help texts are built from the registries, which import nothing heavy (numpy at most): the
dataset specs (:mod:`mlvar.data.registry`), the models (:mod:`mlvar.recipes`), the metric
records (:mod:`mlvar.analysis.metrics`) and the backend classes
(:mod:`mlvar.backends.registry`). The backends' options are built when ``mlvar submit``
first imports them (:func:`__getattr__`): the registry of backends imports the config, the
store and four backend modules, which no other command needs for its help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mlvar.analysis.metrics import ALL_METRICS, METRICS
from mlvar.data import registry
from mlvar.data.protocol import protocol_help
from mlvar.errors import MlvarError
from mlvar.recipes import MODELS, RANDOMNESS_SOURCES

# ---------------------------------------------------------------- every command

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Config file (default: $MLVAR_CONFIG, else ./mlvar.toml if present).",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")
]

# ---------------------------------------------------------------- datasets and scenarios

DATASET_NAMES = ", ".join(registry.DATASETS)

DatasetArg = Annotated[str, typer.Argument(help=f"Dataset: {DATASET_NAMES}.", show_default=False)]


def mode_help() -> str:
    """``compas: original, artificial, holdout. ...`` from the dataset specs."""
    parts = []
    for name, spec in [*registry.DATASETS.items(), *registry.kind_specs().items()]:
        implied = "".join(
            f" ({mode} is the default with --{option})"
            for option, mode in spec.implied_modes.items()
        )
        parts.append(f"{name}: {', '.join(spec.modes)}{implied}.")
    return "Scenario mode (default original). " + " ".join(parts)


# The parameters of `mlvar data prepare`, each described by the modes that take it and by
# what it takes besides one value (lists, ranges, keywords; the study's sweep when omitted).
# They stay text: the sweep service parses them (mlvar.data.sweep).
ModeOpt = Annotated[str | None, typer.Option(help=mode_help(), show_default=False)]


def _sweep_option(option: str, flag: str | None = None, default: str | None = None) -> Any:
    """A ``mlvar data prepare`` option that takes one value or a sweep of values."""
    help_text = f"{registry.option_help(option)} {registry.sweep_help(option)}"
    names = (flag,) if flag else ()
    return typer.Option(*names, help=help_text, metavar="VALUES", show_default=default is not None)


RatioOpt = Annotated[str | None, _sweep_option("ratio")]
ClusterOpt = Annotated[str | None, _sweep_option("cluster")]
SubclassOpt = Annotated[str | None, _sweep_option("subclass")]
ClsOpt = Annotated[str | None, _sweep_option("cls", "--cls")]
GroupOpt = Annotated[str | None, _sweep_option("group")]
PrepareSeedOpt = Annotated[str, _sweep_option("seed", default="0")]
ToOpt = Annotated[str | None, _sweep_option("to", "--to")]
#: A pandas query: one value, never a list (a query may hold commas).
WhereOpt = Annotated[
    str | None,
    typer.Option(
        "--where",
        help=registry.option_help("where") + " One query (commas belong to it).",
        metavar="EXPR",
        show_default=False,
    ),
]

# ---------------------------------------------------------------- training: train, submit


def _default_models() -> str:
    """``mlp for compas, digits; airbench for cifar10, cifar100``, from the dataset specs."""
    by_model: dict[str, list[str]] = {}
    for name, spec in registry.DATASETS.items():
        by_model.setdefault(spec.train.model, []).append(name)
    return "; ".join(f"{model} for {', '.join(names)}" for model, names in by_model.items())


ScenarioOpt = Annotated[
    str | None,
    typer.Option(
        help="Prepared scenarios to train, one experiment each: names, modes (every "
        "scenario of that mode) or globs ('cifar10-holdout-dup-*'), comma-separated; "
        "default: every prepared scenario of the dataset.",
        show_default=False,
    ),
]
ProtocolOpt = Annotated[
    str | None,
    typer.Option(
        help=protocol_help() + " Default from config (\\[protocol] name): mlvar.",
        show_default=False,
    ),
]
RunsOpt = Annotated[int, typer.Option(help="Number of seeded runs (run r uses seed base+r).")]
#: ``train`` and ``submit run``: not given, the protocol's count (mlvar.recipes.default_runs).
TrainRunsOpt = Annotated[
    int | None,
    typer.Option(
        help="Number of seeded runs (run r uses seed base+r); default 10, and under "
        "--protocol study the study's: 100 for compas, 25 for cifar10 and cifar100.",
        show_default=False,
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option(help="Experiment name (default: <scenario>-<model>).", show_default=False),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help=f"Model: {', '.join(MODELS)} (default from config: {_default_models()}), or "
        "your own network as package.module:factory (docs/training.md, 'Your own model'). "
        "Another model brings its own recipe (epochs, lr, batch size, weight decay, vary) "
        "unless those are given too.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cpu or cuda (default from config: cpu).", show_default=False)
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        help="MLP: batched (seeds stacked, default) or loop (one at a time); image models: "
        "fused (seeds as one network; cnn default) or single (one at a time).",
        show_default=False,
    ),
]
VaryOpt = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated randomness sources that follow the run seed: "
        f"{', '.join(RANDOMNESS_SOURCES)} (those the model draws; default all but impl); "
        "the others stay fixed. 'none' fixes all. impl allows non-deterministic CUDA "
        "kernels (no effect on the CPU).",
        show_default=False,
    ),
]
EpochsOpt = Annotated[int | None, typer.Option(help="Override the epochs.", show_default=False)]
LrOpt = Annotated[
    float | None, typer.Option(help="Override the learning rate.", show_default=False)
]
BatchSizeOpt = Annotated[
    int | None, typer.Option(help="Override the batch size.", show_default=False)
]
BaseSeedOpt = Annotated[
    int | None, typer.Option(help="Seed of run 0 (default 0).", show_default=False)
]
PackSizeOpt = Annotated[
    int | None,
    typer.Option(
        help="Seeds trained together by the batched/fused engine (fused 0: from memory).",
        show_default=False,
    ),
]
RecordDynamicsOpt = Annotated[
    bool,
    typer.Option(
        "--record-dynamics",
        help="Also store train-set logits after every epoch (for Data Maps and forgetting events).",
    ),
]
NoTrainTtaOpt = Annotated[
    bool,
    typer.Option(
        "--no-train-tta",
        help="Image recipes with test-time augmentation (airbench): evaluate the train split "
        "with one plain pass (the other splits keep it); part of the experiment identity.",
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Delete an existing experiment of this name first.")
]


def _parse_vary(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if value.strip().lower() == "none":
        return []
    if not items:
        raise MlvarError("--vary is empty", "e.g. --vary init,order (or --vary none)")
    return items


def training_overrides(**options: object) -> dict[str, object]:
    """The training-config overrides of the shared options (None: not given)."""
    out = dict(options)
    out["vary"] = _parse_vary(out.get("vary"))  # type: ignore[arg-type]
    out["record_dynamics"] = out.get("record_dynamics") or None
    if "no_train_tta" in out:  # the flag only turns it off; not given: the config's
        out["train_tta"] = False if out.pop("no_train_tta") else None
    return out


# ---------------------------------------------------------------- analysis: analyze, submit

ALL_METRIC_NAMES = ", ".join(ALL_METRICS)

ExperimentArg = Annotated[
    str, typer.Argument(help="Experiment name (a folder of the runs root).", show_default=False)
]
SplitOpt = Annotated[str, typer.Option(help="Split to analyse.")]
#: ``--split`` of the commands that score the scenario's flaw: not given, the split its
#: affected samples are in (:func:`mlvar.analysis.defaults.detect_split`).
DetectSplitOpt = Annotated[
    str | None,
    typer.Option(
        "--split",
        help="Split to analyse (default: where the scenario's affected samples are: train "
        "for label noise, else test).",
        show_default=False,
    ),
]
MixedOpt = Annotated[
    bool,
    typer.Option("--allow-mixed", help="Analyse runs trained with different configs together."),
]
#: ``mlvar analyze rank --allow-mixed``: also the study table's mixing of protocols.
RankMixedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-mixed",
        help="Analyse runs trained with different configs together; with --merge alone, "
        "build one study table of experiments of different protocols.",
    ),
]
RankByOpt = Annotated[str, typer.Option(help=f"Metric to rank by: {ALL_METRIC_NAMES}.")]
#: ``mlvar submit analyze --by``: the ranking its merge writes.
MergedByOpt = Annotated[
    str, typer.Option(help=f"Metric the merged ranking sorts by: {ALL_METRIC_NAMES}.")
]
#: ``mlvar report html --by``: the report ranks by the final-prediction metrics only.
ReportByOpt = Annotated[str, typer.Option(help=f"Metric to rank by: {', '.join(METRICS)}.")]

# The options of 'analyze saliency', shared with 'submit saliency'.
ExplainTopOpt = Annotated[
    int, typer.Option(help="Top-ranked samples to explain (plus as many random unaffected ones).")
]
ExplainSeedsOpt = Annotated[
    int, typer.Option(help="Runs (seeds) whose models to explain: the first S by run id.")
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        help="Module GradCAM hooks, as named by model.named_modules() "
        "(default: the last Conv2d; image models only).",
        show_default=False,
    ),
]
PageSeedOpt = Annotated[int, typer.Option(help="Seed of the random unaffected samples.")]
CamBatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per GradCAM batch.")]

# ---------------------------------------------------------------- backends: submit

#: Built from the backend registry on first import (:func:`__getattr__`): ``BACKENDS_HELP``
#: (``local (in process or worker processes), ray (...) ... or slurm (...).``) and
#: ``BackendOpt``, the ``--backend`` option listing them.
_BACKEND_NAMES = ("BACKENDS_HELP", "BackendOpt")


def __getattr__(name: str) -> Any:
    """The backends' help and ``--backend`` option, built when first imported (PEP 562)."""
    if name not in _BACKEND_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mlvar.backends.registry import backends_help

    text = backends_help()
    globals()["BACKENDS_HELP"] = text
    globals()["BackendOpt"] = Annotated[str, typer.Option(help=text, show_default=True)]
    return globals()[name]


RetriesOpt = Annotated[
    int | None,
    typer.Option(
        help="Extra attempts of a failing job (default \\[submit] retries, 2).",
        show_default=False,
    ),
]
ShardWorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="local: worker processes (0: in process; default \\[submit] local_workers).",
        show_default=False,
    ),
]
SubmittedExperimentArg = Annotated[str, typer.Argument(help="Experiment name.", show_default=False)]
IdOpt = Annotated[
    str | None,
    typer.Option("--id", help="Submission id (default: the latest).", show_default=False),
]
