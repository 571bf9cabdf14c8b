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
from mlvar.analysis.saliency.compute import training_norm
from mlvar.cli import app
from mlvar.errors import MlvarError
from mlvar.report.html import build_report
from mlvar.saliency import merge_saliency_shards, saliency
from mlvar.store import ExperimentStore
from mlvar.train.service import train
from mlvar.train.trained import build_trained, load_weights, target_layer
from tiny_images import N_CLASSES, SIZE, build_tiny_experiments, tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image scenario, 3 runs of the small CNN and 2 of the MLP (tests/tiny_images.py)."""
    return build_tiny_experiments(tmp_path_factory.mktemp("saliency"))


_config = tiny_config


def _store(root: Path, model: str = "cnn") -> ExperimentStore:
    return ExperimentStore.open(root / "runs", f"tiny-{model}")


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


@pytest.fixture(scope="module")
def computed(work: Path) -> sal.SaliencyResult:
    return saliency(_store(work), work / "data", top=4, seeds=3)


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
    x_raw, scenario = sal.scenario_rows(store, work / "data", "test", index["sample_id"].to_numpy())
    norm = training_norm(scenario)
    from mlvar.train.images import to_nchw

    x = norm.normalise(to_nchw(x_raw))
    model = build_trained("cnn", 1, N_CLASSES, store.runs()[1])
    assert target_layer(model)[0] == "features.7"
    a = sal.gradcam(model, x, [0] * len(x), batch_size=3)
    b = sal.gradcam(model, x, [2] * len(x), batch_size=3)
    assert a.shape == (len(x), SIZE, SIZE)
    assert all(np.abs(a[i] - b[i]).max() > 0.05 for i in range(len(x)))
    # Batching does not change the maps, and the same weights give the same maps.
    again = sal.gradcam(build_trained("cnn", 1, N_CLASSES, store.runs()[1]), x, [0] * 8)
    np.testing.assert_allclose(a, again, atol=1e-5)


def test_inputs_are_normalised_as_in_training(work: Path, computed: sal.SaliencyResult) -> None:
    """The loaded model on the saliency's inputs reproduces each run's stored logits."""
    store = _store(work)
    index = pd.read_parquet(computed.path / "samples.parquet")
    x_raw, scenario = sal.scenario_rows(store, work / "data", "test", index["sample_id"].to_numpy())
    norm = training_norm(scenario)
    from mlvar.train.images import to_nchw

    x = norm.normalise(to_nchw(x_raw))
    for run in store.runs():
        model = build_trained("cnn", 1, N_CLASSES, run)
        with torch.no_grad():
            logits = model(x).numpy()
        stored = run.load_logits("test")[index["position"].to_numpy()]
        np.testing.assert_allclose(logits, stored, atol=1e-4)


def test_the_choice_is_deterministic(work: Path, computed: sal.SaliencyResult) -> None:
    first = np.load(computed.path / "maps.npy")
    ids = pd.read_parquet(computed.path / "samples.parquet")["sample_id"].tolist()
    again = saliency(_store(work), work / "data", top=4, seeds=3)
    assert again.samples["sample_id"].tolist() == ids
    np.testing.assert_array_equal(np.load(again.path / "maps.npy"), first)
    other = saliency(_store(work), work / "data", top=4, seeds=2, seed=7)
    assert other.samples["sample_id"].tolist()[:4] == ids[:4]
    assert other.samples["sample_id"].tolist()[4:] != ids[4:]
    assert np.load(other.path / "maps.npy").shape[1] == 2
    saliency(_store(work), work / "data", top=4, seeds=3)  # as the module fixture left it


def test_layer_override(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    result = saliency(_store(root), root / "data", top=2, seeds=1, layer="features.3")
    assert result.layer == "features.3"
    maps = np.load(result.path / "maps.npy")
    assert maps.shape == (4, 1, 2, SIZE, SIZE) and np.isfinite(maps).all()
    before = _listing(root)
    with pytest.raises(MlvarError) as err:
        saliency(_store(root), root / "data", top=2, seeds=1, layer="features.33")
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
            saliency(store, data_root, **kw)
        assert _listing(root) == before
        return err.value

    # Runs without weights (as MLP runs written before they saved model.pt): a hint to
    # retrain. --layer names a GradCAM layer: an MLP has none.
    run_json = root / "runs" / "tiny-mlp" / "runs" / "run-0000" / "run.json"
    meta = json.loads(run_json.read_text())
    del meta["arrays"]["model.pt"]
    run_json.write_text(json.dumps(meta))
    (run_json.parent / "model.pt").unlink()
    before = _listing(root)
    exc = error(_store(root, "mlp"), root / "data")
    assert "saved no model weights" in exc.message and "retrain" in exc.hint
    exc = error(_store(root, "mlp"), root / "data", layer="fc1")
    assert "--layer applies to GradCAM" in exc.message
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
        load_weights(_store(root).runs()[1])
    with pytest.warns(UserWarning, match="skipping run run-0001 .*model.pt"):
        result = saliency(_store(root), root / "data", top=2, seeds=3)
    assert result.run_ids == ["run-0000", "run-0002"]


def _finite_difference_attributions(
    model: nn.Module, x: np.ndarray, target: np.ndarray, eps: float = 1e-5
) -> np.ndarray:
    """x * d logit_t / d x by central differences on a float64 copy of ``model``: an
    independent check of gradient x input (no autograd)."""
    import copy

    m = copy.deepcopy(model).double().eval()
    xd = torch.as_tensor(x, dtype=torch.float64)
    grad = np.empty(x.shape)
    rows = torch.arange(len(xd))
    t = torch.as_tensor(np.array(target)).long()
    with torch.no_grad():
        for j in range(x.shape[1]):
            step = torch.zeros_like(xd)
            step[:, j] = eps
            up, down = m(xd + step)[rows, t], m(xd - step)[rows, t]
            grad[:, j] = ((up - down) / (2 * eps)).numpy()
    return grad * x


def _mlp_of(store: ExperimentStore, run_no: int, n_features: int) -> nn.Module:
    """Run ``run_no``'s MLP, loaded here from model.pt (not by the saliency module)."""
    from mlvar.train.mlp import MLP

    run = store.runs()[run_no]
    model = MLP(n_features, int(store.meta["train"]["hidden"]), len(store.class_names))
    model.load_state_dict(torch.load(run.path / "model.pt", weights_only=True))
    return model.eval()


