"""Configuration: defaults < mlvar.toml < MLVAR_* environment < CLI flags, strict keys and
values, and the annotated ``mlvar.toml.example`` that must equal the defaults."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlvar.cli import app
from mlvar.config import (
    MODELS,
    RANDOMNESS_SOURCES,
    AmlConfig,
    BackendConfig,
    Config,
    PathsConfig,
    ProtocolConfig,
    RayConfig,
    SubmitConfig,
    TrainConfig,
    load_config,
)
from mlvar.data import registry
from mlvar.errors import MlvarError
from mlvar.train.service import prepare_training

EXAMPLE = Path(__file__).resolve().parents[1] / "mlvar.toml.example"
PATH_KEYS = [f.name for f in dataclasses.fields(PathsConfig)]
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]

runner = CliRunner()


def write(folder: Path, text: str, name: str = "mlvar.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, env: dict[str, str] | None = None) -> MlvarError:
    with pytest.raises(MlvarError) as info:
        load_config(path, env={} if env is None else env)
    err = info.value
    # The CLI prints message and hint on one line: neither may span lines.
    assert "\n" not in err.message and "\n" not in err.hint, str(err)
    assert err.hint, str(err)
    return err


# ---------------------------------------------------------------- the example file


def test_example_parses_and_equals_defaults(no_mlvar_env: Path) -> None:
    cfg = load_config(EXAMPLE, env={})
    defaults = Config()
    assert cfg.source == EXAMPLE.resolve()
    assert cfg.train == defaults.train
    assert cfg.backend == defaults.backend and cfg.submit == defaults.submit
    # Relative paths in a config file are relative to its folder.
    for key in PATH_KEYS:
        assert getattr(cfg.paths, key) == EXAMPLE.resolve().parent / getattr(defaults.paths, key)


def test_example_lists_every_key_with_a_comment() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert set(data) == {"paths", "protocol", "train", "submit", "backend"}
    assert list(data["paths"]) == PATH_KEYS
    assert data["protocol"] == dataclasses.asdict(ProtocolConfig())
    # The cluster tables list every field, in the dataclasses' order.
    assert list(data["submit"]) == [f.name for f in dataclasses.fields(SubmitConfig)]
    assert set(data["backend"]) == {f.name for f in dataclasses.fields(BackendConfig)}
    assert list(data["backend"]["aml"]) == [f.name for f in dataclasses.fields(AmlConfig)]
    assert list(data["backend"]["ray"]) == [f.name for f in dataclasses.fields(RayConfig)]
    for table in dataclasses.fields(BackendConfig):  # every backend's table, a new one too
        fields = dataclasses.fields(getattr(Config().backend, table.name))
        assert list(data["backend"][table.name]) == [f.name for f in fields], table.name
    assert set(data["train"]) == set(registry.DATASETS) == set(Config().train)
    for dataset in registry.DATASETS:
        assert list(data["train"][dataset]) == TRAIN_KEYS, dataset
    # Every key line directly follows a comment line (its meaning and unit).
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"no comment above: {line}"


def test_defaults_match_the_design(no_mlvar_env: Path) -> None:
    cfg = load_config(env={})
    assert cfg.source is None
    assert cfg.paths == PathsConfig()
    assert cfg.paths.data_root == Path("mlvar-work/data")
    assert cfg.paths.runs_root == Path("mlvar-work/runs")
    assert cfg.paths.reports_root == Path("mlvar-work/reports")
    compas = cfg.train_for("compas")
    assert (compas.epochs, compas.lr, compas.batch_size, compas.hidden) == (10, 1e-3, 64, 64)
    # every seeded source the MLP draws; impl (non-deterministic kernels) only when asked
    assert compas.dropout == 0.1 and compas.vary == ["init", "order", "dropout"]
    assert MODELS["mlp"].sources == ("init", "order", "dropout", "impl")
    assert set(RANDOMNESS_SOURCES) == {"init", "order", "dropout", "aug", "impl"}
    assert cfg.train_for("digits").epochs == registry.get_dataset("digits").train.values["epochs"]


# ---------------------------------------------------------------- which file is read


def test_no_file_means_defaults(no_mlvar_env: Path) -> None:
    assert load_config(env={}) == Config()


def test_cwd_mlvar_toml_is_read(no_mlvar_env: Path) -> None:
    write(no_mlvar_env, "[train.compas]\nepochs = 7\n")
    cfg = load_config(env={})
    assert cfg.source == (no_mlvar_env / "mlvar.toml").resolve()
    assert cfg.train_for("compas").epochs == 7


def test_mlvar_config_env_var(no_mlvar_env: Path) -> None:
    write(no_mlvar_env, "[train.compas]\nepochs = 7\n")  # ./mlvar.toml: ignored
    other = write(no_mlvar_env / "elsewhere", "[train.compas]\nepochs = 8\n", "my.toml")
    cfg = load_config(env={"MLVAR_CONFIG": str(other)})
    assert cfg.source == other.resolve() and cfg.train_for("compas").epochs == 8
    # An explicit path (--config) wins over MLVAR_CONFIG.
    third = write(no_mlvar_env, "[train.compas]\nepochs = 9\n", "third.toml")
    assert load_config(third, env={"MLVAR_CONFIG": str(other)}).train_for("compas").epochs == 9
    # The real environment is read when env is not given.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLVAR_CONFIG", str(other))
        assert load_config().train_for("compas").epochs == 8


def test_mlvar_config_env_var_missing_file(no_mlvar_env: Path) -> None:
    err = error_of(None, env={"MLVAR_CONFIG": str(no_mlvar_env / "gone.toml")})
    assert "gone.toml" in err.message and "does not exist" in err.message


def test_missing_config_file(no_mlvar_env: Path) -> None:
    err = error_of(no_mlvar_env / "absent.toml")
    assert "absent.toml" in err.message and "does not exist" in err.message
    assert "--config" in err.hint


def test_config_folder_is_not_a_file(no_mlvar_env: Path) -> None:
    err = error_of(no_mlvar_env)
    assert "does not exist" in err.message


# ---------------------------------------------------------------- precedence


def test_toml_overrides_defaults_and_keeps_the_rest(no_mlvar_env: Path) -> None:
    path = write(
        no_mlvar_env,
        '[train.digits]\nepochs = 3\nlr = 0.01\nvary = ["dropout", "init"]\n'
        '[paths]\nruns_root = "/abs/runs"\n',
    )
    cfg = load_config(path, env={})
    digits = cfg.train_for("digits")
    assert (digits.epochs, digits.lr) == (3, 0.01)
    assert digits.batch_size == registry.get_dataset("digits").train.values["batch_size"]
    assert digits.vary == ["init", "dropout"]  # canonical order
    assert cfg.train["compas"] == Config().train["compas"]  # the other dataset untouched
    assert cfg.paths.runs_root == Path("/abs/runs")
    assert cfg.paths.data_root == PathsConfig().data_root  # not in the file: default


def test_relative_paths_resolve_against_the_toml_folder(
    no_mlvar_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        no_mlvar_env / "project" / "conf",
        '[paths]\ndata_root = "../data"\nruns_root = "runs"\nreports_root = "~/mlvar-reports"\n',
    )
    cwd = no_mlvar_env / "somewhere" / "else"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    cfg = load_config(path, env={})
    conf = path.resolve().parent
    assert cfg.paths.data_root == conf / ".." / "data"
    assert cfg.paths.data_root.resolve() == (no_mlvar_env / "project" / "data").resolve()
    assert cfg.paths.runs_root == conf / "runs"
    assert cfg.paths.reports_root == Path.home() / "mlvar-reports"
    # Given relative to the cwd (a relative --config): still against the file's folder.
    monkeypatch.chdir(no_mlvar_env / "project")
    assert load_config(Path("conf/mlvar.toml"), env={}).paths.runs_root == conf / "runs"


def test_env_overrides_toml(no_mlvar_env: Path) -> None:
    path = write(
        no_mlvar_env,
        '[paths]\ndata_root = "t-data"\nruns_root = "t-runs"\nreports_root = "t-reports"\n',
        "other.toml",
    )
    env = {
        "MLVAR_DATA_ROOT": "/env/data",
        "MLVAR_RUNS_ROOT": "env-runs",  # relative: stays relative to the current directory
        "MLVAR_REPORTS_ROOT": "",  # empty: ignored
    }
    cfg = load_config(path, env=env)
    assert cfg.paths.data_root == Path("/env/data")
    assert cfg.paths.runs_root == Path("env-runs")
    assert cfg.paths.reports_root == path.resolve().parent / "t-reports"
    # Without a file the environment overrides the defaults.
    cfg = load_config(env={"MLVAR_REPORTS_ROOT": "~/r"})
    assert cfg.paths.reports_root == Path.home() / "r"
    assert cfg.paths.data_root == PathsConfig().data_root


@pytest.fixture
def digits_scenario(no_mlvar_env: Path) -> Path:
    """A data root (``<tmp>/data``) holding the digits holdout-of-3 scenario."""
    root = no_mlvar_env / "data"
    registry.prepare(root, "digits", mode="holdout", subclass=3)
    return root


def test_cli_flags_override_toml_via_prepare_training(
    no_mlvar_env: Path, digits_scenario: Path
) -> None:
    path = write(
        no_mlvar_env,
        '[paths]\ndata_root = "data"\n'
        '[train.digits]\nepochs = 3\nlr = 0.01\nvary = ["init"]\nengine = "loop"\n',
    )
    cfg = load_config(path, env={})
    _, train, name = prepare_training(cfg, "digits", None, runs=2)
    assert (train.epochs, train.lr, train.vary, train.engine) == (3, 0.01, ["init"], "loop")
    assert name == "digits-holdout-sub3-r1.0-mlp"
    overrides = {"epochs": 5, "lr": None, "vary": ["order", "init"], "engine": "batched"}
    _, train, _ = prepare_training(cfg, "digits", None, runs=2, overrides=overrides)
    assert (train.epochs, train.lr) == (5, 0.01)  # None means "not given": toml value stays
    assert train.vary == ["init", "order"] and train.engine == "batched"
    # The loaded config itself is not changed by a request's overrides.
    assert cfg.train["digits"].epochs == 3 and cfg.train["digits"].vary == ["init"]
    # Overrides are validated like file values.
    with pytest.raises(MlvarError, match="train.digits.epochs"):
        prepare_training(cfg, "digits", None, runs=2, overrides={"epochs": 0})


def test_cli_precedence_end_to_end(
    no_mlvar_env: Path, digits_scenario: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """toml sets data root, runs root and training values; MLVAR_RUNS_ROOT beats the toml's
    runs root; --epochs beats the toml's epochs; the toml's lr and vary are kept."""
    conf = write(
        no_mlvar_env / "conf",
        '[paths]\ndata_root = "../data"\nruns_root = "../toml-runs"\n'
        '[train.digits]\nepochs = 3\nlr = 0.005\nvary = ["init", "order"]\nhidden = 16\n',
    )
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(no_mlvar_env / "env-runs"))
    monkeypatch.setenv("MLVAR_REPORTS_ROOT", str(no_mlvar_env / "reports"))
    result = runner.invoke(
        app, ["train", "digits", "--config", str(conf), "--runs", "1", "--epochs", "1", "--json"]
    )
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    out = json.loads(result.stdout)
    exp = no_mlvar_env / "env-runs" / "digits-holdout-sub3-r1.0-mlp"
    assert Path(out["path"]) == exp
    assert not (no_mlvar_env / "toml-runs").exists()
    meta = json.loads((exp / "experiment.json").read_text())
    assert meta["train"]["epochs"] == 1
    assert meta["train"]["lr"] == 0.005 and meta["train"]["hidden"] == 16
    assert meta["train"]["vary"] == ["init", "order"]
    run = json.loads((exp / "runs" / "run-0000" / "run.json").read_text())
    assert run["config"]["epochs"] == 1 and run["vary"] == ["init", "order"]


def test_cli_uses_env_data_root_over_toml(no_mlvar_env: Path, monkeypatch) -> None:
    """Seen through an error message that names the data root (nothing is written)."""
    write(no_mlvar_env, '[paths]\ndata_root = "toml-data"\n')
    result = runner.invoke(app, ["train", "digits", "--runs", "1"])
    assert result.exit_code == 2
    assert str(no_mlvar_env.resolve() / "toml-data") in result.stderr
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(no_mlvar_env / "env-data"))
    result = runner.invoke(app, ["train", "digits", "--runs", "1"])
    assert result.exit_code == 2
    assert str(no_mlvar_env / "env-data") in result.stderr
    assert sorted(p.name for p in no_mlvar_env.iterdir()) == ["mlvar.toml"]


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "text, key, near",
    [
        ("[train.compas]\nepoch = 3\n", "train.compas.epoch", "epochs"),
        ("[train.digits]\nbatchsize = 32\n", "train.digits.batchsize", "batch_size"),
        ("[train.compas]\nlearning_rate = 0.1\n", "train.compas.learning_rate", None),
        ("[paht]\ndata_root = 'x'\n", "paht", "paths"),
        ("[paths]\ndata_rot = 'x'\n", "paths.data_rot", "data_root"),
        ("[paths]\nrun_root = 'x'\n", "paths.run_root", "runs_root"),
        ("[train.compsa]\nepochs = 3\n", "train.compsa", "compas"),
        ("[trian.compas]\nepochs = 3\n", "trian", "train"),
        ("zzz = 3\n", "zzz", None),
    ],
    ids=["epoch", "batchsize", "far", "paht", "data_rot", "run_root", "compsa", "trian", "top"],
)
def test_unknown_key_names_the_nearest(
    no_mlvar_env: Path, text: str, key: str, near: str | None
) -> None:
    err = error_of(write(no_mlvar_env, text))
    assert f"unknown key '{key}'" in err.message
    assert "mlvar.toml" in err.message  # names the file
    if near:
        assert f"did you mean '{near}'?" in err.hint
    else:
        assert "valid keys:" in err.hint  # nothing close: list the valid ones


def test_unknown_key_lists_valid_keys(no_mlvar_env: Path) -> None:
    err = error_of(write(no_mlvar_env, "[train.compas]\nzzz = 1\n"))
    for key in TRAIN_KEYS:
        assert key in err.hint


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "text, words",
    [
        ('[train.compas]\nepochs = "ten"\n', ("train.compas.epochs", "int", "'ten'")),
        ("[train.compas]\nepochs = 3.5\n", ("train.compas.epochs", "int", "3.5")),
        ("[train.compas]\nepochs = true\n", ("train.compas.epochs", "int", "True")),
        ('[train.compas]\nlr = "1e-3"\n', ("train.compas.lr", "float", "'1e-3'")),
        ("[train.compas]\nlr = false\n", ("train.compas.lr", "float")),
        ('[train.digits]\nvary = "init"\n', ("train.digits.vary", "list of strings")),
        ("[train.digits]\nvary = [1, 2]\n", ("train.digits.vary", "list of strings")),
        ("[train.digits]\ndevice = 0\n", ("train.digits.device", "str")),
        ('[train.digits]\nmodel = ["mlp"]\n', ("train.digits.model", "str")),
        ("[paths]\ndata_root = 3\n", ("paths.data_root", "string path")),
        ("paths = 3\n", ("'paths'", "table")),
        ("train = 3\n", ("'train'", "table")),
        ("[train]\ncompas = 3\n", ("'train.compas'", "table")),
    ],
    ids=[
        "epochs-str",
        "epochs-float",
        "epochs-bool",
        "lr-str",
        "lr-bool",
        "vary-str",
        "vary-ints",
        "device-int",
        "model-list",
        "path-int",
        "paths-scalar",
        "train-scalar",
        "dataset-scalar",
    ],
)
def test_wrong_types(no_mlvar_env: Path, text: str, words: tuple[str, ...]) -> None:
    err = error_of(write(no_mlvar_env, text))
    for word in words:
        assert word in err.message, (word, err.message)


def test_int_is_accepted_for_a_float(no_mlvar_env: Path) -> None:
    cfg = load_config(write(no_mlvar_env, "[train.compas]\nlr = 1\nweight_decay = 0\n"), env={})
    lr = cfg.train_for("compas").lr
    assert lr == 1.0 and isinstance(lr, float)


# ---------------------------------------------------------------- values out of range


@pytest.mark.parametrize(
    "line, words",
    [
        ("lr = 0", ("train.compas.lr", "positive", "0")),
        ("lr = -1e-3", ("train.compas.lr", "positive")),
        ("lr = nan", ("train.compas.lr", "positive", "nan")),
        ("dropout = 1.0", ("train.compas.dropout", "[0, 1)", "1.0")),
        ("dropout = -0.1", ("train.compas.dropout", "[0, 1)")),
        ("dropout = nan", ("train.compas.dropout", "[0, 1)")),
        ("epochs = 0", ("train.compas.epochs", "at least 1")),
        ("batch_size = 1", ("train.compas.batch_size", "at least 2")),
        ("hidden = 0", ("train.compas.hidden", "at least 1")),
        ("weight_decay = -0.5", ("train.compas.weight_decay", ">= 0")),
        ("pack_size = 0", ("train.compas.pack_size", "at least 1")),
        ('model = "resnet18"', ("train.compas.model", "'resnet18'")),
        ('engine = "fast"', ("train.compas.engine", "'fast'", "batched, loop")),
        ('engine = "loops"', ("train.compas.engine", "'loops'")),
        ('device = "gpu"', ("train.compas.device", "'gpu'", "cpu, cuda")),
        ('logits_dtype = "float64"', ("train.compas.logits_dtype", "'float64'")),
        ('vary = ["init", "aug"]', ("train.compas.vary", "'aug'")),
        ('vary = ["init", "ordr"]', ("train.compas.vary", "'ordr'")),
        ('vary = ["init", "init"]', ("train.compas.vary", "twice")),
    ],
)
def test_out_of_range(no_mlvar_env: Path, line: str, words: tuple[str, ...]) -> None:
    err = error_of(write(no_mlvar_env, f"[train.compas]\n{line}\n"))
    for word in words:
        assert word in err.message, (word, err.message)


@pytest.mark.parametrize(
    "line, key",
    [("lr = inf", "lr"), ("weight_decay = nan", "weight_decay"), ("base_seed = -1", "base_seed")],
    ids=["lr-inf", "weight-decay-nan", "negative-seed"],
)
def test_non_finite_or_negative_values_rejected(no_mlvar_env: Path, line: str, key: str) -> None:
    err = error_of(write(no_mlvar_env, f"[train.compas]\n{line}\n"))
    assert f"train.compas.{key}" in err.message


@pytest.mark.parametrize(
    "line, hint",
    [
        ('engine = "loops"', "did you mean 'loop'?"),
        ('vary = ["init", "ordr"]', "did you mean 'order'?"),
        ('vary = ["aug"]', "valid: init, order, dropout"),
        ("lr = 0", "1e-3"),
    ],
)
def test_out_of_range_hints(no_mlvar_env: Path, line: str, hint: str) -> None:
    err = error_of(write(no_mlvar_env, f"[train.compas]\n{line}\n"))
    assert hint in err.hint


def test_empty_vary_is_allowed(no_mlvar_env: Path) -> None:
    cfg = load_config(write(no_mlvar_env, "[train.compas]\nvary = []\n"), env={})
    assert cfg.train_for("compas").vary == []


# ---------------------------------------------------------------- invalid files


@pytest.mark.parametrize(
    "content",
    [
        b"[paths\ndata_root = 'x'\n",
        b"[paths]\ndata_root = \n",
        b"[paths]\ndata_root = 'x\n",
        b"[train.compas]\nepochs = 3\nepochs = 4\n",
        b"\xff\xfe[paths]\n",
    ],
    ids=["table", "value", "string", "duplicate", "not-utf8"],
)
def test_invalid_toml(no_mlvar_env: Path, content: bytes) -> None:
    path = no_mlvar_env / "broken.toml"
    path.write_bytes(content)
    err = error_of(path)
    assert "broken.toml" in err.message and "not valid TOML" in err.message
    assert "mlvar.toml.example" in err.hint


def test_cli_reports_invalid_toml_in_one_line(no_mlvar_env: Path) -> None:
    path = write(no_mlvar_env, "[paths\n", "broken.toml")
    result = runner.invoke(app, ["data", "list", "--config", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "not valid TOML" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_protocol_table_sets_the_default_protocol(tmp_path: Path) -> None:
    assert load_config(env={}).protocol.name == "mlvar"
    cfg_file = tmp_path / "mlvar.toml"
    cfg_file.write_text('[protocol]\nname = "study"\n')
    assert load_config(cfg_file, env={}).protocol.name == "study"


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('[protocol]\nname = "studdy"\n', ["protocol.name", "studdy", "did you mean 'study'"]),
        ('[protocol]\nnmae = "study"\n', ["protocol.nmae", "did you mean 'name'"]),
        ('protocol = "study"\n', ["'protocol'", "[protocol]"]),
    ],
)
def test_bad_protocol_table_is_one_error(tmp_path: Path, toml: str, words: list[str]) -> None:
    cfg_file = tmp_path / "mlvar.toml"
    cfg_file.write_text(toml)
    with pytest.raises(MlvarError) as exc:
        load_config(cfg_file, env={})
    for word in words:
        assert word in str(exc.value), str(exc.value)


def test_protocol_names_and_checks() -> None:
    from mlvar.data.protocol import check_protocol, name_suffix, protocol_of

    assert name_suffix("mlvar") == "" and name_suffix("study") == "-study"
    assert protocol_of({}) == "mlvar" and protocol_of({"protocol": "study"}) == "study"
    with pytest.raises(MlvarError, match="unknown protocol 'stduy'.*did you mean 'study'"):
        check_protocol("stduy")
