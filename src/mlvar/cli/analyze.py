"""``mlvar analyze``: accuracy across seeds, per-sample metrics and detection."""

from __future__ import annotations

from typing import Annotated

import typer

from mlvar.analysis import service
from mlvar.analysis.metrics import METRICS
from mlvar.cli.common import ConfigOpt, JsonOpt, cli_errors, console, get_config, print_json, table
from mlvar.store import ExperimentStore

app = typer.Typer(
    help="Analyse a run store: accuracy spread, per-sample metrics, detection.",
    no_args_is_help=True,
)

ExperimentArg = Annotated[
    str, typer.Argument(help="Experiment name (a folder of the runs root).", show_default=False)
]
SplitOpt = Annotated[str, typer.Option(help="Split to analyse.")]
MixedOpt = Annotated[
    bool,
    typer.Option("--allow-mixed", help="Analyse runs trained with different configs together."),
]


@app.command("accuracy", no_args_is_help=True)
def accuracy(
    experiment: ExperimentArg,
    split: SplitOpt = "test",
    allow_mixed: MixedOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Accuracy of every run, and its mean, std, min, max and bootstrap interval over seeds.

    Also per class and for affected vs unaffected samples, with the std expected from
    per-sample accuracies beside the observed one. Writes analysis/accuracy-<split>.*.

    Example: mlvar analyze accuracy compas-original-mlp
    """
    with cli_errors():
        cfg = get_config(config)
        store = ExperimentStore.open(cfg.paths.runs_root, experiment)
        result = service.accuracy(store, split, allow_mixed=allow_mixed)
    if json_out:
        print_json(result.to_dict())
        return
    labels = {"accuracy": "all", "acc_affected": "affected", "acc_unaffected": "unaffected"}
    labels |= {f"acc_class_{i}": f"class {n}" for i, n in enumerate(result.class_names)}
    rows = [
        [
            labels.get(k, k),
            s["n"],
            s["mean"],
            s["std"],
            s["min"],
            s["max"],
            s["ci_low"],
            s["ci_high"],
        ]
        for k, s in result.summary.items()
        if s["n"]
    ]
    console.print(
        table(
            f"{experiment}: {split} accuracy over {result.n_runs} runs",
            ["group", "runs", "mean", "std", "min", "max", "95% CI low", "95% CI high"],
            rows,
        )
    )
    console.print(
        f"Seed std of accuracy: observed {result.observed_seed_std:.4f}, expected from "
        f"per-sample accuracies {result.expected_seed_std:.4f}."
        if result.observed_seed_std is not None
        else f"One run: no spread to report (expected std {result.expected_seed_std:.4f})."
    )
    for f in result.files:
        console.print(f"wrote {f}", style="dim")


@app.command("rank", no_args_is_help=True)
def rank(
    experiment: ExperimentArg,
    split: SplitOpt = "test",
    by: Annotated[
        str, typer.Option(help=f"Metric to rank by: {', '.join(METRICS)}.")
    ] = service.DEFAULT_RANK_BY,
    top: Annotated[int, typer.Option(min=0, help="Rows of the ranking to print.")] = 20,
    allow_mixed: MixedOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Per-sample variance metrics, a ranking, and how well each metric finds the flaw.

    Writes analysis/rank-<split>.{parquet,csv} and, when the scenario marks affected
    samples, detection-<split>.* and baselines-<split>.*.

    Example: mlvar analyze rank digits-holdout-sub3-r1.0-mlp --by disagreement
    """
    with cli_errors():
        cfg = get_config(config)
        store = ExperimentStore.open(cfg.paths.runs_root, experiment)
        result = service.rank(store, split, by=by, allow_mixed=allow_mixed)
    if json_out:
        print_json(result.to_dict(top=None))
        return
    if result.detection is not None:
        rows = [
            [
                r["metric"],
                r["scope"],
                r["auroc"],
                r["average_precision"],
                r["precision_at_k"],
                r["rank_first"],
                r["rank_median"],
                r["rank_mean"],
            ]
            for r in result.detection.to_dict(orient="records")
        ]
        console.print(
            table(
                f"{experiment}: detection of {int(result.ranking['affected'].sum())} affected "
                f"{split} samples ({result.n_runs} runs)",
                ["metric", "ranked within", "AUROC", "AP", "P@k", "first", "median", "mean rank"],
                rows,
            )
        )
        rows = [
            [r["baseline"], r["stat"], r["auroc"], r["average_precision"], r["precision_at_k"]]
            for r in result.baselines.to_dict(orient="records")
        ]
        console.print(
            table(
                "single-model baselines over runs", ["metric", "stat", "AUROC", "AP", "P@k"], rows
            )
        )
    head = result.ranking.head(top)
    cols = ["rank", "sample_id", "label_name", "majority_name", "affected", by]
    console.print(
        table(
            f"top {len(head)} by {by}",
            ["rank", "sample id", "label", "majority", "affected", by],
            [[r[c] for c in cols] for r in head.to_dict(orient="records")],
        )
    )
    for f in result.files:
        console.print(f"wrote {f}", style="dim")


@app.command("metrics")
def metrics(json_out: JsonOpt = False) -> None:
    """List the per-sample metrics with their formulas and orientation.

    Example: mlvar analyze metrics --json
    """
    rows = [
        [
            m.name,
            m.formula,
            "yes" if m.uses_label else "no",
            "high" if m.higher_is_suspicious else "low",
        ]
        for m in METRICS.values()
    ]
    if json_out:
        print_json(
            [
                dict(zip(["name", "formula", "uses_label", "suspicious_when"], r, strict=True))
                for r in rows
            ]
        )
        return
    console.print(
        table(
            "per-sample metrics (R runs, p_r = softmax of run r)",
            ["metric", "formula", "uses label", "suspicious when"],
            rows,
        )
    )
