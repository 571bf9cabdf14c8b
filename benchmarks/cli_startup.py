"""Time how fast ``mlvar`` starts: ``--version``, ``train --help`` and one bad-input error.

Each command runs in a fresh subprocess, several times, interleaved with the baseline
``python -c pass`` (the interpreter's own start-up, timed in the same run), so the ratios
hold however busy the machine is. Also lists the libraries (torch, scikit-learn,
matplotlib, pandas, pyarrow, scipy, ray, azure, and numpy) each command imports, from
``-X importtime``.

The commands are timed with mlvar's bytecode cached, as an installed package has it: the
warm-up run writes the ``.pyc`` files even where ``PYTHONDONTWRITEBYTECODE`` is set
(otherwise every run would compile mlvar's sources first).

Not a pytest test: run it as ``python benchmarks/cli_startup.py [--repeat 7]``.
Target (issue #11): every command under 0.5 s on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("torch", "sklearn", "matplotlib", "pandas", "scipy", "ray", "azure", "pyarrow", "numpy")
TARGET_S = 0.5


def commands(work: str) -> dict[str, list[str]]:
    """The timed commands; ``work`` is an empty folder used as data/runs root."""
    mlvar = [sys.executable, "-m", "mlvar"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "mlvar --version": [*mlvar, "--version"],
        "mlvar train --help": [*mlvar, "train", "--help"],
        # bad input needing no data: an unknown dataset (one line, exit 2)
        "mlvar data prepare nosuch": [*mlvar, "data", "prepare", "nosuch"],
    }


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True)
    return time.perf_counter() - started, proc.returncode


def heavy_imports(cmd: list[str], env: dict[str, str]) -> list[str]:
    """The heavy top-level packages ``cmd`` imports (from ``-X importtime``)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True)
    found = set()
    for line in proc.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:"):
            continue
        name = line.rsplit("|", 1)[-1].strip()
        top = name.split(".", 1)[0]
        if top in HEAVY:
            found.add(top)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per command (median)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        env = dict(
            os.environ,
            MLVAR_DATA_ROOT=os.path.join(work, "data"),
            MLVAR_RUNS_ROOT=os.path.join(work, "runs"),
            MLVAR_REPORTS_ROOT=os.path.join(work, "reports"),
            COLUMNS="100",
        )
        env.pop("MLVAR_CONFIG", None)
        cmds = commands(work)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        codes: dict[str, int] = {}
        warm = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for name, cmd in cmds.items():  # warm the file and bytecode caches once
            codes[name] = run_once(cmd, warm)[1]
        for _ in range(args.repeat):
            for name, cmd in cmds.items():
                elapsed, codes[name] = run_once(cmd, env)
                times[name].append(elapsed)
        heavy = {name: heavy_imports(cmd, env) for name, cmd in cmds.items()}
    base = statistics.median(times["python -c pass"])
    rows = []
    for name in cmds:
        median = statistics.median(times[name])
        rows.append(
            {
                "command": name,
                "median_s": round(median, 3),
                "min_s": round(min(times[name]), 3),
                "ratio_to_python": round(median / base, 2),
                "exit_code": codes[name],
                "heavy_imports": heavy[name],
                "under_target": median < TARGET_S,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"median of {args.repeat} runs each; baseline python -c pass = {base:.3f} s")
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'x python':>9} {'exit':>5}  heavy")
    for row in rows:
        print(
            f"{row['command']:<28} {row['median_s']:>9.3f} {row['min_s']:>7.3f} "
            f"{row['ratio_to_python']:>9.2f} {row['exit_code']:>5}  "
            + (", ".join(row["heavy_imports"]) or "-")
        )
    slow = [r["command"] for r in rows[1:] if not r["under_target"]]
    print(f"target {TARGET_S} s: " + ("all met" if not slow else "missed by " + ", ".join(slow)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
