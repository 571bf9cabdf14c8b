"""Saliency shards as backend jobs: ``mlvar submit saliency EXPERIMENT --run-shards M``.

``mlvar analyze saliency EXP --run-shard j/m`` computes the attributions of block j of m
of the runs it explains (:func:`mlvar.analysis.saliency.saliency_shard`); here each of the
M blocks is one job of the kind :data:`SALIENCY`, a
:class:`mlvar.backends.shard_kind.ShardKind` like analysis shards:

- the plan (:func:`plan_saliency_jobs`): every check ``analyze saliency`` makes (split,
  metric, model, ``--layer``, weights, prepared scenario) plus ``1 <= M <= runs
  explained``, then one JSON spec per block (``kind: "saliency"``) with the ``meta.json``
  the shard must come back with (``expect``: the plan's fingerprint, the block's runs,
  method and layer);
- what a job reads (:meth:`SaliencyKind.inputs`): ``experiment.json``, ``samples/<split>.parquet``,
  the split's logits of every run the ranking uses, the ``model.pt`` of the block's runs
  only (each ``run.json`` listing what it needs), and the prepared scenario folder (its
  manifest sha256 is the experiment's);
- the worker (:func:`run_saliency_job`, run by ``python -m mlvar.backends.worker SPEC.json
  --experiment-dir DIR --out OUT --data-root DATA`` or ``--scenario-dir DIR``): it calls
  ``saliency_shard(..., out=OUT/r<j>of<m>)``;
- landing: as analysis shards, into ``analysis/saliency-shards/<split>/r<j>of<m>/``
  (temporary folder beside, sha256 and plan checked, rename); once all are present
  :mod:`mlvar.backends.service` merges them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlvar import __version__
from mlvar.analysis import saliency
from mlvar.analysis.metrics import DYNAMICS_METRICS
from mlvar.backends import faults, shard_kind
from mlvar.backends.kind import JobText, Log, named
from mlvar.backends.shard_kind import ShardKind
from mlvar.backends.spec import SPEC_FORMAT, Job, Submission
from mlvar.errors import MlvarError
from mlvar.io import sha256_file
from mlvar.store import DYNAMICS_FILE, ExperimentStore, RunRecord

KIND = "saliency"
#: The meta.json keys a landed saliency shard must share with its plan.
EXPECT_KEYS = (
    "kind",
    "experiment",
    "shard",
    "block_run_ids",
    "method",
    "layer",
    "split",
    "by",
    "top",
    "seed",
    "seeds",
    "model",
    "run_ids",
    "sample_ids",
)


@dataclass
class SaliencyJobPlan:
    """M run blocks of one saliency computation of an experiment."""

    experiment: str
    split: str
    run_shards: int  # M
    options: dict[str, Any]  # top, seeds, by, layer (as given), seed, batch_size
    scenario: Any  # the prepared scenario (mlvar.data.scenario.Scenario)
    experiment_sha256: str
    ranked_run_ids: list[str]  # every verified run: the ranking reads their logits
    run_ids: list[str]  # the runs explained (the first --seeds)
    dynamics: bool  # the ranking metric needs train.dynamics.npy
    method: str
    layer: str  # the layer the maps are taken at ("input" for the MLP)
    fingerprint: dict[str, Any]  # what every shard explains

    flags = "--run-shards"

    @property
    def kind(self) -> ShardKind:
        return SALIENCY

    @property
    def sharding(self) -> str:
        return f"{self.run_shards} run block(s)"

    def name(self, j: int) -> str:
        return saliency.shard_name(j, self.run_shards)

    def block(self, j: int) -> list[str]:
        return [
            self.run_ids[i] for i in saliency.block_range(j, self.run_shards, len(self.run_ids))
        ]

    def expected(self, j: int) -> dict[str, Any]:
        """The ``meta.json`` values (:data:`EXPECT_KEYS`) of block ``j``'s shard."""
        return {
            "kind": KIND,
            "experiment": self.experiment,
            "shard": [j, self.run_shards],
            "block_run_ids": self.block(j),
            "method": self.method,
            "layer": self.layer,
            **self.fingerprint,
        }

    def expects(self) -> dict[str, dict[str, Any]]:
        return {self.name(j): self.expected(j) for j in range(1, self.run_shards + 1)}

    def spec(self, j: int, submission: str) -> dict[str, Any]:
        """The JSON spec of block ``j`` (what a worker reads)."""
        return {
            "format": SPEC_FORMAT,
            "kind": KIND,
            "mlvar_version": __version__,
            "submission": submission,
            "job": self.name(j),
            "index": j - 1,
            "experiment": self.experiment,
            "experiment_sha256": self.experiment_sha256,
            "scenario": self.scenario.name,
            "scenario_manifest_sha256": self.scenario.manifest_sha256,
            "split": self.split,
            "run_shard": [j, self.run_shards],
            "options": dict(self.options),
            "ranked_run_ids": list(self.ranked_run_ids),
            "dynamics": self.dynamics,
            "expect": self.expected(j),
        }

    def job(self, j: int) -> Job:
        block = self.block(j)
        shard = {"runs": f"{j}/{self.run_shards}", "run_ids": [block[0], block[-1]]}
        return Job(name=self.name(j), kind=KIND, shard=shard)

    def jobs(self, submission: str) -> list[tuple[Job, dict[str, Any]]]:
        return [(self.job(j), self.spec(j, submission)) for j in range(1, self.run_shards + 1)]


