"""``mlvar train``: train N seeded models on a prepared scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlvar.cli.common import (
    ConfigOpt,
    JsonOpt,
    ProgressBar,
    cli_errors,
    console,
    get_config,
    print_json,
    table,
)
from mlvar.data.registry import DATASETS
from mlvar.errors import MlvarError
from mlvar.recipes import MODELS, RANDOMNESS_SOURCES
from mlvar.train import service


def _parse_vary(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if value.strip().lower() == "none":
        return []
    if not items:
        raise MlvarError("--vary is empty", "e.g. --vary init,order (or --vary none)")
    return items


def _default_models() -> str:
    """``mlp for compas, digits; airbench for cifar10, cifar100``, from the dataset specs."""
    by_model: dict[str, list[str]] = {}
    for name, spec in DATASETS.items():
        by_model.setdefault(spec.train.model, []).append(name)
    return "; ".join(f"{model} for {', '.join(names)}" for model, names in by_model.items())


_DEFAULT_MODELS = _default_models()

# The training options, shared by `mlvar train` and `mlvar submit`.
DatasetArg = Annotated[
    str, typer.Argument(help=f"Dataset: {', '.join(DATASETS)}.", show_default=False)
]
ScenarioOpt = Annotated[
    str | None,
    typer.Option(
        help="Prepared scenario: its name, or its mode when unambiguous; may be left out "
        "when the dataset has one prepared scenario.",
        show_default=False,
    ),
]
RunsOpt = Annotated[int, typer.Option(help="Number of seeded runs (run r uses seed base+r).")]
NameOpt = Annotated[
    str | None,
    typer.Option(help="Experiment name (default: <scenario>-<model>).", show_default=False),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help=f"Model: {', '.join(MODELS)} (default from config: {_DEFAULT_MODELS}). Another "
        "model brings its own recipe (epochs, lr, batch size, weight decay, vary) unless those "
        "are given too.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cpu or cuda (default from config: cpu).", show_default=False)
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        help="MLP: batched (all seeds stacked, default) or loop (one model at a time).",
        show_default=False,
    ),
]
VaryOpt = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated randomness sources that follow the run seed: "
        f"{', '.join(RANDOMNESS_SOURCES)} (those the model draws; default all); the others "
        "stay fixed. 'none' fixes all.",
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
    typer.Option(help="Seeds trained together by the batched engine.", show_default=False),
]
RecordDynamicsOpt = Annotated[
    bool,
    typer.Option(
        "--record-dynamics",
        help="Also store train-set logits after every epoch (for Data Maps and forgetting events).",
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Delete an existing experiment of this name first.")
]


def training_overrides(**options: object) -> dict[str, object]:
    """The training-config overrides of the shared options (None: not given)."""
    out = dict(options)
    out["vary"] = _parse_vary(out.get("vary"))  # type: ignore[arg-type]
    out["record_dynamics"] = out.get("record_dynamics") or None
    return out


def train(
    dataset: DatasetArg,
    scenario: ScenarioOpt = None,
    runs: RunsOpt = 10,
    name: NameOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    engine: EngineOpt = None,
    vary: VaryOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    base_seed: BaseSeedOpt = None,
    pack_size: PackSizeOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Image models on the CPU: processes training runs at once (0: one per "
            "core, the default; 1: one run at a time in this process). Results do not "
            "depend on it.",
            show_default=False,
        ),
    ] = None,
    record_dynamics: RecordDynamicsOpt = False,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train N seeded copies of a model; finished runs are kept and skipped on re-runs.

    Examples:

      mlvar train compas --scenario artificial --runs 50

      mlvar train digits --runs 16 --vary init      # only initialisation varies

      mlvar train digits --runs 16 --model cnn      # the small CNN, with augmentation

      mlvar train cifar10 --scenario holdout --runs 8 --device cuda --record-dynamics

      mlvar train compas --scenario compas-holdout-cluster5 --runs 20 --engine loop
    """
    with cli_errors():
        cfg = get_config(config)
        overrides = training_overrides(
            model=model,
            device=device,
            engine=engine,
            vary=vary,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            base_seed=base_seed,
            pack_size=pack_size,
            workers=workers,
            record_dynamics=record_dynamics,
        )
        with ProgressBar(not json_out) as bar:

            def on_progress(done: int, total: int, message: str) -> None:
                bar.update(f"epochs ({message})", done, total)

            result = service.train(
                cfg,
                dataset,
                scenario=scenario,
                runs=runs,
                name=name,
                overrides=overrides,
                force=force,
                progress=on_progress,
            )
    if json_out:
        print_json(result.to_dict())
        return
    _print_result(result)


def _print_result(result: service.TrainResult) -> None:
    if result.cleaned:
        console.print(f"Removed {len(result.cleaned)} unfinished run folder(s) and retrained them.")
    if result.trained:
        splits = list(next(iter(result.accuracy.values())))
        rows = []
        for split in splits:
            accs = [a[split] for a in result.accuracy.values()]
            mean = sum(accs) / len(accs)
            std = (
                (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
                if len(accs) > 1
                else None
            )
            rows.append([split, len(accs), mean, std, min(accs), max(accs)])
        console.print(
            table(
                f"{result.experiment}: accuracy of the {len(result.trained)} runs trained now",
                ["split", "runs", "mean", "std", "min", "max"],
                rows,
            )
        )
        console.print(
            f"Trained {len(result.trained)} run(s) in {result.wall_time_s:.1f} s "
            f"({result.engine} engine, {result.device})."
        )
    if result.skipped:
        console.print(f"Skipped {len(result.skipped)} finished run(s).")
    console.print(f"Run store: {Path(result.path)}")
