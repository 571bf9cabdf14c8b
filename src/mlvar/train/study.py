"""Train a study: every prepared scenario a ``--scenario`` value selects, one experiment
each (``mlvar train DATASET --scenario artificial``).

:func:`plan_study` checks the whole request before anything is written: the scenarios
(:func:`mlvar.data.selection.select_scenarios`), the training config, each experiment's
name, and that an existing experiment was set up the same way; it counts the runs each
experiment has finished already. :func:`train_study` then trains the experiments one
after the other with :func:`mlvar.train.service.train` (finished runs skipped, as
there), reporting progress over the whole study. An experiment that fails (its data
damaged, ...) is recorded with its error and the others go on; a study of one scenario
behaves exactly as :func:`~mlvar.train.service.train` (its errors are raised).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlvar.config import Config, TrainConfig
from mlvar.data.scenario import Scenario
from mlvar.data.selection import select_scenarios
from mlvar.errors import MlvarError
from mlvar.recipes import default_runs
from mlvar.store import ExperimentStore, list_experiments, run_id_for
from mlvar.train import determinism
from mlvar.train.service import (
    Progress,
    TrainResult,
    check_same_experiment,
    experiment_for,
    experiment_meta,
    protocol_for,
    protocol_note,
    train,
    train_config,
)


@dataclass
class PlannedExperiment:
    """One experiment of a study: its scenario, the runs asked for and those finished."""

    scenario: str
    experiment: str
    requested: int
    finished: int  # runs 0..requested-1 complete in the store before the study started

    @property
    def to_run(self) -> int:
        return self.requested - self.finished

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "experiment": self.experiment,
            "requested": self.requested,
            "finished": self.finished,
            "to_run": self.to_run,
        }


@dataclass
class StudyPlan:
    """What a study will train: the dataset, its resolved training config and, per
    selected scenario (in order), the experiment; the runs asked for each, and the notes
    to show (a scenario of another protocol than the recipe's)."""

    dataset: str
    cfg: TrainConfig
    scenarios: list[Scenario]
    experiments: list[PlannedExperiment]
    runs: int = 10
    notes: list[str] = field(default_factory=list)

    @property
    def runs_to_train(self) -> int:
        return sum(p.to_run for p in self.experiments)

    @property
    def runs_requested(self) -> int:
        return sum(p.requested for p in self.experiments)

    @property
    def runs_finished(self) -> int:
        return sum(p.finished for p in self.experiments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "experiments": [p.to_dict() for p in self.experiments],
            "requested": self.runs_requested,
            "finished": self.runs_finished,
            "to_run": self.runs_to_train,
        }


def one_line(exc: BaseException) -> str:
    """An experiment's error as one line (an :class:`MlvarError` with its hint)."""
    text = str(exc) if isinstance(exc, MlvarError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def plan_study(
    config: Config,
    dataset: str,
    scenario: str | None = None,
    runs: int | None = 10,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> StudyPlan:
    """Check a study request and count what is finished, writing nothing.

    ``overrides["protocol"]`` (else the config's ``[protocol] name``) chooses the recipe
    and the scenarios a mode, a glob or no ``scenario`` selects (those prepared under it);
    ``runs`` None means the protocol's default (:func:`mlvar.recipes.default_runs`).
    Raises :class:`MlvarError` for bad input (unknown dataset or protocol, a bad option,
    a ``--scenario`` term that selects nothing, no prepared scenario, ``name`` for more
    than one scenario, an existing experiment set up otherwise unless ``force``).
    """
    if runs is None:
        runs = default_runs(dataset, protocol_for(config, overrides))
    cfg = train_config(config, dataset, runs, overrides)
    found = select_scenarios(Path(config.paths.data_root), dataset, scenario, cfg.protocol)
    if name is not None and len(found) > 1:
        raise MlvarError(
            f"--name names one experiment, but the selection has {len(found)} scenarios",
            "leave --name out (each experiment is named <scenario>-<model>) or select one scenario",
        )
    runs_root = Path(config.paths.runs_root)
    existing = set(list_experiments(runs_root))
    planned = []
    for scen in found:
        exp = experiment_for(scen, cfg, name)
        finished = 0
        if exp in existing and not force:
            store = ExperimentStore.open(runs_root, exp)
            check_same_experiment(store.meta, experiment_meta(exp, scen, cfg), exp)
            done = {r.run_id for r in store.runs()}
            finished = sum(run_id_for(i) in done for i in range(runs))
        planned.append(PlannedExperiment(scen.name, exp, runs, finished))
    notes = [n for n in (protocol_note(scen, cfg) for scen in found) if n]
    notes += filter(None, [determinism.impl_note(cfg.device, cfg.vary)])
    return StudyPlan(dataset, cfg, found, planned, runs, notes)


@dataclass
class StudyResult:
    """What :func:`train_study` did: the plan, each experiment's
    :class:`~mlvar.train.service.TrainResult`, and the experiments that failed (their
    error in one line)."""

    plan: StudyPlan
    results: dict[str, TrainResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def single(self) -> bool:
        """One scenario: reported as ``mlvar train`` of one experiment always was."""
        return len(self.plan.experiments) == 1

    @property
    def trained(self) -> int:
        return sum(len(r.trained) for r in self.results.values())

    @property
    def skipped(self) -> int:
        return sum(len(r.skipped) for r in self.results.values())

    @property
    def wall_time_s(self) -> float:
        return sum(r.wall_time_s for r in self.results.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "experiments": {name: r.to_dict() for name, r in self.results.items()},
            "failed": self.failed,
            "trained": self.trained,
            "skipped": self.skipped,
        }


def train_study(
    config: Config,
    dataset: str,
    scenario: str | None = None,
    runs: int | None = 10,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_plan: Callable[[StudyPlan], None] | None = None,
) -> StudyResult:
    """Train runs ``0 .. runs-1`` of one experiment per selected scenario.

    Parameters
    ----------
    config, dataset, overrides, force
        As :func:`mlvar.train.service.train`, for every experiment (``overrides`` may
        hold ``protocol``: :func:`plan_study`).
    runs
        Runs per experiment; None: the protocol's default.
    scenario
        What to train (:func:`mlvar.data.selection.select_scenarios`): names, modes or
        globs, comma-separated; None: every prepared scenario of the dataset.
    name
        The experiment's name; only for a selection of one scenario.
    progress
        ``progress(done, total, message)`` in run-epochs over the whole study; the
        message starts with the experiment being trained.
    on_plan
        Called with the checked plan before anything is trained.
    """
    plan = plan_study(config, dataset, scenario, runs, name, overrides, force)
    if on_plan is not None:
        on_plan(plan)
    result = StudyResult(plan)
    total = plan.runs_to_train * plan.cfg.epochs
    offset = 0
    for planned in plan.experiments:

        def relay(
            done: int, _total: int, message: str, base: int = offset, exp: str = planned.experiment
        ) -> None:
            if progress:
                progress(min(base + done, total), total, f"{exp}: {message}")

        try:
            result.results[planned.experiment] = train(
                config,
                dataset,
                planned.scenario,
                plan.runs,
                planned.experiment,
                overrides,
                force,
                relay if progress else None,
            )
        except Exception as exc:  # noqa: BLE001 - reported, and the other experiments go on
            if result.single:
                raise  # one experiment: its error is the command's, as it always was
            result.failed[planned.experiment] = one_line(exc)
        offset += planned.to_run * plan.cfg.epochs
        if progress and total:
            progress(min(offset, total), total, planned.experiment)
    return result