def plan_saliency_jobs(
    store: ExperimentStore,
    data_root: Path,
    run_shards: int = 1,
    split: str = "test",
    top: int = saliency.TOP_DEFAULT,
    seeds: int = saliency.SEEDS_DEFAULT,
    by: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = saliency.BATCH_DEFAULT,
) -> SaliencyJobPlan:
    """Check everything ``analyze saliency`` checks and plan ``run_shards`` jobs.

    Raises :class:`MlvarError` for bad arguments (an unknown split or metric, ``--layer``
    for an MLP or a layer the model lacks), runs without ``model.pt``, a missing or changed
    prepared scenario, or ``run_shards`` out of ``1 ..`` runs explained. Writes nothing.
    """
    if run_shards < 1:
        raise MlvarError(
            f"--run-shards must be at least 1, got {run_shards}", "e.g. --run-shards 4"
        )
    plan = saliency.plan_saliency(store, data_root, split, top, seeds, by, layer, seed, batch_size)
    n = len(plan.runs)
    if run_shards > n:
        raise MlvarError(
            f"cannot split the {n} runs explained (--seeds {seeds}) into {run_shards} blocks "
            f"(--run-shards {run_shards})",
            f"use --run-shards with at most {n}",
        )
    method, layer_name = saliency.resolve_layer(plan, layer)
    options = {"top": top, "seeds": seeds, "by": plan.by, "layer": layer, "seed": seed}
    return SaliencyJobPlan(
        experiment=store.name,
        split=split,
        run_shards=run_shards,
        options=dict(options, batch_size=batch_size),
        scenario=plan.scenario,
        experiment_sha256=sha256_file(store.root / "experiment.json"),
        ranked_run_ids=list(plan.ranked_run_ids),
        run_ids=[r.run_id for r in plan.runs],
        dynamics=split == "train" and plan.by in DYNAMICS_METRICS,
        method=method,
        layer=layer_name,
        fingerprint=plan.fingerprint(),
    )


# ------------------------------------------------------------------ what a job reads


class JobInput(ExperimentStore):
    """An experiment folder as a saliency job reads it: only the runs it was planned on
    (``run_ids``). A shipped copy holds the ``model.pt`` of its block's runs only (the
    others are listed in ``run.json`` but not needed), so a missing ``model.pt`` is no
    error; any other listed file must be there and match its sha256."""

    def __init__(self, root: Path, meta: dict[str, Any], run_ids: list[str]) -> None:
        super().__init__(root, meta)
        self.run_ids = list(run_ids)

    def runs(self, verify: bool = False) -> list[RunRecord]:
        found = [r for r in super().runs() if r.run_id in self.run_ids]
        lacking = sorted(set(self.run_ids) - {r.run_id for r in found})
        if lacking:
            raise MlvarError(
                f"{self.root} lacks run(s) {', '.join(lacking)} the job was planned on",
                "give the job the inputs it was submitted with",
            )
        for run in found if verify else []:
            bad = [n for n in run.verify() if n != saliency.WEIGHTS_FILE or (run.path / n).exists()]
            if bad:
                raise MlvarError(
                    f"run {run.run_id} in {self.root}: {', '.join(bad)} missing or not "
                    "matching its sha256",
                    "give the job the inputs it was submitted with",
                )
        return found


# ------------------------------------------------------------------ the worker


