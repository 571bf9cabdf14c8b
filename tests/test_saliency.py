"""Saliency across seeds (``mlvar analyze saliency``): GradCAM maps of the seeds' saved
models have the image's shape, are finite, differ across seeds and with the target class;
inputs are normalised as in training; gradient x input on tabular models; the folder, the
report's strips, the CLI, and its errors (one line, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mlvar.analysis import saliency as sal
from mlvar.analysis import service as analysis
from mlvar.cli import app
from mlvar.config import Config, PathsConfig
from mlvar.data.scenario import SplitData, write_scenario
from mlvar.errors import MlvarError
from mlvar.report.html import build_report
from mlvar.store import ExperimentStore
from mlvar.train.service import train

PNG = b"\x89PNG\r\n\x1a\n"
N_CLASSES = 3
SIZE = 16


def _split(rng: np.random.Generator, n: int, offset: int) -> SplitData:
    """16x16 greyscale images with a bright square whose place depends on the class."""
    y = np.arange(n, dtype=np.int64) % N_CLASSES
    x = rng.integers(0, 8, size=(n, SIZE, SIZE, 1))
    for i in range(n):
        r = 2 + 4 * int(y[i])
        x[i, r : r + 4, r : r + 4, 0] += 8
    return SplitData(
        x=x.astype(np.uint8),
        y=y,
        id=np.arange(offset, offset + n, dtype=np.int64),
        affected=(y == 0) & (np.arange(n) % 2 == 0),
        group=np.full(n, -1, dtype=np.int64),
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image scenario, 3 runs of the small CNN and 2 of the MLP (no weights)."""
    root = tmp_path_factory.mktemp("saliency")
    rng = np.random.default_rng(0)
    manifest = {
        "dataset": "digits",
        "mode": "holdout",
        "params": {},
        "class_names": ["a", "b", "c"],
        "input": {"kind": "image", "shape": [SIZE, SIZE, 1], "max_value": 16},
    }
    splits = {"train": _split(rng, 60, 0), "test": _split(rng, 30, 1000)}
    write_scenario(root / "data", "tiny", manifest, splits)
    cfg = _config(root)
    over = {"epochs": 2, "batch_size": 16, "workers": 1}
    train(cfg, "digits", scenario="tiny", runs=3, overrides={"model": "cnn", **over})
    train(cfg, "digits", scenario="tiny", runs=2, overrides={"model": "mlp", "epochs": 2})
    return root


def _config(root: Path) -> Config:
    return Config(paths=PathsConfig(root / "data", root / "runs", root / "reports"))


def _store(root: Path, model: str = "cnn") -> ExperimentStore:
    return ExperimentStore.open(root / "runs", f"tiny-{model}")


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


@pytest.fixture(scope="module")
def computed(work: Path) -> sal.SaliencyResult:
    return sal.saliency(_store(work), work / "data", top=4, seeds=3)


