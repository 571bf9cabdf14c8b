"""Faults that used to crash (issue #11 item 8), each tried for real.

- a data, runs or reports root that is a file, or a folder mlvar may not write to;
- a full disk (a small tmpfs, and a patched writer) and a read-only filesystem;
- two writers of one experiment at once: two real ``mlvar train`` processes (the MLP
  engines and an image model), a run held by another process, a killed holder;
- ``run.json`` naming array files outside its run folder.

Where a fault needs it (another user's permissions, a tmpfs, two writers) the CLI runs as
real processes (``python -m mlvar``); the rest runs it in process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

import mlvar.io
import mlvar.store
from mlvar import lease
from mlvar.backends.transfer import import_runs
from mlvar.cli import app
from mlvar.cli.common import os_fault_message
from mlvar.config import Config, PathsConfig, load_config
from mlvar.data.registry import prepare
from mlvar.data.scenario import SplitData, write_scenario
from mlvar.errors import ExitCode, MlvarError
from mlvar.lease import Lease
from mlvar.store import LOCKS_DIR, ExperimentStore, RunClaims, inspect_run, read_run
from mlvar.train import images
from mlvar.train.service import train

EXPERIMENT = "digits-holdout-sub3-r1.0-mlp"
CNN_EXPERIMENT = "cifar10-tiny-cnn"
RUNS = [f"run-{i:04d}" for i in range(6)]
#: The MLP runs of these tests: 6 seeds, 3 epochs, one seed per pack.
MLP_ARGS = ["train", "digits", "--runs", "6", "--epochs", "3", "--pack-size", "1"]
MLP_OVER = {"epochs": 3, "pack_size": 1}
CNN_ARGS = ["train", "cifar10", "--model", "cnn", "--runs", "3", "--epochs", "3"]
CNN_ARGS += ["--batch-size", "16", "--workers", "1"]
CNN_OVER = {"model": "cnn", "epochs": 3, "batch_size": 16, "workers": 1}
#: run.json fields that differ between two writes of the same run.
TIMINGS = {"started_at", "finished_at", "wall_time_s", "pack_wall_time_s"}
WAIT_S = 600  # for a CLI process on a loaded 2-core machine

runner = CliRunner()


# ---------------------------------------------------------------- helpers


def snapshot(root: Path, runs: list[str] | None = None) -> dict[str, object]:
    """Every file and folder of an experiment folder: sha256 of each file, ``run.json``
    parsed without its timings. With ``runs``, only those runs' folders."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        run = rel.parts[1] if rel.parts[0] == "runs" and len(rel.parts) > 1 else None
        if runs is not None and run is not None and run not in runs:
            continue
        if path.is_dir():
            out[rel.as_posix()] = "folder"
        elif path.name == "run.json":
            meta = json.loads(path.read_text())
            out[rel.as_posix()] = {k: v for k, v in meta.items() if k not in TIMINGS}
        else:
            out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders and leases left anywhere under ``root``."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.startswith(".tmp-") or p.name == LOCKS_DIR or p.suffix == ".lock"
    )


def assert_complete(store: ExperimentStore) -> None:
    """Every folder under runs/ is a complete run whose arrays match their sha256."""
    for path in sorted((store.root / "runs").iterdir()):
        record, why = inspect_run(path)
        assert record is not None, (path.name, why)
        assert record.verify() == [], path.name


