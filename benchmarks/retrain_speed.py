"""Time ``mlvar retrain`` (continuing each run from its saved weights) against retraining
the same runs from scratch (``--from-scratch``), end to end, in the same process.

The case of issue #14's acceptance: digits with one subclass held out (``--subclass 3``,
ratio 1.0), ``--runs`` CNN seeds, pool ``full_val``, the strategies ``random,
maxconf_std, maxconf_mean, neg_maxconf`` at the default budgets (0, 0.1, 0.2, 0.5, 1.0),
so ``1 + 4 x 4 = 17`` sets of ``--runs`` runs each. Steps, in a temporary folder:

1. prepare the scenario and train the runs (timed: the cost of the original training);
2. copy the experiment, so the two arms start from the same stored runs;
3. ``retrain`` (continuation, the recipe's continuation length) on one copy;
4. ``retrain --from-scratch`` (the recipe's full epochs from each run's seed, on the same
   enlarged training sets) on the other.

Prints the seconds of each step, the ratio continuation / from scratch (the target: at most
0.5) and the mean held-out and other gains of each arm at budget 0.1 as a sanity check.
Not a pytest test: run it as ``python benchmarks/retrain_speed.py`` (``--runs 4`` for a
quick look).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mlvar.config import Config, PathsConfig
from mlvar.data.registry import prepare
from mlvar.retrain.service import retrain
from mlvar.train.service import train

STRATEGIES = "random,maxconf_std,maxconf_mean,neg_maxconf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=16, help="CNN seeds (default 16)")
    parser.add_argument("--by", default=STRATEGIES, help="strategies (default: the issue's 4)")
    parser.add_argument("--budget", default=None, help="budgets (default: 0,0.1,0.2,0.5,1)")
    parser.add_argument("--model", default="cnn", help="the model (default cnn)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="work in this (new) folder and keep it (data/, continue/, scratch/ runs roots)",
    )
    return parser.parse_args(argv)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _gains_at(result, budget: float) -> dict[str, tuple[float, float]]:
    gains = result.gains
    rows = gains[gains["budget"] == budget]
    return {
        r["strategy"]: (r["gain_affected_mean"], r["gain_unaffected_mean"])
        for r in rows.to_dict(orient="records")
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budgets = {} if args.budget is None else {"budgets": args.budget}
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="mlvar-retrain-bench-") as tmp:
        root = Path(tmp) if args.keep is None else args.keep
        arms = {}
        for arm in ("continue", "scratch"):
            arms[arm] = Config(paths=PathsConfig(root / "data", root / arm, root / "reports"))
        prepare(root / "data", "digits", mode="holdout", subclass=3)
        trained, t_train = _timed(
            train,
            arms["continue"],
            "digits",
            runs=args.runs,
            overrides={"model": args.model},
        )
        shutil.copytree(root / "continue", root / "scratch")
        cont, t_cont = _timed(
            retrain, trained.experiment, arms["continue"], strategies=args.by, **budgets
        )
        scratch, t_scratch = _timed(
            retrain,
            trained.experiment,
            arms["scratch"],
            strategies=args.by,
            from_scratch=True,
            **budgets,
        )
    n_sets = len(cont.sets)
    ratio = t_cont / t_scratch
    table = {
        "experiment": trained.experiment,
        "runs": args.runs,
        "sets": n_sets,
        "continuations": n_sets * args.runs,
        "train_s": round(t_train, 1),
        "continue_s": round(t_cont, 1),
        "from_scratch_s": round(t_scratch, 1),
        "continue_over_scratch": round(ratio, 3),
        "continue_epochs": cont.sets[0]["epochs"],
        "scratch_epochs": scratch.sets[0]["epochs"],
        "engine": cont.sets[0]["engine"],
        "target_met": ratio <= 0.5,
    }
    print(
        f"digits holdout sub3, {args.runs} {args.model} seeds, {n_sets} sets, "
        f"engine {table['engine']}"
    )
    print(f"  train the runs:        {t_train:8.1f} s")
    print(f"  retrain (continue):    {t_cont:8.1f} s  ({table['continue_epochs']} epochs a run)")
    print(f"  retrain --from-scratch:{t_scratch:8.1f} s  ({table['scratch_epochs']} epochs a run)")
    verdict = "met" if ratio <= 0.5 else "missed"
    print(f"  continue / scratch:    {ratio:8.3f}  (target <= 0.5: {verdict})")
    print("  mean gain at budget 0.1 (held-out, other):")
    c, s = _gains_at(cont, 0.1), _gains_at(scratch, 0.1)
    for strategy in c:
        print(
            f"    {strategy:14s} continue {c[strategy][0]:+.3f} {c[strategy][1]:+.3f}"
            f"   scratch {s.get(strategy, (float('nan'),) * 2)[0]:+.3f}"
            f" {s.get(strategy, (float('nan'),) * 2)[1]:+.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
