"""The whole pipeline on scikit-learn's digits, offline: ``mlvar demo``; or on your own
data: ``mlvar demo --data PATH``.

``--data`` dispatches on what PATH is (:func:`data_kind`): a folder is an image folder
(user kind ``imagefolder``), a file a table (``table``). The data is fetched as a user
dataset under a name derived from PATH (:func:`demo_name`, or ``--name``), one scenario is
prepared (:data:`USER_DEMOS`: an image folder's first group held out, or ``original``
when it has no groups; a table's smallest tree-leaf cluster held out), and it is trained,
analysed and reported like the digits demo. Re-running reuses the fetch, the scenario and
the finished runs.

Importing it loads nothing heavy (the CLI shows :data:`DEMO_RUNS` in its help): the
pipeline's modules are imported by :func:`run_demo`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlvar.errors import MlvarError

if TYPE_CHECKING:
    from mlvar.analysis import service as analysis
    from mlvar.analysis.saliency import SaliencyResult
    from mlvar.config import Config
    from mlvar.data.scenario import Scenario
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


@dataclass
class DemoResult:
    scenario: str
    experiment: str
    report: Path
    accuracy: analysis.AccuracyResult
    ranking: analysis.RankResult
    saliency: SaliencyResult | None = None
    #: What the affected test samples are, for the summary line ("the held-out 3s").
    affected: str = "held-out 3s"
    dataset: str = "digits"

    def best_detection(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` metrics that best find the held-out digit, highest AUROC first: their
        rows of the detection table (empty when it has none)."""
        det = self.ranking.detection
        if det is None:
            return []
        return det.sort_values("auroc", ascending=False).head(n).to_dict(orient="records")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "scenario": self.scenario,
            "experiment": self.experiment,
            "report": str(self.report),
            "accuracy": self.accuracy.to_dict(),
            "detection": self.ranking.to_dict(top=10)["detection"],
            "saliency": None if self.saliency is None else str(self.saliency.path),
        }


# --------------------------------------------------------------------------- your own data


@dataclass(frozen=True)
class UserDemo:
    """How ``mlvar demo --data`` runs on one user kind: the model it trains, whether GradCAM
    applies, and ``scenario(spec, data_root)``: the mode, options and a description of the
    affected samples of the scenario it prepares (from the fetched dataset's spec)."""

    model: str
    images: bool
    scenario: Callable[[Any, Path], tuple[str, dict[str, Any], str]]
    #: The demo's options this kind's fetch takes (``--size``, ``--label``), by name.
    fetch_options: tuple[str, ...] = field(default_factory=tuple)


def _imagefolder_scenario(spec: DatasetSpec, root: Path) -> tuple[str, dict[str, Any], str]:
    """The first group held out (of the sorted (class, group) folders), else ``original``."""
    source = spec.open(root)  # the record only: nothing is read until ``base``
    if source.group_names:
        group = source.group_names[0]
        return "holdout", {"group": group}, f"held-out group {group}"
    return "original", {}, "affected samples (none: the folder has no groups)"


def _table_scenario(spec: DatasetSpec, root: Path) -> tuple[str, dict[str, Any], str]:
    """The smallest tree-leaf cluster held out (COMPAS's holdout, on any table)."""
    return "cluster", {"cluster": 0}, "held-out cluster 0"


#: The hook of ``mlvar demo --data``: user kind -> how its demo runs. A kind without an
#: entry cannot be demonstrated.
USER_DEMOS: dict[str, UserDemo] = {
    "imagefolder": UserDemo("cnn", True, _imagefolder_scenario, ("size",)),
    "table": UserDemo("mlp", False, _table_scenario, ("label",)),
}


