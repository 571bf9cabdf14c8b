"""Time ``mlvar analyze rank`` (streaming) against a naive in-memory numpy computation.

Two synthetic run stores (built with :func:`mlvar.analysis.synthetic.synthetic_store`;
building them is not timed):

* ``wide``: 100 runs x 50,000 samples x 100 classes, float16 logits;
* ``long``: 20 runs x 1,000,000 samples x 10 classes, float32 logits.

For each, in fresh subprocesses (so peak resident memory is that computation's alone):

* ``streaming``: ``service.rank`` (sha256 verification of every array, every metric,
  baselines, detection, ranking, writing parquet/CSV), as ``mlvar analyze rank`` runs it;
* ``naive``: every run's logits loaded into one ``[R, n, C]`` float64 array, softmax,
  :func:`compute_metrics`, :func:`baseline_scores` and the same detection. When that
  array would need more than ``--naive-max-gb`` (the naive peak is several copies of it),
  the naive run uses only the first samples and its time is scaled linearly to all of them
  (marked ``extrapolated``), so that it cannot exhaust a shared machine.

Peak memory is the child's ``ru_maxrss``. Not a pytest test:
``python benchmarks/analysis_speed.py [--case wide|long|all]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "wide": {"n_runs": 100, "n_samples": 50_000, "n_classes": 100, "dtype": "float16"},
    "long": {"n_runs": 20, "n_samples": 1_000_000, "n_classes": 10, "dtype": "float32"},
}


def _child(mode: str, runs_root: str, name: str, max_gb: float) -> dict:
    """Run one measurement in this process and return its figures."""
    import numpy as np

    from mlvar.analysis import service
    from mlvar.store import ExperimentStore

    store = ExperimentStore.open(Path(runs_root), name)
    start = time.perf_counter()
    out: dict = {"mode": mode}
    if mode == "streaming":
        result = service.rank(store, "test")
        out["n_runs"] = result.n_runs
        out["auroc_gconf_mean"] = float(
            result.detection.set_index("metric").loc["gconf_mean", "auroc"]
        )
    else:
        from mlvar.analysis.detection import detect, detect_baselines
        from mlvar.analysis.metrics import baseline_scores, compute_metrics, softmax

        samples = store.samples("test")
        runs = store.runs(verify=True)
        n = len(samples)
        c = len(store.class_names)
        r = len(runs)
        # softmax makes ~3 float64 copies, entropy another: about 4x the array at peak
        limit = int(max_gb * 2**30 / (4 * 8 * r * c))
        m = min(n, max(1, limit))
        out["samples_used"] = m
        labels = samples["label"].to_numpy()[:m]
        affected = samples["affected"].to_numpy()[:m]
        logits = np.stack([run.load_logits("test", mmap=False)[:m] for run in runs])
        probs = softmax(logits.astype(np.float64))
        del logits
        metrics = compute_metrics(probs, labels)
        base = baseline_scores(probs, labels)
        del probs
        detect(metrics, labels, affected)
        detect_baselines(base, labels, affected)
        out["extrapolated"] = m < n
    elapsed = time.perf_counter() - start
    if mode == "naive" and out["extrapolated"]:
        out["measured_s"] = elapsed
        elapsed *= len(store.samples("test")) / out["samples_used"]
    out["seconds"] = elapsed
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _measure(mode: str, runs_root: Path, name: str, max_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(runs_root), name, str(max_gb)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--naive-max-gb", type=float, default=4.0)
    parser.add_argument("--tmp", type=Path, default=None, help="where to build the stores")
    args = parser.parse_args(argv)

    from mlvar.analysis.synthetic import synthetic_store

    cases = list(CASES) if args.case == "all" else [args.case]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        for case in cases:
            spec = CASES[case]
            t0 = time.perf_counter()
            synthetic_store(root, name=case, **spec)
            built = time.perf_counter() - t0
            stream = _measure("streaming", root, case, args.naive_max_gb)
            naive = _measure("naive", root, case, args.naive_max_gb)
            size = spec["n_runs"] * spec["n_samples"] * spec["n_classes"]
            print(
                f"{case}: {spec['n_runs']} runs x {spec['n_samples']:,} samples x "
                f"{spec['n_classes']} classes ({spec['dtype']}, {size * 8 / 2**30:.1f} GiB as "
                f"float64; store built in {built:.0f} s)"
            )
            print(
                f"  streaming rank: {stream['seconds']:.1f} s, peak RSS "
                f"{stream['peak_rss_mb']:.0f} MB (AUROC gconf_mean "
                f"{stream['auroc_gconf_mean']:.3f})"
            )
            note = (
                f" (extrapolated from {naive['samples_used']:,} samples in "
                f"{naive['measured_s']:.1f} s)"
                if naive["extrapolated"]
                else ""
            )
            print(
                f"  naive in-memory: {naive['seconds']:.1f} s{note}, peak RSS "
                f"{naive['peak_rss_mb']:.0f} MB"
            )
            print(f"  ratio streaming / naive time: {stream['seconds'] / naive['seconds']:.2f}")
            sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, mode, runs_root, name, max_gb = sys.argv
        print(json.dumps(_child(mode, runs_root, name, float(max_gb))))
    else:
        main()
