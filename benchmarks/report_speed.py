"""Time ``mlvar report html`` for 2,000 ranked samples (target: under 30 s).

A synthetic run store (:func:`mlvar.analysis.synthetic.synthetic_store`: 20 runs x 2,000
samples x 10 classes, a quarter of class 0 affected) and a prepared scenario holding a
32x32 RGB image per sample (so every sample page writes its thumbnail) are built first,
untimed. Then :func:`mlvar.report.html.build_report` runs as the command does: accuracy,
ranking and detection (written to the store), AUROC against the number of runs, every
figure, the ranking table of all 2,000 samples and the pages of the top ``--top`` plus
as many random unaffected samples. Prints the wall time and the size of the folder.

Not a pytest test: ``python benchmarks/report_speed.py [--samples 2000] [--runs 20]``.
(The saliency half of the report benchmark waits for the image models.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mlvar.analysis.synthetic import synthetic_store
from mlvar.data.scenario import SplitData, write_scenario
from mlvar.report.html import TOP_DEFAULT, build_report

TARGET_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--top", type=int, default=TOP_DEFAULT)
    args = parser.parse_args()
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
        print(
            json.dumps(
                {
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
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