def test_mlp_on_images_gets_gradient_x_input_maps(work: Path) -> None:
    store = _store(work, "mlp")
    result = saliency(store, work / "data", top=3, seeds=2)
    assert result.method == "gradient x input" and result.layer == "input"
    assert result.shape == (SIZE, SIZE)
    attr = np.load(result.path / "attributions.npy")
    maps = np.load(result.path / "maps.npy").astype(np.float32)
    assert attr.shape == (6, 2, 2, SIZE * SIZE) and maps.shape == (6, 2, 2, SIZE, SIZE)
    assert np.isfinite(attr).all() and maps.min() >= 0 and maps.max() <= 1
    # The maps are |gradient x input| per pixel (one channel), each scaled to max 1.
    pixels = np.abs(attr).reshape(6, 2, 2, SIZE, SIZE)
    expected = pixels / pixels.max(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(maps, expected, atol=1e-3)
    # Against central differences of each run's own model, inputs scaled as in training.
    index = pd.read_parquet(result.path / "samples.parquet")
    test = sal.scenario_rows(store, work / "data", "test", index["sample_id"].to_numpy())[0]
    x = test.reshape(6, -1).astype(np.float64) / 16
    labels = index["label"].to_numpy()
    for s in range(2):
        model = _mlp_of(store, s, SIZE * SIZE)
        fd = _finite_difference_attributions(model, x, labels)
        np.testing.assert_allclose(attr[:, s, 0], fd, rtol=1e-3, atol=1e-4)
    assert np.abs(attr[:, 0] - attr[:, 1]).max() > 1e-3  # seeds differ
    assert json.loads((result.path / "saliency.json").read_text())["input"] == "image"


@pytest.fixture(scope="module")
def compas_work(tmp_path_factory: pytest.TempPathFactory, compas_csv: Path) -> Path:
    """COMPAS with the artificial feature (ratio 0.1), 3 MLP runs of 3 epochs."""
    from mlvar.data.registry import prepare

    root = tmp_path_factory.mktemp("saliency-compas")
    (root / "data" / "raw").mkdir(parents=True)
    shutil.copyfile(compas_csv, root / "data" / "raw" / "compas-scores-two-years.csv")
    prepare(root / "data", "compas", mode="artificial", ratio=0.1)
    train(_config(root), "compas", runs=3, name="tab", overrides={"epochs": 3})
    return root


def test_tabular_gradient_x_input_across_seeds(compas_work: Path) -> None:
    root = compas_work
    store = ExperimentStore.open(root / "runs", "tab")
    result = saliency(store, root / "data", top=4, seeds=3)
    manifest = json.loads(next((root / "data").rglob("manifest.json")).read_text())
    names = manifest["feature_names"]
    assert result.feature_names == names and names[-1] == "artificial"
    attr = np.load(result.path / "attributions.npy")
    assert attr.dtype == np.float32 and attr.shape == (8, 3, 2, len(names))
    assert np.isfinite(attr).all()
    assert not (result.path / "maps.npy").exists()
    index = pd.read_parquet(result.path / "samples.parquet")
    x = sal.scenario_rows(store, root / "data", "test", index["sample_id"].to_numpy())[0]
    x = x.astype(np.float64)
    labels = index["label"].to_numpy()
    preds = np.array(index["pred"].tolist()).T  # [S, n]
    for s in range(3):
        model = _mlp_of(store, s, len(names))
        # The weights in model.pt are the run's: they give its stored logits.
        with torch.no_grad():
            logits = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
        stored = store.runs()[s].load_logits("test")[index["position"].to_numpy()]
        np.testing.assert_allclose(logits, stored, atol=1e-5)
        np.testing.assert_array_equal(preds[s], stored.argmax(axis=1))
        for t, target in enumerate((labels, preds[s])):
            fd = _finite_difference_attributions(model, x, target)
            np.testing.assert_allclose(attr[:, s, t], fd, rtol=1e-3, atol=1e-4)
    # A feature at 0 gets 0; seeds disagree somewhere; the stats are across seeds.
    assert (attr[np.broadcast_to(x[:, None, None, :] == 0, attr.shape)] == 0).all()
    assert attr.std(axis=1).max() > 1e-3
    stats = np.load(result.path / "stats.npy")
    np.testing.assert_allclose(stats[:, 0], attr.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(stats[:, 1], attr.std(axis=1), atol=1e-6)
    rows = json.loads((result.path / "samples.json").read_text())
    np.testing.assert_allclose(rows[0]["attr_true_std"], stats[0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(index["spread_pred"], stats[:, 1, 1].mean(axis=1), atol=1e-6)
    for sid in index["sample_id"]:
        assert (result.path / "overlays" / f"{sid}.png").read_bytes()[:8] == PNG

    # The report: each sample page lists the attributions per feature, and the chart.
    build_report(store, root / "report", top=4, data_root=root / "data")
    html = (root / "report" / "index.html").read_text()
    assert "8 of these pages show gradient x input attribution charts" in html
    page = (root / "report" / "samples" / f"sample-{index['sample_id'][0]}.html").read_text()
    assert "gradient x input, true class" in page and "artificial" in page
    assert f"sample-{index['sample_id'][0]}.saliency.png" in page
    mean, std = stats[0, 0, 0], stats[0, 1, 0]
    j = int(np.abs(mean).argmax())
    from mlvar.report.html import fmt

    assert f"{fmt(float(mean[j]))} ± {fmt(float(std[j]))}" in page


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
        (["tiny-mlp", "--layer", "fc1"], "--layer applies to GradCAM"),
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


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_run_shards_merge_to_the_unsharded_result(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    store = _store(root)
    whole = saliency(store, root / "data", top=3, seeds=3)
    expected = _files(whole.path)
    meta = expected.pop("saliency.json")
    shutil.rmtree(whole.path)
    blocks = []
    for j in (2, 1):  # any order
        part = sal.saliency_shard(store, root / "data", (j, 2), top=3, seeds=3)
        blocks.append(part.run_ids)
        assert part.path == sal.shards_folder(store, "test") / f"r{j}of2"
    assert blocks == [["run-0001", "run-0002"], ["run-0000"]]
    merged = merge_saliency_shards(store, root / "data")
    got = _files(merged.path)
    assert json.loads(got.pop("saliency.json")) == json.loads(meta)
    assert got.keys() == expected.keys()
    for name in expected:  # maps, stats, index and every overlay PNG, byte for byte
        assert got[name] == expected[name], name


def test_tabular_run_shards_merge_exactly(compas_work: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(compas_work, root)
    store = ExperimentStore.open(root / "runs", "tab")
    whole = saliency(store, root / "data", top=2, seeds=3)
    expected = _files(whole.path)
    for j in (1, 2, 3):
        sal.saliency_shard(store, root / "data", (j, 3), top=2, seeds=3)
    merged = merge_saliency_shards(store, root / "data")
    got = _files(merged.path)
    for name in ("attributions.npy", "stats.npy", "samples.parquet", "samples.json"):
        assert got[name] == expected[name], name


def test_incomplete_or_mismatched_shards_are_refused(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    shutil.rmtree(root / "runs" / "tiny-cnn" / "analysis", ignore_errors=True)
    store = _store(root)

    def refused(match: str) -> MlvarError:
        before = _listing(root)
        with pytest.raises(MlvarError, match=match) as err:
            merge_saliency_shards(store, root / "data")
        assert _listing(root) == before and not sal.folder(store, "test").exists()
        return err.value

    refused("no saliency shards")
    sal.saliency_shard(store, root / "data", (1, 3), top=2, seeds=3)
    assert "compute them" in refused(r"blocks \[2, 3\] of 3 are missing").hint
    sal.saliency_shard(store, root / "data", (2, 2), top=2, seeds=3)
    refused(r"mix block counts \[2, 3\]")
    shutil.rmtree(sal.shards_folder(store, "test") / "r1of3")
    sal.saliency_shard(store, root / "data", (1, 2), top=3, seeds=3)  # another --top
    refused("explain different things .*top")
    sal.saliency_shard(store, root / "data", (1, 2), top=2, seeds=3)
    maps = sal.shards_folder(store, "test") / "r2of2" / "maps.npy"
    data = bytearray(maps.read_bytes())
    data[-1] ^= 0x01
    maps.write_bytes(bytes(data))
    refused("r2of2 .* not usable: maps.npy is missing or does not match its sha256")
    with pytest.raises(MlvarError, match="only 3 runs to explain"):
        sal.saliency_shard(store, root / "data", (1, 4), top=2, seeds=3)
    with pytest.raises(MlvarError, match="1 <= j <= m"):
        sal.saliency_shard(store, root / "data", (3, 2), top=2, seeds=3)


def test_cli_run_shards_and_merge(work: Path, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    shutil.rmtree(root / "runs" / "tiny-mlp" / "analysis", ignore_errors=True)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    for var, sub in {"MLVAR_DATA_ROOT": "data", "MLVAR_RUNS_ROOT": "runs"}.items():
        monkeypatch.setenv(var, str(root / sub))
    runner = CliRunner()
    base = ["analyze", "saliency", "tiny-mlp", "--top", "2", "--seeds", "2"]
    for j in (1, 2):
        result = runner.invoke(app, [*base, "--run-shard", f"{j}/2", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["run_ids"] == [f"run-000{j - 1}"]
    result = runner.invoke(app, ["analyze", "saliency", "tiny-mlp", "--merge", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["method"] == "gradient x input" and out["run_ids"] == ["run-0000", "run-0001"]
    for args, words in [
        (["--merge", "--run-shard", "1/2"], "--merge and --run-shard exclude each other"),
        (["--run-shard", "3/2"], "--run-shard must be i/k with 1 <= i <= k"),
        (["--run-shard", "1/3"], "only 2 runs to explain"),
    ]:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines


def test_shards_of_another_layer_are_refused_and_leftovers_ignored(
    work: Path, tmp_path: Path
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(work, root)
    store = _store(root)
    sal.saliency_shard(store, root / "data", (1, 2), top=2, seeds=2, layer="features.3")
    sal.saliency_shard(store, root / "data", (2, 2), top=2, seeds=2)
    with pytest.raises(MlvarError, match=r"explain different things \(layer\)"):
        merge_saliency_shards(store, root / "data")
    sal.saliency_shard(store, root / "data", (1, 2), top=2, seeds=2)
    # A temporary folder left by a killed shard job is not a shard.
    leftover = sal.shards_folder(store, "test") / ".tmp-r1of2-killed"
    leftover.mkdir()
    (leftover / "maps.npy").write_bytes(b"partial")
    merged = merge_saliency_shards(store, root / "data")
    assert merged.layer == "features.7" and merged.run_ids == ["run-0000", "run-0001"]
