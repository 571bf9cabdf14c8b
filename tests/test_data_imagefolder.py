"""imagefolder: scikit-learn's digits written to a folder of PNGs (class = digit // 2,
group = digit), fetched and prepared; every mode checked against code written here; bad
folders refused through the CLI (one line, exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mlvar.data import imagefolder, registry
from mlvar.data.sweep import prepare_sweep
from mlvar.errors import MlvarError
from test_cli_errors import fails_cleanly, invoke, use_root

N = 1797
NAME = "mydigits"


def _rgb(img: np.ndarray) -> np.ndarray:
    """A digit (0-16) as a colour image whose grayscale differs from each channel."""
    v = (img * 15).astype(np.uint8)
    return np.stack([v, 255 - v, (v // 2 + 40).astype(np.uint8)], axis=-1)


def _class_folder(digit: int) -> str:
    return f"{digit // 2 * 2}-{digit // 2 * 2 + 1}"


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The digits as root/<coarse class>/<digit>/<index>.png (RGB), with hidden files the
    reader must skip, and the reference: each id's load_digits index, label and group."""
    bunch = load_digits()
    root = tmp_path_factory.mktemp("imgf") / NAME  # as mlvar demo --data names it
    for i, (img, digit) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        folder = root / _class_folder(int(digit)) / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(img), "RGB").save(folder / f"{i:04d}.png")
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "0-1" / ".DS_Store").write_bytes(b"junk")
    (root / "2-3" / "3" / "._0003.png").write_bytes(b"AppleDouble junk")
    # The id order written independently: by class folder, group folder, file name.
    order = np.array(sorted(range(N), key=lambda i: (bunch.target[i], i)))
    target = bunch.target[order]
    labels = target // 2
    rest, test = train_test_split(np.arange(N), test_size=0.3, stratify=labels, random_state=69)
    train, val = train_test_split(rest, test_size=0.1, stratify=labels[rest], random_state=69)
    return {
        "root": root,
        "index_of_id": order,
        "digit": target,
        "label": labels,
        "images": np.stack([_rgb(bunch.images[i]) for i in order]),
        "split": {"train": train, "val": val, "test": test},
    }


