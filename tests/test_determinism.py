"""Deterministic CUDA kernels by default, and ``impl`` as a variance source
(mlvar.train.determinism), tested on the CPU: the settings computed per device and
``--vary``, applied to PyTorch and restored, the environment of worker processes, the
one-line refusal of a cuBLAS setting that is not deterministic, ``--vary impl`` parsing
and its note on the CPU, the run.json record, and networks whose backward passes have no
operation that PyTorch's deterministic mode refuses on CUDA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from mlvar.backends.local import worker_env
from mlvar.cli import app
from mlvar.config import Config, PathsConfig, TrainConfig, validate_train
from mlvar.errors import MlvarError
from mlvar.store import ExperimentStore
from mlvar.train import determinism
from mlvar.train.models import build_model, global_avg_pool, global_max_pool, init_weights
from mlvar.train.seeding import RunGenerators, source_seeds
from mlvar.train.service import train, train_config
from tiny_images import write_tiny_scenario

runner = CliRunner()
CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


@pytest.fixture(autouse=True)
def _no_cublas_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CUBLAS, raising=False)


# ---------------------------------------------------------------- the settings


def test_settings_per_device_and_vary() -> None:
    cuda = determinism.settings_for("cuda", ["init", "order", "aug"])
    assert (cuda.deterministic, cuda.cudnn_deterministic, cuda.cudnn_benchmark) == (
        True,
        True,
        False,
    )
    assert cuda.impl == "fixed"
    varied = determinism.settings_for("cuda", ["init", "impl"])
    assert (varied.deterministic, varied.cudnn_deterministic, varied.cudnn_benchmark) == (
        False,
        False,
        True,
    )
    assert varied.impl == "varied"
    cpu = determinism.settings_for("cpu", ["impl"])
    assert not cpu.deterministic and cpu.impl == "not applicable on cpu"
    assert determinism.settings_for("cpu", ["init"]).impl == "fixed"
    assert cpu.record() == {
        "device": "cpu",
        "deterministic_algorithms": False,
        "impl": "not applicable on cpu",
    }


def test_applied_on_cuda_sets_pytorch_and_restores_it(fast_deterministic_flag: list) -> None:
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    with determinism.applied(determinism.settings_for("cuda", ["init"])) as record:
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # raise, not warn
        assert cudnn.deterministic and not cudnn.benchmark
        assert os.environ[CUBLAS] == ":4096:8"  # set before training touches CUDA
    assert record == {
        "device": "cuda",
        "deterministic_algorithms": True,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
        "cublas_workspace_config": ":4096:8",
        "impl": "fixed",
    }
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark) == (
        before
    )
    with determinism.applied(determinism.settings_for("cuda", ["impl"])) as record:
        assert not torch.are_deterministic_algorithms_enabled() and cudnn.benchmark
    assert record["impl"] == "varied" and record["deterministic_algorithms"] is False
    assert cudnn.benchmark == before[2]
    calls = fast_deterministic_flag
    assert calls == [(True, False), (before[0], False), (False, False), (before[0], False)]


def test_applied_on_the_cpu_changes_nothing_and_records_the_flag() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with determinism.applied(determinism.settings_for("cpu", ["impl"])) as record:
        assert torch.are_deterministic_algorithms_enabled() == before
    assert record["deterministic_algorithms"] == before
    assert record["impl"] == "not applicable on cpu"


def test_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = worker_env("cuda", "1")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env[CUBLAS] == ":4096:8"
    assert CUBLAS not in worker_env("cpu")
    monkeypatch.setenv(CUBLAS, ":16:8")  # the user's deterministic choice is kept
    assert worker_env("cuda", "0")[CUBLAS] == ":16:8"
    assert determinism.cuda_env({}) == {CUBLAS: ":4096:8"}


def test_a_cublas_setting_that_is_not_deterministic_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CUBLAS, ":0:0")
    monkeypatch.setattr("mlvar.train.service._cuda_available", lambda: True)
    with pytest.raises(MlvarError, match="does not make cuBLAS deterministic") as info:
        train_config(Config(), "digits", 2, {"device": "cuda"})
    assert "--vary impl" in info.value.hint
    # allowed when non-deterministic kernels are asked for, and on the CPU
    train_config(Config(), "digits", 2, {"device": "cuda", "vary": ["init", "impl"]})
    train_config(Config(), "digits", 2, {"device": "cpu"})


# ---------------------------------------------------------------- impl as a source


@pytest.mark.parametrize("model", ["mlp", "cnn", "airbench", "resnet18"])
def test_vary_impl_is_a_source_of_every_model_and_draws_no_seed(model: str) -> None:
    cfg = validate_train(TrainConfig(model=model, vary=["impl", "init"]), "train.digits")
    assert cfg.vary == ["init", "impl"]  # the canonical order
    assert "impl" not in TrainConfig().vary  # not varied by default
    assert source_seeds(0, 3, ["init", "impl"]) == {"init": 3, "order": 0, "dropout": 0, "aug": 0}
    gen = RunGenerators(0, 3, ["impl"])
    # impl varies no generator: the seeded sources stay those of --vary none
    ref = RunGenerators(0, 3, [])
    assert torch.equal(torch.rand(4, generator=gen.init), torch.rand(4, generator=ref.init))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("determinism")
    write_tiny_scenario(root / "data")
    return root


def test_image_runs_record_the_kernel_settings(tiny_root: Path, tmp_path: Path) -> None:
    cfg = Config(paths=PathsConfig(tiny_root / "data", tmp_path / "runs", tmp_path / "rep"))
    over = {"model": "cnn", "epochs": 1, "batch_size": 16, "vary": ["init", "impl"], "workers": 1}
    res = train(cfg, "digits", "tiny", runs=1, overrides=over)
    (run,) = ExperimentStore.open(tmp_path / "runs", res.experiment).runs(verify=True)
    assert run.meta["determinism"] == {
        "device": "cpu",
        "deterministic_algorithms": False,
        "impl": "not applicable on cpu",
    }
    assert run.meta["vary"] == ["init", "impl"] and "impl" not in run.meta["source_seeds"]


def test_cli_vary_impl_on_the_cpu_notes_it_and_records_it(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(tiny_root / "data"))
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(tmp_path / "runs"))
    args = ["train", "digits", "--scenario", "tiny", "--runs", "2", "--epochs", "1"]
    res = runner.invoke(app, [*args, "--vary", "impl"])
    assert res.exit_code == 0, res.stdout + res.stderr
    notes = [line for line in res.stderr.splitlines() if "impl" in line]
    assert len(notes) == 1 and "not applicable on cpu" in notes[0], res.stderr
    runs = sorted((tmp_path / "runs").glob("*/runs/*/run.json"))
    metas = [json.loads(p.read_text()) for p in runs]
    assert [m["determinism"]["impl"] for m in metas] == ["not applicable on cpu"] * 2
    assert [m["vary"] for m in metas] == [["impl"], ["impl"]]
    # impl alone on the CPU: every seeded source is fixed, so the two runs are one
    logits = [np.load(p.parent / "test.logits.npy") for p in runs]
    assert np.array_equal(logits[0], logits[1])
    bad = runner.invoke(app, [*args, "--vary", "impll"])
    assert bad.exit_code == 2 and "did you mean 'impl'?" in bad.stderr


# ---------------------------------------------------------------- the networks

#: Backward nodes of the operations PyTorch's deterministic mode refuses on CUDA
#: (torch.use_deterministic_algorithms' list) that an image network could contain.
REFUSED_ON_CUDA = (
    "AdaptiveAvgPool2DBackward",
    "AdaptiveAvgPool3DBackward",
    "AdaptiveMaxPool2DBackward",
    "AvgPool3DBackward",
    "MaxPool3DWithIndicesBackward",
    "FractionalMaxPool",
    "MaxUnpool",
    "ReflectionPad",
    "Upsample",
    "NllLoss2DBackward",
    "GridSampler",
    "EmbeddingBagBackward",
)


def _backward_nodes(loss: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize(
    ("model", "channels", "size"), [("cnn", 1, 8), ("airbench", 3, 16), ("resnet18", 3, 16)]
)
def test_networks_have_no_backward_that_deterministic_cuda_refuses(
    model: str, channels: int, size: int
) -> None:
    torch.manual_seed(0)
    net = build_model(model, channels, 10)
    init_weights(net, torch.Generator().manual_seed(0))
    x = torch.randn(4, channels, size, size)
    if hasattr(net, "init_whitening"):
        net.init_whitening(x)
    loss = F.cross_entropy(net(x), torch.arange(4), label_smoothing=0.2)
    names = _backward_nodes(loss)
    assert "ConvolutionBackward0" in names  # the walk sees the whole graph
    assert not [n for n in names if n.startswith(REFUSED_ON_CUDA)], names


def test_global_pools_equal_the_adaptive_pools_bit_for_bit() -> None:
    x = torch.randn(6, 5, 4, 4, requires_grad=True)
    x.data[0, 0] = 0.0  # ties: the gradient goes to the first maximum, as adaptive_max_pool2d's
    g = torch.randn(6, 5)
    for ours, ref in (
        (global_avg_pool, lambda t: F.adaptive_avg_pool2d(t, 1).flatten(1)),
        (global_max_pool, lambda t: F.adaptive_max_pool2d(t, 1).flatten(1)),
    ):
        a, b = ours(x), ref(x)
        assert torch.equal(a, b)
        (ga,) = torch.autograd.grad(a, x, g)
        (gb,) = torch.autograd.grad(b, x, g)
        assert torch.equal(ga, gb)
    assert torch.allclose(global_avg_pool(x), x.sum(dim=(2, 3)) / 16)