def run_saliency_job(
    spec: dict[str, Any],
    experiment_dir: Path,
    out: Path,
    data_root: Path | None,
    log: Log = print,
) -> Path:
    """Compute the saliency shard ``spec`` from ``experiment_dir`` (the store's folder or a
    job's input) and the prepared scenario in ``data_root`` into ``out/r<j>of<m>/``.

    Raises :class:`MlvarError` when the experiment or the scenario is not the one the spec
    was planned on, or a run is missing or fails its sha256.
    """
    meta = shard_kind.check_job_input(spec, experiment_dir, KIND)
    if data_root is None:
        raise MlvarError(
            "a saliency job needs the prepared scenario", "pass --data-root or --scenario-dir"
        )
    target = {spec["index"]: f"shard {spec['job']}"}
    faults.before_work(spec, target)

    def progress(done: int, total: int) -> None:
        log(f"[{time.strftime('%H:%M:%S')}] {spec['job']}: {done}/{total} runs", flush=True)
        faults.during_work(spec, target, log)

    opts = spec["options"]
    with named(Path(experiment_dir), spec["experiment"]) as root:
        part = saliency.saliency_shard(
            JobInput(root, meta, spec["ranked_run_ids"]),
            Path(data_root),
            tuple(spec["run_shard"]),
            spec["split"],
            top=opts["top"],
            seeds=opts["seeds"],
            by=opts["by"],
            layer=opts["layer"],
            seed=opts["seed"],
            batch_size=opts["batch_size"],
            progress=progress,
            out=Path(out) / spec["job"],
        )
    log(f"wrote saliency shard {spec['job']}: runs {', '.join(part.run_ids)}", flush=True)
    return part.path


class SaliencyKind(ShardKind):
    """One run block of ``analyze saliency``; reads the prepared scenario too."""

    name = KIND
    keys = EXPECT_KEYS
    reads_scenario = True

    def verify(self, folder: Path) -> tuple[dict[str, Any] | None, str]:
        return saliency.verify_saliency_shard(folder)

    def recognises(self, meta: dict[str, Any]) -> bool:
        return meta.get("kind") == KIND

    def root(self, store: ExperimentStore, split: str) -> Path:
        return saliency.shards_folder(store, split)

    def place(self, store: ExperimentStore, meta: dict[str, Any]) -> tuple[Path | None, str]:
        """``analysis/saliency-shards/<split>/r<j>of<m>/``."""
        why = shard_kind.store_mismatch(store, meta)
        if why:
            return None, why
        try:
            j, m = (int(v) for v in meta["shard"])
        except (KeyError, TypeError, ValueError):
            return None, "meta.json names no shard"
        if not 1 <= j <= m:
            return None, f"meta.json names block {j} of {m}"
        return saliency.shards_folder(store, meta["split"]) / saliency.shard_name(j, m), ""

    def inputs(self, store: ExperimentStore, spec: dict[str, Any]) -> dict[str, Path | bytes]:
        """``experiment.json``, ``samples/<split>.parquet`` and, of every run the ranking
        uses, the split's logits (``train.dynamics.npy`` when the ranking metric needs
        them) and a ``run.json`` listing those and ``model.pt``, whose file is shipped for
        the runs of the job's block only. The prepared scenario goes separately."""
        split = spec["split"]
        block = set(spec["expect"]["block_run_ids"])
        listed = {f"{split}.logits.npy", saliency.WEIGHTS_FILE}
        listed |= {DYNAMICS_FILE} if spec["dynamics"] else set()
        files = shard_kind.experiment_files(store, split)
        for run_id in spec["ranked_run_ids"]:
            shipped = listed if run_id in block else listed - {saliency.WEIGHTS_FILE}
            files.update(shard_kind.run_files(store, run_id, listed, shipped))
        return files

    def describe(self, sub: Submission, spec: dict[str, Any]) -> JobText:
        name = spec["job"]
        j, m = spec["run_shard"]
        opts, block = spec["options"], spec["expect"]["block_run_ids"]
        layer = f" --layer {opts['layer']}" if opts.get("layer") else ""
        runs = block[0] if len(block) == 1 else f"{block[0]}..{block[-1]}"
        return JobText(
            title=f"{sub.experiment} saliency {name}",
            description=(
                f"mlvar: analyze saliency {sub.experiment} --split {spec['split']} --run-shard "
                f"{j}/{m} --top {opts['top']} --seeds {opts['seeds']} --by {opts['by']}{layer} "
                f"--seed {opts['seed']} (runs {runs})"
            ),
            labels=shard_kind.shard_labels(sub, spec),
        )

    def compute(self, spec: dict, exp: Path, out: Path, data: Path | None, log: Log) -> Path:
        return run_saliency_job(spec, exp, out, data, log)


SALIENCY = SaliencyKind()