def test_maps_have_the_image_shape_are_finite_and_differ_across_seeds(
    work: Path, computed: sal.SaliencyResult
) -> None:
    result = computed
    assert result.layer == "features.7"  # the SmallCNN's last Conv2d
    assert result.shape == (SIZE, SIZE) and result.n_seeds == 3
    maps = np.load(result.path / "maps.npy")
    assert maps.dtype == np.float16 and maps.shape == (8, 3, 2, SIZE, SIZE)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # Different weights, different maps: every pair of seeds differs on the true class.
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(maps[:, a, 0].astype(float) - maps[:, b, 0]).max() > 0.05
    # mean, std and max - min across seeds, as stored.
    stats = np.load(result.path / "stats.npy").astype(np.float32)
    m = maps.astype(np.float32)
    np.testing.assert_allclose(stats[:, 0], m.mean(axis=1), atol=2e-3)
    np.testing.assert_allclose(stats[:, 1], m.std(axis=1), atol=2e-3)
    np.testing.assert_allclose(stats[:, 2], m.max(axis=1) - m.min(axis=1), atol=2e-3)
    # The index: the top 4 of the ranking, then 4 random unaffected samples.
    ranking = analysis.rank(_store(work), "test", write=False).ranking
    index = pd.read_parquet(result.path / "samples.parquet")
    assert index["sample_id"].tolist()[:4] == ranking["sample_id"].tolist()[:4]
    assert index["kind"].tolist() == ["top"] * 4 + ["random unaffected"] * 4
    assert not index["affected"].iloc[4:].any()
    assert json.loads((result.path / "samples.json").read_text())[0]["sample_id"] == int(
        index["sample_id"].iloc[0]
    )
    # per-seed predictions are the runs' stored predictions
    store = _store(work)
    for s, run in enumerate(store.runs()):
        stored = run.load_logits("test")[index["position"].to_numpy()].argmax(axis=1)
        assert [p[s] for p in index["pred"]] == stored.tolist()
    for sid in index["sample_id"]:
        assert (result.path / "overlays" / f"{sid}.png").read_bytes()[:8] == PNG
    meta = json.loads((result.path / "saliency.json").read_text())
    assert meta["run_ids"] == ["run-0000", "run-0001", "run-0002"] and meta["top"] == 4


def test_target_class_changes_the_map(work: Path, computed: sal.SaliencyResult) -> None:
    maps = np.load(computed.path / "maps.npy").astype(np.float32)
    index = pd.read_parquet(computed.path / "samples.parquet")
    preds = np.stack(index["pred"].to_numpy())  # [n, S]
    labels = index["label"].to_numpy()[:, None]
    same = preds == labels
    # A run that predicted the label: the two targets are one map.
    assert np.array_equal(maps[same][:, 0], maps[same][:, 1])
    # Directly: one model, one batch, two target classes.
    store = _store(work)
    x_raw, norm, _ = sal._image_inputs(store, work / "data", "test", index["sample_id"].to_numpy())
    from mlvar.train.images import to_nchw

    x = norm.normalise(to_nchw(x_raw))
    model = sal.build_trained("cnn", 1, N_CLASSES, store.runs()[1])
    assert sal.target_layer(model)[0] == "features.7"
    a = sal.gradcam(model, x, [0] * len(x), batch_size=3)
    b = sal.gradcam(model, x, [2] * len(x), batch_size=3)
    assert a.shape == (len(x), SIZE, SIZE)
    assert all(np.abs(a[i] - b[i]).max() > 0.05 for i in range(len(x)))
    # Batching does not change the maps, and the same weights give the same maps.
    again = sal.gradcam(sal.build_trained("cnn", 1, N_CLASSES, store.runs()[1]), x, [0] * 8)
    np.testing.assert_allclose(a, again, atol=1e-5)


def test_inputs_are_normalised_as_in_training(work: Path, computed: sal.SaliencyResult) -> None:
    """The loaded model on the saliency's inputs reproduces each run's stored logits."""
    store = _store(work)
    index = pd.read_parquet(computed.path / "samples.parquet")
    x_raw, norm, _ = sal._image_inputs(store, work / "data", "test", index["sample_id"].to_numpy())
    from mlvar.train.images import to_nchw

    x = norm.normalise(to_nchw(x_raw))
    for run in store.runs():
        model = sal.build_trained("cnn", 1, N_CLASSES, run)
        with torch.no_grad():
            logits = model(x).numpy()
        stored = run.load_logits("test")[index["position"].to_numpy()]
        np.testing.assert_allclose(logits, stored, atol=1e-4)


