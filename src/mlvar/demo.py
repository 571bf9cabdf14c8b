"""The whole pipeline on scikit-learn's digits, offline: ``mlvar demo``.

Importing it loads nothing heavy (the CLI shows :data:`DEMO_RUNS` in its help): the
pipeline's modules are imported by :func:`run_demo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlvar.analysis import service as analysis
    from mlvar.analysis.saliency import SaliencyResult
    from mlvar.config import Config
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
