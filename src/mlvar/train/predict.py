"""``mlvar analyze predict``: evaluate an experiment's saved models on a split of a prepared
scenario and add the logits to every run, so that older experiments and other scenarios'
data serve as pools (docs/run-store.md, "Splits added by analyze predict").

:func:`plan_predict` checks a request without torch and without writing anything (the
experiment, the scenario and its split, that the inputs fit the models, that every run
to fill saved its weights, that the stored name does not clash); :func:`predict_split`
then registers the split (``samples/<NAME>.parquet`` and ``experiment.json``), and for
each run that lacks it, holding the run's lease, evaluates the run's ``model.pt`` the way
training evaluated its own splits (:func:`evaluate_run`) and adds ``<NAME>.logits.npy``
(:meth:`mlvar.store.ExperimentStore.add_run_logits`). A run that has it is skipped, so a
re-run fills only what is missing (runs trained since, or left by a kill).

torch is imported inside the functions: the CLI imports this module in its command only,
but a plan needs no torch at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data.scenario import Scenario, SplitData, experiment_scenario, open_scenario
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore, RunRecord, read_run
from mlvar.train.trained import WEIGHTS_FILE

#: ``experiment.json`` key: stored split name -> where its data comes from.
EXTERNAL_SPLITS = "external_splits"
DEFAULT_SPLIT = "val"
SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")

#: ``progress(done, total)`` in runs.
Progress = Callable[[int, int], None]


@dataclass
class PredictPlan:
    """A checked ``analyze predict`` request: what to evaluate, on what, stored as what."""

    store: ExperimentStore
    own: Scenario  # the experiment's scenario (its training split normalises images)
    scenario: Scenario  # where the data comes from
    split: str  # its split
    name: str  # the stored split name
    data: SplitData
    todo: list[RunRecord]  # complete runs that lack <name>.logits.npy
    have: list[str]  # complete runs that have it

    @property
    def external(self) -> bool:
        """Whether the stored split is not one of the experiment's own scenario under its
        own name (that scenario as the runs were trained on it: a scenario prepared
        again since is another scenario's data, recorded in ``external_splits``)."""
        trained_on = (self.store.meta.get("scenario") or {}).get("manifest_sha256")
        own = self.scenario.name == self.own.name and (self.scenario.manifest_sha256 == trained_on)
        return not (own and self.split == self.name)

    def source(self) -> dict[str, str]:
        """The ``external_splits`` entry of the stored split."""
        return {
            "scenario": self.scenario.name,
            "split": self.split,
            "manifest_sha256": self.scenario.manifest_sha256,
        }


@dataclass
class PredictResult:
    """What :func:`predict_split` did."""

    experiment: str
    split: str  # the stored name
    scenario: str
    source_split: str
    n_samples: int
    n_affected: int
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # had it already
    accuracy: dict[str, float] = field(default_factory=dict)  # run -> accuracy on the split
    registered: bool = False  # samples/<split>.parquet and experiment.json written now

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def parse_target(on: str) -> tuple[str, str]:
    """``SCENARIO[:SPLIT]`` as ``(scenario, split)``; the split defaults to ``val``."""
    scenario, _, split = on.partition(":")
    scenario, split = scenario.strip(), split.strip() or DEFAULT_SPLIT
    if not scenario:
        raise MlvarError(f"--on {on!r} names no scenario", "e.g. --on digits-holdout-sub3-r0.0:val")
    return scenario, split


def _check_name(name: str) -> str:
    if not SPLIT_NAME_RE.match(name):
        raise MlvarError(
            f"invalid split name '{name}'",
            "use letters, digits, '.', '_', '@' and '-', starting with a letter or digit",
        )
    return name


def _check_input(store: ExperimentStore, own: Scenario, target: Scenario) -> None:
    """Refuse a scenario whose inputs or classes the experiment's models cannot read."""
    checks = [
        (
            "inputs",
            store.meta.get("input") or own.manifest.get("input"),
            target.manifest.get("input"),
        ),
        ("classes", store.class_names, target.class_names),
        ("features", own.manifest.get("feature_names"), target.manifest.get("feature_names")),
    ]
    for what, mine, theirs in checks:
        if mine != theirs:
            raise MlvarError(
                f"scenario '{target.name}' does not fit experiment '{store.name}': its {what} "
                f"{theirs} are not the experiment's {mine}",
                "pick a scenario of the same dataset with the same classes and inputs",
            )


def _check_clash(plan: PredictPlan) -> None:
    """Refuse a stored name that holds other data than the plan's."""
    store, name = plan.store, plan.name
    if name not in store.splits:
        return
    recorded = (store.meta.get(EXTERNAL_SPLITS) or {}).get(name)
    if recorded is None:  # one of the experiment's own splits
        same = not plan.external
        origin = f"split '{name}' of its scenario '{plan.own.name}'"
    else:
        same = recorded == plan.source()
        origin = f"split '{recorded.get('split')}' of scenario '{recorded.get('scenario')}'"
        if recorded.get("scenario") == plan.scenario.name and not same:
            origin += " as it was prepared then"
    if not same:
        raise MlvarError(
            f"experiment '{store.name}' has a split '{name}' already, holding {origin}",
            "store this one under another name with --as NAME",
        )


def training_scenario(store: ExperimentStore, data_root: Path) -> Scenario:
    """The experiment's own prepared scenario (its inputs; its training split normalises
    images): :func:`~mlvar.data.scenario.experiment_scenario`, or, when the scenario was
    prepared again since (a newer mlvar added ``full_val``, so its manifest changed), the
    one of that name whose training split is still the runs' (the ids, labels, affected
    flags and groups of ``samples/train.parquet``)."""
    info = store.meta.get("scenario") or {}
    try:
        again = open_scenario(data_root, str(info.get("name") or ""))
    except MlvarError:
        again = None
    if (
        again is not None
        and again.manifest_sha256 != info.get("manifest_sha256")
        and "train" in store.splits
        and "train" in again.splits
    ):
        again.check_storage()
        train, table = again.load("train"), store.samples("train")
        columns = {"sample_id": train.id, "label": train.y, "affected": train.affected}
        columns["group"] = train.group
        if all(
            len(table) == len(v) and np.array_equal(table[c].to_numpy(), v)
            for c, v in columns.items()
        ):
            return again
    return experiment_scenario(data_root, store.name, store.meta)  # or its one-line error


def plan_predict(
    store: ExperimentStore, data_root: Path, on: str, as_name: str | None = None
) -> PredictPlan:
    """Check an ``analyze predict`` request (no torch, nothing written).

    Raises :class:`MlvarError` (one line) for an unknown scenario (nearest names), an
    unknown split of it (its splits listed), an experiment without its own prepared
    scenario, inputs or classes the models cannot read, a name that holds other data,
    an experiment without complete runs, and runs to fill that saved no ``model.pt``.
    """
    scenario_name, split = parse_target(on)
    own = training_scenario(store, Path(data_root))
    target = open_scenario(Path(data_root), scenario_name)
    if split not in target.splits:
        raise MlvarError(
            f"scenario '{target.name}' has no split '{split}'",
            "its splits: " + ", ".join(target.splits),
        )
    _check_input(store, own, target)
    if as_name is None:
        as_name = split if target.name == own.name else f"{split}@{target.name}"
    name = _check_name(as_name)
    runs = store.runs()
    if not runs:
        raise MlvarError(
            f"experiment '{store.name}' has no finished runs",
            f"train some with 'mlvar train {store.meta.get('dataset', 'DATASET')} --runs N'",
        )
    logits = f"{name}.logits.npy"
    todo = [r for r in runs if logits not in r.meta.get("arrays", {})]
    have = [r.run_id for r in runs if logits in r.meta.get("arrays", {})]
    lacking = [r.run_id for r in todo if WEIGHTS_FILE not in r.meta.get("arrays", {})]
    if lacking:
        shown = ", ".join(lacking[:5]) + (
            f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        )
        raise MlvarError(
            f"runs {shown} of '{store.name}' have no {WEIGHTS_FILE} to predict with",
            "retrain them with this mlvar (runs of earlier builds saved no MLP weights)",
        )
    target.check_storage()
    plan = PredictPlan(store, own, target, split, name, target.load(split), todo, have)
    _check_clash(plan)
    return plan


# ---------------------------------------------------------------------------- evaluation


def evaluate_run(
    store: ExperimentStore, own: Scenario, data: SplitData, run: RunRecord, device: str = "cpu"
) -> np.ndarray:
    """The logits ``[n, C]`` of ``run``'s saved model on ``data``, computed as training
    computed those of its own splits, in the experiment's ``logits_dtype``.

    The MLP: its inputs as training made them (:func:`mlvar.train.service.input_features`),
    the eval-mode network with one thread per kernel (the engines' evaluation), a sigmoid
    head's output as two-class logits (:func:`mlvar.train.mlp.two_class_logits`). Image
    models: the recipe's normalisation (fixed constants, or the statistics of the
    experiment's own training split, computed as training computes them), then
    :func:`mlvar.train.images.predict` with the recipe's test-time augmentation and
    precision.
    """
    import torch

    from mlvar.train import images
    from mlvar.train.mlp import TwoClassLogits, _one_thread_per_kernel, two_class_logits
    from mlvar.train.service import input_features
    from mlvar.train.trained import build_mlp, build_trained

    train = store.meta.get("train") or {}
    dtype = np.dtype(train.get("logits_dtype", "float32"))
    dev = torch.device(device)
    if store.meta.get("model", "mlp") == "mlp":
        x = torch.from_numpy(input_features(data.x, own.manifest)).to(dev)
        model = build_mlp(store, int(x.shape[1]), run).to(dev)
        with _one_thread_per_kernel(dev), torch.no_grad():
            if isinstance(model, TwoClassLogits):
                out = two_class_logits(model.mlp(x).float().cpu())
            else:
                out = model(x).float().cpu()
        return out.numpy().astype(dtype)
    recipe = train.get("recipe") or {}
    precision = str(recipe.get("precision", "bf16"))
    x = images.to_nchw(data.x)
    model = build_trained(str(store.meta["model"]), int(x.shape[1]), len(store.class_names), run)
    norm = _training_norm(own, dev, recipe.get("normalise"))
    with images._full_fp32(precision):
        out = images.predict(model.to(dev), norm, x.to(dev), int(recipe.get("tta", 0)), precision)
    return out.numpy().astype(dtype)


def _training_norm(own: Scenario, device: Any, normalise: dict[str, list[float]] | None) -> Any:
    """The ``ImageData`` whose normalisation training used: the recipe's constants, or the
    statistics of the experiment's training split (one thread per kernel, as training)."""
    from mlvar.train.images import ImageData
    from mlvar.train.mlp import _one_thread_per_kernel

    with _one_thread_per_kernel(device):
        return ImageData.build({"train": own.load("train")}, own.manifest, device, normalise)


# ---------------------------------------------------------------------------- the service


def predict_split(
    store: ExperimentStore,
    data_root: Path,
    on: str,
    as_name: str | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> PredictResult:
    """Add the split ``on`` (``SCENARIO[:SPLIT]``) to every complete run of ``store`` that
    lacks it, as ``as_name`` (default: the split's name for the experiment's own scenario,
    else ``<SPLIT>@<SCENARIO>``).

    Registers the split first (``samples/<NAME>.parquet``; ``experiment.json`` gains it in
    ``splits`` and, for another scenario's data, in ``external_splits``), then evaluates
    each run holding its lease (another process adding the same split waits, then finds
    it done). Runs that have the split are skipped. See :func:`plan_predict` for what is
    refused before anything is written.
    """
    plan = plan_predict(store, data_root, on, as_name)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MlvarError(
                "--device cuda was asked for, but CUDA is not available here", "use --device cpu"
            )
    data, name = plan.data, plan.name
    result = PredictResult(
        store.name,
        name,
        plan.scenario.name,
        plan.split,
        len(data),
        int(data.affected.sum()),
        skipped=list(plan.have),
    )
    if name not in store.splits:
        samples = {
            "sample_id": data.id,
            "label": data.y,
            "affected": data.affected,
            "group": data.group,
        }
        updates = {EXTERNAL_SPLITS: {name: plan.source()}} if plan.external else {}
        store.add_split(name, samples, updates)
        result.registered = True
    logits_file = f"{name}.logits.npy"
    for done, run in enumerate(plan.todo):
        with store.holding(run.run_id):
            current = read_run(run.path)
            if current is None or logits_file in current.meta.get("arrays", {}):
                result.skipped.append(run.run_id)  # another process added it meanwhile
            else:
                logits = evaluate_run(store, plan.own, data, current, device)
                acc = float((logits.argmax(axis=1) == data.y).mean())
                store.add_run_logits(run.run_id, name, logits, {f"{name}_accuracy": acc})
                result.added.append(run.run_id)
                result.accuracy[run.run_id] = acc
        if progress:
            progress(done + 1, len(plan.todo))
    result.skipped.sort()
    return result