@pytest.fixture(scope="module")
def fetched(digits_folder: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    data_root = tmp_path_factory.mktemp("imgf-data")
    info = imagefolder.fetch_imagefolder(digits_folder["root"], NAME, data_root)
    assert info.pop("action") == "recorded"
    spec = registry.get_dataset(NAME, data_root)  # resolved through source.json
    return {"root": data_root, "info": info, "spec": spec}


def _load(scenario) -> dict:
    return {s: scenario.load(s) for s in scenario.splits}


def _first(pos: np.ndarray, member: np.ndarray, ratio: float) -> np.ndarray:
    """``pos`` without the first floor(ratio * count) of its members (in split order)."""
    members = np.flatnonzero(member[pos])
    k = math.floor(ratio * len(members) + 1e-9)
    return np.delete(pos, members[:k])


def test_fetch_records_the_folder(fetched: dict, digits_folder: dict) -> None:
    info = fetched["info"]
    assert info["rows"] == N and info["layout"] == "class/group/file"
    assert info["classes"] == ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert info["groups"] == [[d // 2, str(d)] for d in range(10)]
    assert info["shape"] == [8, 8, 3]
    split = {"test_fraction": 0.3, "val_fraction": 0.1, "seed": 69}
    assert info["options"] == {"size": None, "color": "rgb", "split": split}
    folder = fetched["root"] / "user" / NAME
    stored = np.load(folder / "images.npy", allow_pickle=False)
    np.testing.assert_array_equal(stored, digits_folder["images"])  # hidden files skipped
    # Fetching the same folder with the same options again writes nothing.
    again = imagefolder.fetch_imagefolder(digits_folder["root"], NAME, fetched["root"])
    assert again.pop("action") == "unchanged" and again == info
    # The sha256 over the relative paths in id order and the file bytes, recomputed here.
    digest = hashlib.sha256()
    target = load_digits().target
    for i in digits_folder["index_of_id"]:
        rel = f"{_class_folder(int(target[i]))}/{target[i]}/{i:04d}.png"
        data = (digits_folder["root"] / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    assert info["sha256"] == digest.hexdigest()


def test_original_is_the_folder_split_stratified(fetched: dict, digits_folder: dict) -> None:
    scenario = fetched["spec"].prepare(fetched["root"], "original")
    assert scenario.name == f"{NAME}-original"
    assert scenario.manifest["input"] == {"kind": "image", "shape": [8, 8, 3], "max_value": 255}
    assert scenario.manifest["group_names"] == [str(d) for d in range(10)]
    splits = _load(scenario)
    labels = digits_folder["label"]
    for s, data in splits.items():
        ids = digits_folder["split"][s]
        np.testing.assert_array_equal(data.id, ids)
        np.testing.assert_array_equal(data.y, labels[ids])
        np.testing.assert_array_equal(data.group, digits_folder["digit"][ids])
        np.testing.assert_array_equal(data.x, digits_folder["images"][ids])
        assert not data.affected.any()
    # Stratified: every split holds each class in the proportion of the whole folder.
    whole = np.bincount(labels) / N
    for s in ("train", "test"):
        share = np.bincount(splits[s].y, minlength=5) / len(splits[s])
        np.testing.assert_allclose(share, whole, atol=0.01)


@pytest.mark.parametrize(("group", "ratio"), [("3", 1.0), ("3", 0.5), ("8-9/8", 0.25)])
def test_group_holdout(fetched: dict, digits_folder: dict, group: str, ratio: float) -> None:
    spec = fetched["spec"]
    given = {"group": group} if ratio == 1.0 else {"group": group, "ratio": ratio}
    scenario = spec.prepare(fetched["root"], None, given)  # --group implies holdout
    digit = int(group.split("/")[-1])
    assert scenario.name == f"{NAME}-holdout-g{digit}-r{ratio}"
    assert scenario.manifest["params"] == {"group": str(digit), "ratio": ratio}
    assert scenario.splits == ["train", "val", "test", "full_val"]
    splits = _load(scenario)
    member = digits_folder["digit"] == digit
    ref = digits_folder["split"]
    for s in ("train", "val"):
        kept = _first(ref[s], member, ratio)
        np.testing.assert_array_equal(splits[s].id, kept)
        np.testing.assert_array_equal(splits[s].y, digits_folder["label"][kept])
        assert not splits[s].affected.any()
    for s, ids in (("test", ref["test"]), ("full_val", ref["val"])):
        np.testing.assert_array_equal(splits[s].id, ids)
        np.testing.assert_array_equal(splits[s].affected, member[ids])
        np.testing.assert_array_equal(splits[s].x, digits_folder["images"][ids])
    counts = scenario.manifest["group_counts"]["test"][str(digit)]
    assert counts == {"total": int(member[ref["test"]].sum()), "affected": counts["total"]}


def test_class_holdout_and_duplicates(fetched: dict, digits_folder: dict) -> None:
    spec, labels, ref = fetched["spec"], digits_folder["label"], digits_folder["split"]
    scenario = spec.prepare(fetched["root"], "holdout", {"cls": 1, "ratio": 0.5})
    assert scenario.name == f"{NAME}-holdout-cls1-r0.5"
    splits = _load(scenario)
    np.testing.assert_array_equal(splits["train"].id, _first(ref["train"], labels == 1, 0.5))
    for s in ("val", "test"):
        np.testing.assert_array_equal(splits[s].affected, labels[ref[s]] == 1)

    dup = _load(spec.prepare(fetched["root"], "holdout-dup", {"cls": 2, "ratio": 0.5}))
    train = dup["train"]
    members = np.flatnonzero(labels[ref["train"]] == 2)
    k = math.floor(0.5 * len(members))
    np.testing.assert_array_equal(train.id, ref["train"])  # same samples, same order
    np.testing.assert_array_equal(np.flatnonzero(train.affected), members[:k])
    # Each copy shows the image of a remaining (unaffected) sample of the class.
    remaining = {train.x[i].tobytes() for i in members[k:]}
    assert all(train.x[i].tobytes() in remaining for i in members[:k])


def _gray3(x: np.ndarray) -> np.ndarray:
    """3-channel grayscale as PIL computes it, image by image."""
    out = [np.asarray(Image.fromarray(img, "RGB").convert("L")) for img in x]
    return np.repeat(np.stack(out)[..., None], 3, axis=-1)


def test_augmentation_modes_grayscale(fetched: dict, digits_folder: dict) -> None:
    spec, labels, ref, images = (
        fetched["spec"],
        digits_folder["label"],
        digits_folder["split"],
        digits_folder["images"],
    )
    splits = _load(spec.prepare(fetched["root"], "augmentation", {"cls": 1, "ratio": 0.5}))
    train = splits["train"]
    members = np.flatnonzero(labels[ref["train"]] == 1)
    changed = members[: math.floor(0.5 * len(members))]
    np.testing.assert_array_equal(np.flatnonzero(train.affected), changed)
    expected = images[ref["train"]].copy()
    expected[changed] = _gray3(expected[changed])
    np.testing.assert_array_equal(train.x, expected)
    np.testing.assert_array_equal(splits["test_gray"].x, _gray3(images[ref["test"]]))
    np.testing.assert_array_equal(splits["test_gray"].affected, labels[ref["test"]] == 1)

    every = _load(spec.prepare(fetched["root"], "augmentation-all", {"ratio": 0.3}))
    n_changed = sum(math.floor(0.3 * c) for c in np.bincount(labels[ref["train"]]))
    assert int(every["train"].affected.sum()) == n_changed
    assert every["test_gray"].affected.all() and not every["test"].affected.any()


def test_sweeps_of_group_ratio_and_class(fetched: dict) -> None:
    spec, root = fetched["spec"], fetched["root"]
    result = prepare_sweep(spec, root, "holdout", {"group": "1,3", "ratio": "0.5:1:0.5"})
    assert result.names == [f"{NAME}-holdout-g{g}-r{r}" for g in (1, 3) for r in (0.5, 1.0)]
    every = prepare_sweep(spec, root, "holdout", {"group": "all", "ratio": "0"})
    assert every.names == [f"{NAME}-holdout-g{g}-r0.0" for g in range(10)]
    classes = prepare_sweep(spec, root, "augmentation", {"cls": "all", "ratio": "0.1"})
    assert classes.names == [f"{NAME}-augmentation-cls{c}-r0.1" for c in range(5)]


def test_prepare_is_byte_identical(fetched: dict, digits_folder: dict, tmp_path: Path) -> None:
    info = imagefolder.fetch_imagefolder(digits_folder["root"], NAME, tmp_path)
    assert info.pop("action") == "recorded" and info == fetched["info"]
    again = registry.prepare_sweep(tmp_path, NAME, group="3").scenarios[0]
    first = fetched["spec"].prepare(fetched["root"], None, {"group": "3"}, force=True).path
    for file in sorted(again.path.iterdir()):
        assert file.read_bytes() == (first / file.name).read_bytes(), file.name
    for ref in again.arrays:
        assert ref.path(tmp_path).read_bytes() == ref.path(fetched["root"]).read_bytes()


# --------------------------------------------------------------------------- small folders


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _tiny(root: Path, n: int = 10, size: int = 8) -> Path:
    """Two classes of ``n`` gray images each: root/a/<i>.png, root/b/<i>.png."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(n):
            _write(root / cls / f"{i}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    return root


def test_size_and_gray_and_flat_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _tiny(tmp_path / "src")
    wide = _write(src / "b" / "wide.png", np.full((6, 20), 200, np.uint8))
    photo = src / "a" / "photo.jpg"  # JPEG too, in colour: read gray
    gradient = np.linspace(0, 255, 12 * 10 * 3).reshape(12, 10, 3).astype(np.uint8)
    Image.fromarray(gradient, "RGB").save(photo, quality=90)
    use_root(tmp_path, monkeypatch)
    args = ("data", "fetch", "imagefolder", "--source", src, "--name", "tiny", "--json")
    fetched = invoke(*args, "--size", "16", "--color", "gray")
    assert fetched.exit_code == 0, fetched.stderr
    assert '"shape": "16x16x1"' in fetched.stdout and '"layout": "class/file"' in fetched.stdout
    data = registry.prepare_sweep(tmp_path / "data", "tiny", "original").scenarios[0]
    x = np.concatenate([data.load(s).x for s in data.splits])
    ids = np.concatenate([data.load(s).id for s in data.splits])
    names = [f"{c}/{i}.png" for c in "ab" for i in range(10)] + ["b/wide.png", "a/photo.jpg"]
    order = sorted(names, key=lambda r: tuple(r.split("/")))
    for file, path in (("b/wide.png", wide), ("a/photo.jpg", photo)):
        image = Image.open(path).convert("L").resize((16, 16), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(x[ids == order.index(file)][0, ..., 0], np.asarray(image))
    # A gray folder's appearance change is inversion 255 - x (it cannot be made gray).
    inverted = registry.prepare_sweep(tmp_path / "data", "tiny", "augmentation", ratio="1")
    train = inverted.scenarios[0].load("train")
    original = data.load("train")
    np.testing.assert_array_equal(train.id, original.id)
    changed = original.y == 0
    np.testing.assert_array_equal(train.affected, changed)
    np.testing.assert_array_equal(train.x[changed], 255 - original.x[changed])
    np.testing.assert_array_equal(train.x[~changed], original.x[~changed])
    # Without groups holdout is the class holdout (no --cls needed to choose it).
    spec = registry.get_dataset("tiny", tmp_path / "data")
    assert (
        spec.prepare(tmp_path / "data", "holdout", {"ratio": 0.5}).name == "tiny-holdout-cls0-r0.5"
    )
    with pytest.raises(MlvarError, match="takes no --group"):
        spec.prepare(tmp_path / "data", "holdout", {"group": "x"})


def test_bad_folders_are_refused_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tree_listing
) -> None:
    root = use_root(tmp_path, monkeypatch)

    def refused(src: Path, *words: str, options: tuple = ()) -> None:
        args = ("data", "fetch", "imagefolder", "--source", src, "--name", "bad", *options)
        fails_cleanly(root, tree_listing, *args, words=words)
        assert not (root / "data").exists()

    one = root / "one"
    _write(one / "a" / "0.png", np.zeros((8, 8), np.uint8))
    refused(one, "only class 'a'", "at least two")
    refused(root / "missing", "does not exist")
    refused(_tiny(root / "ok"), "--size 0", options=("--size", "0"))
    refused(_tiny(root / "ok"), "--color", "rgb or --color gray", options=("--color", "cmyk"))

    mixed = _tiny(root / "mixed")
    _write(mixed / "b" / "big.png", np.zeros((9, 8), np.uint8))
    refused(mixed, "a/0.png is 8x8 but b/big.png is 8x9", "--size")

    corrupt = _tiny(root / "corrupt")
    png = (corrupt / "a" / "1.png").read_bytes()
    (corrupt / "a" / "1.png").write_bytes(png[: len(png) // 2])
    refused(corrupt, "a/1.png is corrupt or truncated")

    text = _tiny(root / "text")
    (text / "b" / "notes.txt").write_text("not an image")
    refused(text, "b/notes.txt is not an image")

    gif = _tiny(root / "gif")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gif / "a" / "g.gif")
    refused(gif, "a/g.gif is a GIF image", "PNG")

    depth = _tiny(root / "depth")
    _write(depth / "c" / "g" / "0.png", np.zeros((8, 8), np.uint8))
    refused(depth, "class folder c holds group folders, unlike the other")

    small = _tiny(root / "small")
    _write(small / "c" / "0.png", np.zeros((8, 8), np.uint8))
    refused(small, "has 1 rows, too few to stratify")

    outside = _write(root / "elsewhere" / "x.png", np.zeros((8, 8), np.uint8))
    linked = _tiny(root / "linked")
    os.symlink(outside, linked / "a" / "escape.png")
    refused(linked, "a/escape.png is a symlink to", "outside the image folder")

    bomb = _tiny(root / "bomb")
    monkeypatch.setattr(imagefolder, "MAX_PIXELS", 100)
    _write(bomb / "b" / "huge.png", np.zeros((11, 10), np.uint8))
    refused(bomb, "b/huge.png has 10x11 pixels, over the limit of 100")


def test_symlink_inside_the_folder_is_followed(tmp_path: Path) -> None:
    inside = _tiny(tmp_path / "inside")
    os.symlink(inside / "a" / "0.png", inside / "b" / "link.png")
    info = imagefolder.fetch_imagefolder(inside, "ok", tmp_path / "data", color="gray")
    assert info["rows"] == 21
    stored = np.load(tmp_path / "data" / "user" / "ok" / "images.npy")
    np.testing.assert_array_equal(stored[0], stored[-1])  # a/0.png and b/link.png


def test_unknown_group_names_the_nearest(
    fetched: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tree_listing
) -> None:
    root = fetched["root"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(root))
    prepare = ("data", "prepare", NAME, "--group")
    fails_cleanly(
        root, tree_listing, *prepare, "33", words=("unknown group '33'", "close names: 3")
    )
    fails_cleanly(root, tree_listing, *prepare, "3,77", words=("cannot prepare --group 77",))
    fails_cleanly(root, tree_listing, *prepare, "3", "--cls", "1", words=("--group with --cls",))
    with pytest.raises(MlvarError, match="is in several classes"):
        groups = [(0, "x"), (1, "x")]
        source = imagefolder.ImageFolderSource(
            root, "twins", {"classes": ["a", "b"], "groups": groups, "layout": "class/group/file"}
        )
        source.find_group("x")
    assert source.group_names == ["a/x", "b/x"] and source.find_group("b/x") == 1


# --------------------------------------------------------------------------- end to end


def test_demo_on_the_folder_auroc_matches_sklearn(
    fetched: dict, digits_folder: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mlvar demo --data``'s pipeline on the image folder: its first group (digit 0) held
    out, 8 CNN seeds; the detection AUROCs of the ranking recomputed from the stored logits."""
    from sklearn.metrics import roc_auc_score

    from mlvar import demo
    from mlvar.config import Config, PathsConfig, default_train
    from mlvar.store import ExperimentStore

    # GradCAM and report pages of a few samples under two seeds keep the test cheap.
    monkeypatch.setattr(demo, "DEMO_TOP", 3)
    monkeypatch.setattr(demo, "DEMO_SALIENCY_SEEDS", 2)

    root = fetched["root"]
    cfg = Config(paths=PathsConfig(root, tmp_path / "runs", tmp_path / "reports"))
    cfg.train[NAME] = default_train(NAME, root)
    cfg.train[NAME].epochs, cfg.train[NAME].batch_size, cfg.train[NAME].workers = 1, 128, 1
    steps: list[str] = []
    result = demo.run_data_demo(cfg, digits_folder["root"], {}, runs=8, step=steps.append)
    assert steps[0] == f"recording {digits_folder['root']} as imagefolder '{NAME}'"
    assert result.scenario == f"{NAME}-holdout-g0-r1.0"
    assert result.report.is_file() and result.saliency is not None
    assert len(result.saliency.samples) == 6 and result.saliency.n_seeds == 2  # top 3, 3 others
    store = ExperimentStore.open(cfg.paths.runs_root, result.experiment)
    assert store.meta["train"]["model"] == "cnn" and len(store.runs()) == 8
    samples = store.samples("test")
    affected = samples["affected"].to_numpy()
    np.testing.assert_array_equal(
        affected, digits_folder["digit"][samples["sample_id"].to_numpy()] == 0
    )
    logits = np.stack([run.load_logits("test") for run in store.runs()]).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    label = samples["label"].to_numpy()
    gconf = probs[:, np.arange(len(label)), label]
    maxconf = probs.max(axis=2)
    scores = {  # each metric's suspicion written here: low mean confidence, high spread
        "gconf_mean": -gconf.mean(axis=0),
        "gconf_std": gconf.std(axis=0),
        "n_correct": -(probs.argmax(axis=2) == label).sum(axis=0),
        "maxconf_mean": -maxconf.mean(axis=0),
        "maxconf_std": maxconf.std(axis=0),
    }
    # Label-aware metrics are ranked within the held-out group's class (docs/metrics.md),
    # label-free ones over the whole split.
    in_class = label == 0
    detection = result.ranking.detection.set_index("metric")
    for metric, score in scores.items():
        aware = metric.startswith("gconf") or metric == "n_correct"
        rows = in_class if aware else np.ones(len(label), bool)
        assert detection.loc[metric, "scope"] == ("class 0" if aware else "split"), metric
        expected = roc_auc_score(affected[rows], score[rows])
        assert detection.loc[metric, "auroc"] == pytest.approx(expected, abs=1e-9), metric


def test_demo_refuses_what_the_kind_does_not_take(tmp_path: Path) -> None:
    from mlvar.config import Config, PathsConfig
    from mlvar.demo import demo_name, run_data_demo

    folder = _tiny(tmp_path / "My Photos")
    table = tmp_path / "scans.csv"
    table.write_text("a,b\n1,2\n")
    assert demo_name(folder) == "my_photos"
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "reports"))
    with pytest.raises(MlvarError, match="--size is for imagefolder data"):
        run_data_demo(cfg, table, {"size": 8})
    with pytest.raises(MlvarError, match="--where is for table data"):
        run_data_demo(cfg, folder, {"where": "a > 1"})
    with pytest.raises(MlvarError, match="takes no --group"):
        run_data_demo(cfg, folder, {"group": "x"})  # no groups: only --cls holds out
    assert not (tmp_path / "runs").exists()
