"""Training speed of the image models: images per second and seconds per epoch, one model
at a time against several seeds at once.

CPU (default)::

    python benchmarks/train_speed.py                      # every model, 2 seeds, small data
    python benchmarks/train_speed.py --models cnn --seeds 4 --n-train 1150

For each model it trains ``--seeds`` seeds of ``--epochs`` epochs on synthetic data of the
model's usual shape (cnn: 8x8x1 like digits; airbench, resnet18: 32x32x3 like CIFAR),
first one after the other in this process (all threads), then in ``--procs`` processes at
once (threads split between them), and prints both with their ratio.

Scheduling of ``mlvar train`` itself (CPU)::

    python benchmarks/train_speed.py --api --models cnn --seeds 8 --epochs 2 --rounds 2

times ``images.train_runs`` (what ``mlvar train`` calls: training, writing the runs,
worker start-up included) on ``--seeds`` pending runs, three ways interleaved in rounds
so that load from other work on the machine hits them alike: ``before`` (one run after
the other with torch's default threads, the code before worker processes: the
one-thread-per-kernel guard replaced by a no-op), ``workers=1`` (one after the other, one
thread) and ``auto`` (``workers = 0``: one process per core, the default).

Fused engine against worker processes on digits (CPU)::

    python benchmarks/train_speed.py --cpu-fused                 # 16 seeds, 2 rounds
    python benchmarks/train_speed.py --cpu-fused --seeds 16 --rounds 3 --pack-sizes 16,8

trains the demo's experiment (``mlvar demo``: the CNN on digits, holdout of subclass 3,
the cnn recipe) through ``mlvar train``'s service in this process, ``--seeds`` runs per
variant, rounds interleaved: ``single`` (today's engine: worker processes, one per core,
the baseline) and ``fused`` with each of ``--pack-sizes`` (0: the automatic pack). It
prints seconds, the ratio against the baseline timed in the same run, and the test
accuracy's mean and std over the seeds of each variant.

CUDA::

    python benchmarks/train_speed.py --device cuda --seeds 4 --epochs 10

runs ``--seeds`` seeds of the airbench-style network on full-size synthetic CIFAR-10
(50,000 train and 10,000 test images), one at a time and then as concurrent processes
sharing the GPU, and reports seconds per seed and the ratio. Synthetic data train at the
real speed (the accuracy is meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlvar.config import TrainConfig, switch_model
from mlvar.data.scenario import Scenario, SplitData
from mlvar.store import ExperimentStore
from mlvar.train import images
from mlvar.train.seeding import RunGenerators

SHAPES = {"cnn": (8, 8, 1, 16), "airbench": (32, 32, 3, 255), "resnet18": (32, 32, 3, 255)}


def _split(n: int, shape: tuple[int, int, int, int], seed: int) -> SplitData:
    h, w, c, top = shape
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int64)
    return SplitData(
        x=rng.integers(0, top + 1, (n, h, w, c)).astype(np.uint8),
        y=y,
        id=np.arange(n, dtype=np.int64),
        affected=np.zeros(n, dtype=bool),
        group=np.full(n, -1, dtype=np.int64),
    )


def _train_seeds(job: dict) -> dict:
    """Train seeds ``job['seeds']`` one after the other; return the training seconds."""
    torch.set_num_threads(job["threads"])
    shape = SHAPES[job["model"]]
    splits = {
        "train": _split(job["n_train"], shape, 0),
        "test": _split(job["n_test"], shape, 1),
    }
    manifest = {"class_names": [str(i) for i in range(10)], "input": {"max_value": shape[3]}}
    device = torch.device(job["device"])
    data = images.ImageData.build(splits, manifest, device)
    cfg = TrainConfig()
    switch_model(cfg, job["model"])
    cfg.epochs, cfg.device = job["epochs"], job["device"]
    if job.get("batch_size"):
        cfg.batch_size = job["batch_size"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for seed in job["seeds"]:
        images.train_run(data, cfg, RunGenerators(0, seed, cfg.vary))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "seeds": len(job["seeds"])}


def _warm(_: int) -> int:
    return torch.get_num_threads()


def measure(model: str, args: argparse.Namespace) -> dict:
    threads = args.threads or torch.get_num_threads()
    base = {
        "model": model,
        "n_train": args.n_train if model != "cnn" or args.n_train_given else 1150,
        "n_test": args.n_test,
        "epochs": args.epochs,
        "device": args.device,
        "batch_size": args.batch_size,
    }
    seeds = list(range(args.seeds))
    # Warm-up (kernels, allocator), not timed.
    _train_seeds({**base, "seeds": [0], "epochs": 1, "threads": threads})
    seq = _train_seeds({**base, "seeds": seeds, "threads": threads})
    procs = min(args.procs, len(seeds))
    per_proc = max(1, threads // procs) if args.device == "cpu" else threads
    chunks = [seeds[i::procs] for i in range(procs)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pool.map(_warm, range(procs))
        t0 = time.perf_counter()
        pool.map(_train_seeds, [{**base, "seeds": c, "threads": per_proc} for c in chunks])
        par_s = time.perf_counter() - t0
    n_images = base["n_train"] * args.epochs * len(seeds)
    out = {
        "model": model,
        "device": args.device,
        "seeds": len(seeds),
        "epochs": args.epochs,
        "n_train": base["n_train"],
        "one_at_a_time": {
            "seconds_per_seed": seq["seconds"] / len(seeds),
            "seconds_per_epoch": seq["seconds"] / len(seeds) / args.epochs,
            "images_per_s": n_images / seq["seconds"],
            "threads": threads,
        },
        "parallel": {
            "processes": procs,
            "threads_each": per_proc,
            "seconds_per_seed": par_s / len(seeds),
            "seconds_per_epoch": par_s / len(seeds) / args.epochs,
            "images_per_s": n_images / par_s,
        },
    }
    out["speedup_parallel"] = seq["seconds"] / par_s
    return out


def _api_once(model: str, args: argparse.Namespace, variant: str, root: Path) -> float:
    """Seconds of one ``images.train_runs`` call on ``args.seeds`` fresh runs."""
    shape = SHAPES[model]
    n_train = args.n_train if model != "cnn" or args.n_train_given else 1150
    splits = {"train": _split(n_train, shape, 0), "test": _split(args.n_test, shape, 1)}
    manifest = {"class_names": [str(i) for i in range(10)], "input": {"max_value": shape[3]}}
    samples = {
        s: {"sample_id": d.id, "label": d.y, "affected": d.affected, "group": d.group}
        for s, d in splits.items()
    }
    store = ExperimentStore.create(
        root, f"bench-{variant.replace('=', '')}-{time.time_ns()}", manifest, samples
    )
    cfg = TrainConfig()
    switch_model(cfg, model)
    cfg.epochs, cfg.device = args.epochs, "cpu"
    cfg.workers = 0 if variant == "auto" else 1
    if args.batch_size:
        cfg.batch_size = args.batch_size
    scenario = Scenario("bench", root, manifest)
    guard = images._one_thread_per_kernel
    if variant == "before":  # the code before: kernels on torch's default threads
        images._one_thread_per_kernel = lambda _device: contextlib.nullcontext()
    try:
        t0 = time.perf_counter()
        runs = list(images.train_runs(store, scenario, splits, cfg, list(range(args.seeds)), {}))
        seconds = time.perf_counter() - t0
    finally:
        images._one_thread_per_kernel = guard
    assert len(runs) == args.seeds
    return seconds


def measure_api(model: str, args: argparse.Namespace) -> dict:
    variants = ["before", "workers=1", "auto"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _api_once(model, argparse.Namespace(**{**vars(args), "seeds": 1}), "workers=1", root)
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                times[v].append(_api_once(model, args, v, root))
    n_train = args.n_train if model != "cnn" or args.n_train_given else 1150
    out = {
        "model": model,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "n_train": n_train,
        "threads": torch.get_num_threads(),
        "auto_workers": min(torch.get_num_threads() or os.cpu_count() or 1, args.seeds),
        "seconds": times,
        "median_s": {v: statistics.median(t) for v, t in times.items()},
    }
    med = out["median_s"]
    out["speedup_auto_vs_before"] = med["before"] / med["auto"]
    out["speedup_auto_vs_workers1"] = med["workers=1"] / med["auto"]
    return out


def main_api(args: argparse.Namespace, models: list[str]) -> None:
    results = [measure_api(m, args) for m in models]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"device: CPU, {os.cpu_count()} cores; torch {torch.__version__}")
    for r in results:
        print(
            f"{r['model']}: {r['seeds']} runs x {r['epochs']} epochs, {r['n_train']} train "
            f"images; auto = {r['auto_workers']} processes x 1 thread"
        )
        for v, ts in r["seconds"].items():
            each = " ".join(f"{t:.1f}" for t in ts)
            print(f"  {v:<10} median {r['median_s'][v]:7.1f} s  (rounds: {each})")
        print(
            f"  auto vs before: {r['speedup_auto_vs_before']:.2f}x, "
            f"auto vs workers=1: {r['speedup_auto_vs_workers1']:.2f}x"
        )


def _train_digits(config, scenario: str, variant: str, seeds: int, name: str) -> dict:
    """One ``mlvar train`` of the demo's experiment with ``variant``: its seconds and
    per-run test accuracies."""
    from mlvar.train.service import train

    over: dict = {"model": "cnn", "workers": 0}
    if variant == "single":
        over["engine"] = "single"
    else:
        over["engine"], over["pack_size"] = "fused", int(variant.split("=")[1])
    t0 = time.perf_counter()
    result = train(config, "digits", scenario=scenario, runs=seeds, name=name, overrides=over)
    seconds = time.perf_counter() - t0
    assert len(result.trained) == seeds and result.engine == over["engine"]
    return {"seconds": seconds, "test": [result.accuracy[r]["test"] for r in result.trained]}


def measure_cpu_fused(args: argparse.Namespace) -> dict:
    """``--cpu-fused``: the fused engine against worker processes on digits (CPU)."""
    from mlvar.config import Config, PathsConfig
    from mlvar.data import registry

    variants = ["single"] + [f"fused pack={p}" for p in args.pack_sizes.split(",")]
    times: dict[str, list[float]] = {v: [] for v in variants}
    accs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
        scenario = registry.prepare(root / "data", "digits", mode="holdout", subclass=3).name
        _train_digits(config, scenario, variants[-1], 2, "warm-up")  # imports, kernels
        for r in range(args.rounds):
            for i, v in enumerate(variants if r % 2 == 0 else variants[::-1]):
                out = _train_digits(config, scenario, v, args.seeds, f"r{r}-{i}")
                times[v].append(out["seconds"])
                accs[v] = out["test"]  # every round trains the same seeds alike
    med = {v: statistics.median(t) for v, t in times.items()}
    return {
        "model": "cnn",
        "dataset": "digits holdout subclass 3",
        "seeds": args.seeds,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median_s": med,
        "speedup_vs_single": {v: med["single"] / med[v] for v in variants},
        "test_accuracy": {
            v: {"mean": statistics.mean(a), "std": statistics.stdev(a) if len(a) > 1 else 0.0}
            for v, a in accs.items()
        },
        "max_seed_accuracy_gap": {
            v: max(abs(x - y) for x, y in zip(a, accs["single"], strict=True))
            for v, a in accs.items()
        },
    }


def main_cpu_fused(args: argparse.Namespace) -> None:
    r = measure_cpu_fused(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"device: CPU, {os.cpu_count()} cores, {r['threads']} torch threads; "
        f"torch {torch.__version__}"
    )
    print(f"cnn on {r['dataset']}: {r['seeds']} seeds, the demo's recipe (mlvar train)")
    print(f"  {'variant':<16} {'median s':>9} {'vs single':>9} {'test acc mean +- std':>21}")
    for v, ts in r["seconds"].items():
        acc = r["test_accuracy"][v]
        print(
            f"  {v:<16} {r['median_s'][v]:9.1f} {r['speedup_vs_single'][v]:8.2f}x "
            f"{acc['mean']:13.4f} +- {acc['std']:.4f}   (rounds: "
            + " ".join(f"{t:.1f}" for t in ts)
            + f"; largest per-seed accuracy gap to single {r['max_seed_accuracy_gap'][v]:.4f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=None, help="comma-separated (default: all on CPU)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (CPU 2, CUDA 4)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (CPU 1, CUDA 10)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--procs", type=int, default=None, help="parallel processes")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads in all")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--api", action="store_true", help="time images.train_runs: before, workers=1, auto"
    )
    parser.add_argument("--rounds", type=int, default=2, help="--api: interleaved rounds")
    parser.add_argument(
        "--cpu-fused",
        action="store_true",
        help="digits, CPU: the fused engine against worker processes (mlvar train)",
    )
    parser.add_argument(
        "--pack-sizes", default="0", help="--cpu-fused: fused pack sizes (0: automatic)"
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    args.n_train_given = args.n_train is not None
    seeds_given = args.seeds
    args.seeds = args.seeds or (4 if cuda else 2)
    args.epochs = args.epochs or (10 if cuda else 1)
    args.n_train = args.n_train or (50_000 if cuda else 512)
    args.n_test = args.n_test or (10_000 if cuda else 256)
    args.procs = args.procs or (args.seeds if cuda else min(2, os.cpu_count() or 1))
    models = (args.models or ("airbench" if cuda else "cnn,airbench,resnet18")).split(",")
    if args.cpu_fused:
        if cuda:
            raise SystemExit("--cpu-fused times the CPU engines; leave out --device cuda")
        args.seeds = seeds_given or 16
        main_cpu_fused(args)
        return
    if args.api:
        if cuda:
            raise SystemExit("--api times the CPU scheduling; leave out --device cuda")
        main_api(args, models)
        return
    results = [measure(m, args) for m in models]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    name = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores"
    print(f"device: {name}; torch {torch.__version__}")
    print(
        f"{'model':<10} {'n_train':>8} {'seeds':>5} {'mode':<22} "
        f"{'s/seed':>8} {'s/epoch':>8} {'img/s':>9}"
    )
    for r in results:
        one, par = r["one_at_a_time"], r["parallel"]
        rows = [
            (f"one at a time ({one['threads']} thr)", one),
            (f"{par['processes']} procs x {par['threads_each']} thr", par),
        ]
        for label, m in rows:
            print(
                f"{r['model']:<10} {r['n_train']:>8} {r['seeds']:>5} {label:<22} "
                f"{m['seconds_per_seed']:>8.2f} {m['seconds_per_epoch']:>8.3f} "
                f"{m['images_per_s']:>9.0f}"
            )
        print(f"{'':<10} parallel / one-at-a-time speed-up: {r['speedup_parallel']:.2f}x")


if __name__ == "__main__":
    main()
