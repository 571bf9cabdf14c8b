"""The real CLI, in process: bad input gives exit code 2, one ``Error: ... (hint: ...)`` line
on stderr, no traceback, and leaves the work folders untouched; a few success paths with
``--json``.

Every test runs with ``MLVAR_DATA_ROOT``/``MLVAR_RUNS_ROOT``/``MLVAR_REPORTS_ROOT`` inside a
temporary folder that is also the current directory (so no ``./mlvar.toml`` is read), and
compares a listing of that folder before and after each failing command.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from mlvar import __version__
from mlvar.analysis.metrics import METRICS
from mlvar.cli import app
from mlvar.data.compas import COMPAS_SHA256
from mlvar.errors import MlvarError

# typer >= 0.26 ships its own click; its CliRunner keeps stderr apart from stdout (as click
# >= 8.2 does), so ``result.stderr`` is what a user sees on stderr.
runner = CliRunner()

DIGITS_SCENARIO = "digits-holdout-sub3-r1.0"
DIGITS_EXPERIMENT = f"{DIGITS_SCENARIO}-mlp"
ENV_DIRS = {"MLVAR_DATA_ROOT": "data", "MLVAR_RUNS_ROOT": "runs", "MLVAR_REPORTS_ROOT": "reports"}

Listing = Callable[[Path], list[tuple[str, int]]]


def use_root(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every mlvar path at ``root`` and make it the current directory."""
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    for var, sub in ENV_DIRS.items():
        monkeypatch.setenv(var, str(root / sub))
    return root


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result: Result, *words: str) -> str:
    """Exit 2, one ``Error:`` line with a hint naming ``words``, no traceback; return it."""
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert result.exit_code == 2, (result.exit_code, everything, result.exception)
    # Exit code 2 must come from mlvar's error handler, not from an escaped exception.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("Error: "), line
    assert "(hint: " in line and line.endswith(")"), line
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    assert result.stdout.strip() == "", result.stdout
    return line


def fails_cleanly(root: Path, listing: Listing, *args: str | Path, words: tuple = ()) -> str:
    """Run a command that must fail as a user error and write nothing under ``root``."""
    before = listing(root)
    line = assert_user_error(invoke(*args), *words)
    assert listing(root) == before, f"{args} changed {root}"
    return line


def ok(*args: str | Path) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def ok_json(*args: str | Path) -> object:
    return json.loads(ok(*args, "--json").stdout)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty work folder (data, runs and reports roots inside it), also the cwd."""
    return use_root(tmp_path, monkeypatch)


@pytest.fixture
def compas_work(compas_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A work folder whose data root already holds the fetched COMPAS CSV."""
    return use_root(compas_root.parent, monkeypatch)


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Once per module: digits holdout of digit 3 prepared and 2 runs of 2 epochs trained,
    all through the CLI. Tests that change the folder must copy it first."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        use_root(root, mp)
        prepared = ok_json("data", "prepare", "digits", "--mode", "holdout", "--subclass", "3")
        trained = ok_json("train", "digits", "--runs", "2", "--epochs", "2")
    yield {"root": root, "prepare": prepared, "train": trained}


