"""The CLI starts light: ``mlvar --version``, every group's and command's ``--help`` and the
bad-input errors that need no data load none of torch, scikit-learn, matplotlib, pandas,
pyarrow and scipy, and exit as they should (one line, exit code 2, for the errors).

``--version`` and each error run as ``python -m mlvar ...`` in a fresh interpreter, which
records the top-level packages in ``sys.modules`` as it exits; the helps run one after the
other in one fresh interpreter (what they load together, none loads alone). The timings
are ``benchmarks/cli_startup.py``'s (docs/performance.md, "Start-up").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from mlvar import __version__
from mlvar.cli import COMMANDS, build_command
from mlvar.errors import ExitCode

HEAVY = frozenset({"torch", "sklearn", "matplotlib", "pandas", "pyarrow", "scipy"})

# Runs `mlvar ARGS` as `python -m mlvar` does, then writes the loaded top-level packages.
_PROBE = """
import json, os, runpy, sys
sys.argv = ["mlvar", *sys.argv[1:]]
try:
    runpy.run_module("mlvar", run_name="__main__", alter_sys=True)
finally:
    with open(os.environ["MLVAR_TEST_MODULES"], "w") as fh:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), fh)
"""

# Runs each `mlvar ARGS` of a JSON list in this interpreter; writes their exit codes and
# output, and the top-level packages loaded by all of them.
_HELP_PROBE = """
import contextlib, io, json, os, sys
from mlvar.cli import app
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app(args, prog_name="mlvar")
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append([code, out.getvalue(), err.getvalue()])
with open(os.environ["MLVAR_TEST_MODULES"], "w") as fh:
    modules = sorted({name.split(".")[0] for name in sys.modules})
    json.dump({"results": results, "modules": modules}, fh)
"""


def _command_paths() -> list[tuple[str, ...]]:
    """``()`` (the root), every command and every group's sub-commands, from the app."""
    paths: list[tuple[str, ...]] = [()]
    for name in COMMANDS:
        paths.append((name,))
        paths += [(name, sub) for sub in getattr(build_command(name), "commands", {})]
    return paths


HELP = [(*path, "--help") for path in _command_paths()]

#: Bad input that needs no data: the arguments and words the one line must name. The work
#: folder holds only ``typo.toml`` (a config with a misspelt table) and empty roots.
ERRORS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("nosuch",), ("No such command 'nosuch'",)),
    (("data", "prepare", "nosuch"), ("unknown dataset 'nosuch'", "digits")),
    (("data", "fetch", "nosuch"), ("unknown dataset 'nosuch'",)),
    (("data", "prepare", "digits", "--mode", "nosuch"), ("unknown digits mode 'nosuch'",)),
    (("data", "prepare", "compas", "--mode", "artificial", "--ratio", "2"), ("out of range",)),
    (("data", "prepare", "digits", "--subclass", "12"), ("subclass '12'",)),
    (("data", "prepare", "cifar10", "--mode", "holdout", "--ratio", "0:1:0"), ("positive step",)),
    (("data", "prepare", "compas", "--mode", "artificial", "--ratio", ",,"), ("names no value",)),
    (("data", "prepare", "compas", "--mode", "holdout", "--cluster", "1,,2"), ("empty list item",)),
    (("data", "prepare", "cifar10", "--mode", "holdout-dup", "--ratio", "0.5,1"), ("--ratio 1.0",)),
    (("data", "prepare", "cifar100", "--subclass", "study,baby"), ("'study' with other",)),
    (("data", "prepare", "digits", "--mode", "augmentation", "--cls", "0,10"), ("class '10'",)),
    (("data", "info", "nosuch"), ("no prepared scenario 'nosuch'",)),
    (("train", "nosuch"), ("unknown dataset 'nosuch'",)),
    (("train", "digits"), ("no prepared scenario of dataset 'digits'",)),
    (("train", "digits", "--model", "nosuch"), ("'nosuch' is not a known model", "cnn")),
    (("train", "digits", "--runs", "0"), ("--runs must be at least 1",)),
    (("train", "digits", "--vary", "nosuch"), ("unknown source 'nosuch'",)),
    (("train", "digits", "--config", "typo.toml"), ("unknown key 'trian'", "train")),
    (("train", "digits", "--nosuch"), ("No such option: --nosuch",)),
    (("train", "digits", "--runs", "abc"), ("Invalid value for '--runs'",)),
    (("submit", "digits", "--backend", "nosuch"), ("unknown backend 'nosuch'", "slurm")),
    (("submit", "analyze", "exp", "--backend", "nosuch"), ("unknown backend 'nosuch'",)),
    (("submit", "saliency", "exp", "--backend", "nosuch"), ("unknown backend 'nosuch'",)),
    (("analyze", "rank", "exp", "--by", "nosuch"), ("unknown metric 'nosuch'", "gconf_mean")),
    (("analyze", "accuracy", "../x"), ("unknown experiment '../x'",)),
    (("analyze", "import", ".", "--name", "bad/name"), ("invalid experiment name 'bad/name'",)),
    (("analyze", "import", "nosuch", "--name", "x"), ("nosuch is not a folder",)),
    (("analyze", "rank", "exp", "--shard", "3/2"), ("--shard must be i/k",)),
    (("analyze", "rank", "exp", "--merge", "--shard", "1/2"), ("--merge cannot be combined",)),
    (("analyze", "saliency", "exp", "--top", "0"), ("--top must be at least 1",)),
    (("analyze", "curve", "exp", "--subsets", "0"), ("Invalid value for '--subsets'",)),
    (("analyze", "rank", "exp", "--ranks", "nosuch"), ("unknown rank convention", "study")),
    (("analyze", "rank", "exp", "--split", "all"), ("--split all applies only",)),
    (("analyze", "curve", "exp", "--design", "nosuch"), ("unknown curve design", "prefix")),
    (("analyze", "curve", "exp", "--step", "10"), ("--step applies only to --design prefix",)),
    (("analyze", "curve", "exp", "--design", "prefix", "--step", "0"), ("--step must be",)),
    (("analyze", "metrics", "--nosuch"), ("No such option: --nosuch",)),
    (("retrain", "exp", "--by", "maxconf_sdt"), ("unknown strategy", "maxconf_std")),
    (("retrain", "exp", "--budget", "0.1,1.5"), ("outside [0, 1]",)),
    (("report", "html", "../x"), ("unknown experiment '../x'",)),
    (("report", "html", "--study", "exp"), ("takes no experiment name",)),
]

