"""The service behind ``mlvar retrain``: check a request, order the pool by each strategy,
write the selection, continue every run for budget 0 and for every strategy x budget, and
write the summary (docs/retrain.md).

Everything is checked before anything is written (:func:`plan_retrain`): the pool split,
the strategies and budgets, the pool's labels where a strategy reads them, the runs and
their saved weights, the scenario the runs were trained on, and the identity of sets
already there. Then ``retrain/selected.parquet`` is written atomically, each set is
continued (:func:`mlvar.train.continuation.continue_runs`: claimed, checkpointed and
resumed like training; finished runs are skipped, so a retraining killed midway and run
again completes what is missing), and ``retrain/summary.{parquet,csv}`` is written from
the stored sets.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlvar.analysis.acquisition import (
    DEFAULT_BUDGETS,
    DEFAULT_STRATEGIES,
    Strategy,
    budget_k,
    parse_budgets,
    parse_strategies,
    pool_orders,
    set_name,
)
from mlvar.analysis.retrain import (
    BASELINE_SET,
    SELECTED_COLUMNS,
    SELECTED_FILE,
    gain_stats,
    json_records,
    retrain_dir,
    write_summary,
)
from mlvar.config import Config
from mlvar.data.scenario import Scenario, SplitData, experiment_scenario
from mlvar.errors import MlvarError, unknown_choice
from mlvar.store import ExperimentStore, RunRecord, parquet_bytes

if TYPE_CHECKING:
    import pandas as pd

    from mlvar.analysis.service import Predictions

#: ``progress(done, total, message)``: ``done`` counts sets (fractional inside one).
Progress = Callable[[float, int, str], None]

DEFAULT_POOL = "full_val"
WEIGHTS_FILE = "model.pt"  # mlvar.train.trained.WEIGHTS_FILE, without importing torch


@dataclass
class RetrainSet:
    """One retraining set: a strategy (None for ``b0``) at a budget, and what each run adds."""

    name: str
    strategy: Strategy | None
    budget: float
    k: int
    added: dict[str, np.ndarray]  # run id -> pool positions, in the strategy's order
    meta: dict[str, Any]  # experiment.json["retrain"] of the set


@dataclass
class RetrainPlan:
    """A checked request (:func:`plan_retrain`): nothing written yet."""

    store: ExperimentStore
    pool: str
    pool_samples: pd.DataFrame
    pool_data: SplitData
    scenario: Scenario
    strategies: list[Strategy]
    budgets: list[float]
    runs: list[RunRecord]  # the runs to continue
    all_runs: list[RunRecord]  # every verified run (the shared orders read all of them)
    sets: list[RetrainSet]
    epochs: int | None
    from_scratch: bool
    device: str

    @property
    def root(self) -> Path:
        return retrain_dir(self.store)

    def selected(self) -> pd.DataFrame:
        """One row per added sample of every set of budget > 0 and every verified run."""
        import pandas as pd

        ids = self.pool_samples["sample_id"].to_numpy()
        frames = []
        for s in self.sets:
            if s.strategy is None:
                continue
            for run_id, positions in s.added.items():
                frames.append(
                    pd.DataFrame(
                        {
                            "strategy": s.strategy.name,
                            "budget": s.budget,
                            "run_id": run_id,
                            "sample_id": ids[positions],
                            "position": positions,
                        }
                    )
                )
        if not frames:
            return pd.DataFrame({c: [] for c in SELECTED_COLUMNS})
        return pd.concat(frames, ignore_index=True)[list(SELECTED_COLUMNS)]


@dataclass
class RetrainResult:
    """What :func:`retrain` did."""

    experiment: str
    pool: str
    pool_size: int
    strategies: list[str]
    budgets: list[float]
    runs: list[str]
    sets: list[dict[str, Any]] = field(default_factory=list)  # set, strategy, budget, ...
    summary: pd.DataFrame | None = None
    gains: pd.DataFrame | None = None
    files: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "pool": self.pool,
            "pool_size": self.pool_size,
            "strategies": self.strategies,
            "budgets": self.budgets,
            "runs": self.runs,
            "sets": self.sets,
            "gains": json_records(self.gains),
            "summary": json_records(self.summary),
            "files": self.files,
            "wall_time_s": self.wall_time_s,
        }


# ---------------------------------------------------------------- checks


def _open(experiment: str | ExperimentStore, config: Config) -> ExperimentStore:
    if isinstance(experiment, ExperimentStore):
        return experiment
    return ExperimentStore.open(Path(config.paths.runs_root), experiment)


def _check_pool(store: ExperimentStore, pool: str) -> None:
    if pool not in store.splits:
        raise MlvarError(
            f"experiment '{store.name}' has no pool split '{pool}' (it has "
            f"{', '.join(store.splits)})",
            f"add one with 'mlvar analyze predict {store.name} --on SCENARIO[:SPLIT]', "
            "or pass --pool with one of those",
        )


def _labels_missing(samples: pd.DataFrame) -> bool:
    return "label" not in samples.columns or bool((samples["label"].to_numpy() < 0).any())


def choose_runs(
    store: ExperimentStore, verified: list[RunRecord], runs: int | Sequence[str] | None
) -> list[RunRecord]:
    """The runs to continue: all verified ones (None), the first ``runs`` by run id (an
    int), or those named; each must have saved its weights."""
    if not verified:
        raise MlvarError(
            f"experiment '{store.name}' has no finished runs",
            f"train some with 'mlvar train {store.meta.get('dataset', 'DATASET')}'",
        )
    by_id = {r.run_id: r for r in verified}
    if runs is None:
        chosen = list(verified)
    elif isinstance(runs, int):
        if runs < 1:
            raise MlvarError(f"--runs must be at least 1, got {runs}", "e.g. --runs 4")
        chosen = verified[:runs]
    else:
        chosen = []
        for run_id in runs:
            if run_id not in by_id:
                raise unknown_choice(f"run of '{store.name}'", run_id, by_id)
            if by_id[run_id] not in chosen:
                chosen.append(by_id[run_id])
        if not chosen:
            raise MlvarError("--runs names no run", "e.g. --runs run-0000,run-0001 or --runs 4")
    lacking = [
        r.run_id
        for r in chosen
        if WEIGHTS_FILE not in r.meta.get("arrays", {}) or not (r.path / WEIGHTS_FILE).is_file()
    ]
    if lacking:
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        shown = ", ".join(lacking[:5]) + more
        raise MlvarError(
            f"experiment '{store.name}' has runs without saved weights ({WEIGHTS_FILE}): {shown}",
            "retraining continues from a run's weights: retrain those runs with 'mlvar "
            "train', or pass --runs with runs that saved them",
        )
    return chosen


def pool_source(data_root: Path, store: ExperimentStore, pool: str) -> tuple[Scenario, SplitData]:
    """The experiment's scenario and the pool's data (x, y, id, affected): a split of that
    scenario, or one ``mlvar analyze predict`` added from another scenario
    (:func:`mlvar.data.scenario.split_source`), checked against the stored sample ids."""
    scenario = experiment_scenario(data_root, store.name, store.meta)
    external = store.meta.get("external_splits") or {}
    if pool in scenario.splits and pool not in external:
        data = scenario.load(pool)
    else:
        # Only 'mlvar analyze predict' adds splits the scenario lacks; it brings this.
        from mlvar.data.scenario import split_source

        source, name = split_source(data_root, store.name, store.meta, pool)
        data = source.load(name)
    ids = store.samples(pool)["sample_id"].to_numpy()
    if len(data.id) != len(ids) or not np.array_equal(data.id, ids):
        raise MlvarError(
            f"the pool '{pool}' of '{store.name}' does not hold the samples of its prepared "
            "scenario (sample ids differ)",
            "prepare the scenario the experiment was trained on",
        )
    return scenario, data


def _selection_digest(orders: np.ndarray, run_ids: Sequence[str], k: int) -> str:
    digest = hashlib.sha256()
    for run_id, order in zip(run_ids, orders, strict=True):
        digest.update(run_id.encode() + b"\0")
        digest.update(np.ascontiguousarray(order[:k], dtype=np.int64).tobytes())
    return digest.hexdigest()


def _set_meta(
    store: ExperimentStore,
    pool: str | None,
    strategy: Strategy | None,
    budget: float,
    k: int,
    epochs: int | None,
    from_scratch: bool,
    selection: str | None,
) -> dict[str, Any]:
    return {
        "source": store.name,
        "pool": pool,
        "strategy": None if strategy is None else strategy.name,
        "budget": float(budget),
        "k": int(k),
        "epochs": epochs,
        "from_scratch": bool(from_scratch),
        "oracle": bool(strategy is not None and strategy.oracle),
        "selection_sha256": selection,
    }


def _check_existing(root: Path, sets: Sequence[RetrainSet]) -> None:
    """Refuse a set already under ``root`` that was made otherwise (nothing written)."""
    import json

    for s in sets:
        file = root / s.name / "experiment.json"
        if not file.is_file():
            continue
        try:
            old = json.loads(file.read_text()).get("retrain") or {}
        except (OSError, ValueError):
            continue  # the continuation reports a corrupt set
        keys = sorted(k for k in set(old) | set(s.meta) if old.get(k) != s.meta.get(k))
        if keys:
            diffs = "; ".join(f"{k} {old.get(k)!r}, asked {s.meta.get(k)!r}" for k in keys)
            raise MlvarError(
                f"retraining set '{s.name}' of '{s.meta['source']}' was made with another "
                f"{', '.join(keys)} ({diffs})",
                f"remove {root / s.name} to redo it, or ask for what it was made with",
            )


def plan_retrain(
    experiment: str | ExperimentStore,
    config: Config,
    pool: str = DEFAULT_POOL,
    strategies: str | Sequence[str] = DEFAULT_STRATEGIES,
    budgets: str | Sequence[float] = DEFAULT_BUDGETS,
    epochs: int | None = None,
    from_scratch: bool = False,
    runs: int | Sequence[str] | None = None,
    device: str | None = None,
) -> RetrainPlan:
    """Check a retraining request and compute every selection; nothing is written.

    Raises
    ------
    MlvarError
        An unknown experiment, a pool split it lacks (the message lists those it has),
        an unknown strategy (nearest names), budgets outside [0, 1], a label-aware
        strategy on a pool whose labels are missing, runs without saved weights, a
        missing or changed scenario, or a set already there made otherwise.
    """
    chosen = parse_strategies(strategies)
    fractions = parse_budgets(budgets)
    if epochs is not None and epochs < 1:
        raise MlvarError(f"--epochs must be at least 1, got {epochs}", "e.g. --epochs 5")
    store = _open(experiment, config)
    _check_pool(store, pool)
    samples = store.samples(pool)
    oracles = [s.name for s in chosen if s.uses_label]
    missing = _labels_missing(samples)
    if missing and oracles:
        raise MlvarError(
            f"the pool '{pool}' of '{store.name}' has missing labels (label < 0), but "
            f"{', '.join(oracles)} read labels",
            "use label-free strategies (random, maxconf_std, maxconf_mean, neg_maxconf, ...)",
        )
    from mlvar.analysis.service import load_predictions  # pandas: the request is sane

    preds = load_predictions(store, pool)
    to_run = choose_runs(store, preds.runs, runs)
    scenario, data = pool_source(Path(config.paths.data_root), store, pool)
    # torch: the request is checked. Sets record the epochs the continuation runs, so an
    # --epochs equal to the recipe's length finds the sets made without it.
    from mlvar.train.continuation import experiment_plan

    epochs = experiment_plan(store, epochs, from_scratch).epochs
    if missing:  # label-free strategies only: the labels are never read
        preds = _with_placeholder_labels(preds)
    orders = pool_orders(preds, chosen)
    run_ids = [r.run_id for r in preds.runs]
    n = len(samples)
    sets = [
        RetrainSet(
            BASELINE_SET,
            None,
            0.0,
            0,
            {r.run_id: np.zeros(0, dtype=np.int64) for r in to_run},
            _set_meta(store, None, None, 0.0, 0, epochs, from_scratch, None),
        )
    ]
    for strategy in chosen:
        for budget in fractions[1:]:
            k = budget_k(budget, n)
            digest = _selection_digest(orders[strategy.name], run_ids, k)
            added = {rid: orders[strategy.name][i, :k].copy() for i, rid in enumerate(run_ids)}
            unlabelled = {rid for rid, pos in added.items() if (data.y[pos] < 0).any()}
            if unlabelled:
                raise MlvarError(
                    f"{strategy.name} at budget {budget} adds unlabelled pool samples "
                    f"(label < 0) to runs {', '.join(sorted(unlabelled)[:3])}",
                    "a pool needs labels for the samples it adds to training",
                )
            name = set_name(strategy.name, budget)
            meta = _set_meta(store, pool, strategy, budget, k, epochs, from_scratch, digest)
            sets.append(RetrainSet(name, strategy, budget, k, added, meta))
    _check_existing(retrain_dir(store), sets)
    dataset = store.meta.get("dataset")
    dev = device or (config.train_for(dataset).device if dataset in config.train else "cpu")
    return RetrainPlan(
        store,
        pool,
        samples,
        data,
        scenario,
        chosen,
        fractions,
        to_run,
        list(preds.runs),
        sets,
        epochs,
        from_scratch,
        dev,
    )


def _with_placeholder_labels(preds: Predictions) -> Predictions:
    """``preds`` with every missing label read as class 0: what label-free metrics need
    to build (they never read the label)."""
    import dataclasses

    labels = preds.samples["label"].to_numpy() if "label" in preds.samples else None
    filled = np.zeros(len(preds.samples), dtype=np.int64) if labels is None else labels.clip(0)
    return dataclasses.replace(preds, samples=preds.samples.assign(label=filled))


# ---------------------------------------------------------------- the work


def _in_order(gains: pd.DataFrame, strategies: Sequence[str]) -> pd.DataFrame:
    """``gains`` with the strategies asked for first, in that order (the others, from
    earlier calls, after them by name), budgets ascending."""
    if gains.empty:
        return gains
    rank = {name: i for i, name in enumerate(strategies)}
    key = [
        (rank.get(s, len(rank)), s, b)
        for s, b in zip(gains["strategy"], gains["budget"], strict=True)
    ]
    order = sorted(range(len(key)), key=key.__getitem__)
    return gains.iloc[order].reset_index(drop=True)


def _write_selected(plan: RetrainPlan) -> str:
    """``retrain/selected.parquet`` (atomically): this request's sets replace the rows of
    the same strategy and budget, those of other sets stay."""
    import pandas as pd
    import pyarrow as pa

    from mlvar.io import atomic_write_bytes

    file = plan.root / SELECTED_FILE
    new = plan.selected()
    if file.is_file():
        old = pd.read_parquet(file)
        asked = {(s.strategy.name, s.budget) for s in plan.sets if s.strategy is not None}
        pairs = zip(old["strategy"], old["budget"], strict=True)
        keep = [(st, float(b)) not in asked for st, b in pairs]
        new = pd.concat([old[keep], new], ignore_index=True)
    new = new.astype({"budget": "float64", "sample_id": "int64", "position": "int64"})
    new = new.sort_values(["strategy", "budget", "run_id"], kind="stable")
    table = pa.Table.from_pandas(new.reset_index(drop=True), preserve_index=False)
    atomic_write_bytes(file, parquet_bytes(table))
    return str(file)


def retrain(
    experiment: str | ExperimentStore,
    config: Config,
    pool: str = DEFAULT_POOL,
    strategies: str | Sequence[str] = DEFAULT_STRATEGIES,
    budgets: str | Sequence[float] = DEFAULT_BUDGETS,
    epochs: int | None = None,
    from_scratch: bool = False,
    runs: int | Sequence[str] | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> RetrainResult:
    """Add the top of the pool under each strategy at each budget to every run's training
    set and continue the run from its saved weights; budget 0 (``b0``, no sample added)
    is always run, the baseline of every gain.

    Parameters
    ----------
    experiment
        The trained experiment (name, or its store); its runs must have saved ``model.pt``.
    config
        Paths (runs root, data root) and the device default.
    pool
        The split whose samples are acquired (default ``full_val``).
    strategies, budgets
        Comma-separated text or sequences (:func:`mlvar.analysis.acquisition.parse_strategies`,
        :func:`~mlvar.analysis.acquisition.parse_budgets`).
    epochs
        Continuation epochs (None: the recipe's continuation length).
    from_scratch
        Retrain each run from its seed instead of continuing from its weights.
    runs
        The runs to continue: all (None), the first N (int) or those named.
    device
        ``cpu`` or ``cuda`` (default: the dataset's configured device).
    progress
        ``progress(done, total, message)`` over sets.

    Returns
    -------
    RetrainResult
        The sets trained and skipped, the summary of every stored set and its gains.
    """
    started = time.perf_counter()
    plan = plan_retrain(
        experiment, config, pool, strategies, budgets, epochs, from_scratch, runs, device
    )
    from mlvar.train.continuation import continue_runs

    files = [_write_selected(plan)]
    run_ids = [r.run_id for r in plan.runs]
    done_sets = []
    total = len(plan.sets)
    for i, s in enumerate(plan.sets):
        if progress:
            progress(i, total, f"{s.name} ({len(run_ids)} runs)")

        def inner(*args: Any, i: int = i, s: RetrainSet = s, **_: Any) -> None:
            # (done, total, ...) of the set's own work, shown as a fraction of one set
            if progress and len(args) >= 2 and args[1]:
                progress(i + min(1.0, float(args[0]) / float(args[1])), total, s.name)

        outcome = continue_runs(
            plan.store,
            plan.root / s.name,
            s.meta,
            plan.scenario,
            plan.pool_data,
            {rid: s.added[rid] for rid in run_ids},
            run_ids,
            epochs=plan.epochs,
            from_scratch=plan.from_scratch,
            device=plan.device,
            progress=inner,
        )
        done_sets.append(
            {
                "set": s.name,
                "strategy": None if s.strategy is None else s.strategy.name,
                "budget": s.budget,
                "n_added": s.k,
                "oracle": bool(s.meta["oracle"]),
                "trained": list(outcome.trained),
                "skipped": list(outcome.skipped),
                "epochs": outcome.epochs,
                "engine": outcome.engine,
            }
        )
    if progress:
        progress(total, total, "summary")
    summary, written = write_summary(plan.root, [s.name for s in plan.strategies], plan.pool)
    files += written
    return RetrainResult(
        plan.store.name,
        pool,
        len(plan.pool_samples),
        [s.name for s in plan.strategies],
        plan.budgets,
        run_ids,
        done_sets,
        summary,
        _in_order(gain_stats(summary), [s.name for s in plan.strategies]),
        files,
        time.perf_counter() - started,
    )
