"""Time ``mlvar data fetch`` and ``mlvar data prepare`` on a full-size synthetic CIFAR-10.

Writes a synthetic archive in the real python format (``cifar-10-batches-py/``: five train
batches of 10,000 and one test batch of 10,000 random 32x32x3 images, pickled as Python 2
did, gzip level 1) to a temporary folder, fetches it with ``--source --no-verify``, then
prepares every CIFAR-10 mode. Each step runs in a fresh subprocess so that its wall time
and peak resident memory (``ru_maxrss``) are its own.

Not a pytest test: run it as ``python benchmarks/prepare_speed.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

# The CIFAR-format writer the tests use (tests/cifar_format.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cifar_format import py2_pickle  # noqa: E402

STEPS = {
    "fetch": ["fetch"],
    "original": ["original"],
    "holdout": ["holdout", "0.9"],
    "holdout-dup": ["holdout-dup", "0.9"],
    "augmentation": ["augmentation", "0.5"],
    "augmentation-all": ["augmentation-all", "0.5"],
}


def write_archive(path: Path, n_train: int = 50_000, n_test: int = 10_000) -> None:
    """A synthetic CIFAR-10 python archive of random images, in the real layout."""
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    members = {
        "batches.meta": py2_pickle({"num_cases_per_batch": 10_000, "label_names": names}),
    }
    per = n_train // 5
    for i in range(1, 6):
        members[f"data_batch_{i}"] = py2_pickle(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": rng.integers(0, 10, per).tolist(),
                "data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                "filenames": [f"img_{i}_{j}.png" for j in range(per)],
            }
        )
    members["test_batch"] = py2_pickle(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": rng.integers(0, 10, n_test).tolist(),
            "data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            "filenames": [f"test_{j}.png" for j in range(n_test)],
        }
    )
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def child(step: str, root: Path, archive: Path) -> None:
    """Run one step in this process; print its wall time and peak memory as JSON."""
    from mlvar.data import registry

    start = time.perf_counter()
    args = STEPS[step]
    if args[0] == "fetch":
        registry.fetch(root, "cifar10", source=archive, verify=False)
    else:
        ratio = float(args[1]) if len(args) > 1 else None
        registry.prepare(root, "cifar10", mode=args[0], ratio=ratio, force=True)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step": step, "seconds": wall, "peak_mib": peak_mib}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--archive", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each prepare step")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.root, args.archive)
        return
    with tempfile.TemporaryDirectory(prefix="mlvar-bench-") as tmp:
        tmp_path = Path(tmp)
        archive = tmp_path / "cifar-10-python.tar.gz"
        start = time.perf_counter()
        write_archive(archive)
        print(
            f"synthetic archive: {archive.stat().st_size / 2**20:.0f} MiB "
            f"in {time.perf_counter() - start:.1f} s"
        )
        rows = []
        for step in STEPS:
            for _ in range(1 if step == "fetch" else args.repeat):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        step,
                        "--root",
                        str(tmp_path / "data"),
                        "--archive",
                        str(archive),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{'step':<18}{'seconds':>9}{'peak MiB':>10}")
        for row in rows:
            print(f"{row['step']:<18}{row['seconds']:>9.2f}{row['peak_mib']:>10.0f}")


if __name__ == "__main__":
    main()