def env_for(root: Path, data_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLVAR_")}
    env.update(
        MLVAR_DATA_ROOT=str(data_root),
        MLVAR_RUNS_ROOT=str(root / "runs"),
        MLVAR_REPORTS_ROOT=str(root / "reports"),
        **extra,
    )
    return env


def start(args: list[str], env: dict[str, str], cwd: Path, prefix: tuple = ()) -> subprocess.Popen:
    """``mlvar ARGS`` as a real process (``prefix``: a command to run it under)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "mlvar", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = WAIT_S) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_line_error(code: int, stdout: str, stderr: str, *words: str) -> str:
    """Exit 2, no traceback, the last stderr line ``Error: ... (hint: ...)`` naming words."""
    assert "Traceback" not in stdout + stderr, stderr
    assert code == ExitCode.BAD_INPUT, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and "(hint: " in lines[0], lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def use_roots(monkeypatch: pytest.MonkeyPatch, cwd: Path, **roots: Path) -> None:
    """Point the in-process CLI at ``roots`` (data, runs, reports), from ``cwd``."""
    monkeypatch.chdir(cwd)
    for var in ("MLVAR_CONFIG", "MLVAR_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    for name, path in roots.items():
        monkeypatch.setenv(f"MLVAR_{name.upper()}_ROOT", str(path))


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with digits' holdout of digit 3 prepared."""
    data = tmp_path_factory.mktemp("digits") / "data"
    prepare(data, "digits", mode="holdout", subclass=3)
    return data


@pytest.fixture(scope="module")
def reference(digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ExperimentStore:
    """What a single writer writes: ``MLP_ARGS`` trained by one process."""
    runs_root = tmp_path_factory.mktemp("reference") / "runs"
    cfg = Config(paths=PathsConfig(digits_data, runs_root, runs_root.parent / "reports"))
    result = train(cfg, "digits", runs=6, overrides=MLP_OVER)
    assert result.trained == RUNS
    return ExperimentStore.open(runs_root, EXPERIMENT)


@pytest.fixture
def trained(reference: ExperimentStore, tmp_path: Path) -> Path:
    """A private copy of the reference runs root (its parent is returned)."""
    shutil.copytree(reference.root.parent, tmp_path / "runs")
    return tmp_path


@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10-format scenario (40 train, 20 val, 20 test images)."""
    data = tmp_path_factory.mktemp("tinycifar") / "data"
    rng = np.random.default_rng(0)

    def split(n: int, offset: int) -> SplitData:
        y = np.arange(n, dtype=np.int64) % 10
        x = rng.integers(0, 64, size=(n, 32, 32, 3)) + (y * 18)[:, None, None, None]
        return SplitData(
            x=x.astype(np.uint8),
            y=y,
            id=np.arange(offset, offset + n, dtype=np.int64),
            affected=y == 0,
            group=np.full(n, -1, dtype=np.int64),
        )

    manifest = {
        "dataset": "cifar10",
        "mode": "augmentation",
        "params": {"cls": 0, "ratio": 0.5},
        "class_names": [f"c{i}" for i in range(10)],
        "input": {"kind": "image", "shape": [32, 32, 3], "max_value": 255},
    }
    splits = {"train": split(40, 0), "val": split(20, 1000), "test": split(20, 2000)}
    write_scenario(data, "cifar10-tiny", manifest, splits)
    return data


@pytest.fixture(scope="session")
def unprivileged() -> tuple[str, ...]:
    """A command prefix under which folder permissions apply: none for a normal user;
    for root, setpriv dropping the capabilities that override them."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot apply")
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlvar-probe-{os.getpid()}"
    probe.mkdir(mode=0o555)
    try:
        done = subprocess.run([*prefix, "mkdir", str(probe / "x")], capture_output=True)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if done.returncode == 0:
        pytest.skip("setpriv cannot drop root's permission override here")
    return prefix


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (``options``: ``size=...``, ``ro``), or a skip."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------- roots


ROOT_COMMANDS = {
    "data": ["data", "prepare", "digits", "--mode", "holdout", "--subclass", "3"],
    "runs": ["train", "digits", "--runs", "1", "--epochs", "1"],
    "reports": ["report", "html", EXPERIMENT],
}


@pytest.mark.parametrize("below", [False, True], ids=["is-a-file", "below-a-file"])
@pytest.mark.parametrize("which", list(ROOT_COMMANDS))
def test_a_root_that_is_a_file_is_one_line(
    which: str,
    below: bool,
    trained: Path,
    digits_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    tree_listing: Callable[[Path], list],
) -> None:
    blocker = trained / "a-file"
    blocker.write_text("not a folder\n")
    roots = {"data": digits_data, "runs": trained / "runs", "reports": trained / "reports"}
    roots[which] = blocker / "sub" if below else blocker
    use_roots(monkeypatch, trained, **roots)
    before, data_before = tree_listing(trained), tree_listing(digits_data)
    result = invoke(*ROOT_COMMANDS[which])
    line = one_line_error(result.exit_code, result.stdout, result.stderr, str(blocker))
    assert f"the {which} root" in line and f"MLVAR_{which.upper()}_ROOT" in line
    assert tree_listing(trained) == before and tree_listing(digits_data) == data_before


def test_a_root_that_is_a_file_in_the_config_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("")
    (tmp_path / "mlvar.toml").write_text('[paths]\nruns_root = "runs"\n')
    with pytest.raises(MlvarError) as info:
        load_config(tmp_path / "mlvar.toml", env={})
    assert "is not a folder" in info.value.message
    assert f"[paths] runs_root in {tmp_path / 'mlvar.toml'}" in info.value.hint
    load_config(tmp_path / "mlvar.toml", env={"MLVAR_RUNS_ROOT": str(tmp_path / "elsewhere")})


@pytest.mark.parametrize("which", list(ROOT_COMMANDS))
def test_a_root_without_write_permission_is_one_line(
    which: str,
    trained: Path,
    digits_data: Path,
    unprivileged: tuple[str, ...],
    tree_listing: Callable[[Path], list],
) -> None:
    locked = trained / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)  # whatever the umask
    data = trained / "data"
    shutil.copytree(digits_data, data)
    env = env_for(trained, locked if which == "data" else data)
    if which != "data":
        env[f"MLVAR_{which.upper()}_ROOT"] = str(locked)
    before = tree_listing(trained)
    code, out, err = finish(start(ROOT_COMMANDS[which], env, trained, unprivileged))
    line = one_line_error(code, out, err, "Permission denied", str(locked))
    assert "mlvar --debug" in line
    # Nothing written anywhere: not even the analysis a report would have needed.
    assert tree_listing(trained) == before