@pytest.fixture
def trained(trained_root: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained work folder, as cwd and mlvar roots."""
    root = tmp_path / "trained"
    shutil.copytree(trained_root["root"], root)
    return use_root(root, monkeypatch)


@pytest.fixture
def two_compas_scenarios(compas_work: Path) -> Path:
    """A work folder with two prepared COMPAS scenarios (original and artificial 0.3)."""
    ok("data", "prepare", "compas")
    ok("data", "prepare", "compas", "--mode", "artificial", "--ratio", "0.3")
    return compas_work


# ---------------------------------------------------------------- data fetch / prepare


@pytest.mark.parametrize(
    "args",
    [["data", "fetch", "cifar11"], ["data", "prepare", "cifar11"], ["train", "cifar11"]],
    ids=["fetch", "prepare", "train"],
)
def test_unknown_dataset(work: Path, tree_listing: Listing, args: list[str]) -> None:
    fails_cleanly(work, tree_listing, *args, words=("unknown dataset", "cifar11", "compas"))


def test_unknown_scenario_info(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "data",
        "info",
        "digits-holdout-sub3",
        words=(
            "no prepared scenario",
            "'digits-holdout-sub3'",
            f"did you mean '{DIGITS_SCENARIO}'",
        ),
    )


def test_unknown_dataset_suggests_nearest(work: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        work, tree_listing, "data", "prepare", "digit", words=("'digit'", "did you mean 'digits'")
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["digits", "--mode", "holdut", "--subclass", "3"], ("mode", "holdut", "'holdout'")),
        (["digits", "--mode", "artificial"], ("digits mode", "artificial", "original")),
        (["compas", "--mode", "holdot", "--cluster", "3"], ("compas mode", "holdot", "'holdout'")),
    ],
    ids=["digits-typo", "digits-compas-mode", "compas-typo"],
)
def test_unknown_mode(
    compas_work: Path, tree_listing: Listing, args: list[str], words: tuple
) -> None:
    fails_cleanly(compas_work, tree_listing, "data", "prepare", *args, words=words)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--subclass", "12"], ("subclass", "12", "0-9")),
        (["--subclass", "x"], ("subclass", "'x'", "0-9")),
        (["--subclass=-1"], ("subclass", "-1", "0-9")),
        (["--subclass", "3.5"], ("subclass", "3.5", "0-9")),
        # Without --subclass, holdout is the study's sweep (tests/test_cli_sweeps.py).
        (["--mode", "holdout", "--subclass", "3,all"], ("subclass", "'all'", "alone")),
        (["--mode", "original", "--subclass", "3"], ("original", "takes no --subclass")),
        (["--mode", "holdout", "--subclass", "3", "--cluster", "2"], ("takes no --cluster",)),
    ],
    ids=["12", "letter", "negative", "fraction", "keyword-in-list", "original", "cluster"],
)
def test_digits_invalid_subclass(
    work: Path, tree_listing: Listing, args: list[str], words: tuple
) -> None:
    fails_cleanly(work, tree_listing, "data", "prepare", "digits", *args, words=words)


@pytest.mark.parametrize(
    "args, words",
    [
        (["compas", "--mode", "artificial", "--ratio", "0.7"], ("ratio", "0.7", "[0.0, 0.5]")),
        (["compas", "--mode", "artificial", "--ratio=-0.1"], ("ratio", "-0.1", "[0.0, 0.5]")),
        # Without --ratio, artificial is the study's sweep (tests/test_cli_sweeps.py).
        (
            ["compas", "--mode", "artificial", "--ratio", "0.1:0.7:0.1"],
            ("ratio 0.6", "out of range", "[0.0, 0.5]"),
        ),
        (["digits", "--subclass", "3", "--ratio", "1.5"], ("ratio", "1.5", "[0.0, 1.0]")),
        (["digits", "--subclass", "3", "--ratio", "nan"], ("ratio", "nan")),
    ],
    ids=["compas-0.7", "compas-negative", "compas-range", "digits-1.5", "digits-nan"],
)
def test_ratio_out_of_range(
    compas_work: Path, tree_listing: Listing, args: list[str], words: tuple
) -> None:
    fails_cleanly(compas_work, tree_listing, "data", "prepare", *args, words=words)


@pytest.mark.parametrize("cluster", ["14", "99", "-1"])
def test_cluster_out_of_range(compas_work: Path, tree_listing: Listing, cluster: str) -> None:
    line = fails_cleanly(
        compas_work,
        tree_listing,
        "data",
        "prepare",
        "compas",
        "--mode",
        "holdout",
        f"--cluster={cluster}",
        words=("cluster", cluster),
    )
    assert "0..13" in line  # the valid range: 14 leaves with min_samples_leaf=300


def test_prepare_compas_without_fetch(work: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        work, tree_listing, "data", "prepare", "compas", words=("not found", "mlvar data fetch")
    )


def test_prepare_twice_without_force(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "data",
        "prepare",
        "digits",
        "--subclass",
        "3",
        words=("already exists", DIGITS_SCENARIO, "--force"),
    )


def test_fetch_source_missing(work: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        work,
        tree_listing,
        "data",
        "fetch",
        "compas",
        "--source",
        work / "nowhere.csv",
        words=("nowhere.csv", "not found"),
    )


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x00\x01\x02\x03binary\x00" * 50, ("not a csv",)),
        (b"no commas here\njust text\n", ("lacks required columns", "two_year_recid")),
        (b"", ("empty",)),
    ],
    ids=["binary", "text", "empty"],
)
def test_fetch_source_not_a_csv(
    work: Path, tree_listing: Listing, content: bytes, words: tuple
) -> None:
    bad = work / "bad.csv"
    bad.write_bytes(content)
    fails_cleanly(work, tree_listing, "data", "fetch", "compas", "--source", bad, words=words)


def test_fetch_source_lacks_columns(work: Path, tree_listing: Listing, compas_csv: Path) -> None:
    lines = compas_csv.read_text().splitlines()
    header = lines[0].split(",")
    drop = {"priors_count", "two_year_recid", "race"}
    keep = [i for i, col in enumerate(header) if col not in drop]
    # Only the first 200 rows: enough to parse, quick to write.
    rows = [",".join(line.split(",")[i] for i in keep) for line in lines[:200]]
    bad = work / "fewer-columns.csv"
    bad.write_text("\n".join(rows) + "\n")
    line = fails_cleanly(
        work, tree_listing, "data", "fetch", "compas", "--source", bad, words=("lacks", "columns")
    )
    for col in drop:
        assert col in line
    assert "sex" not in line.split("columns", 1)[1].split("(hint")[0]  # only the missing ones


def test_fetch_checksum_mismatch_and_no_verify(
    work: Path, tree_listing: Listing, compas_csv: Path
) -> None:
    modified = work / "modified.csv"
    lines = compas_csv.read_text().splitlines(keepends=True)
    modified.write_text("".join(lines[:-1]))  # drop the last row: still a valid COMPAS CSV
    fails_cleanly(
        work,
        tree_listing,
        "data",
        "fetch",
        "compas",
        "--source",
        modified,
        words=("checksum mismatch", COMPAS_SHA256, "--no-verify"),
    )
    info = ok_json("data", "fetch", "compas", "--source", modified, "--no-verify")
    assert info["verified"] is False
    assert info["sha256"] != COMPAS_SHA256
    assert info["rows"] == 7213
    assert (work / "data" / "raw" / "compas-scores-two-years.csv").read_text() == "".join(
        lines[:-1]
    )


def test_fetch_digits_takes_no_source(work: Path, tree_listing: Listing, compas_csv: Path) -> None:
    fails_cleanly(
        work,
        tree_listing,
        "data",
        "fetch",
        "digits",
        "--source",
        compas_csv,
        words=("digits takes no --source",),
    )


# ---------------------------------------------------------------- train


@pytest.mark.parametrize("runs", ["0", "-3"])
def test_train_runs_below_one(trained: Path, tree_listing: Listing, runs: str) -> None:
    fails_cleanly(
        trained, tree_listing, "train", "digits", f"--runs={runs}", words=("--runs", runs)
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--vary", "init,ordr"], ("vary", "'ordr'", "'order'")),
        (["--vary", "aug"], ("vary", "'aug'", "init, order, dropout")),
        (["--vary", "init,init"], ("vary", "twice")),
        (["--vary", ","], ("--vary is empty",)),
        (["--engine", "fast"], ("engine", "'fast'", "batched")),
        (["--epochs", "0"], ("epochs", "0")),
        (["--lr", "0"], ("lr", "positive")),
        (["--lr=-0.1"], ("lr", "positive")),
        (["--batch-size", "1"], ("batch_size", "1")),
        (["--pack-size", "0"], ("pack_size", "0")),
        (["--device", "tpu"], ("device", "'tpu'", "cpu")),
        (["--name", "../escape"], ("experiment name", "../escape")),
    ],
    ids=[
        "vary-typo",
        "vary-unknown",
        "vary-twice",
        "vary-empty",
        "engine",
        "epochs",
        "lr-zero",
        "lr-negative",
        "batch-size",
        "pack-size",
        "device",
        "name",
    ],
)
def test_train_bad_option(
    trained: Path, tree_listing: Listing, args: list[str], words: tuple
) -> None:
    fails_cleanly(trained, tree_listing, "train", "digits", "--runs", "1", *args, words=words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_train_cuda_unavailable(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "train",
        "digits",
        "--runs",
        "1",
        "--device",
        "cuda",
        words=("cuda", "not available", "--device cpu"),
    )


def test_train_a_model_the_images_are_too_small_for(trained: Path, tree_listing: Listing) -> None:
    """airbench pools 8x8 digits to nothing: refused before the experiment is created."""
    fails_cleanly(
        trained,
        tree_listing,
        "train",
        "digits",
        "--runs",
        "1",
        "--model",
        "airbench",
        words=("airbench", "8x8", "--model cnn"),
    )


def test_train_negative_base_seed(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "train",
        "digits",
        "--runs",
        "1",
        "--epochs",
        "1",
        "--name",
        "negative-seed",
        "--base-seed=-5",
        words=("base_seed", "-5"),
    )


def test_train_without_prepared_scenario(work: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        work,
        tree_listing,
        "train",
        "digits",
        "--runs",
        "1",
        words=("no prepared scenario", "mlvar data prepare digits"),
    )


def test_train_unknown_scenario(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "train",
        "digits",
        "--scenario",
        "digits-holdout-sub4-r1.0",
        words=("digits-holdout-sub4-r1.0", f"did you mean '{DIGITS_SCENARIO}'"),
    )


def test_train_existing_experiment_with_other_setup(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "train",
        "digits",
        "--runs",
        "3",
        "--epochs",
        "3",
        words=(DIGITS_EXPERIMENT, "different setup", "epochs", "--force"),
    )


def test_scenario_ambiguous(two_compas_scenarios: Path) -> None:
    # 'mlvar train' now trains every scenario it selects (issue #12 item 3); the commands
    # of one scenario still refuse an ambiguous value, naming the candidates.
    from mlvar.config import load_config
    from mlvar.data.scenario import resolve_scenario

    with pytest.raises(MlvarError, match="2 prepared scenarios") as err:
        resolve_scenario(load_config().paths.data_root, "compas", None)
    assert "compas-original" in err.value.hint and "compas-artificial-r0.3" in err.value.hint
    assert "--scenario" in err.value.hint


@pytest.mark.parametrize(
    "value, words",
    [
        ("compas-holdout-*", ("'compas-holdout-*'", "matches no", "compas-original")),
        ("compas-original,artificail", ("'artificail'", "did you mean 'artificial'")),
        (" , ", ("names no scenario", "commas")),
    ],
    ids=["glob", "list-typo", "empty-list"],
)
def test_scenario_selecting_nothing(
    two_compas_scenarios: Path, tree_listing: Listing, value: str, words: tuple
) -> None:
    for command in ("train", "submit"):
        fails_cleanly(
            two_compas_scenarios,
            tree_listing,
            command,
            "compas",
            "--scenario",
            value,
            "--runs",
            "1",
            words=words,
        )


def test_scenario_by_mode_resolves(two_compas_scenarios: Path) -> None:
    from mlvar.config import load_config
    from mlvar.train.service import prepare_training

    found, _cfg, name = prepare_training(load_config(), "compas", "artificial", runs=1)
    assert found.name.startswith("compas-artificial") and name == f"{found.name}-mlp"


# ---------------------------------------------------------------- analyze / report


@pytest.mark.parametrize(
    "args",
    [["analyze", "accuracy"], ["analyze", "rank"], ["report", "html"]],
    ids=["accuracy", "rank", "report"],
)
def test_unknown_experiment(trained: Path, tree_listing: Listing, args: list[str]) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        *args,
        DIGITS_EXPERIMENT.replace("mlp", "mpl"),
        words=("unknown experiment", "mpl", f"did you mean '{DIGITS_EXPERIMENT}'"),
    )


@pytest.mark.parametrize(
    "args",
    [["analyze", "accuracy"], ["analyze", "rank"], ["report", "html"]],
    ids=["accuracy", "rank", "report"],
)
def test_unknown_experiment_empty_runs_root(
    work: Path, tree_listing: Listing, args: list[str]
) -> None:
    fails_cleanly(
        work, tree_listing, *args, "nothing-here", words=("unknown experiment", "mlvar train")
    )


@pytest.mark.parametrize(
    "args",
    [["analyze", "accuracy"], ["analyze", "rank"], ["report", "html"]],
    ids=["accuracy", "rank", "report"],
)
def test_experiment_without_finished_runs(
    trained: Path, tree_listing: Listing, args: list[str]
) -> None:
    runs = sorted((trained / "runs" / DIGITS_EXPERIMENT / "runs").glob("*/run.json"))
    assert len(runs) == 2
    for file in runs:
        file.unlink()  # as if both runs were killed before finishing
    fails_cleanly(
        trained,
        tree_listing,
        *args,
        DIGITS_EXPERIMENT,
        words=(DIGITS_EXPERIMENT, "no finished runs", "mlvar train digits"),
    )


def test_unknown_metric_rank(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "analyze",
        "rank",
        DIGITS_EXPERIMENT,
        "--by",
        "disagrement",
        words=("unknown metric", "disagrement", "did you mean 'disagreement'"),
    )


def test_unknown_metric_report(trained: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        "report",
        "html",
        DIGITS_EXPERIMENT,
        "--by",
        "disagrement",
        words=("unknown metric", "disagrement", "did you mean 'disagreement'"),
    )


def test_report_out_is_a_file(trained: Path, tree_listing: Listing) -> None:
    target = trained / "a-file"
    target.write_text("not a folder\n")
    fails_cleanly(
        trained,
        tree_listing,
        "report",
        "html",
        DIGITS_EXPERIMENT,
        "--out",
        target,
        words=("a-file", "not a folder"),
    )


@pytest.mark.parametrize(
    "args",
    [["analyze", "accuracy"], ["analyze", "rank"]],
    ids=["accuracy", "rank"],
)
def test_unknown_split(trained: Path, tree_listing: Listing, args: list[str]) -> None:
    fails_cleanly(
        trained,
        tree_listing,
        *args,
        DIGITS_EXPERIMENT,
        "--split",
        "tset",
        words=("no split 'tset'", "test"),
    )


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "args",
    [
        ["data", "prepare", "digits", "--subclass", "3"],
        ["data", "list"],
        ["train", "digits", "--runs", "1"],
        ["analyze", "accuracy", DIGITS_EXPERIMENT],
        ["report", "html", DIGITS_EXPERIMENT],
    ],
    ids=["prepare", "list", "train", "analyze", "report"],
)
def test_config_typo(trained: Path, tree_listing: Listing, args: list[str]) -> None:
    bad = trained / "bad.toml"
    bad.write_text("[train.digits]\nepoch = 3\n")
    fails_cleanly(
        trained,
        tree_listing,
        *args,
        "--config",
        bad,
        words=("unknown key", "train.digits.epoch", "bad.toml", "did you mean 'epochs'"),
    )


def test_config_file_missing(work: Path, tree_listing: Listing) -> None:
    fails_cleanly(
        work,
        tree_listing,
        "data",
        "list",
        "--config",
        work / "absent.toml",
        words=("absent.toml", "does not exist", "--config"),
    )


def test_config_from_cwd_with_typo(work: Path, tree_listing: Listing) -> None:
    (work / "mlvar.toml").write_text("[paht]\ndata_root = 'x'\n")
    fails_cleanly(work, tree_listing, "data", "list", words=("'paht'", "did you mean 'paths'"))


def test_config_invalid_toml(work: Path, tree_listing: Listing) -> None:
    bad = work / "broken.toml"
    bad.write_text("[paths\ndata_root = \n")
    fails_cleanly(
        work, tree_listing, "data", "list", "--config", bad, words=("not valid TOML", "broken")
    )


def test_usage_error_is_one_line(work: Path, tree_listing: Listing) -> None:
    fails_cleanly(work, tree_listing, "train", "digits", "--runs", "abc", words=("--runs",))


# ---------------------------------------------------------------- success paths


def test_version() -> None:
    result = ok("--version")
    assert result.stdout.strip() == f"mlvar {__version__}"


LEAF_COMMANDS = [
    ["data", "fetch"],
    ["data", "prepare"],
    ["data", "info"],
    ["data", "list"],
    ["train"],
    ["analyze", "accuracy"],
    ["analyze", "rank"],
    ["analyze", "metrics"],
    ["report", "html"],
    ["demo"],
]


@pytest.mark.parametrize(
    "command",
    LEAF_COMMANDS,
    ids=[" ".join(c) for c in LEAF_COMMANDS],
)
def test_help_mentions_example(command: list[str]) -> None:
    out = ok(*command, "--help").stdout
    assert "Usage:" in out
    assert "example" in out.lower(), out


@pytest.mark.parametrize("group", [[], ["data"], ["analyze"], ["report"]], ids=str)
def test_group_help(group: list[str]) -> None:
    out = ok(*group, "--help").stdout
    assert "Usage:" in out and "Commands" in out


def test_root_help_mentions_session() -> None:
    out = ok("--help").stdout
    assert "mlvar demo" in out and "mlvar data prepare" in out


def test_fetch_compas_source_json(work: Path, compas_csv: Path) -> None:
    info = ok_json("data", "fetch", "compas", "--source", compas_csv)
    target = work / "data" / "raw" / "compas-scores-two-years.csv"
    assert info == {
        "dataset": "compas",
        "path": str(target),
        "sha256": COMPAS_SHA256,
        "rows": 7214,
        "verified": True,
        "source": str(compas_csv),
        "action": "copied",
    }
    assert target.read_bytes() == compas_csv.read_bytes()
    # No temporary file left beside it.
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_prepare_digits_json(trained_root: dict) -> None:
    info = trained_root["prepare"]
    assert info["name"] == DIGITS_SCENARIO
    assert info["dataset"] == "digits" and info["mode"] == "holdout"
    assert Path(info["path"]) == trained_root["root"] / "data" / DIGITS_SCENARIO
    assert info["class_names"] == ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert {"train", "val", "test"} <= set(info["splits"])
    assert info["splits"]["train"]["per_class"]["2-3"]["affected"] == 0  # the 3s are gone
    assert info["splits"]["test"]["affected"] > 0


def test_train_digits_json(trained_root: dict) -> None:
    info = trained_root["train"]
    assert info["experiment"] == DIGITS_EXPERIMENT
    assert info["trained"] == ["run-0000", "run-0001"]
    assert info["skipped"] == [] and info["cleaned"] == []
    assert set(info["accuracy"]) == {"run-0000", "run-0001"}
    assert info["device"] == "cpu" and info["engine"] == "batched"
    meta = json.loads((Path(info["path"]) / "runs" / "run-0000" / "run.json").read_text())
    assert meta["config"]["epochs"] == 2 and meta["status"] == "complete"


def test_train_again_skips_finished_runs(trained: Path) -> None:
    info = ok_json("train", "digits", "--runs", "2", "--epochs", "2")
    assert info["trained"] == [] and info["skipped"] == ["run-0000", "run-0001"]


def test_analyze_accuracy_and_rank_json(trained: Path) -> None:
    acc = ok_json("analyze", "accuracy", DIGITS_EXPERIMENT)
    assert acc["experiment"] == DIGITS_EXPERIMENT and acc["n_runs"] == 2
    assert {"per_run", "summary", "expected_seed_std", "observed_seed_std", "files"} <= set(acc)
    assert {"accuracy", "acc_affected", "acc_unaffected"} <= set(acc["summary"])
    assert [r["run_id"] for r in acc["per_run"]] == ["run-0000", "run-0001"]

    rank = ok_json("analyze", "rank", DIGITS_EXPERIMENT, "--by", "disagreement")
    assert rank["by"] == "disagreement" and rank["n_runs"] == 2
    assert {"ranking", "detection", "baselines", "files"} <= set(rank)
    first = rank["ranking"][0]
    assert {"rank", "sample_id", "label", "affected", "n_correct", "disagreement"} <= set(first)
    assert {r["metric"] for r in rank["detection"]} <= set(METRICS)
    for f in rank["files"]:
        assert Path(f).is_file()


def test_report_html_json(trained: Path) -> None:
    info = ok_json("report", "html", DIGITS_EXPERIMENT)
    index = trained / "reports" / DIGITS_EXPERIMENT / "index.html"
    assert index.is_file()
    assert str(index.parent) in json.dumps(info)


def test_data_list_and_info_json(trained: Path) -> None:
    listed = ok_json("data", "list")
    assert [s["name"] for s in listed] == [DIGITS_SCENARIO]
    info = ok_json("data", "info", DIGITS_SCENARIO)
    assert info["name"] == DIGITS_SCENARIO


def test_analyze_metrics() -> None:
    table = ok("analyze", "metrics").stdout
    for name in ("n_correct", "disagreement", "mutual_information"):
        assert name in table
    listed = ok_json("analyze", "metrics")
    assert [m["name"] for m in listed] == list(METRICS)
    assert set(listed[0]) == {"name", "formula", "uses_label", "suspicious_when"}
