"""Run one job of ``mlvar submit``: ``python -m mlvar.backends.worker SPEC.json ...``.

The worker is the unit a backend runs where it has no Python process of its own (a local
worker subprocess, an Azure ML command job). It reads the spec, finds its kind in
:mod:`mlvar.backends.kinds` and runs it (:meth:`mlvar.backends.kind.JobKind.run`):

``train`` (a pack of runs, :mod:`mlvar.backends.train_jobs`): train them into the runs
root ``--runs-root OUT`` (itself a run store: ``<experiment>/experiment.json``,
``samples/``, ``runs/<id>/``), reading the prepared scenario.

``analysis`` (one shard of ``mlvar analyze rank``, :mod:`mlvar.backends.shard_jobs`):
compute it from an experiment folder into ``OUT/<shard>/`` (``meta.json`` last, listing
the sha256 of every file).

``saliency`` (one run block of ``mlvar analyze saliency``,
:mod:`mlvar.backends.saliency_jobs`): the same, reading the prepared scenario too, into
``OUT/r<j>of<m>/``.

``retrain`` (one retraining set x a pack of runs, :mod:`mlvar.backends.retrain_jobs`):
continue the runs of an experiment folder from their weights into ``OUT/<set>/`` (a run
store), reading the prepared scenario.

Usage::

    python -m mlvar.backends.worker SPEC.json --runs-root OUT --data-root DATA
    python -m mlvar.backends.worker SPEC.json --runs-root OUT --scenario-dir DIR \\
        [--array-file FILE ...]
    python -m mlvar.backends.worker SHARD.json --experiment-dir EXP --out OUT
    python -m mlvar.backends.worker SALIENCY.json --experiment-dir EXP --out OUT \\
        (--data-root DATA | --scenario-dir DIR)
    python -m mlvar.backends.worker RETRAIN.json --experiment-dir EXP --out OUT \\
        (--data-root DATA | --scenario-dir DIR)

``--scenario-dir`` names the prepared scenario folder itself (an Azure ML input mount;
repeated for a study's job that trains several experiments, one per scenario, in the order
of the spec's ``parts``); each ``--array-file`` a shared array they read
(docs/datasets.md), mounted too.
Exit codes: 0 the job is complete, 2 bad input, 1 a failure (with its traceback).
Test fault injection: :mod:`mlvar.backends.faults`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlvar.backends.kind import scenario_root
from mlvar.backends.kinds import kind_of, read_spec
from mlvar.errors import ExitCode, MlvarError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlvar.backends.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", type=Path, help="the job's JSON spec (a pack or a shard)")
    parser.add_argument("--runs-root", type=Path, help="train: output runs root")
    parser.add_argument(
        "--data-root", type=Path, help="train, saliency, retrain: a data root holding the scenario"
    )
    parser.add_argument(
        "--scenario-dir",
        type=Path,
        action="append",
        default=[],
        help="train, saliency, retrain: the prepared scenario folder itself (a study's job: "
        "one per scenario, in the order of its spec's parts)",
    )
    parser.add_argument(
        "--array-file",
        type=Path,
        action="append",
        default=[],
        help="with --scenario-dir: a shared array the scenario reads (repeated)",
    )
    parser.add_argument(
        "--experiment-dir",
        type=Path,
        help="analysis, saliency, retrain: the experiment folder to read",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="analysis, saliency, retrain: output folder (gets <shard>/ or <set>/)",
    )
    args = parser.parse_args(argv)
    try:
        spec = read_spec(args.spec)
        kind = kind_of(spec)
        out = getattr(args, kind.out_flag.lstrip("-").replace("-", "_"))
        if out is None:
            raise MlvarError(f"a {kind.name} spec needs {kind.out_flag}", "see --help")
        names = [str(part.get("scenario", "")) for part in spec.get("parts", [spec])]
        with scenario_root(
            args.data_root, args.scenario_dir, list(dict.fromkeys(names)), args.array_file
        ) as data:
            kind.run(spec, out, args.experiment_dir, data)
    except MlvarError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