def data_kind(path: Path) -> str:
    """The user kind of ``path``: ``imagefolder`` for a folder, ``table`` for a file.

    Raises
    ------
    MlvarError
        ``path`` does not exist, or is neither a file nor a folder.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return "imagefolder"
    if path.is_file():
        return "table"
    if not path.exists():
        raise MlvarError(f"--data {path} does not exist", "give a folder of images or a table file")
    raise MlvarError(f"--data {path} is neither a file nor a folder", "give a folder or a file")


def demo_name(path: Path, taken: Collection[str] = ()) -> str:
    """The dataset name ``mlvar demo --data`` fetches ``path`` under: its stem in lower case,
    each run of other characters than letters and digits made one ``_``, prefixed ``d_``
    when it does not start with a letter, at most 35 characters, and ``_data`` appended
    when that is one of ``taken`` (the built-in datasets and kinds): ``My Photos`` ->
    ``my_photos``, ``2024-scans`` -> ``d_2024_scans``, ``digits`` -> ``digits_data``."""
    stem = Path(path).expanduser().resolve().stem.lower()
    name = re.sub(r"[^a-z0-9]+", "_", stem).strip("_") or "data"
    if not name[0].isalpha():
        name = f"d_{name}"
    name = name[:35].rstrip("_")
    return f"{name}_data" if name in taken else name


def _user_scenario(
    root: Path,
    data: Path,
    name: str | None,
    fetch_options: dict[str, Any],
    say: Step,
) -> tuple[DatasetSpec, UserDemo, Scenario, str]:
    """Fetch ``data`` as a user dataset and prepare its demo scenario (or reuse them)."""
    from mlvar.data import registry

    kind = data_kind(data)
    demo = USER_DEMOS[kind]
    given = {k: v for k, v in fetch_options.items() if v is not None}
    for option in given:
        if option not in demo.fetch_options:
            raise MlvarError(
                f"mlvar demo --{option} is for "
                + ", ".join(k for k, d in USER_DEMOS.items() if option in d.fetch_options)
                + f" data, but {data} is read as {kind}",
                f"drop --{option}",
            )
    name = name or demo_name(data, [*registry.DATASETS, *registry.USER_KINDS])
    say(f"fetching {data} as {kind} '{name}'")
    registry.fetch(root, kind, source=data, name=name, **given)
    spec = registry.get_dataset(name, root)
    mode, options, affected = demo.scenario(spec, root)
    return spec, demo, _prepared(root, spec, mode, options, say), affected


def _prepared(
    root: Path, spec: DatasetSpec, mode: str, options: dict[str, Any], say: Step
) -> Scenario:
    """The scenario of ``mode`` and ``options``: opened when prepared before, else prepared."""
    from mlvar.data.scenario import open_scenario

    variant, params = spec.check(mode, options)
    name = spec.scenario_name(variant, params.resolve(spec.open(root)))
    say(f"preparing scenario {name}")
    if (root / name / "manifest.json").is_file():
        return open_scenario(root, name)
    return spec.prepare(root, mode, options)


def run_demo(
    config: Config,
    runs: int = DEMO_RUNS,
    step: Step | None = None,
    progress: training.Progress | None = None,
    data: str | Path | None = None,
    name: str | None = None,
    fetch_options: dict[str, Any] | None = None,
) -> DemoResult:
    """Prepare digits with digit 3 held out (or, with ``data``, fetch your folder of images
    or table as user dataset ``name`` and prepare its demo scenario), train ``runs`` seeds
    of the small CNN (a table: the MLP), analyse, compute GradCAM of the top-ranked samples
    across seeds (images only), write the report.

    ``fetch_options`` are the kind's fetch options the demo passes on (an image folder's
    ``size``, a table's ``label``); None values are not given. Re-running reuses the fetch,
    the prepared scenario and the finished runs.

    Raises
    ------
    MlvarError
        ``data`` is missing or cannot be fetched or prepared (as ``mlvar data fetch`` and
        ``mlvar data prepare`` would refuse it), or an option its kind does not take.
    """
    from mlvar.analysis import service as analysis
    from mlvar.data import registry
    from mlvar.report.html import build_report
    from mlvar.saliency import saliency
    from mlvar.store import ExperimentStore
    from mlvar.train import service as training

    say = step or (lambda _msg: None)
    root = Path(config.paths.data_root)
    if data is None:
        dataset, model, images, affected = "digits", DEMO_MODEL, True, "held-out 3s"
        name = f"digits-holdout-sub{DEMO_SUBCLASS}-r1.0"
        say(f"preparing scenario {name}")
        if (root / name / "manifest.json").is_file():
            from mlvar.data.scenario import open_scenario

            scenario = open_scenario(root, name)
        else:
            scenario = registry.prepare(root, "digits", mode="holdout", subclass=DEMO_SUBCLASS)
    else:
        spec, demo, scenario, affected = _user_scenario(
            root, Path(data).expanduser(), name, fetch_options or {}, say
        )
        dataset, model, images = spec.name, demo.model, demo.images
    say(f"training {runs} seeds")
    trained = training.train(
        config,
        dataset,
        scenario=scenario.name,
        runs=runs,
        overrides={"model": model},
        progress=progress,
    )
    store = ExperimentStore.open(config.paths.runs_root, trained.experiment)
    say("analysing")
    acc = analysis.accuracy(store, "test")
    ranking = analysis.rank(store, "test")
    maps = None
    if images:
        say("computing GradCAM across seeds")
        maps = saliency(store, root, "test", top=DEMO_TOP, seeds=min(runs, DEMO_SALIENCY_SEEDS))
    say("writing the report")
    report = build_report(
        store, Path(config.paths.reports_root) / trained.experiment, top=DEMO_TOP, data_root=root
    )
    return DemoResult(
        scenario.name, trained.experiment, report.path, acc, ranking, maps, affected, dataset
    )
