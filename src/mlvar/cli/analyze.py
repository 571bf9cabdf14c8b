"""``mlvar analyze``: accuracy across seeds, per-sample metrics and detection, sharded
analysis and the study table, the study's accuracy analyses of a holdout sweep, AUROC
against the number of runs, importing predictions.

A thin shell: every computation lives in :mod:`mlvar.analysis`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlvar.analysis.conventions import (
    ALL_SPLITS,
    CURVE_DESIGNS,
    DESIGN_PREFIX,
    PREFIX_STEP_DEFAULT,
    RANKS_MID,
    RANKS_STUDY,
    check_design,
    check_ranks,
)
from mlvar.analysis.defaults import (
    DEFAULT_RANK_BY,
    SALIENCY_BATCH_DEFAULT,
    SALIENCY_SEEDS_DEFAULT,
    SALIENCY_TOP_DEFAULT,
)
from mlvar.cli.common import (
    ProgressBar,
    cli_errors,
    console,
    get_config,
    print_json,
    table,
    warnings_to_stderr,
)
from mlvar.cli.options import (
    CamBatchOpt,
    ConfigOpt,
    ExperimentArg,
    ExplainSeedsOpt,
    ExplainTopOpt,
    JsonOpt,
    LayerOpt,
    MixedOpt,
    PageSeedOpt,
    RankByOpt,
    RankMixedOpt,
    SplitOpt,
)
from mlvar.errors import MlvarError

if TYPE_CHECKING:
    from mlvar.analysis.service import RankResult

app = typer.Typer(
    help="Analyse a run store: accuracy spread, per-sample metrics, detection.",
    no_args_is_help=True,
)


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
    with cli_errors(), warnings_to_stderr():
        from mlvar.store import ExperimentStore

        cfg = get_config(config)
        store = ExperimentStore.open(cfg.paths.runs_root, experiment)
        from mlvar.analysis import service  # pandas: once the experiment is found

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


def _print_rank(result: RankResult, top: int) -> None:
    by, split = result.by, result.split
    # the study's positions start at 0 and are not mid-ranks
    positions = " (0-based positions, --ranks study)" if result.ranks == RANKS_STUDY else ""
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
                f"{result.experiment}: detection of {result.n_affected} "
                f"affected {split} samples ({result.n_runs} runs){positions}",
                ["metric", "ranked within", "AUROC", "AP", "P@k", "first", "median", "mean rank"],
                rows,
                digits={"first": 1, "median": 1, "mean rank": 1},
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


def _print_study(result, by: str) -> None:
    per = result.per_experiment(by)
    every = result.split == ALL_SPLITS
    rows = [
        [
            r["experiment"]
            + (f" [{r['split']}]" if every else "")
            + (" (stale)" if r["stale"] else ""),
            r["params"] or r["mode"],
            r["n_runs"],
            r["auroc"],
            r["average_precision"],
            r["best_metric"],
            r["best_auroc"],
            r["baseline_auroc"],
        ]
        for r in per.to_dict(orient="records")
    ]
    console.print(
        table(
            f"study: detection of the affected {result.split} samples, {len(per)} experiments "
            f"(AUROC and AP of {by}; best metric by AUROC; median single-model neg_gconf)",
            ["experiment", "params", "runs", "AUROC", "AP", "best metric", "AUROC", "1 model"],
            rows,
        )
    )
    for name, why in result.skipped.items():
        console.print(f"skipped {name}: {why}", style="dim", markup=False)
    for f in result.files:
        console.print(f"wrote {f}", style="dim")


@app.command("rank", no_args_is_help=True)
def rank(
    experiment: Annotated[
        str | None,
        typer.Argument(
            help="Experiment name (a folder of the runs root); omit it with --merge to "
            "build the study table over every experiment.",
            show_default=False,
        ),
    ] = None,
    split: SplitOpt = "test",
    by: RankByOpt = DEFAULT_RANK_BY,
    top: Annotated[int, typer.Option(min=0, help="Rows of the ranking to print.")] = 20,
    allow_mixed: RankMixedOpt = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="Compute only block i of k of the samples (i/k, 1-based, contiguous) and "
            "write partial results to analysis/shards/<split>/; merge with --merge.",
            show_default=False,
        ),
    ] = None,
    run_shard: Annotated[
        str | None,
        typer.Option(
            "--run-shard",
            help="Compute only block j of m of the runs (j/m, runs sorted by id); "
            "combines with --shard.",
            show_default=False,
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="With EXPERIMENT: combine its shards into the full result. Without: "
            "write <runs_root>/study.{parquet,csv}, one row per experiment x metric.",
        ),
    ] = False,
    compute_missing: Annotated[
        bool,
        typer.Option(
            "--compute-missing",
            help="With --merge and no experiment: first analyse experiments that have no "
            "detection results yet.",
        ),
    ] = False,
    ranks: Annotated[
        str | None,
        typer.Option(
            "--ranks",
            help="Rank summaries of the affected samples: mid (1-based, ties share their "
            "mean rank; the default) or study (0-based positions in the original study's "
            "argsort order). --merge of shards defaults to the shards' convention.",
            show_default=False,
        ),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            "--protocol",
            help="With --merge alone: the study table of the experiments of one protocol "
            "(mlvar or study); the others are skipped.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Per-sample variance metrics, a ranking, and how well each metric finds the flaw.

    Writes analysis/rank-<split>.{parquet,csv,json} and, when the scenario marks affected
    samples, detection-<split>.* and baselines-<split>.*. On the train split of runs that
    recorded per-epoch predictions, the training-dynamics metrics are included.

    --shard i/k [--run-shard j/m] computes one block as a separate job; --merge then
    combines the blocks exactly. --merge without an experiment builds the study table;
    with --split all, over every split with affected samples (train and val too).

    Example: mlvar analyze rank digits-holdout-sub3-r1.0-mlp --by disagreement
    """
    with cli_errors(), warnings_to_stderr():
        from mlvar.analysis.metrics import check_by
        from mlvar.analysis.sharding import parse_shard
        from mlvar.store import ExperimentStore

        check_by(by)
        if ranks is not None:
            check_ranks(ranks)
        if split == ALL_SPLITS and not (merge and experiment is None):
            raise MlvarError(
                f"--split {ALL_SPLITS} applies only to the study table (--merge without an "
                "experiment)",
                "name one split for an experiment, e.g. --split train",
            )
        if merge and (shard or run_shard):
            raise MlvarError(
                "--merge cannot be combined with --shard or --run-shard",
                "compute each shard first, then merge them in a separate call",
            )
        if compute_missing and not (merge and experiment is None):
            raise MlvarError(
                "--compute-missing applies only to --merge without an experiment",
                "use 'mlvar analyze rank --merge --compute-missing'",
            )
        if protocol is not None:
            from mlvar.data.protocol import check_protocol

            check_protocol(protocol)
            if not (merge and experiment is None):
                raise MlvarError(
                    "--protocol applies only to --merge without an experiment",
                    "use 'mlvar analyze rank --merge --protocol " + protocol + "'",
                )
        if experiment is None and not merge:
            raise MlvarError(
                "missing argument EXPERIMENT",
                "name an experiment, or pass --merge alone to build the study table",
            )
        shard_ = parse_shard(shard, "--shard") if shard else None
        run_shard_ = parse_shard(run_shard, "--run-shard") if run_shard else None
        cfg = get_config(config)
        if experiment is None:
            from mlvar.analysis.study import study

            result = study(
                cfg.paths.runs_root,
                split,
                compute_missing=compute_missing,
                ranks=ranks or RANKS_MID,
                allow_mixed=allow_mixed,
                protocol=protocol,
            )
        else:
            store = ExperimentStore.open(cfg.paths.runs_root, experiment)
            # pandas: once the experiment is found
            from mlvar.analysis import service
            from mlvar.analysis.shards import merge_shards, write_shard

            if shard_ or run_shard_:
                result = write_shard(
                    store,
                    split,
                    shard_ or (1, 1),
                    run_shard_ or (1, 1),
                    allow_mixed,
                    ranks=ranks or RANKS_MID,
                )
            elif merge:
                result = merge_shards(store, split, by=by, ranks=ranks)
            else:
                result = service.rank(
                    store, split, by=by, allow_mixed=allow_mixed, ranks=ranks or RANKS_MID
                )
    from mlvar.analysis.service import RankResult

    if json_out:
        if isinstance(result, RankResult):
            print_json(result.to_dict(top=None))
        else:
            print_json(result.to_dict())
        return
    if isinstance(result, RankResult):
        _print_rank(result, top)
    elif experiment is None:
        _print_study(result, by)
    else:
        console.print(
            f"{experiment}: {split} samples {result.samples[0]}..{result.samples[1] - 1} "
            f"(shard {result.shard[0]}/{result.shard[1]}), {len(result.run_ids)} runs "
            f"(run shard {result.run_shard[0]}/{result.run_shard[1]})"
        )
        console.print(f"wrote {result.path}", style="dim")