def test_the_choice_is_deterministic(work: Path, computed: sal.SaliencyResult) -> None:
    first = np.load(computed.path / "maps.npy")
    ids = pd.read_parquet(computed.path / "samples.parquet")["sample_id"].tolist()
    again = sal.saliency(_store(work), work / "data", top=4, seeds=3)
    assert again.samples["sample_id"].tolist() == ids
    np.testing.assert_array_equal(np.load(again.path / "maps.npy"), first)
    other = sal.saliency(_store(work), work / "data", top=4, seeds=2, seed=7)
    assert other.samples["sample_id"].tolist()[:4] == ids[:4]
    assert other.samples["sample_id"].tolist()[4:] != ids[4:]
    assert np.load(other.path / "maps.npy").shape[1] == 2
    sal.saliency(_store(work), work / "data", top=4, seeds=3)  # as the module fixture left it


def test_layer_override(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    result = sal.saliency(_store(root), root / "data", top=2, seeds=1, layer="features.3")
    assert result.layer == "features.3"
    maps = np.load(result.path / "maps.npy")
    assert maps.shape == (4, 1, 2, SIZE, SIZE) and np.isfinite(maps).all()
    before = _listing(root)
    with pytest.raises(MlvarError) as err:
        sal.saliency(_store(root), root / "data", top=2, seeds=1, layer="features.33")
    assert "no layer 'features.33'" in err.value.message
    assert "did you mean" in err.value.hint and "features.7" in err.value.hint
    assert _listing(root) == before


def test_bad_input_is_one_error_and_writes_nothing(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    shutil.rmtree(root / "runs" / "tiny-cnn" / "analysis", ignore_errors=True)
    before = _listing(root)

    def error(store: ExperimentStore, data_root: Path, **kw) -> MlvarError:
        with pytest.raises(MlvarError) as err:
            sal.saliency(store, data_root, **kw)
        assert _listing(root) == before
        return err.value

    # MLP runs keep no weights: a hint to train an image model.
    exc = error(_store(root, "mlp"), root / "data")
    assert "saved no model weights" in exc.message and "--model cnn" in exc.hint
    # The prepared scenario is missing.
    exc = error(_store(root), tmp_path / "nowhere")
    assert "'tiny'" in exc.message and "not in the data root" in exc.message
    assert error(_store(root), root / "data", top=0).message.startswith("--top")
    assert error(_store(root), root / "data", seeds=0).message.startswith("--seeds")
    assert "unknown metric" in error(_store(root), root / "data", by="nope").message
    # A model.pt that does not match its sha256 is never loaded: that run is left out
    # (with a warning, as by every analysis), and loading it alone is an error.
    weights = root / "runs" / "tiny-cnn" / "runs" / "run-0001" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MlvarError, match="run-0001.*sha256"):
        sal.load_weights(_store(root).runs()[1])
    with pytest.warns(UserWarning, match="skipping run run-0001 .*model.pt"):
        result = sal.saliency(_store(root), root / "data", top=2, seeds=3)
    assert result.run_ids == ["run-0000", "run-0002"]


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_gradient_x_input_sums_to_the_logit_on_a_linear_model() -> None:
    torch.manual_seed(0)
    model = _Linear()
    x = np.random.default_rng(0).normal(size=(7, 5))
    target = np.array([0, 1, 2, 0, 1, 2, 2])
    attr = sal.gradient_x_input(model, x, target)
    assert attr.shape == (7, 5)
    w = model.fc.weight.detach().numpy()
    b = model.fc.bias.detach().numpy()
    logits = x @ w.T + b
    # gradient x input of a linear model: w_t[j] * x[j]; the sum is f_t(x) - b_t
    np.testing.assert_allclose(attr, w[target] * x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        attr.sum(axis=1), logits[np.arange(7), target] - b[target], atol=1e-12
    )
    # one class for every row
    np.testing.assert_allclose(sal.gradient_x_input(model, x, 1), w[1] * x, atol=1e-12)


def test_attribution_spread_across_seeds() -> None:
    def mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)
        )

    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    models = [mlp(0), mlp(1), mlp(0)]
    out = sal.attribution_spread(models, x, np.zeros(6, dtype=int))
    assert out["per_seed"].shape == (3, 6, 4)
    assert np.isfinite(out["per_seed"]).all()
    # eval mode: dropout off, so equal weights give equal attributions
    np.testing.assert_array_equal(out["per_seed"][0], out["per_seed"][2])
    assert out["std"].max() > 0 and out["range"].max() > 0
    np.testing.assert_allclose(out["mean"], out["per_seed"].mean(axis=0))
    assert models[0].training  # the model's mode is restored
    per_model = sal.attribution_spread(models, x, np.array([[0] * 6, [1] * 6, [0] * 6]))
    assert not np.allclose(per_model["per_seed"][1], out["per_seed"][1])


