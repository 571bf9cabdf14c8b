"""Time the ``batched`` and ``loop`` training engines on the real COMPAS data.

Prepares the COMPAS ``original`` scenario in a temporary folder, then times, in the same
process and interleaved repeat by repeat (timings on a shared machine drift, so the
engines are compared under the same conditions):

* ``batched``: all ``--seeds`` seeds in one pack;
* ``loop``: the first ``--loop-seeds`` seeds only, extrapolated linearly to ``--seeds``
  (the loop engine trains one seed after the other, so its time is proportional).

Prints the median over ``--repeat`` repeats and the mean test accuracy of each engine as a
sanity check. Not a pytest test: run it as ``python benchmarks/ensemble_speed.py``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlvar.config import TrainConfig, validate_train
from mlvar.data.compas import prepare_compas
from mlvar.train.mlp import ENGINES, TrainData
from mlvar.train.seeding import RunGenerators

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "compas-scores-two-years.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50, help="seeds in the ensemble")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per seed")
    parser.add_argument("--repeat", type=int, default=3, help="repeats; medians are shown")
    parser.add_argument(
        "--loop-seeds",
        type=int,
        default=5,
        help="seeds actually trained by the loop engine (extrapolated to --seeds)",
    )
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="the ProPublica CSV")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args(argv)


def load_compas(csv: Path, root: Path) -> tuple[TrainData, torch.Tensor, torch.Tensor]:
    """Training data and test features/labels of the prepared ``original`` scenario."""
    (root / "raw").mkdir(parents=True)
    shutil.copyfile(csv, root / "raw" / "compas-scores-two-years.csv")
    scenario = prepare_compas(root, "original")
    train, test = scenario.load("train"), scenario.load("test")
    data = TrainData(
        torch.as_tensor(train.x, dtype=torch.float32).reshape(len(train), -1),
        torch.as_tensor(train.y, dtype=torch.int64),
        len(scenario.class_names),
    )
    test_x = torch.as_tensor(test.x, dtype=torch.float32).reshape(len(test), -1)
    return data, test_x, torch.as_tensor(test.y, dtype=torch.int64)


def time_engine(engine: str, data: TrainData, cfg: TrainConfig, seeds: int, test_x, test_y):
    """Seconds to train ``seeds`` seeds, their test accuracies and test logits."""
    gens = [RunGenerators(cfg.base_seed, r, cfg.vary) for r in range(seeds)]
    if data.x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = ENGINES[engine](data, cfg, gens, {"test": test_x})
    if data.x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    accs = [(out["test"].argmax(1) == test_y.cpu()).float().mean().item() for out in outs]
    return seconds, accs, [out["test"] for out in outs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.csv.is_file():
        print(f"COMPAS CSV not found: {args.csv} (pass --csv)", file=sys.stderr)
        return 2
    cfg = validate_train(TrainConfig(epochs=args.epochs, device=args.device))
    device = torch.device(args.device)
    loop_seeds = min(args.loop_seeds, args.seeds)
    with tempfile.TemporaryDirectory(prefix="mlvar-bench-") as tmp:
        data, test_x, test_y = load_compas(args.csv, Path(tmp) / "data")
    data = TrainData(data.x.to(device), data.y.to(device), data.n_classes)
    test_x = test_x.to(device)
    print(
        f"COMPAS original: {len(data.y)} training rows, {data.x.shape[1]} features, "
        f"{args.seeds} seeds x {args.epochs} epochs, batch {cfg.batch_size}, "
        f"hidden {cfg.hidden}, dropout {cfg.dropout}; device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )

    # Warm-up (untimed): first calls pay for thread pools, allocator growth and lazy init.
    warm = validate_train(TrainConfig(epochs=1, device=args.device))
    for engine in ENGINES:
        time_engine(engine, data, warm, 2, test_x, test_y)

    times: dict[str, list[float]] = {"batched": [], "loop": []}
    accs: dict[str, list[float]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    for rep in range(args.repeat):
        for engine, seeds in (("batched", args.seeds), ("loop", loop_seeds)):
            seconds, accs[engine], logits[engine] = time_engine(
                engine, data, cfg, seeds, test_x, test_y
            )
            times[engine].append(seconds * args.seeds / seeds)  # for all seeds
            print(f"  repeat {rep + 1}: {engine:7s} {seconds:7.2f} s for {seeds} seeds")

    batched = statistics.median(times["batched"])
    loop = statistics.median(times["loop"])
    print()
    print(f"median of {args.repeat} repeats, {args.seeds} seeds x {args.epochs} epochs")
    print(f"{'engine':8s} {'s total':>9s} {'s/seed':>8s} {'test acc (mean over seeds)':>28s}")
    for engine, total in (("batched", batched), ("loop", loop)):
        acc = sum(accs[engine]) / len(accs[engine])
        note = f"  ({len(accs[engine])} seeds)"
        print(f"{engine:8s} {total:9.2f} {total / args.seeds:8.3f} {acc:28.4f}{note}")
    print(f"loop: {loop_seeds} seeds timed, extrapolated linearly to {args.seeds} seeds")
    print(f"batched is {loop / batched:.1f}x faster than loop")
    shared = range(loop_seeds)
    same_acc = sum(accs["batched"][i] for i in shared) / loop_seeds
    diff = max((logits["batched"][i] - logits["loop"][i]).abs().max().item() for i in shared)
    print(
        f"on the {loop_seeds} seeds both trained: batched test acc {same_acc:.4f}, "
        f"max |logit difference| batched vs loop {diff:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
