"""``mlvar retrain``: add the pool samples a strategy picks to each run's training set and
continue the run from its saved weights; compare the test accuracy gains (docs/retrain.md).

A thin shell over :func:`mlvar.retrain.retrain`; the strategy and budget lists are checked
before the experiment is opened (numpy only: ``--help`` and those errors stay fast).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mlvar.analysis.acquisition import (
    ALIASES,
    DEFAULT_BUDGETS,
    DEFAULT_STRATEGIES,
    STRATEGIES,
    format_budget,
    parse_budgets,
    parse_strategies,
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
from mlvar.cli.options import ConfigOpt, DeviceOpt, ExperimentArg, JsonOpt

if TYPE_CHECKING:
    from mlvar.retrain import RetrainResult

_ALIAS_TEXT = ", ".join(f"{a} = {b}" for a, b in ALIASES.items())


def parse_runs(value: str | None) -> int | list[str] | None:
    """``--runs``: None (all), a number N (the first N by run id) or run ids, comma-separated."""
    from mlvar.errors import MlvarError

    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise MlvarError(
            f"--runs '{value}' has an empty list item", "e.g. --runs 4 or --runs run-0000,run-0002"
        )
    if len(items) == 1 and items[0].isdigit():
        return int(items[0])
    return items


def retrain(
    experiment: ExperimentArg,
    pool: Annotated[
        str,
        typer.Option(
            help="The split whose samples are acquired: full_val (holdout scenarios: the "
            "validation split before anything was held out), or one added with "
            "'mlvar analyze predict'."
        ),
    ] = "full_val",
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="Strategies, comma-separated: "
            f"{', '.join(STRATEGIES)}; the study's names {_ALIAS_TEXT}. Label-aware ones "
            "are flagged oracle.",
        ),
    ] = ",".join(DEFAULT_STRATEGIES),
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            help="Fractions of the pool to add, comma-separated or start:stop:step; "
            "k = fraction x pool size rounded half up. Budget 0 (no sample added, the "
            "baseline of every gain) is always run.",
        ),
    ] = ",".join(format_budget(b) for b in DEFAULT_BUDGETS),
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Continuation epochs (default: the recipe's continuation length).",
            show_default=False,
        ),
    ] = None,
    from_scratch: Annotated[
        bool,
        typer.Option(
            "--from-scratch", help="Retrain each run from its seed instead of its weights."
        ),
    ] = False,
    runs: Annotated[
        str | None,
        typer.Option(
            help="Runs to continue: N (the first N by run id) or run ids, comma-separated "
            "(default: all).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Variance-guided acquisition: add the pool samples each strategy ranks first to every
    run's training set, continue the run from its saved weights, and compare test accuracy.

    Budget 0 (the same continuation with nothing added) is the baseline of every gain.
    Writes <experiment>/retrain/: one run store per set (b0, <strategy>-b<budget>),
    selected.parquet (the samples each run added) and summary.{parquet,csv} (one row per
    strategy x budget x run: accuracy overall, on affected and other test samples, and the
    gains over b0). Finished runs are skipped, so a killed retraining resumes.

    Example: mlvar retrain digits-holdout-sub3-r1.0-cnn --by random,maxconf_std --budget 0.1,0.5
    """
    with cli_errors(), warnings_to_stderr():
        strategies = parse_strategies(by)
        budgets = parse_budgets(budget)
        chosen_runs = parse_runs(runs)
        cfg = get_config(config)
        from mlvar.retrain import retrain as run_retrain  # pandas: once the request is sane

        with ProgressBar(not json_out) as bar:
            result = run_retrain(
                experiment,
                cfg,
                pool=pool,
                strategies=[s.name for s in strategies],
                budgets=budgets,
                epochs=epochs,
                from_scratch=from_scratch,
                runs=chosen_runs,
                device=device,
                progress=lambda done, total, msg: bar.update(f"retrain {msg}", done, total),
            )
    if json_out:
        print_json(result.to_dict())
        return
    print_retrain(result)


def print_retrain(result: RetrainResult) -> None:
    """The gains table of a retraining, and what it trained."""
    gains = result.gains
    rows = [
        [
            r["strategy"] + (" (oracle)" if r["oracle"] else ""),
            r["budget"],
            r["n_added"],
            r["n_runs"],
            r["acc_mean"],
            r["gain_mean"],
            r["gain_std"],
            r["gain_affected_mean"],
            r["gain_unaffected_mean"],
        ]
        for r in ([] if gains is None else gains.to_dict(orient="records"))
    ]
    console.print(
        table(
            f"{result.experiment}: test accuracy after retraining with pool '{result.pool}' "
            f"({result.pool_size} samples); gains over budget 0, mean over runs",
            ["strategy", "budget", "added", "runs", "acc", "gain", "std", "affected", "other"],
            rows,
            digits={"budget": 2},
        ),
        markup=False,
    )
    trained = sum(len(s["trained"]) for s in result.sets)
    skipped = sum(len(s["skipped"]) for s in result.sets)
    console.print(
        f"Continued {trained} run(s) in {len(result.sets)} set(s), skipped {skipped} finished "
        f"({result.wall_time_s:.1f} s). Statistics: mlvar analyze retrain {result.experiment}",
        markup=False,
    )
    for f in result.files:
        console.print(f"wrote {f}", style="dim", markup=False)