def test_report_shows_the_strips(work: Path, computed: sal.SaliencyResult) -> None:
    store = _store(work)
    report = build_report(store, work / "report", top=4, data_root=work / "data")
    html = report.path.read_text()
    assert 'id="saliency-note"' in html and "8 of these pages show GradCAM strips" in html
    strips = sorted((work / "report" / "samples").glob("*.saliency.png"))
    assert len(strips) == 8 and all(p.read_bytes()[:8] == PNG for p in strips)
    page = strips[0].with_name(strips[0].name.replace(".saliency.png", ".html")).read_text()
    assert "Attribution across seeds" in page and strips[0].name in page
    assert "GradCAM at layer features.7 of 3 runs" in page
    # Another --top: the random pages differ, only the shared ones have a strip.
    report = build_report(store, work / "report", top=2, data_root=work / "data")
    assert len(list((work / "report" / "samples").glob("*.saliency.png"))) < 8 + 1


def test_cli(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    for var, sub in {"MLVAR_DATA_ROOT": "data", "MLVAR_RUNS_ROOT": "runs"}.items():
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("MLVAR_REPORTS_ROOT", str(root / "reports"))
    runner = CliRunner()
    result = runner.invoke(
        app, ["analyze", "saliency", "tiny-cnn", "--top", "2", "--seeds", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["layer"] == "features.7" and out["run_ids"] == ["run-0000", "run-0001"]
    assert len(out["samples"]) == 4 and Path(out["path"]).is_dir()
    result = runner.invoke(app, ["analyze", "saliency", "tiny-cnn", "--top", "1"])
    assert result.exit_code == 0 and "GradCAM (cnn, layer features.7)" in result.stdout
    before = _listing(root)
    for args, words in [
        (["tiny-cnn", "--layer", "head2"], "no layer 'head2'"),
        (["tiny-cnn", "--top", "0"], "--top must be at least 1"),
        (["tiny-cnn", "--seeds", "0"], "--seeds must be at least 1"),
        (["tiny-cnn", "--by", "nope"], "unknown metric"),
        (["tiny-cnn", "--split", "val"], "no split 'val'"),
        (["tiny-cnnn"], "did you mean 'tiny-cnn'"),
        (["tiny-mlp"], "saved no model weights"),
    ]:
        result = runner.invoke(app, ["analyze", "saliency", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], lines
        assert "Traceback" not in result.output
        assert _listing(root) == before


@pytest.mark.slow
def test_demo_report_has_gradcam_strips(tmp_path: Path) -> None:
    from mlvar.demo import DEMO_TOP, run_demo

    result = run_demo(_config(tmp_path), runs=2)
    assert result.saliency is not None and result.saliency.n_seeds == 2
    maps = np.load(result.saliency.path / "maps.npy")
    # the top K and K random unaffected samples, 2 seeds, true and predicted class
    assert maps.shape == (2 * DEMO_TOP, 2, 2, 8, 8) and np.isfinite(maps).all()
    # report pages and saliency pick the same samples: every page has its strip
    pages = list((result.report.parent / "samples").glob("*.html"))
    strips = list((result.report.parent / "samples").glob("*.saliency.png"))
    assert len(pages) == len(strips) == 2 * DEMO_TOP
    assert "GradCAM strips" in result.report.read_text()