def _print_subclasses(result) -> None:
    subclasses = result.subclasses.sort_values(["group", "subclass"], kind="stable")
    console.print(
        table(
            f"{result.dataset}: held-out test accuracy per subclass (mean over runs) at ratio "
            f"0 and its drop at ratio 1, {result.n_groups} KMeans groups",
            ["group", "subclass", "ratios", "acc ratio 0", "acc ratio 1", "drop"],
            [
                [
                    r["group"],
                    r["subclass"],
                    r["n_ratios"],
                    r["acc_ratio0"],
                    r["acc_ratio1"],
                    r["drop"],
                ]
                for r in subclasses.to_dict(orient="records")
            ],
        )
    )
    console.print(
        table(
            "per group, over its experiments (every ratio): Pearson r (p) of the mean and of "
            "the std of validation accuracy against held-out test accuracy",
            ["group", "subclasses", "experiments", "r (mean)", "p (mean)", "r (std)", "p (std)"],
            [
                [
                    r["group"],
                    r["subclasses"],
                    r["n_experiments"],
                    r["r_val_mean"],
                    r["p_val_mean"],
                    r["r_val_std"],
                    r["p_val_std"],
                ]
                for r in result.correlations.to_dict(orient="records")
            ],
        )
    )
    for note in result.notes:
        console.print(f"note: {note}", style="dim", markup=False)
    for f in result.files:
        console.print(f"wrote {f}", style="dim")