def test_a_read_only_filesystem_is_one_line(
    digits_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        use_roots(monkeypatch, tmp_path, data=digits_data, runs=ro, reports=tmp_path / "rep")
        result = invoke("train", "digits", "--runs", "1", "--epochs", "1")
        one_line_error(
            result.exit_code, result.stdout, result.stderr, "Read-only file system", str(ro)
        )
        assert list(ro.iterdir()) == []


# ---------------------------------------------------------------- full disk


def test_a_full_disk_is_one_line_and_leaves_only_complete_runs(
    digits_data: Path,
    reference: ExperimentStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # About 85 kB a run: the experiment and four runs fit in 400 kB, not six.
    with tmpfs(tmp_path / "small", "size=400k") as small:
        use_roots(monkeypatch, tmp_path, data=digits_data, runs=small, reports=tmp_path / "rep")
        args = MLP_ARGS
        result = invoke(*args)
        line = one_line_error(
            result.exit_code, result.stdout, result.stderr, "No space left on device", str(small)
        )
        assert ".tmp-" not in line and "mlvar --debug" in line
        store = ExperimentStore.open(small, EXPERIMENT)
        landed = [r.run_id for r in store.runs()]
        assert 1 <= len(landed) < 6
        assert_complete(store)
        assert leftovers(small) == []

        # With --debug the traceback comes first, then the same line.
        debug = invoke("--debug", *args)
        assert debug.exit_code == ExitCode.BAD_INPUT
        assert "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1].startswith("Error: No space left on device")
        monkeypatch.setenv("MLVAR_DEBUG", "1")
        assert "Traceback" in invoke(*args).stderr
        monkeypatch.delenv("MLVAR_DEBUG")

        # Room again: the same command trains the missing runs, and the store is what
        # a single writer with room writes.
        subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True)
        again = invoke(*args, "--json")
        assert again.exit_code == 0, again.stderr
        assert json.loads(again.stdout)["skipped"] == landed
        assert snapshot(store.root) == snapshot(reference.root)
        assert leftovers(small) == []


class _FullAfter:
    """``mlvar.io``'s view of ``os`` whose ``fsync`` fails with ENOSPC after ``n`` calls,
    as a full disk does (the error names no file, like a real ``write``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        self.n -= 1
        if self.n < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)


def test_a_failed_write_names_the_final_path_and_leaves_no_folder(
    digits_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_roots(monkeypatch, tmp_path, data=digits_data, runs=tmp_path / "runs")
    assert invoke("train", "digits", "--runs", "1", "--epochs", "1").exit_code == 0
    # run-0001: its logits of four splits (train, val, test, full_val) and model.pt are
    # written (each file and its folder fsynced), then run.json fails.
    monkeypatch.setattr(mlvar.io, "os", _FullAfter(10))
    result = invoke("train", "digits", "--runs", "2", "--epochs", "1")
    runs_dir = tmp_path / "runs" / EXPERIMENT / "runs"
    one_line_error(
        result.exit_code,
        result.stdout,
        result.stderr,
        f"No space left on device: {runs_dir / 'run-0001' / 'run.json'}",
    )
    assert sorted(p.name for p in runs_dir.iterdir()) == ["run-0000"]
    assert leftovers(tmp_path / "runs") == []


def test_a_failed_image_write_keeps_the_checkpoint_to_resume(
    cifar_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {**CNN_OVER, "checkpoint_every": 1}
    whole_cfg = Config(paths=PathsConfig(cifar_data, tmp_path / "whole", tmp_path / "rep"))
    train(whole_cfg, "cifar10", runs=1, overrides=over)
    cfg = Config(paths=PathsConfig(cifar_data, tmp_path / "runs", tmp_path / "rep"))

    real_write = mlvar.store.atomic_write_json

    def no_space(path: Path, obj: object) -> None:  # the disk fills up as run.json is written
        if Path(path).name != "run.json":
            return real_write(path, obj)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("mlvar.store.atomic_write_json", no_space)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, "cifar10", runs=1, overrides=over)
    monkeypatch.undo()
    store = ExperimentStore.open(tmp_path / "runs", CNN_EXPERIMENT)
    folder = store.run_dir("run-0000")
    assert sorted(p.name for p in folder.iterdir()) == [images.CHECKPOINT_FILE]
    assert leftovers(tmp_path / "runs") == []
    resumed = train(cfg, "cifar10", runs=1, overrides=over)
    assert resumed.trained == ["run-0000"] and resumed.cleaned == []
    (run,) = store.runs(verify=True)
    assert run.meta["resumed_from_epoch"] == 2
    assert not (folder / images.CHECKPOINT_FILE).exists()
    whole = ExperimentStore.open(tmp_path / "whole", CNN_EXPERIMENT)
    assert run.meta["arrays"] == whole.runs()[0].meta["arrays"]


def test_os_fault_messages() -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/run.json")
    message, hint = os_fault_message(full)
    assert message == "No space left on device: /x/run.json" and "free space" in hint
    assert os_fault_message(PermissionError(errno.EACCES, "Permission denied", "/x"))[0] == (
        "Permission denied: /x"
    )
    assert os_fault_message(OSError(errno.EROFS, "Read-only file system"))[0] == (
        "Read-only file system"
    )
    # Not a fault of the machine's files: left to be an internal error with its traceback.
    assert os_fault_message(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None
    assert os_fault_message(OSError("no errno")) is None


# ---------------------------------------------------------------- run.json array names


@pytest.mark.parametrize(
    "name", ["../../outside.npy", "/etc/passwd", "sub/test.logits.npy", "..", "a\\b.npy"]
)
def test_array_names_outside_the_run_folder_skip_the_run(
    name: str, trained: Path, monkeypatch: pytest.MonkeyPatch, digits_data: Path
) -> None:
    store = ExperimentStore.open(trained / "runs", EXPERIMENT)
    meta_file = store.run_dir("run-0001") / "run.json"
    meta = json.loads(meta_file.read_text())
    meta["arrays"][name] = meta["arrays"].pop("test.logits.npy")
    meta_file.write_text(json.dumps(meta))
    opened: list[Path] = []
    real_sha = mlvar.store.sha256_file

    def spy(path: Path) -> str:
        opened.append(Path(path))
        return real_sha(path)

    monkeypatch.setattr(mlvar.store, "sha256_file", spy)
    with pytest.warns(UserWarning, match=r"skipping run run-0001 .*not a plain file name"):
        runs = store.runs(verify=True)
    assert [r.run_id for r in runs] == [r for r in RUNS if r != "run-0001"]
    assert opened and all(p.parent.parent == store.root / "runs" for p in opened)
    assert inspect_run(store.run_dir("run-0001"))[0] is None
    assert "not a plain file name" in inspect_run(store.run_dir("run-0001"))[1]

    # The CLI's analysis warns, naming the run and the name, and goes on without it.
    use_roots(monkeypatch, trained, data=digits_data, runs=trained / "runs")
    result = invoke("analyze", "accuracy", EXPERIMENT, "--json")
    assert result.exit_code == 0, result.stderr
    assert "run-0001" in result.stderr and repr(name) in result.stderr
    assert json.loads(result.stdout)["n_runs"] == 5

    # An import refuses it, saying why; the other runs land.
    dest_root = trained / "dest"
    dest = ExperimentStore.create(
        dest_root,
        EXPERIMENT,
        {k: v for k, v in store.meta.items() if k not in ("splits", "store_format")},
        {s: {c: store.samples(s)[c].to_numpy() for c in store.samples(s)} for s in store.splits},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = import_runs(store.root, dest)
    assert "not a plain file name" in imported.rejected["run-0001"]
    assert sorted(imported.imported) == [r for r in RUNS if r != "run-0001"]


# ---------------------------------------------------------------- several writers


def _both(args: list[str], root: Path, data: Path) -> list[dict]:
    """Two ``mlvar ARGS --json`` started together on the runs root ``root/runs``."""
    env = env_for(root, data)
    procs = [start([*args, "--json"], env, root) for _ in range(2)]
    outputs = []
    for proc in procs:
        code, out, err = finish(proc)
        assert code == 0 and "Traceback" not in err, err
        outputs.append(json.loads(out))
    return outputs


def _shared_out(outputs: list[dict], runs: list[str]) -> None:
    """Each run trained by exactly one process; each process accounts for every run."""
    a, b = (set(o["trained"]) for o in outputs)
    assert not a & b and sorted(a | b) == runs
    for out in outputs:
        assert sorted(out["trained"] + out["skipped"]) == runs, out


@pytest.mark.parametrize("engine", ["pack-1", "batched"])
def test_two_writers_at_once_write_what_one_writes(
    engine: str,
    digits_data: Path,
    reference: ExperimentStore,
    tmp_path: Path,
) -> None:
    if engine == "pack-1":
        args, ref = MLP_ARGS, reference
    else:  # the default pack: one process claims all six runs, the other waits for them
        args = MLP_ARGS[:-2]
        cfg = Config(paths=PathsConfig(digits_data, tmp_path / "ref", tmp_path / "rep"))
        train(cfg, "digits", runs=6, overrides={"epochs": 3})
        ref = ExperimentStore.open(tmp_path / "ref", EXPERIMENT)
    # Both start on an empty runs root: both create the experiment, then share the runs.
    outputs = _both(args, tmp_path, digits_data)
    _shared_out(outputs, RUNS)
    store = ExperimentStore.open(tmp_path / "runs", EXPERIMENT)
    assert snapshot(store.root) == snapshot(ref.root)
    assert leftovers(tmp_path / "runs") == []


def test_two_image_writers_at_once_write_what_one_writes(cifar_data: Path, tmp_path: Path) -> None:
    cfg = Config(paths=PathsConfig(cifar_data, tmp_path / "ref", tmp_path / "rep"))
    train(cfg, "cifar10", runs=3, overrides=CNN_OVER)
    ref = ExperimentStore.open(tmp_path / "ref", CNN_EXPERIMENT)
    outputs = _both(CNN_ARGS, tmp_path, cifar_data)
    _shared_out(outputs, RUNS[:3])
    store = ExperimentStore.open(tmp_path / "runs", CNN_EXPERIMENT)
    assert snapshot(store.root) == snapshot(ref.root)
    assert leftovers(tmp_path / "runs") == []


def _empty_experiment(reference: ExperimentStore, runs_root: Path) -> ExperimentStore:
    """The reference experiment without its runs, at ``runs_root``."""
    shutil.copytree(reference.root, runs_root / EXPERIMENT, ignore=shutil.ignore_patterns("run-*"))
    return ExperimentStore.open(runs_root, EXPERIMENT)


def _wait_for(check: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert proc.poll() is None, f"mlvar exited before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_run_another_process_holds_is_waited_for_and_taken_as_finished(
    digits_data: Path, reference: ExperimentStore, tmp_path: Path
) -> None:
    store = _empty_experiment(reference, tmp_path / "runs")
    with RunClaims(store) as other:  # this test process plays the other writer
        assert other.claim("run-0001") is True
        proc = start(
            [*MLP_ARGS[:3], "3", *MLP_ARGS[4:], "--json"], env_for(tmp_path, digits_data), tmp_path
        )
        _wait_for(
            lambda: all(read_run(store.run_dir(r)) for r in ("run-0000", "run-0002")),
            proc,
            "runs 0 and 2",
        )
        time.sleep(3 * store_poll())
        assert proc.poll() is None, "mlvar did not wait for run-0001"
        assert not store.run_dir("run-0001").exists()
        # The other writer finishes run-0001 (the reference's copy) and lets go.
        staged = tmp_path / "runs" / EXPERIMENT / ".tmp-test" / "run-0001"
        shutil.copytree(reference.run_dir("run-0001"), staged)
        assert store.land_run(staged, "run-0001")
        shutil.rmtree(staged.parent)
    code, out, err = finish(proc)
    assert code == 0, err
    result = json.loads(out)
    assert result["trained"] == ["run-0000", "run-0002"] and result["skipped"] == ["run-0001"]
    assert snapshot(store.root) == snapshot(reference.root, runs=RUNS[:3])
    assert leftovers(tmp_path / "runs") == []


def store_poll() -> float:
    return mlvar.store.WAIT_POLL_S


def test_a_run_another_process_gives_up_is_trained_here(
    digits_data: Path, reference: ExperimentStore, tmp_path: Path
) -> None:
    store = _empty_experiment(reference, tmp_path / "runs")
    with RunClaims(store) as other:
        assert other.claim("run-0001") is True
        proc = start(
            [*MLP_ARGS[:3], "3", *MLP_ARGS[4:], "--json"], env_for(tmp_path, digits_data), tmp_path
        )
        _wait_for(lambda: read_run(store.run_dir("run-0002")) is not None, proc, "run 2")
    code, out, err = finish(proc)  # released without writing it: mlvar trains it
    assert code == 0, err
    assert json.loads(out)["trained"] == RUNS[:3]
    assert snapshot(store.root) == snapshot(reference.root, runs=RUNS[:3])


def test_a_killed_writer_blocks_nothing(
    digits_data: Path, reference: ExperimentStore, tmp_path: Path
) -> None:
    env = env_for(tmp_path, digits_data)
    killed = start(MLP_ARGS, env, tmp_path)
    locks = tmp_path / "runs" / EXPERIMENT / LOCKS_DIR
    # Killed as soon as it holds its first lease (it trains run-0000 then).
    _wait_for(lambda: locks.is_dir() and any(locks.glob("*.lock")), killed, "a lease")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stale = sorted(p.name for p in locks.glob("*.lock"))
    assert stale, "the killed writer left no lease to break"
    # Its lease names a process of this host that is gone: broken at once, well before
    # the 120 s a lease of another host must go unrefreshed.
    t0 = time.monotonic()
    code, out, err = finish(start([*MLP_ARGS, "--json"], env, tmp_path), timeout=lease.STALE_S)
    assert code == 0, err
    assert time.monotonic() - t0 < lease.STALE_S
    assert sorted(json.loads(out)["trained"]) == RUNS
    store = ExperimentStore.open(tmp_path / "runs", EXPERIMENT)
    assert snapshot(store.root) == snapshot(reference.root)
    assert leftovers(tmp_path / "runs") == []


def test_an_experiment_made_meanwhile_by_another_process_is_used(
    reference: ExperimentStore, tmp_path: Path
) -> None:
    samples = {
        s: {c: reference.samples(s)[c].to_numpy() for c in reference.samples(s)}
        for s in reference.splits
    }
    meta = {k: v for k, v in reference.meta.items() if k not in ("splits", "store_format")}
    first = ExperimentStore.create(tmp_path, EXPERIMENT, meta, samples)
    # A second process that looked before the first had renamed its folder into place:
    second = ExperimentStore.create(tmp_path, EXPERIMENT, dict(meta, created_by="other"), samples)
    assert second.root == first.root and second.meta == first.meta
    assert [p.name for p in tmp_path.iterdir()] == [EXPERIMENT]


# ---------------------------------------------------------------- leases


@pytest.fixture
def fast_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(lease, "STALE_S", 0.5)


def _foreign_lease(path: Path, host: str = "another-node", pid: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "t"}))


def test_a_lease_is_held_once(tmp_path: Path) -> None:
    a, b = Lease(tmp_path / "x.lock"), Lease(tmp_path / "x.lock")
    assert a.acquire() and not b.acquire()
    assert a.holder() == f"{lease._HOST}:{os.getpid()}"
    a.release()
    assert b.acquire() and not a.acquire()
    b.release()
    assert not tmp_path.joinpath("x.lock").exists()


def test_a_lease_of_a_dead_process_here_is_broken_at_once(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _foreign_lease(tmp_path / "x.lock", host=lease._HOST, pid=int(gone.stdout))
    mine = Lease(tmp_path / "x.lock")
    assert mine.acquire()
    mine.release()


def test_a_lease_of_another_host_is_broken_once_it_stops_changing(
    tmp_path: Path, fast_leases: None
) -> None:
    _foreign_lease(tmp_path / "x.lock")
    mine = Lease(tmp_path / "x.lock")
    t0 = time.monotonic()
    while not mine.acquire():
        assert time.monotonic() - t0 < 10
        time.sleep(0.05)
    assert time.monotonic() - t0 >= lease.STALE_S
    mine.release()


def test_a_refreshed_lease_of_another_host_is_never_broken(
    tmp_path: Path, fast_leases: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease, "_HOST", "another-node")
    holder = Lease(tmp_path / "x.lock")
    assert holder.acquire()
    monkeypatch.setattr(lease, "_HOST", "this-node")
    waiter = Lease(tmp_path / "x.lock")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4 * lease.STALE_S:
        assert not waiter.acquire()  # the heartbeat keeps it fresh
        time.sleep(0.05)
    lease._heartbeat.discard(holder)  # the holder's node dies: no more heartbeats
    t0 = time.monotonic()
    while not waiter.acquire():
        assert time.monotonic() - t0 < 10
        time.sleep(0.05)
    waiter.release()


def test_breaking_puts_back_a_lease_taken_over_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.lock"
    _foreign_lease(path)
    taker = Lease(path)

    def stale_then_taken(p: Path, seen: object) -> bool:
        # Judged stale; then, before this breaker renames it, another process breaks it
        # and takes the lease anew.
        path.unlink()
        assert taker.acquire()
        return True

    monkeypatch.setattr(lease, "_stale", stale_then_taken)
    assert Lease(path).acquire() is False
    assert taker.held and taker._is_ours(taker._fd)  # the new lease is still in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]
    taker.release()
