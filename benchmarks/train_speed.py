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

CUDA, the prepared script for a lent H100/H200 (issue 16; under about 8 minutes)::

    PYTHONPATH=src python benchmarks/train_speed.py --device cuda --out train_speed_cuda.json

writes full-size synthetic CIFAR-10 (50,000 train and 10,000 test 32x32x3 images: class
patterns plus noise, learnable, made in about a second) as a scenario, then trains
through ``mlvar.train.service.train`` (what ``mlvar train`` runs), each row in its own
child process: airbench (full recipe, 10 epochs) one seed at a time (3 seeds;
``--single-seeds``) and in ``fused`` packs of 8, 16, 32 and 64 seeds; resnet18 at 2
epochs one seed at a time and in packs of 4, 8 and 16. Per row: the child's start-up,
its warm-up (one epoch of the same pack, not counted), the timed training (loading,
training, TTA evaluation, writing the runs), seconds per seed, images per second, peak
GPU memory (``torch.cuda.max_memory_allocated``) and the speed-up over one at a time.
Then the fused engine's per-seed test logits against one at a time after a few steps
(``np.allclose``, ``--rtol``/``--atol``). One table is printed and written as JSON
(``--out``). Rows that would overrun their share of ``--budget-s`` (420 s) are skipped
with a note, and so are the fused rows where the fused engine is not built. Kernels are
deterministic (mlvar's default on CUDA); ``--vary-impl`` allows the others.

The same script on the CPU, end to end on 128 16x16 images (1 epoch, packs of 2)::

    python benchmarks/train_speed.py --device cpu --tiny --out /tmp/train_speed_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlvar.config import TrainConfig, switch_model
from mlvar.data.scenario import Scenario, SplitData
from mlvar.io import atomic_write_text
from mlvar.store import ExperimentStore
from mlvar.train import images
from mlvar.train.seeding import RunGenerators

SRC = Path(__file__).resolve().parents[1] / "src"
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


# ------------------------------------------------------------ the prepared device script
#
# ``--device cuda`` (issue 16, item 5): one script for a lent H100/H200 whose whole run
# stays under about 8 minutes (``--budget-s``). Every row is one child process running
# ``mlvar.train.service.train`` (what ``mlvar train`` calls) on a synthetic scenario:
# its start-up (interpreter, imports, CUDA context), a warm-up training of one epoch of
# the same pack (kernels, cuDNN autotuning, allocator; not counted) and the timed
# training (loading, training, TTA evaluation of every split, writing the runs) are
# reported apart. A row whose estimated time no longer fits its model's share of the
# budget is skipped with a note. ``--device cpu --tiny`` is the same script on a few
# hundred images, to check it end to end without a GPU.

#: Seeds per pack of the fused rows, per model (resnet18's packs stop at 16: at 2 epochs
#: of 50,000 images even 16 seeds take minutes).
CUDA_PACKS = {"airbench": (8, 16, 32, 64), "resnet18": (4, 8, 16)}
#: Epochs per model: the full airbench recipe; resnet18 at 2 epochs.
CUDA_EPOCHS = {"airbench": 10, "resnet18": 2}
#: Each part's share of ``--budget-s``: airbench rows, resnet18 rows, the logits check.
BUDGET_SHARES = {"airbench": 0.55, "resnet18": 0.33, "check": 0.12}
#: Seeds of the one-at-a-time rows (``--single-seeds`` sets both).
SINGLE_SEEDS = {"airbench": 3, "resnet18": 1}
CLASSES = 10


def synthetic_cifar(n: int, seed: int, size: int = 32, templates_seed: int = 7) -> SplitData:
    """``n`` learnable ``size`` x ``size`` x 3 uint8 images: the mean of a class's fixed
    low-frequency pattern (a random image of a quarter the size, upsampled 4x) and
    uniform noise (fast: a few numpy calls; 50,000 32x32 images in about a second)."""
    shape = (CLASSES, size // 4, size // 4, 3)
    templates = np.random.default_rng(templates_seed).integers(0, 256, shape)
    templates = templates.repeat(4, axis=1).repeat(4, axis=2).astype(np.uint16)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    noise = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    x = ((templates[y] + noise) // 2).astype(np.uint8)
    return SplitData(
        x=x,
        y=y,
        id=np.arange(n, dtype=np.int64) + seed * 1_000_000,
        affected=np.zeros(n, dtype=bool),
        group=np.full(n, -1, dtype=np.int64),
    )


def write_synthetic_scenario(
    data_root: Path, name: str, n_train: int, n_test: int, size: int = 32
) -> None:
    """A CIFAR-10-shaped scenario ``name`` of synthetic images (train and test only)."""
    from mlvar.data.scenario import write_scenario

    manifest = {
        "dataset": "cifar10",
        "mode": "original",
        "params": {},
        "description": "synthetic class patterns plus noise (benchmarks/train_speed.py)",
        "class_names": [f"class{c}" for c in range(CLASSES)],
        "input": {"kind": "image", "shape": [size, size, 3], "max_value": 255},
    }
    splits = {"train": synthetic_cifar(n_train, 1, size), "test": synthetic_cifar(n_test, 2, size)}
    write_scenario(data_root, name, manifest, splits, force=True)


def engines_available() -> dict[str, str | None]:
    """The ``--engine`` values of one-at-a-time and fused image training here (None:
    fused not built yet; one-at-a-time is then the image models' default)."""
    from importlib.util import find_spec

    from mlvar.config import ENGINES

    fused = "fused" if "fused" in ENGINES and find_spec("mlvar.train.fused") else None
    return {"single": "single" if "single" in ENGINES else None, "fused": fused}


def _child_overrides(spec: dict) -> dict:
    over = {
        "model": spec["model"],
        "device": spec["device"],
        "epochs": spec["epochs"],
        "workers": 1,  # CPU: in this process; the rows compare engines, not processes
        "checkpoint_every": 0,
    }
    if spec.get("engine"):
        over["engine"] = spec["engine"]
    if spec.get("pack_size"):
        over["pack_size"] = spec["pack_size"]
    if spec.get("vary"):
        over["vary"] = spec["vary"]
    if spec.get("batch_size"):
        over["batch_size"] = spec["batch_size"]  # airbench: its lr scales with it
    if spec.get("no_train_tta"):
        over["train_tta"] = False
    return over


def cuda_child(spec: dict) -> dict:
    """One row, in a child process: start-up, warm-up, then the timed training."""
    startup = time.time() - spec["spawned_at"]  # interpreter and imports (module top)
    from mlvar.config import Config, PathsConfig
    from mlvar.train.service import train

    cuda = spec["device"] == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")  # the CUDA context
        torch.cuda.synchronize()
    startup = time.time() - spec["spawned_at"]
    root = Path(spec["root"])
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    over = _child_overrides(spec)
    tag = spec["tag"]
    t0 = time.perf_counter()
    warm_runs = spec.get("pack_size") or 1
    train(cfg, "cifar10", spec["scenario"], warm_runs, f"warm-{tag}", {**over, "epochs": 1})
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train(cfg, "cifar10", spec["scenario"], spec["seeds"], tag, over)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    store = ExperimentStore.open(root / "runs", result.experiment)
    metas = [r.meta for r in store.runs()]
    singles = all(int(m.get("pack_size", 1)) == 1 for m in metas)
    walls = [float(m.get("pack_wall_time_s", m["wall_time_s"])) for m in metas]
    return {
        "startup_s": startup,
        "warmup_s": warmup,
        "train_s": seconds,
        # training and evaluation as the runs record them (no loading, no writing)
        "run_wall_s": sum(walls) if singles else max(walls),
        "engine_recorded": sorted({str(m.get("engine")) for m in metas}),
        "pack_sizes": sorted({int(m.get("pack_size", 1)) for m in metas}),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "test_accuracy": float(np.mean([a["test"] for a in result.accuracy.values()])),
    }


def check_child(spec: dict) -> dict:
    """Per-seed test logits of the fused engine against one-at-a-time, a few steps."""
    from mlvar.config import Config, PathsConfig
    from mlvar.train.service import train

    root = Path(spec["root"])
    cfg = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
    seeds = spec["seeds"]
    logits = {}
    for engine, pack in ((spec["single"], None), ("fused", seeds)):
        over = _child_overrides({**spec, "engine": engine, "pack_size": pack})
        name = f"check-{engine or 'default'}"
        train(cfg, "cifar10", spec["scenario"], seeds, name, over)
        runs = ExperimentStore.open(root / "runs", name).runs()
        logits[engine or "default"] = np.stack([r.load_logits("test", mmap=False) for r in runs])
    one, fused = logits[spec["single"] or "default"], logits["fused"]
    diff = np.abs(one - fused)
    return {
        "seeds": seeds,
        "steps": spec["steps"],
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_per_seed": [float(d.max()) for d in diff],
        "allclose": bool(np.allclose(fused, one, rtol=spec["rtol"], atol=spec["atol"])),
        "rtol": spec["rtol"],
        "atol": spec["atol"],
        "argmax_agreement": float((one.argmax(-1) == fused.argmax(-1)).mean()),
    }


def _spawn(spec: dict, timeout_s: float) -> dict:
    """Run ``spec`` in a child process (``--child``); its result, or ``error``."""
    spec = {**spec, "spawned_at": time.time()}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=max(timeout_s, 1),
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _row(
    model: str, engine: str, pack: int, seeds: int, epochs: int, n_train: int, out: dict
) -> dict:
    row = {"model": model, "engine": engine, "pack_size": pack, "seeds": seeds, "epochs": epochs}
    row.update(out)
    if "train_s" in out:
        row["seconds_per_seed"] = out["train_s"] / seeds
        row["images_per_s"] = n_train * epochs * seeds / out["train_s"]
    return row


def cuda_model_rows(model: str, args: argparse.Namespace, root: Path, engines: dict) -> list[dict]:
    """One model's rows: one seed at a time, then each fused pack size, within the
    model's share of the budget (rows that no longer fit are skipped with a note)."""
    epochs = args.epochs or CUDA_EPOCHS[model]
    packs = (2,) if args.tiny else CUDA_PACKS[model]
    budget = args.budget_s * BUDGET_SHARES[model]
    started = time.perf_counter()
    base = {
        "root": str(root),
        "scenario": "bench-full",
        "model": model,
        "device": args.device,
        "epochs": epochs,
        "vary": ["init", "order", "aug", "impl"] if args.vary_impl else None,
        "batch_size": args.batch_size,
        "no_train_tta": args.tiny,
    }
    n = args.n_train
    rows = []
    single = args.single_seeds or SINGLE_SEEDS[model]
    spec = {**base, "tag": f"{model}-single", "engine": engines["single"], "seeds": single}
    out = _spawn(spec, budget)
    rows.append(_row(model, engines["single"] or "default", 1, single, epochs, n, out))
    rate = out.get("train_s", 0) / single  # seconds per seed: the estimate of later rows
    overhead = out.get("startup_s", 0)
    for pack in packs:
        left = budget - (time.perf_counter() - started)
        if engines["fused"] is None:
            note = "skipped: no fused engine here (mlvar.train.fused not built yet)"
            rows.append(_row(model, "fused", pack, pack, epochs, n, {"note": note}))
            continue
        estimate = overhead + rate * pack * (1 + 1 / epochs)  # warm-up: one epoch of it
        if not rate or estimate > left:
            note = f"skipped: estimated {estimate:.0f} s > {left:.0f} s left (--budget-s)"
            rows.append(_row(model, "fused", pack, pack, epochs, n, {"note": note}))
            continue
        spec = {**base, "tag": f"{model}-fused{pack}", "engine": "fused", "pack_size": pack}
        out = _spawn({**spec, "seeds": pack}, left)
        rows.append(_row(model, "fused", pack, pack, epochs, n, out))
        if "train_s" in out:
            rate, overhead = out["train_s"] / pack, out["startup_s"]
    single_rate = rows[0].get("seconds_per_seed")
    for row in rows:
        if single_rate and row.get("seconds_per_seed"):
            row["speedup_vs_single"] = single_rate / row["seconds_per_seed"]
    return rows


def main_cuda(args: argparse.Namespace) -> None:
    """The prepared device script (or ``--tiny`` on the CPU): print one table, write JSON."""
    if args.tiny:  # 16x16 images, 2 steps an epoch, the train split without TTA: quick
        args.n_train, args.n_test = args.n_train or 128, args.n_test or 64
        args.epochs, args.single_seeds = args.epochs or 1, 2
        args.batch_size = args.batch_size or 64
        args.budget_s = args.budget_s or 1800
    else:
        args.n_train, args.n_test = args.n_train or 50_000, args.n_test or 10_000
        args.budget_s = args.budget_s or 420
    engines = engines_available()
    t_all = time.perf_counter()
    models = (args.models or "airbench,resnet18").split(",")
    with tempfile.TemporaryDirectory(prefix="mlvar-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        size = 16 if args.tiny else 32
        write_synthetic_scenario(root / "data", "bench-full", args.n_train, args.n_test, size)
        n_check = 128 if args.tiny else 4096
        n_check_test = 64 if args.tiny else 512
        write_synthetic_scenario(root / "data", "bench-check", n_check, n_check_test, size)
        data_s = time.perf_counter() - t0
        rows = [r for m in models for r in cuda_model_rows(m, args, root, engines)]
        if engines["fused"] is None:
            check = {"note": "skipped: no fused engine here (mlvar.train.fused not built yet)"}
        else:
            batch = args.batch_size or 1024  # airbench's: the check's steps per epoch
            spec = {
                "root": str(root),
                "scenario": "bench-check",
                "model": "airbench",
                "device": args.device,
                "epochs": 1,
                "seeds": 2 if args.tiny else 4,
                "steps": n_check // batch or 1,
                "single": engines["single"],
                "rtol": args.rtol,
                "atol": args.atol,
                "vary": None,
                "batch_size": args.batch_size,
                "tag": "check",
                "mode": "check",
            }
            check = _spawn(spec, args.budget_s * BUDGET_SHARES["check"] + 20)
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "tiny": args.tiny,
        "deterministic": not args.vary_impl,
        "engines": engines,
        "data_s": data_s,
        "total_s": time.perf_counter() - t_all,
        "rows": rows,
        "fused_vs_single_logits": check,
    }
    print_cuda_table(info)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}")


def print_cuda_table(info: dict) -> None:
    print(
        f"device: {info['device']}; torch {info['torch']}; {info['n_train']} train + "
        f"{info['n_test']} test synthetic images; deterministic kernels: "
        f"{info['deterministic']}; total {info['total_s']:.0f} s"
    )
    head = (
        f"{'model':<9} {'engine':<7} {'pack':>4} {'seeds':>5} {'ep':>3} {'start s':>7} "
        f"{'warm s':>7} {'train s':>8} {'s/seed':>7} {'img/s':>9} {'peak GiB':>8} {'x single':>8}"
    )
    print(head)
    for r in info["rows"]:
        if "train_s" not in r:
            print(
                f"{r['model']:<9} {r['engine']:<7} {r['pack_size']:>4} {r['seeds']:>5} "
                f"{r['epochs']:>3}  {r.get('note') or r.get('error')}"
            )
            continue
        peak = r["peak_gpu_bytes"] / 2**30 if r.get("peak_gpu_bytes") is not None else float("nan")
        print(
            f"{r['model']:<9} {r['engine']:<7} {r['pack_size']:>4} {r['seeds']:>5} "
            f"{r['epochs']:>3} {r['startup_s']:>7.1f} {r['warmup_s']:>7.1f} {r['train_s']:>8.1f} "
            f"{r['seconds_per_seed']:>7.2f} {r['images_per_s']:>9.0f} {peak:>8.2f} "
            f"{r.get('speedup_vs_single', float('nan')):>8.2f}"
        )
    c = info["fused_vs_single_logits"]
    if "allclose" in c:
        print(
            f"fused vs one at a time, {c['seeds']} seeds x {c['steps']} steps: allclose "
            f"{c['allclose']} (rtol {c['rtol']}, atol {c['atol']}), max |diff| "
            f"{c['max_abs_diff']:.2e}, argmax agreement {c['argmax_agreement']:.3f}"
        )
    else:
        print(f"fused vs one at a time: {c.get('note') or c.get('error')}")


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
    parser.add_argument("--tiny", action="store_true", help="the device script, tiny (CPU)")
    parser.add_argument("--out", default="train_speed_cuda.json", help="device script: JSON")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="device script: seconds (420; tiny 1800)"
    )
    parser.add_argument(
        "--single-seeds",
        type=int,
        default=None,
        help="one-at-a-time seeds (airbench 3, resnet18 1)",
    )
    parser.add_argument("--vary-impl", action="store_true", help="non-deterministic kernels")
    parser.add_argument("--rtol", type=float, default=1e-2, help="logits check (bf16 on CUDA)")
    parser.add_argument("--atol", type=float, default=5e-2, help="logits check")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--cpu-fused",
        action="store_true",
        help="digits, CPU: the fused engine against worker processes (mlvar train)",
    )
    parser.add_argument(
        "--pack-sizes", default="0", help="--cpu-fused: fused pack sizes (0: automatic)"
    )
    args = parser.parse_args()
    if args.child is not None:  # one row of the device script, in its own process
        spec = json.loads(args.child)
        print(json.dumps((check_child if spec.get("mode") == "check" else cuda_child)(spec)))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if cuda or args.tiny:
        main_cuda(args)
        return
    args.n_train_given = args.n_train is not None
    seeds_given = args.seeds
    args.seeds = args.seeds or 2
    args.epochs = args.epochs or 1
    args.n_train = args.n_train or 512
    args.n_test = args.n_test or 256
    args.procs = args.procs or min(2, os.cpu_count() or 1)
    models = (args.models or "cnn,airbench,resnet18").split(",")
    if args.cpu_fused:
        args.seeds = seeds_given or 16
        main_cpu_fused(args)
        return
    if args.api:
        main_api(args, models)
        return
    results = [measure(m, args) for m in models]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"device: CPU, {os.cpu_count()} cores; torch {torch.__version__}")
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