#: Errors found by the backends' service, which imports the analysis: pandas, never torch.
PANDAS_ERRORS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("submit", "status", "nosuch"), ("unknown experiment 'nosuch'",)),
    (("submit", "download", "nosuch"), ("unknown experiment 'nosuch'",)),
]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    modules: frozenset[str]

    @property
    def heavy(self) -> set[str]:
        return set(self.modules & HEAVY)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Outcome]:
    """``--version`` and each error in its own interpreter (a few at a time), the helps
    together in one."""
    work = tmp_path_factory.mktemp("startup")
    (work / "typo.toml").write_text("[trian]\nepochs = 3\n")
    probes = tmp_path_factory.mktemp("modules")
    env = dict(os.environ, COLUMNS="100")
    env.pop("MLVAR_CONFIG", None)
    for var, sub in (("DATA", "data"), ("RUNS", "runs"), ("REPORTS", "reports")):
        env[f"MLVAR_{var}_ROOT"] = str(work / sub)
    commands = [("--version",), *(a for a, _ in ERRORS + PANDAS_ERRORS)]

    def python(k: int, *args: str) -> tuple[subprocess.CompletedProcess, object]:
        record = probes / f"{k}.json"
        proc = subprocess.run(
            [sys.executable, "-c", *args],
            env={**env, "MLVAR_TEST_MODULES": str(record)},
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert record.is_file(), proc.stderr
        return proc, json.loads(record.read_text())

    def run(k: int, args: tuple[str, ...]) -> Outcome:
        proc, modules = python(k, _PROBE, *args)
        return Outcome(proc.returncode, proc.stdout, proc.stderr, frozenset(modules))

    def run_helps() -> dict[tuple[str, ...], Outcome]:
        proc, record = python(len(commands), _HELP_PROBE, json.dumps(HELP))
        loaded = frozenset(record["modules"])
        return {
            args: Outcome(code, out, err, loaded)
            for args, (code, out, err) in zip(HELP, record["results"], strict=True)
        }

    with ThreadPoolExecutor(max_workers=3) as pool:
        helps = pool.submit(run_helps)
        done = list(pool.map(run, range(len(commands)), commands))
    assert sorted(p.name for p in work.iterdir()) == ["typo.toml"], "a command wrote files"
    return {**dict(zip(commands, done, strict=True)), **helps.result()}


def test_version_loads_typer_and_rich_only(outcomes: dict[tuple[str, ...], Outcome]) -> None:
    out = outcomes[("--version",)]
    assert (out.code, out.stdout, out.stderr) == (ExitCode.OK, f"mlvar {__version__}\n", "")
    assert not out.heavy, out.heavy
    assert "numpy" not in out.modules  # not even the registries


def test_every_command_is_covered() -> None:
    # the list is walked from the app: every group brings its sub-commands
    for path in [("train",), ("data", "list"), ("submit", "saliency"), ("analyze", "metrics")]:
        assert (*path, "--help") in HELP, path
    for group in ("data", "submit", "analyze", "report"):
        assert any(len(h) == 3 and h[0] == group for h in HELP), group


@pytest.mark.parametrize("args", HELP, ids=" ".join)
def test_help_loads_no_heavy_library(
    outcomes: dict[tuple[str, ...], Outcome], args: tuple[str, ...]
) -> None:
    out = outcomes[args]
    assert out.code == ExitCode.OK, out.stderr
    assert out.stdout.lstrip().startswith("Usage:") and out.stderr == ""
    # what the helps loaded together: 'python -X importtime -m mlvar ... --help' tells which
    assert not out.heavy, out.heavy


def _one_line_error(out: Outcome, words: tuple[str, ...]) -> None:
    assert out.code == ExitCode.BAD_INPUT, (out.code, out.stderr)
    assert out.stdout == "" and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith("Error: ") and "(hint: " in line and line.endswith(")"), line
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize(("args", "words"), ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_bad_input_needing_no_data_loads_no_heavy_library(
    outcomes: dict[tuple[str, ...], Outcome], args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    out = outcomes[args]
    _one_line_error(out, words)
    assert not out.heavy, out.heavy


@pytest.mark.parametrize(
    ("args", "words"), PANDAS_ERRORS, ids=[" ".join(a) for a, _ in PANDAS_ERRORS]
)
def test_errors_of_the_backends_service_load_no_torch(
    outcomes: dict[tuple[str, ...], Outcome], args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    out = outcomes[args]
    _one_line_error(out, words)
    assert not out.heavy - {"pandas", "pyarrow"}, out.heavy
