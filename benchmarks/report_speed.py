"""Time ``mlvar report html`` for 2,000 ranked samples (target: under 30 s) and
``mlvar analyze saliency`` for 100 samples x 8 seeds (target: under 60 s on a CPU).

A synthetic run store (:func:`mlvar.analysis.synthetic.synthetic_store`: 20 runs x 2,000
samples x 10 classes, a quarter of class 0 affected) and a prepared scenario holding a
32x32 RGB image per sample (so every sample page writes its thumbnail) are built first,
untimed. Then :func:`mlvar.report.html.build_report` runs as the command does: accuracy,
ranking and detection (written to the store), AUROC against the number of runs, every
figure, the ranking table of all 2,000 samples and the pages of the top ``--top`` plus
as many random unaffected samples. Prints the wall time and the size of the folder.

Saliency: a prepared scenario of 32x32 RGB images (1,000 train, 2,000 test) and an
experiment of 8 runs of ``--model`` (default ``airbench``, the CIFAR model) whose
``model.pt`` holds freshly initialised weights (the whitening layer from the training
images, as training does) and whose logits are random, all built untimed. Then
:func:`mlvar.saliency.saliency` runs as the command does (``--top 50``: the
top 50 samples and 50 random unaffected ones, 8 seeds, true and predicted class): the
ranking, loading and checking the weights, normalising the images, GradCAM in batches,
the arrays and 100 overlay strips.

Tabular (``--part tabular``): the real COMPAS CSV (``../shared/data`` or
``$MLVAR_COMPAS_CSV``), artificial feature at ratio 0.1, ``--seeds`` MLP runs trained
untimed; then gradient x input of the same 100 samples x 8 seeds, with the charts.

Study scale (``--scale``): an imported experiment (``mlvar analyze import``) of 100 runs x
50,000 samples x 100 classes of synthetic float16 logits (each run a fixed per-sample
logit vector plus its own noise; a quarter of class 0 affected, their label lowered),
built untimed. Then, in a fresh process (its peak memory is the report's alone),
:func:`~mlvar.report.html.build_report` as the command runs it (the figures' imports
included), and in headless Chromium (selenium and chromedriver, as
``tests/test_report_browser.py`` drives them) the time from navigation start to the first
page of the ranking in the document (the table script's ``mlvar-ranking-rendered``
performance mark), median of ``--loads`` fresh loads, and of a sort by a metric and of a
filter to the affected samples (the time the table's event handler takes to put the new
rows in the document). Targets: the report under 30 s,
``index.html`` under 1 MB, the first page under 2 s.

Not a pytest test: ``python benchmarks/report_speed.py [--samples 2000] [--runs 20]
[--part report|saliency|tabular|both] [--model airbench] [--saliency-top 50] [--seeds 8]``,
``python benchmarks/report_speed.py --scale [--runs 100 --samples 50000 --classes 100]``.

Study site (``--part study``): 99 small experiments (the study's 9 CIFAR-100 subclasses
x 11 ratios of mode ``holdout``, 5 runs x 1,000 samples x 100 classes each), ranked
untimed; then ``mlvar report html --study`` timed, the size of its index and of its
family page, and both opened in headless Chromium (load time, images shown, console).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlvar.analysis.synthetic import synthetic_store
from mlvar.data.scenario import SplitData, write_scenario
from mlvar.report.html import TOP_DEFAULT, build_report

TARGET_S = 30.0
SALIENCY_TARGET_S = 60.0
INDEX_TARGET_BYTES = 2**20
FIRST_PAGE_TARGET_MS = 2000.0


def report_bench(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="mlvar-report-bench-") as tmp:
        root = Path(tmp)
        store = synthetic_store(
            root / "runs",
            "bench",
            n_runs=args.runs,
            n_samples=args.samples,
            n_classes=args.classes,
            affected_fraction=0.25,
        )
        samples = store.samples("test")
        rng = np.random.default_rng(0)
        split = SplitData(
            x=rng.integers(0, 256, size=(args.samples, 32, 32, 3), dtype=np.uint8),
            y=samples["label"].to_numpy(),
            id=samples["sample_id"].to_numpy(),
            affected=samples["affected"].to_numpy(),
            group=samples["group"].to_numpy(),
        )
        manifest = {
            "dataset": "synthetic",
            "mode": "synthetic",
            "class_names": store.class_names,
            "input": {"kind": "image", "shape": [32, 32, 3], "max_value": 255},
        }
        write_scenario(root / "data", store.meta["scenario"]["name"], manifest, {"test": split})
        start = time.perf_counter()
        result = build_report(store, root / "report", top=args.top, data_root=root / "data")
        seconds = time.perf_counter() - start
        files = [p for p in (root / "report").rglob("*") if p.is_file()]
        return {
            "part": "report",
            "samples": args.samples,
            "runs": args.runs,
            "classes": args.classes,
            "pages": result.n_pages,
            "images": result.inputs == "",
            "seconds": round(seconds, 2),
            "target_s": TARGET_S,
            "within_target": seconds < TARGET_S,
            "files": len(files),
            "megabytes": round(sum(p.stat().st_size for p in files) / 2**20, 2),
        }


def _image_split(rng: np.random.Generator, n: int, n_classes: int, offset: int) -> SplitData:
    y = np.arange(n, dtype=np.int64) % n_classes
    return SplitData(
        x=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
        y=y,
        id=np.arange(offset, offset + n, dtype=np.int64),
        affected=(y == 0) & (rng.random(n) < 0.25),
        group=np.full(n, -1, dtype=np.int64),
    )


def saliency_store(root: Path, model: str, seeds: int, n_test: int, n_classes: int):
    """A scenario and an experiment of ``seeds`` untrained ``model`` runs with weights."""
    import torch

    from mlvar.store import ExperimentStore, run_id_for
    from mlvar.train import images
    from mlvar.train.models import build_model, init_weights

    rng = np.random.default_rng(0)
    splits = {"train": _image_split(rng, 1000, n_classes, 0)}
    splits["test"] = _image_split(rng, n_test, n_classes, 100_000)
    manifest = {
        "dataset": "cifar10",
        "mode": "synthetic",
        "class_names": [f"class {i}" for i in range(n_classes)],
        "input": {"kind": "image", "shape": [32, 32, 3], "max_value": 255},
    }
    scenario = write_scenario(root / "data", "bench-images", manifest, splits)
    meta = {
        "dataset": "cifar10",
        "class_names": manifest["class_names"],
        "scenario": {
            "name": scenario.name,
            "mode": "synthetic",
            "manifest_sha256": scenario.manifest_sha256,
        },
        "model": model,
        "train": {},
    }
    samples = {
        s: {"sample_id": d.id, "label": d.y, "affected": d.affected, "group": d.group}
        for s, d in splits.items()
    }
    store = ExperimentStore.create(root / "runs", "bench-saliency", meta, samples)
    norm = images._build_data({"train": splits["train"]}, manifest, torch.device("cpu"))
    for r in range(seeds):
        net = build_model(model, 3, n_classes)
        init_weights(net, torch.Generator().manual_seed(r))
        if hasattr(net, "init_whitening"):
            net.init_whitening(norm.normalise(norm.train_x))
        logits = {
            s: rng.normal(size=(len(d.y), n_classes)).astype(np.float32) for s, d in splits.items()
        }
        run_meta = {"run_index": r, "seed": r, "config": {"model": model}}
        images.write_run(store, run_id_for(r), logits, run_meta, net.state_dict())
    return store


def saliency_bench(args: argparse.Namespace) -> dict:
    from mlvar.saliency import saliency

    with tempfile.TemporaryDirectory(prefix="mlvar-saliency-bench-") as tmp:
        root = Path(tmp)
        store = saliency_store(root, args.model, args.seeds, args.samples, args.classes)
        import pytorch_grad_cam  # noqa: F401 - imported once, untimed, as by the CLI

        start = time.perf_counter()
        result = saliency(store, root / "data", top=args.saliency_top, seeds=args.seeds)
        seconds = time.perf_counter() - start
        return {
            "part": "saliency",
            "model": args.model,
            "layer": result.layer,
            "samples": len(result.samples),
            "seeds": result.n_seeds,
            "maps": 2 * len(result.samples) * result.n_seeds,
            "seconds": round(seconds, 2),
            "target_s": SALIENCY_TARGET_S,
            "within_target": seconds < SALIENCY_TARGET_S,
            "megabytes": round(
                sum(p.stat().st_size for p in result.path.rglob("*") if p.is_file()) / 2**20, 2
            ),
        }


def tabular_saliency_bench(args: argparse.Namespace) -> dict:
    """Gradient x input of COMPAS MLP runs: ``--saliency-top`` top + as many random
    unaffected samples x ``--seeds`` runs, on the real COMPAS CSV (trained untimed)."""
    import os
    import shutil

    from mlvar.config import Config, PathsConfig
    from mlvar.data.registry import prepare
    from mlvar.saliency import saliency
    from mlvar.store import ExperimentStore
    from mlvar.train.service import train

    csv = Path(__file__).resolve().parents[2] / "shared" / "data" / "compas-scores-two-years.csv"
    csv = Path(os.environ.get("MLVAR_COMPAS_CSV", csv))
    with tempfile.TemporaryDirectory(prefix="mlvar-saliency-bench-") as tmp:
        root = Path(tmp)
        (root / "data" / "raw").mkdir(parents=True)
        shutil.copyfile(csv, root / "data" / "raw" / "compas-scores-two-years.csv")
        prepare(root / "data", "compas", mode="artificial", ratio=0.1)
        config = Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))
        train(config, "compas", runs=args.seeds, name="bench")
        store = ExperimentStore.open(root / "runs", "bench")
        start = time.perf_counter()
        result = saliency(store, root / "data", top=args.saliency_top, seeds=args.seeds)
        seconds = time.perf_counter() - start
        return {
            "part": "tabular",
            "model": "mlp",
            "method": result.method,
            "features": len(result.feature_names),
            "samples": len(result.samples),
            "seeds": result.n_seeds,
            "seconds": round(seconds, 2),
            "target_s": SALIENCY_TARGET_S,
            "ratio_to_target": round(seconds / SALIENCY_TARGET_S, 3),
            "within_target": seconds < SALIENCY_TARGET_S,
        }


def scale_store(root: Path, runs: int, samples: int, classes: int, seed: int = 0):
    """An imported experiment of synthetic float16 logits (see the module doc)."""
    from mlvar.analysis.importer import import_predictions
    from mlvar.store import ExperimentStore

    source = root / "predictions"
    source.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    affected = (labels == 0) & (rng.random(samples) < 0.25)
    base = rng.normal(scale=0.5, size=(samples, classes)).astype(np.float32)
    base[np.arange(samples), labels] += 2.0
    base[affected, 0] -= 2.0
    np.save(source / "labels.npy", labels)
    np.save(source / "affected.npy", affected)
    for r in range(runs):
        noise = np.random.default_rng([seed, r]).normal(size=base.shape).astype(np.float32)
        np.save(source / f"run-{r:04d}.npy", (base + noise).astype(np.float16))
    names = [f"class_{c}" for c in range(classes)]
    import_predictions(source, root / "runs", "scale", class_names=names)
    shutil.rmtree(source)  # the store holds its own copy
    return ExperimentStore.open(root / "runs", "scale")


def _build_child(root: str) -> None:
    """Build the report of ``root``'s experiment in this fresh process; print figures."""
    import resource

    from mlvar.store import ExperimentStore

    store = ExperimentStore.open(Path(root) / "runs", "scale")
    start = time.perf_counter()
    result = build_report(store, Path(root) / "report", data_root=Path(root) / "data")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "pages": result.n_pages}))


