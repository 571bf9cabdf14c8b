"""The shard mechanics shared by sharded analysis and sharded saliency
(``mlvar.analysis.sharding``): blocks, names, the folder with ``meta.json`` last, its
verification, and whether a set of shards is complete."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlvar.analysis import sharding
from mlvar.analysis.saliency.shards import SHARD_FORMAT as SALIENCY_FORMAT
from mlvar.analysis.shards import SHARD_FORMAT, merge_shards, shards_dir, write_shard
from mlvar.analysis.synthetic import synthetic_store
from mlvar.errors import MlvarError


@pytest.mark.parametrize("n", [0, 1, 5, 17, 100])
@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_blocks_are_contiguous_and_cover_every_item_once(n: int, m: int) -> None:
    bounds = [sharding.shard_range(j, m, n) for j in range(1, m + 1)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1  # as even as integers allow


def test_names_and_parsing() -> None:
    assert sharding.shard_name(None, (2, 4)) == "r2of4"
    assert sharding.shard_name((1, 3), (2, 4)) == "s1of3-r2of4"
    assert sharding.parse_shard(" 2 / 4 ") == (2, 4)
    for bad in ("0/2", "3/2", "x", "", "1/2/3"):
        with pytest.raises(MlvarError, match="--run-shard must be i/k"):
            sharding.parse_shard(bad, "--run-shard")


def _fmt(**kw) -> sharding.ShardFormat:
    return sharding.ShardFormat(what="a test shard's", recognises=lambda m: m.get("t") == 1, **kw)


def test_the_folder_lists_each_files_sha256_and_meta_comes_last(tmp_path: Path) -> None:
    arrays = {"a.npy": np.arange(6.0).reshape(2, 3), "b.npy": np.ones(4, dtype=np.float16)}
    seen = []

    def on_file(name: str) -> None:  # meta.json is not there while arrays are written
        seen.append((name, (tmp_path / "s" / "meta.json").exists()))

    meta = sharding.write_shard_folder(tmp_path / "s", arrays, {"t": 1}, on_file)
    assert seen == [("a.npy", False), ("b.npy", False)]
    on_disk = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert on_disk == meta and on_disk["t"] == 1
    for name, array in arrays.items():
        data = (tmp_path / "s" / name).read_bytes()
        assert on_disk["files"][name] == hashlib.sha256(data).hexdigest()
        np.testing.assert_array_equal(np.load(tmp_path / "s" / name), array)
    assert sharding.verify_shard_folder(tmp_path / "s", _fmt()) == (meta, "")


def test_verify_names_the_problem(tmp_path: Path) -> None:
    def fresh() -> Path:
        folder = tmp_path / "s"
        shutil.rmtree(folder, ignore_errors=True)
        sharding.write_shard_folder(folder, {"a.npy": np.zeros(3)}, {"t": 1})
        return folder

    def why(folder: Path, fmt: sharding.ShardFormat | None = None) -> str:
        return sharding.verify_shard_folder(folder, fmt or _fmt())[1]

    folder = fresh()
    (folder / "a.npy").write_bytes((folder / "a.npy").read_bytes()[:-1] + b"\x01")
    assert why(folder) == "sha256 mismatch in a.npy"
    assert why(folder, _fmt(mismatch="{name} is bad")) == "a.npy is bad"
    (folder / "a.npy").unlink()
    assert why(folder) == "a.npy is missing"
    folder = fresh()
    (folder / "extra.npy").write_bytes(b"x")
    assert why(folder) == "unlisted file(s) extra.npy"
    folder = fresh()
    assert why(folder, _fmt(names=frozenset({"maps.npy"}))) == "unexpected file 'a.npy'"
    meta = json.loads((folder / "meta.json").read_text())
    for bad in ("../a.npy", ".a.npy", "a.txt"):
        (folder / "meta.json").write_text(json.dumps(dict(meta, files={bad: "0"})))
        assert why(folder) == f"file name {bad!r} is not a plain .npy name"
    (folder / "meta.json").write_text(json.dumps({"t": 1}))
    assert why(folder) == "meta.json lists no files"
    assert why(folder, _fmt(files_optional=True)) == ""  # written before sha256 were listed
    (folder / "meta.json").write_text(json.dumps({"t": 2, "files": meta["files"]}))
    assert sharding.verify_shard_folder(folder, _fmt()) == (None, "meta.json is not a test shard's")
    (folder / "meta.json").write_text("{")
    assert why(folder) == "corrupt meta.json"
    (folder / "meta.json").unlink()
    assert why(folder) == "unfinished (no meta.json)"


def test_analysis_and_saliency_shards_are_told_apart(tmp_path: Path) -> None:
    analysis_meta = {"samples": [1, 1], "runs": [1, 1], "run_ids": ["run-0000"]}
    sharding.write_shard_folder(tmp_path / "a", {"votes.npy": np.zeros(2)}, analysis_meta)
    sharding.write_shard_folder(tmp_path / "s", {"maps.npy": np.zeros(2)}, {"kind": "saliency"})
    assert sharding.verify_shard_folder(tmp_path / "a", SHARD_FORMAT)[1] == ""
    assert sharding.verify_shard_folder(tmp_path / "s", SALIENCY_FORMAT)[1] == ""
    assert sharding.verify_shard_folder(tmp_path / "a", SALIENCY_FORMAT)[1].endswith(
        "not a saliency shard's"
    )
    assert sharding.verify_shard_folder(tmp_path / "s", SHARD_FORMAT)[1].endswith("not a shard's")


def test_a_survey_finds_missing_repeated_and_mixed_blocks() -> None:
    runs = [((j, 3),) for j in (3, 1, 2)]
    survey = sharding.survey_blocks(runs)
    assert survey.complete and survey.sizes == (3,) and not survey.missing
    survey = sharding.survey_blocks([((1, 3),), ((3, 3),), ((3, 3),)])
    assert survey.missing == [(2,)] and survey.repeated == [(3,)] and not survey.complete
    survey = sharding.survey_blocks([((1, 2),), ((1, 3),)])
    assert survey.sizes is None and survey.counts == [[2, 3]] and not survey.complete
    # two axes: samples x runs
    grid = [((i, 2), (j, 2)) for i, j in [(1, 1), (1, 2), (2, 2)]]
    assert sharding.survey_blocks(grid).missing == [(2, 1)]
    grid.append(((2, 1), (1, 2)))
    assert sharding.survey_blocks(grid).counts == [[1, 2], [2]]


def test_shard_folders_leave_out_temporary_ones(tmp_path: Path) -> None:
    for name in ("r2of2", ".tmp-r1of2-abc", "r1of2"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in sharding.shard_folders(tmp_path)] == ["r1of2", "r2of2"]
    assert sharding.shard_folders(tmp_path / "absent") == []


def test_an_analysis_merge_refuses_two_folders_of_one_block(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=3, n_samples=40)
    for i in (1, 2):
        write_shard(store, "test", (i, 2))
    whole = merge_shards(store, "test", write=False).ranking
    root = shards_dir(store, "test")
    shutil.copytree(root / "s1of2-r1of1", root / "s1of2-r1of1-copy")
    with pytest.raises(MlvarError, match=r"overlap: more than one folder holds samples 1/2"):
        merge_shards(store, "test", write=False)
    shutil.rmtree(root / "s1of2-r1of1-copy")
    shutil.copytree(root / "s1of2-r1of1", root / ".tmp-s1of2-r1of1-left-by-a-kill")
    assert merge_shards(store, "test", write=False).ranking.equals(whole)
