"""Time ``mlvar data fetch`` and ``mlvar data prepare`` on a full-size synthetic CIFAR-10.

Writes a synthetic archive in the real python format (``cifar-10-batches-py/``: five train
batches of 10,000 and one test batch of 10,000 random 32x32x3 images, pickled as Python 2
did, gzip level 1) to a temporary folder, fetches it with ``--source --no-verify``, then
prepares every CIFAR-10 mode. Each step runs in a fresh subprocess so that its wall time
and peak resident memory (``ru_maxrss``) are its own.

``--sweep``: the study's 10-ratio sweeps (0.0, 0.1, ..., 0.9 of class 0) of
``holdout-dup`` and ``augmentation`` instead, each prepared twice from the same fetched
copy, each in a data root of its own: as ``registry.prepare_sweep`` writes them (shared
storage: one process for the sweep) and as full copies (format 1, every scenario holding
its arrays, one ``prepare`` per ratio, as before the shared storage). Reported: wall time,
peak memory, the disk each sweep added to its data root (files counted once per inode,
so the raw arrays the shared storage hard-links cost nothing), the same as if ``raw/``
were deleted (the hard-linked source counted in full), each against one full copy, and
that every split loads to the same arrays both ways.

``--table``: your own table at scale instead: a synthetic 1,000,000-row, 50-column CSV
(45 float columns with 1% missing values, 4 categorical columns of 3 to 12 categories, a
binary label) recorded with ``data fetch table`` and prepared with ``data prepare --mode
holdout --where ...``, each step in a fresh subprocess, against the target (each under
60 s and 2 GiB peak) and against ``pandas.read_csv`` of the same file timed in the same
run.

Not a pytest test: run it as ``python benchmarks/prepare_speed.py [--sweep | --table]``
(about a minute; ``--sweep`` about two).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

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


TABLE_ROWS = 1_000_000
TABLE_NUMERIC = 45
TABLE_CATEGORIES = (3, 5, 8, 12)
TABLE_WHERE = "c0 == 'k1' and f0 > 0"
TABLE_TARGET = {"seconds": 60.0, "peak_mib": 2048.0}


def write_table(path: Path, n: int = TABLE_ROWS) -> None:
    """The synthetic CSV of ``--table`` (written with pyarrow)."""
    import pyarrow as pa
    from pyarrow import csv

    rng = np.random.default_rng(0)
    columns: dict[str, Any] = {}
    for i in range(TABLE_NUMERIC):
        values = rng.normal(size=n).astype(np.float32)
        columns[f"f{i}"] = pa.array(values, mask=rng.random(n) < 0.01)
    for i, k in enumerate(TABLE_CATEGORIES):
        columns[f"c{i}"] = pa.array(np.array([f"k{j}" for j in range(k)])[rng.integers(0, k, n)])
    score = np.asarray(columns["f1"].fill_null(0)) + (np.asarray(columns["c0"]) == "k1")
    columns["label"] = pa.array((score + rng.normal(size=n) > 0.5).astype(np.int64))
    csv.write_csv(pa.table(columns), path)


def table_child(step: str, root: Path, source: Path) -> None:
    """One ``--table`` step in this process; print its wall time and peak memory."""
    start = time.perf_counter()
    if step == "read_csv":
        import pandas as pd

        pd.read_csv(source)
    else:
        from mlvar.data import registry

        if step == "fetch":
            registry.fetch(root, "table", source=source, name="big", label="label")
        else:
            registry.prepare_sweep(root, "big", "holdout", where=TABLE_WHERE, force=True)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step": step, "seconds": wall, "peak_mib": peak_mib}))


def table_benchmark(tmp_path: Path) -> None:
    source = tmp_path / "big.csv"
    start = time.perf_counter()
    write_table(source)
    print(
        f"synthetic table: {TABLE_ROWS:,} rows x 50 columns, "
        f"{source.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.1f} s"
    )
    root = str(tmp_path / "data")
    rows = {
        step: _run_child("--table-child", step, "--root", root, "--archive", str(source))
        for step in ("read_csv", "fetch", "prepare")
    }
    base = rows["read_csv"]["seconds"]
    print(f"{'step':<26}{'seconds':>9}{'x read_csv':>12}{'peak MiB':>10}{'target':>16}")
    for step, row in rows.items():
        label = {
            "read_csv": "pandas.read_csv (baseline)",
            "fetch": "data fetch table",
            "prepare": "data prepare holdout",
        }[step]
        ok = all(row[k] < v for k, v in TABLE_TARGET.items())
        target = "" if step == "read_csv" else ("met" if ok else "MISSED")
        print(
            f"{label:<26}{row['seconds']:>9.2f}{row['seconds'] / base:>12.2f}"
            f"{row['peak_mib']:>10.0f}{target:>16}"
        )
    print(f"target: each step under {TABLE_TARGET['seconds']:.0f} s and 2 GiB peak")


SWEEP_MODES = ("holdout-dup", "augmentation")
SWEEP_RATIOS = [round(0.1 * i, 1) for i in range(10)]


def sweep_child(layout: str, mode: str, root: Path) -> None:
    """Prepare the 10-ratio sweep of ``mode`` in this process, with shared storage or as
    full copies; print wall time and peak memory as JSON."""
    from mlvar.data import registry, spec

    start = time.perf_counter()
    if layout == "shared":
        result = registry.prepare_sweep(root, "cifar10", mode=mode)
        assert len(result.prepared) == len(SWEEP_RATIOS), result.names
    else:
        # Without a source to share with, write_scenario writes every array into the
        # scenario's folder (format 1): the full copies, one prepare per ratio as before.
        spec.Source.rows = property(lambda self: None)  # type: ignore[assignment]
        for ratio in SWEEP_RATIOS:
            registry.prepare(root, "cifar10", mode=mode, ratio=ratio)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": wall, "peak_mib": peak_mib}))


def compare_child(shared: Path, full: Path) -> None:
    """Check that every split of every scenario loads to the same arrays both ways."""
    import numpy as np

    from mlvar.data.scenario import list_scenarios, open_scenario

    checked = 0
    for a in list_scenarios(shared):
        b = open_scenario(full, a.name)
        assert a.format_version == 2 and b.format_version == 1, (a.name, b.format_version)
        for split in a.splits:
            da, db = a.load(split), b.load(split)
            for name in ("x", "y", "id", "affected", "group"):
                x, y = getattr(da, name), getattr(db, name)
                assert x.dtype == y.dtype and np.array_equal(x, y), (a.name, split, name)
            checked += 1
    print(json.dumps({"splits": checked}))


def disk_bytes(root: Path, skip: str = "") -> int:
    """Bytes allocated under ``root`` (not under its folder ``skip``), each file counted
    once however many links it has."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root and skip in dirs:
            dirs.remove(skip)
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links (the fetched raw arrays)."""
    for folder, _dirs, files in os.walk(src):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(folder) / name, target / name)


def _run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def sweep_benchmark(tmp_path: Path, archive: Path) -> None:
    fetched = tmp_path / "fetched"
    _run_child("--child", "fetch", "--root", str(fetched), "--archive", str(archive))
    print(
        f"{'sweep (10 ratios)':<18}{'storage':<8}{'seconds':>9}{'peak MiB':>10}"
        f"{'disk MiB':>10}{'x one copy':>12}{'w/o raw MiB':>13}{'x one copy':>12}"
    )
    for mode in SWEEP_MODES:
        roots = {layout: tmp_path / f"{layout}-{mode}" for layout in ("full", "shared")}
        rows = {}
        for layout, root in roots.items():
            _link_tree(fetched / "raw", root / "raw")
            before = disk_bytes(root)
            row = _run_child("--sweep-child", layout, "--mode", mode, "--root", str(root))
            row["disk"] = disk_bytes(root) - before
            row["no_raw"] = disk_bytes(root, skip="raw")
            rows[layout] = row
        one_copy = rows["full"]["disk"] / len(SWEEP_RATIOS)
        for layout, row in rows.items():
            print(
                f"{mode:<18}{layout:<8}{row['seconds']:>9.2f}{row['peak_mib']:>10.0f}"
                f"{row['disk'] / 2**20:>10.0f}{row['disk'] / one_copy:>12.2f}"
                f"{row['no_raw'] / 2**20:>13.0f}{row['no_raw'] / one_copy:>12.2f}"
            )
        same = _run_child("--compare", str(roots["shared"]), str(roots["full"]))
        print(f"{'':<18}every split loads to equal arrays both ways ({same['splits']} splits)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--sweep-child", choices=("shared", "full"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--table-child", choices=("read_csv", "fetch", "prepare"), help=argparse.SUPPRESS
    )
    parser.add_argument("--compare", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--archive", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each prepare step")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="the 10-ratio holdout-dup and augmentation sweeps, shared storage vs full copies",
    )
    parser.add_argument(
        "--table", action="store_true", help="a 1,000,000-row table: data fetch table + prepare"
    )
    args = parser.parse_args(argv)
    if args.table_child:
        table_child(args.table_child, args.root, args.archive)
        return
    if args.child:
        child(args.child, args.root, args.archive)
        return
    if args.sweep_child:
        sweep_child(args.sweep_child, args.mode, args.root)
        return
    if args.compare:
        compare_child(*args.compare)
        return
    if args.table:
        with tempfile.TemporaryDirectory(prefix="mlvar-bench-") as tmp:
            table_benchmark(Path(tmp))
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
        if args.sweep:
            sweep_benchmark(tmp_path, archive)
            return
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