def _browser_figures(index: Path, loads: int) -> dict:
    """First-page, sort and filter times of ``index`` in headless Chromium (ms)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from test_report_browser import _console_errors, _missing, browser

    reason = _missing()
    if reason:
        return {"browser": f"not measured: {reason}"}
    mark = "return performance.getEntriesByName('mlvar-ranking-rendered').map(e => e.startTime);"
    # The table renders synchronously in the event's handler: the time around the
    # dispatch is the time from the click (or change) to the new rows in the document.
    sort_js = (
        "const t = performance.now();"
        "document.querySelector('#ranking th[data-key=\"gconf_std\"] button').click();"
        "return performance.now() - t;"
    )
    filter_js = (
        "const s = document.getElementById('filter-affected'); s.value = 'affected';"
        "const t = performance.now(); s.dispatchEvent(new Event('change'));"
        "return performance.now() - t;"
    )
    first, sort, filt, rows, errors = [], [], [], 0, []
    with browser() as driver:
        driver.set_page_load_timeout(120)
        for _ in range(loads):
            driver.get("about:blank")
            driver.get(index.resolve().as_uri())
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(mark))
            first.append(driver.execute_script(mark)[0])
            rows = len(driver.find_elements(By.CSS_SELECTOR, "#ranking tbody tr"))
            sort.append(driver.execute_script(sort_js))
            filt.append(driver.execute_script(filter_js))
            assert driver.find_elements(By.CSS_SELECTOR, "#ranking tbody tr.affected")
            errors += _console_errors(driver)
    return {
        "first_page_ms": round(float(np.median(first)), 1),
        "first_page_ms_each": [round(x, 1) for x in first],
        "first_page_target_ms": FIRST_PAGE_TARGET_MS,
        "first_page_within_target": float(np.median(first)) < FIRST_PAGE_TARGET_MS,
        "rows_in_document": rows,
        "sort_ms": round(float(np.median(sort)), 1),
        "filter_ms": round(float(np.median(filt)), 1),
        "console_errors": errors,
    }


def scale_bench(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="mlvar-report-scale-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        scale_store(root, args.runs, args.samples, args.classes)
        setup = time.perf_counter() - start
        child = subprocess.run(
            [sys.executable, __file__, "--build-child", str(root)],
            check=True,
            capture_output=True,
            text=True,
        )
        built = json.loads(child.stdout.strip().splitlines()[-1])
        report = root / "report"
        files = [p for p in report.rglob("*") if p.is_file()]
        index = (report / "index.html").stat().st_size
        out = {
            "part": "scale",
            "runs": args.runs,
            "samples": args.samples,
            "classes": args.classes,
            "dtype": "float16",
            "setup_s": round(setup, 1),
            "seconds": round(built["seconds"], 2),
            "target_s": TARGET_S,
            "within_target": built["seconds"] < TARGET_S,
            "peak_mb": round(built["peak_mb"]),
            "pages": built["pages"],
            "index_html_kb": round(index / 1024, 1),
            "index_within_target": index < INDEX_TARGET_BYTES,
            "ranking_data_mb": round((report / "ranking-data.js").stat().st_size / 2**20, 2),
            "ranking_csv_mb": round((report / "ranking.csv").stat().st_size / 2**20, 2),
            "files": len(files),
            "megabytes": round(sum(p.stat().st_size for p in files) / 2**20, 2),
        }
        out |= _browser_figures(report / "index.html", args.loads)
        return out


STUDY_SUBCLASSES = (
    "baby",
    "boy",
    "girl",
    "man",
    "woman",
    "caterpillar",
    "mushroom",
    "porcupine",
    "ray",
)


def study_bench(args: argparse.Namespace) -> dict:
    """A 99-experiment study (the study's 9 CIFAR-100 subclasses x 11 ratios, one family),
    each a small synthetic experiment ranked untimed; then the study pages timed, and the
    index and family page opened in headless Chromium."""
    from mlvar.analysis import service
    from mlvar.report.study import FAMILIES_DIR, build_study_report
    from mlvar.store import ExperimentStore

    with tempfile.TemporaryDirectory(prefix="mlvar-study-bench-") as tmp:
        root = Path(tmp)
        classes = [f"class_{c}" for c in range(args.classes)]
        for k, (sub, ratio) in enumerate((s, r / 10) for s in STUDY_SUBCLASSES for r in range(11)):
            rng = np.random.default_rng(k)
            n = args.samples
            labels = rng.integers(0, len(classes), n)
            affected = (labels < 5) & (rng.random(n) < 0.5)
            meta = {
                "dataset": "cifar100",
                "class_names": classes,
                "scenario": {
                    "name": f"cifar100-holdout-{sub}-r{ratio:.1f}",
                    "mode": "holdout",
                    "params": {"subclass": sub, "ratio": ratio},
                },
                "model": "airbench",
                "train": {},
            }
            samples = {
                "test": {
                    "sample_id": np.arange(n),
                    "label": labels,
                    "affected": affected,
                    "group": np.full(n, -1),
                }
            }
            store = ExperimentStore.create(root / "runs", f"e{k:02d}", meta, samples)
            base = rng.normal(scale=0.5, size=(n, len(classes))).astype(np.float32)
            base[np.arange(n), labels] += 2.0
            base[affected, labels[affected]] -= 2.0 * ratio
            for r in range(args.runs):
                noise = rng.normal(size=base.shape).astype(np.float32)
                store.write_run(f"run-{r:04d}", {"test": base + noise}, {"seed": r, "config": {}})
            service.rank(store, "test")
            service.accuracy(store, "test")
        start = time.perf_counter()
        result = build_study_report(root / "runs", root / "study")
        seconds = time.perf_counter() - start
        index = root / "study" / "index.html"
        family = next((root / "study" / FAMILIES_DIR).glob("*.html"))
        out = {
            "part": "study",
            "experiments": result.n_experiments,
            "skipped": result.skipped,
            "families": result.families,
            "figures": result.figures,
            "seconds": round(seconds, 2),
            "index_html_kb": round(index.stat().st_size / 1024, 1),
            "family_html_kb": round(family.stat().st_size / 1024, 1),
        }
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_report_browser import _console_errors, _missing, browser

        if _missing():
            return out | {"browser": f"not measured: {_missing()}"}
        timing = "return performance.getEntriesByType('navigation')[0].loadEventEnd;"
        with browser() as driver:
            for name, page in (("index", index), ("family", family)):
                driver.get(page.resolve().as_uri())
                out[f"{name}_load_ms"] = round(driver.execute_script(timing), 1)
                out[f"{name}_images"] = driver.execute_script(
                    "return Array.from(document.images).filter(i => i.naturalWidth > 0).length;"
                )
                out[f"{name}_console_errors"] = _console_errors(driver)
        return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--build-child":
        _build_child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["report", "saliency", "tabular", "study", "both"], default="both"
    )
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--top", type=int, default=TOP_DEFAULT)
    parser.add_argument("--model", default="airbench", help="saliency: cnn, airbench, resnet18")
    parser.add_argument("--saliency-top", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument(
        "--scale",
        action="store_true",
        help="the study-scale report: 100 runs x 50,000 samples x 100 classes by default",
    )
    parser.add_argument("--loads", type=int, default=3, help="--scale: page loads timed")
    args = parser.parse_args()
    if args.scale:
        defaults = {"runs": (20, 100), "samples": (2000, 50_000), "classes": (10, 100)}
        for name, (old, new) in defaults.items():
            if getattr(args, name) == old:
                setattr(args, name, new)
        print(json.dumps(scale_bench(args), indent=2))
        return
    out = []
    if args.part in ("report", "both"):
        out.append(report_bench(args))
    if args.part in ("saliency", "both"):
        out.append(saliency_bench(args))
    if args.part == "tabular":
        out.append(tabular_saliency_bench(args))
    if args.part == "study":
        defaults = {"runs": (20, 5), "samples": (2000, 1000), "classes": (10, 100)}
        for name, (old, new) in defaults.items():
            if getattr(args, name) == old:
                setattr(args, name, new)
        out.append(study_bench(args))
    print(json.dumps(out if len(out) > 1 else out[0], indent=2))


if __name__ == "__main__":
    main()