@app.command("subclasses")
def subclasses(
    dataset: Annotated[
        str, typer.Option(help="Dataset of the holdout sweep (the study: cifar100).")
    ] = "cifar100",
    groups: Annotated[
        int,
        typer.Option(
            "--groups",
            min=1,
            help="KMeans groups of subclasses (the study: 10); fewer lets a partial sweep "
            "be grouped.",
        ),
    ] = 10,
    model: Annotated[
        str | None,
        typer.Option(help="Only the experiments of this model.", show_default=False),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            help="Only the experiments of this protocol (mlvar or study).", show_default=False
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The study's accuracy analyses over a holdout sweep (one experiment per subclass and ratio).

    Per subclass: the mean held-out test accuracy at ratio 0 and its drop at ratio 1,
    grouped by KMeans(10 groups, random_state 42); per group: Pearson r and p of the mean
    and of the std of validation accuracy against held-out test accuracy over its
    experiments. Writes <runs_root>/study-subclasses.* and study-correlations.*. Exits 2
    naming the missing subclasses where fewer than --groups have both ratio 0 and 1.

    Example: mlvar analyze subclasses --dataset cifar100
    """
    with cli_errors(), warnings_to_stderr():
        cfg = get_config(config)
        from mlvar.analysis.study_accuracy import subclass_accuracy

        result = subclass_accuracy(
            cfg.paths.runs_root, dataset, groups, model=model, protocol=protocol
        )
    if json_out:
        print_json(result.to_dict())
        return
    _print_subclasses(result)


@app.command("curve", no_args_is_help=True)
def curve(
    experiment: ExperimentArg,
    split: SplitOpt = "test",
    subsets: Annotated[
        int, typer.Option(min=1, help="Random subsets of runs per size (all when fewer exist).")
    ] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the subset draws.")] = 0,
    design: Annotated[
        str,
        typer.Option(
            help=f"Which runs: {' or '.join(CURVE_DESIGNS)} (random subsets of 1, 2, 4, ... "
            "runs; or the original study's nested prefixes: the first STEP, 2 STEP, ... "
            "runs in run order, one per size)."
        ),
    ] = CURVE_DESIGNS[0],
    step: Annotated[
        int | None,
        typer.Option(
            help=f"Prefix sizes grow by STEP runs (--design {DESIGN_PREFIX} only; default "
            f"{PREFIX_STEP_DEFAULT}).",
            show_default=False,
        ),
    ] = None,
    allow_mixed: MixedOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """AUROC of every metric against the number of runs (1, 2, 4, ..., all).

    For each size, several random subsets of runs; mean and std over subsets. With
    --design prefix, the first 10, 20, ... runs instead (the original study's curve).
    Writes analysis/auroc-vs-runs-<split>.{parquet,csv} and ...-subsets.{parquet,csv}.

    Example: mlvar analyze curve digits-holdout-sub3-r1.0-mlp --subsets 10
    """
    with cli_errors(), warnings_to_stderr():
        from mlvar.store import ExperimentStore

        step = check_design(design, step)
        cfg = get_config(config)
        store = ExperimentStore.open(cfg.paths.runs_root, experiment)
        from mlvar.analysis.curve import runs_curve  # pandas: once the experiment is found

        result = runs_curve(
            store,
            split,
            subsets=subsets,
            seed=seed,
            allow_mixed=allow_mixed,
            design=design,
            step=step,
        )
    if json_out:
        print_json(result.to_dict())
        return
    sizes = result.sizes
    rows = [
        [metric, *(f"{m:.3f}" + ("" if s != s else f" ± {s:.3f}") for m, s in cells)]
        for metric, cells in result.auroc_by_metric().items()
    ]
    over = (
        f"the first {result.step}, {2 * result.step}, ... runs (nested prefixes)"
        if result.design == DESIGN_PREFIX
        else f"mean ± std over up to {result.subsets} subsets"
    )
    console.print(
        table(
            f"{experiment}: AUROC ({split}) against the number of runs, {over}",
            ["metric", *[f"{s} runs" for s in sizes]],
            rows,
        )
    )
    for f in result.files:
        console.print(f"wrote {f}", style="dim")


@app.command("saliency", no_args_is_help=True)
def saliency_(
    experiment: ExperimentArg,
    split: SplitOpt = "test",
    top: ExplainTopOpt = SALIENCY_TOP_DEFAULT,
    seeds: ExplainSeedsOpt = SALIENCY_SEEDS_DEFAULT,
    by: RankByOpt = DEFAULT_RANK_BY,
    layer: LayerOpt = None,
    seed: PageSeedOpt = 0,
    batch_size: CamBatchOpt = SALIENCY_BATCH_DEFAULT,
    run_shard: Annotated[
        str | None,
        typer.Option(
            "--run-shard",
            help="Compute only block j of m of the runs (j/m) into "
            "analysis/saliency-shards/<split>/; combine with --merge.",
            show_default=False,
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Combine a complete set of --run-shard results (other options "
            "come from the shards).",
        ),
    ] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Attributions of the top-ranked samples under each seed's saved model.

    Image models get GradCAM maps; the MLP gets gradient x input per feature (on images:
    per pixel, shown as maps). For the true class and each run's predicted class, with
    their mean, std and max-min across seeds; random unaffected samples give the
    contrast. Needs runs that saved model.pt and the prepared scenario in the data root.
    Writes analysis/saliency-<split>/ (maps.npy or attributions.npy, stats.npy,
    samples.parquet/json, overlays/); 'mlvar report html' then shows each sample's strip
    or chart.

    Large jobs split over the runs: '--run-shard j/m' for j = 1..m (separate processes or
    machines, or 'mlvar submit saliency' as backend jobs), then '--merge'.

    Example: mlvar analyze saliency digits-holdout-sub3-r1.0-cnn --top 10 --seeds 8
    """
    with cli_errors(), warnings_to_stderr():
        if merge and run_shard is not None:
            raise MlvarError(
                "--merge and --run-shard exclude each other", "run one, then the other"
            )
        if top < 1 or seeds < 1 or batch_size < 1:
            name, value = next(
                (n, v)
                for n, v in (("--top", top), ("--seeds", seeds), ("--batch-size", batch_size))
                if v < 1
            )
            raise MlvarError(f"{name} must be at least 1, got {value}", "use e.g. 10")
        from mlvar.analysis.metrics import check_by
        from mlvar.analysis.sharding import parse_shard
        from mlvar.store import ExperimentStore

        check_by(by)
        cfg = get_config(config)
        store = ExperimentStore.open(cfg.paths.runs_root, experiment)
        shard = parse_shard(run_shard, "--run-shard") if run_shard is not None else None
        # pandas (and torch, to load the models): once the request is checked
        from mlvar.analysis.saliency import saliency_shard
        from mlvar.saliency import merge_saliency_shards, saliency

        data_root = Path(cfg.paths.data_root)
        with ProgressBar(not json_out) as bar:
            options = {
                "top": top,
                "seeds": seeds,
                "by": by,
                "layer": layer,
                "seed": seed,
                "batch_size": batch_size,
                "progress": lambda done, total: bar.update("saliency (runs)", done, total),
            }
            if merge:
                result = merge_saliency_shards(store, data_root, split, layer)
            elif shard is not None:
                part = saliency_shard(store, data_root, shard, split, **options)
            else:
                result = saliency(store, data_root, split, **options)
    if shard is not None:
        if json_out:
            print_json(part.to_dict())
        else:
            console.print(
                f"{experiment}: saliency shard {shard[0]}/{shard[1]} ({len(part.run_ids)} runs: "
                f"{', '.join(part.run_ids)}; {part.n_samples} samples) in {part.path}",
                markup=False,
            )
            console.print(
                f"merge a complete set with: mlvar analyze saliency {experiment} --merge",
                style="dim",
                markup=False,
            )
        return
    if json_out:
        print_json(result.to_dict())
        return
    rows = [
        [
            r["rank"],
            str(r["sample_id"]),
            r["label_name"],
            "yes" if r["affected"] else "no",
            r["kind"],
            f"{r['n_correct']}/{result.n_seeds}",
            r["spread_true"],
            r["spread_pred"],
        ]
        for r in result.samples.to_dict(orient="records")
    ]
    console.print(
        table(
            f"{experiment}: {_method_title(result)} of "
            f"{len(rows)} {split} samples under {result.n_seeds} runs, ranked by {by}",
            [
                "rank",
                "sample id",
                "label",
                "affected",
                "kind",
                "correct",
                "spread true",
                "spread pred",
            ],
            rows,
        )
    )
    over = (
        "features of the std across runs of the attribution"
        if result.feature_names
        else ("pixels of the std across runs of the map")
    )
    console.print(f"spread: mean over {over} (true / predicted class)", style="dim")
    for f in result.files:
        console.print(f"wrote {f}", style="dim")


def _method_title(result) -> str:
    if result.method.startswith("GradCAM"):
        return f"GradCAM ({result.model}, layer {result.layer})"
    return f"{result.method} ({result.model})"


@app.command("import", no_args_is_help=True)
def import_(
    source: Annotated[
        Path,
        typer.Argument(
            help="Folder with one <run-name>.npy per run ([n, C]), labels.npy, and "
            "optionally affected.npy and ids.npy.",
            show_default=False,
        ),
    ],
    name: Annotated[
        str, typer.Option("--name", help="Name of the new experiment.", show_default=False)
    ],
    split: Annotated[str, typer.Option(help="Split the predictions belong to.")] = "test",
    probs: Annotated[
        bool, typer.Option("--probs", help="The run files hold probabilities, not logits.")
    ] = False,
    class_names: Annotated[
        str | None,
        typer.Option(
            "--class-names",
            help="Comma-separated class names (default: class_0, class_1, ...).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing experiment of that name.")
    ] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Import predictions made by another tool into the run store.

    Every analysis then works on them. Shapes, values and labels are checked first;
    on any error nothing is written.

    Example: mlvar analyze import ./preds --name resnet-cifar10 --probs
    """
    with cli_errors(), warnings_to_stderr():
        from mlvar.analysis.importer import import_predictions

        cfg = get_config(config)
        names = None
        if class_names is not None:
            names = [c.strip() for c in class_names.split(",")]
        result = import_predictions(
            source,
            cfg.paths.runs_root,
            name,
            split=split,
            probs=probs,
            class_names=names,
            force=force,
        )
    if json_out:
        print_json(result.to_dict())
        return
    console.print(
        f"Imported {len(result.runs)} runs of {result.n_samples} {result.split} samples x "
        f"{result.n_classes} classes ({result.n_affected} affected) as '{result.experiment}'"
        + (" (replaced)" if result.replaced else "")
    )
    console.print(f"wrote {result.path}", style="dim")


@app.command("metrics")
def metrics(
    json_out: JsonOpt = False,
    all_: Annotated[
        bool,
        typer.Option(
            "--all",
            help="With --json: include the training-dynamics metrics (each entry then has "
            "a 'needs' key).",
        ),
    ] = False,
) -> None:
    """List the per-sample metrics with their formulas and orientation.

    The training-dynamics metrics (Data Maps, forgetting events) apply to the train
    split of runs that recorded per-epoch predictions.

    Example: mlvar analyze metrics --json
    """
    from mlvar.analysis.metrics import ALL_METRICS, DYNAMICS_METRICS, METRICS

    def row(m) -> list:
        return [
            m.name,
            m.formula,
            "yes" if m.uses_label else "no",
            "high" if m.higher_is_suspicious else "low",
        ]

    if json_out:
        keys = ["name", "formula", "uses_label", "suspicious_when"]
        chosen = ALL_METRICS if all_ else METRICS
        out = []
        for m in chosen.values():
            entry = dict(zip(keys, row(m), strict=True))
            if all_:
                entry["needs"] = m.needs
            out.append(entry)
        print_json(out)
        return
    console.print(
        table(
            "per-sample metrics (R runs, p_r = softmax of run r)",
            ["metric", "formula", "uses label", "suspicious when"],
            [row(m) for m in METRICS.values()],
        )
    )
    console.print(
        table(
            "training-dynamics metrics (train split, runs with per-epoch predictions p_e)",
            ["metric", "formula", "uses label", "suspicious when"],
            [row(m) for m in DYNAMICS_METRICS.values()],
        )
    )


# ---------------------------------------------------------------- analyze retrain


@app.command("retrain", no_args_is_help=True)
def retrain_(
    experiment: ExperimentArg,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Gains of a retraining ('mlvar retrain') over its budget-0 continuation, per strategy
    and budget, and each strategy against random.

    Per strategy and budget: mean, std, min, max and median over runs of the test accuracy
    gain overall, on the affected samples and on the others. Against random: the mean over
    runs of the paired difference of gains, with a 95% percentile bootstrap interval over
    runs (2000 resamples, seed 0). Reads <experiment>/retrain/summary.parquet.

    Example: mlvar analyze retrain digits-holdout-sub3-r1.0-cnn
    """
    with cli_errors(), warnings_to_stderr():
        from mlvar.store import ExperimentStore

        cfg = get_config(config)
        store = ExperimentStore.open(cfg.paths.runs_root, experiment)
        from mlvar.analysis.retrain import retrain_stats  # pandas: once the experiment is found

        stats = retrain_stats(store)
    if json_out:
        print_json(stats.to_dict())
        return
    for gain, label in (
        ("gain", "all test samples"),
        ("gain_affected", "affected"),
        ("gain_unaffected", "other"),
    ):
        rows = [
            [
                r["strategy"] + (" (oracle)" if r["oracle"] else ""),
                r["budget"],
                r["n_added"],
                r["n_runs"],
                *(r[f"{gain}_{s}"] for s in ("mean", "std", "min", "max", "median")),
            ]
            for r in stats.gains.to_dict(orient="records")
        ]
        console.print(
            table(
                f"{experiment}: test accuracy gain over budget 0 ({label}), over runs",
                ["strategy", "budget", "added", "runs", "mean", "std", "min", "max", "median"],
                rows,
                digits={"budget": 2},
            )
        )
    rows = [
        [
            r["strategy"] + (" (oracle)" if r["oracle"] else ""),
            r["budget"],
            r["n_runs"],
            *(
                f"{r[f'{g}_diff']:+.4f} [{r[f'{g}_ci_low']:+.4f}, {r[f'{g}_ci_high']:+.4f}]"
                for g in ("gain", "gain_affected", "gain_unaffected")
            ),
        ]
        for r in stats.versus_random.to_dict(orient="records")
    ]
    if rows:
        console.print(
            table(
                f"against random: mean paired difference of gains over runs "
                f"[{stats.level:.0%} bootstrap interval, {stats.n_boot} resamples]",
                ["strategy", "budget", "runs", "all", "affected", "other"],
                rows,
                digits={"budget": 2},
            )
        )
    else:
        console.print("no strategy to compare with random at the same budget", style="dim")
