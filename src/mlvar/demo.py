"""The whole pipeline on scikit-learn's digits, offline: ``mlvar demo``; on your own data:
``mlvar demo --data PATH`` (:func:`run_data_demo`): a table file, or a folder of images
(its first group held out, GradCAM in the report).

Importing it loads nothing heavy (the CLI shows :data:`DEMO_RUNS` in its help): the
pipeline's modules are imported by :func:`run_demo`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlvar.analysis import service as analysis
    from mlvar.analysis.saliency import SaliencyResult
    from mlvar.config import Config
    from mlvar.data.spec import DatasetSpec
    from mlvar.train import service as training

DEMO_SUBCLASS = 3  # the held-out digit: coarse class "2-3" keeps only its 2s in training
DEMO_RUNS = 16
#: The demo trains the small CNN on the 8x8 images (``mlvar train digits`` keeps the MLP
#: as its default; ``--model cnn`` there gives the demo's model).
DEMO_MODEL = "cnn"
#: GradCAM in the demo's report: the top 10 samples (and 10 random unaffected ones) under
#: up to 16 runs (a second or two on a CPU for the 8x8 digits).
# The report's sample pages are the top K plus K random unaffected samples, chosen the
# way saliency chooses them: the same K gives every page its GradCAM strip.
DEMO_TOP = 20
DEMO_SALIENCY_SEEDS = 16

#: ``step(message)`` before each stage; ``progress(done, total, message)`` during training.
Step = Callable[[str], None]


@dataclass(frozen=True)
class DataDemo:
    """How ``mlvar demo --data PATH`` runs on a user kind: which of the demo's options
    go to ``mlvar data fetch`` (``fetch``), ``scenario(options, spec, data_root)``: the
    mode and the options of the scenario it prepares (``spec``: the fetched dataset's),
    the demo's options ``scenario`` reads (``options``; any other given is refused), and
    whether the report gets GradCAM maps (``saliency``: image kinds)."""

    fetch: tuple[str, ...]
    scenario: Callable[[dict[str, Any], DatasetSpec, Path], tuple[str, dict[str, Any]]]
    options: tuple[str, ...] = ()
    saliency: bool = False


def _table_scenario(
    options: dict[str, Any], spec: DatasetSpec, data_root: Path
) -> tuple[str, dict[str, Any]]:
    """A table's demo: the subgroup ``--where`` held out, else decision-tree cluster 0."""
    if options.get("where"):
        return "holdout", {"where": options["where"]}
    return "cluster", {"cluster": 0}


def _imagefolder_scenario(
    options: dict[str, Any], spec: DatasetSpec, data_root: Path
) -> tuple[str, dict[str, Any]]:
    """An image folder's demo: the group ``--group`` held out, else the first group (of the
    sorted class/group folders); ``original`` for a folder without groups."""
    if options.get("group"):
        return "holdout", {"group": options["group"]}
    groups = spec.open(data_root).group_names  # its record only: no image is read
    return ("holdout", {"group": groups[0]}) if groups else ("original", {})


#: Per user kind (:data:`mlvar.data.registry.USER_KINDS`): ``--data PATH`` is a table
#: when it is a file, an image folder (kind ``imagefolder``) when it is a folder.
DATA_DEMOS: dict[str, DataDemo] = {
    "table": DataDemo(("label",), _table_scenario, options=("where",)),
    "imagefolder": DataDemo(("size",), _imagefolder_scenario, options=("group",), saliency=True),
}


@dataclass
class DemoResult:
    scenario: str
    experiment: str
    report: Path
    accuracy: analysis.AccuracyResult
    ranking: analysis.RankResult
    saliency: SaliencyResult | None = None

    def best_detection(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` metrics that best find the held-out digit, highest AUROC first: their
        rows of the detection table (empty when it has none)."""
        det = self.ranking.detection
        if det is None:
            return []
        return det.sort_values("auroc", ascending=False).head(n).to_dict(orient="records")

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "experiment": self.experiment,
            "report": str(self.report),
            "accuracy": self.accuracy.to_dict(),
            "detection": self.ranking.to_dict(top=10)["detection"],
            "saliency": None if self.saliency is None else str(self.saliency.path),
        }


def run_demo(
    config: Config,
    runs: int = DEMO_RUNS,
    step: Step | None = None,
    progress: training.Progress | None = None,
) -> DemoResult:
    """Prepare digits with digit 3 held out, train ``runs`` seeds of the small CNN, analyse,
    compute GradCAM of the top-ranked samples across seeds, write the report.

    Re-running reuses the prepared scenario and the finished runs.
    """
    from mlvar.analysis import service as analysis
    from mlvar.data import registry
    from mlvar.report.html import build_report
    from mlvar.saliency import saliency
    from mlvar.store import ExperimentStore
    from mlvar.train import service as training

    say = step or (lambda _msg: None)
    root = Path(config.paths.data_root)
    name = f"digits-holdout-sub{DEMO_SUBCLASS}-r1.0"
    say(f"preparing scenario {name}")
    if (root / name / "manifest.json").is_file():
        from mlvar.data.scenario import open_scenario

        scenario = open_scenario(root, name)
    else:
        scenario = registry.prepare(root, "digits", mode="holdout", subclass=DEMO_SUBCLASS)
    say(f"training {runs} seeds")
    trained = training.train(
        config,
        "digits",
        scenario=scenario.name,
        runs=runs,
        overrides={"model": DEMO_MODEL},
        progress=progress,
    )
    store = ExperimentStore.open(config.paths.runs_root, trained.experiment)
    say("analysing")
    acc = analysis.accuracy(store, "test")
    ranking = analysis.rank(store, "test")
    say("computing GradCAM across seeds")
    maps = saliency(store, root, "test", top=DEMO_TOP, seeds=min(runs, DEMO_SALIENCY_SEEDS))
    say("writing the report")
    report = build_report(
        store, Path(config.paths.reports_root) / trained.experiment, top=DEMO_TOP, data_root=root
    )
    return DemoResult(scenario.name, trained.experiment, report.path, acc, ranking, maps)


def demo_name(path: Path) -> str:
    """The dataset name ``mlvar demo --data PATH`` records ``path`` under: its stem in
    lower case, other characters than letters, digits and ``_`` as ``_`` (a leading digit
    gets ``d``), ``_data`` appended where that is a built-in name or kind."""
    from mlvar.data.registry import DATASETS, USER_KINDS

    stem = re.sub(r"[^a-z0-9_]", "_", path.stem.lower())[:35] or "data"
    stem = stem if stem[0].isalpha() else f"d{stem}"
    return f"{stem}_data" if stem in DATASETS or stem in USER_KINDS else stem


def run_data_demo(
    config: Config,
    data: str | Path,
    options: dict[str, Any],
    runs: int = DEMO_RUNS,
    step: Step | None = None,
    progress: training.Progress | None = None,
) -> DemoResult:
    """The pipeline on the user's data ``data`` (a table file or an image folder): record
    it under :func:`demo_name`, prepare the kind's demo scenario (:data:`DATA_DEMOS`),
    train ``runs`` seeds with the dataset's default model (an image folder: the small
    CNN), analyse, compute GradCAM across seeds (images), write the report.

    ``options`` are the demo's (``label``, ``where``, ``size``, ``group``; None: not
    given). Re-running reuses the recorded data, the prepared scenario and the finished
    runs.

    Raises
    ------
    MlvarError
        ``data`` is missing, an option its kind does not take, or what ``mlvar data fetch``
        and ``mlvar data prepare`` refuse.
    """
    from mlvar.analysis import service as analysis
    from mlvar.data import registry
    from mlvar.data.scenario import open_scenario
    from mlvar.errors import MlvarError
    from mlvar.report.html import build_report
    from mlvar.store import ExperimentStore
    from mlvar.train import service as training

    say = step or (lambda _msg: None)
    root = Path(config.paths.data_root)
    data = Path(data).expanduser()
    if not data.exists():
        raise MlvarError(f"--data {data} not found", "pass a table file or an image folder")
    kind = "imagefolder" if data.is_dir() else "table"
    demo = DATA_DEMOS[kind]
    name = demo_name(data)
    given = {key: value for key, value in options.items() if value is not None}
    for key in given:
        if key not in (*demo.fetch, *demo.options):
            takers = [k for k, d in DATA_DEMOS.items() if key in (*d.fetch, *d.options)]
            raise MlvarError(
                f"mlvar demo --{key} is for {' or '.join(takers) or 'no'} data, but {data} "
                f"is read as {kind}",
                f"drop --{key}",
            )
    say(f"recording {data} as {kind} '{name}'")
    registry.fetch(root, kind, source=data, name=name,
                   **{key: value for key, value in given.items() if key in demo.fetch})  # fmt: skip
    spec = registry.get_dataset(name, root)
    mode, scenario_options = demo.scenario(given, spec, root)
    variant, params = spec.check(mode, scenario_options)
    source = spec.open(root)
    params = params.resolve(source)
    scenario_name = spec.scenario_name(variant, params)
    say(f"preparing scenario {scenario_name}")
    if (root / scenario_name / "manifest.json").is_file():
        scenario = open_scenario(root, scenario_name)
    else:
        scenario = spec.build(source, variant, params, force=False)
    say(f"training {runs} seeds")
    trained = training.train(config, name, scenario=scenario.name, runs=runs, progress=progress)
    store = ExperimentStore.open(config.paths.runs_root, trained.experiment)
    say("analysing")
    acc = analysis.accuracy(store, "test")
    ranking = analysis.rank(store, "test")
    maps = None
    if demo.saliency:
        from mlvar.saliency import saliency

        say("computing GradCAM across seeds")
        maps = saliency(store, root, "test", top=DEMO_TOP, seeds=min(runs, DEMO_SALIENCY_SEEDS))
    say("writing the report")
    report = build_report(
        store, Path(config.paths.reports_root) / trained.experiment, top=DEMO_TOP, data_root=root
    )
    return DemoResult(scenario.name, trained.experiment, report.path, acc, ranking, maps)
