"""Sharded analysis: shards of samples and of runs merge into exactly the unsharded result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mlvar.analysis import service
from mlvar.analysis.metrics import ALL_METRICS, METRICS, compute_metrics
from mlvar.analysis.partial import combine_runs, concat_samples, finalize, from_probs
from mlvar.analysis.shards import merge_shards, parse_shard, shard_range, write_shard
from mlvar.analysis.synthetic import synthetic_store
from mlvar.cli import app
from mlvar.errors import MlvarError

runner = CliRunner()


def _by_id(result: service.RankResult) -> pd.DataFrame:
    return result.ranking.sort_values("sample_id").reset_index(drop=True)


def test_partials_by_hand_invariance() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(12) * 0.4, size=(17, 101))
    labels = rng.integers(0, 12, 101)
    whole = finalize(from_probs(probs, labels), labels)
    # sample blocks: bit for bit
    blocks = [from_probs(probs[:, a : a + 9], labels[a : a + 9]) for a in range(0, 101, 9)]
    pd.testing.assert_frame_equal(finalize(concat_samples(blocks), labels), whole, check_exact=True)
    # run blocks: float round-off only (sums re-associated)
    runs = [from_probs(probs[a:b], labels) for a, b in [(0, 5), (5, 6), (6, 17)]]
    merged = finalize(combine_runs(runs), labels)
    for col in whole:
        np.testing.assert_allclose(merged[col], whole[col], rtol=0, atol=1e-12)
    votes = ["n_correct", "n_distinct_pred", "vote_entropy", "disagreement", "variation_ratio"]
    pd.testing.assert_frame_equal(merged[votes], whole[votes], check_exact=True)
    # and the reference implementation agrees to round-off
    ref = compute_metrics(probs, labels)
    for col in ref:
        np.testing.assert_allclose(whole[col], ref[col], rtol=0, atol=1e-12)


def test_parse_shard_and_ranges() -> None:
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ["0/3", "4/3", "a/b", "3", "", "-1/2"]:
        with pytest.raises(MlvarError, match="i/k"):
            parse_shard(bad)
    n = 10
    ranges = [shard_range(i, 3, n) for i in (1, 2, 3)]
    assert ranges == [(0, 3), (3, 6), (6, 10)]


@pytest.fixture
def store(tmp_path: Path):
    return synthetic_store(
        tmp_path / "runs", name="exp", n_runs=7, n_samples=211, n_classes=5, dtype="float16"
    )


def test_sample_shards_merge_exactly(store) -> None:
    whole = service.rank(store, "test", by="disagreement", write=False)
    for i in (1, 2, 3):
        write_shard(store, "test", (i, 3), chunk=13)
    merged = merge_shards(store, "test", by="disagreement")
    assert merged.n_runs == 7
    pd.testing.assert_frame_equal(merged.ranking, whole.ranking, check_exact=True)
    pd.testing.assert_frame_equal(merged.detection, whole.detection, check_exact=True)
    pd.testing.assert_frame_equal(merged.baselines, whole.baselines, check_exact=True)
    info = json.loads((store.root / "analysis" / "rank-test.json").read_text())
    assert info["merged_shards"] == {"samples": 3, "runs": 1}
    assert info["run_ids"] == [f"run-{r:04d}" for r in range(7)]


def test_run_and_sample_shards_merge_to_round_off(store) -> None:
    whole = _by_id(service.rank(store, "test", write=False))
    for i in (1, 2):
        for j in (1, 2, 3):
            write_shard(store, "test", (i, 2), (j, 3))
    merged_result = merge_shards(store, "test", write=False)
    merged = _by_id(merged_result)
    # Sums over runs are re-associated when run blocks combine: |error| ~ R * 1e-16.
    for col in METRICS:
        np.testing.assert_allclose(merged[col], whole[col], rtol=0, atol=1e-12)
    exact = ["n_correct", "n_distinct_pred", "vote_entropy", "disagreement", "votes"]
    pd.testing.assert_frame_equal(merged[exact], whole[exact], check_exact=True)
    # baselines use each run's own scores: exact
    full = service.rank(store, "test", write=False)
    pd.testing.assert_frame_equal(merged_result.baselines, full.baselines, check_exact=True)


def test_merge_refuses_incomplete_and_overlapping(store) -> None:
    with pytest.raises(MlvarError, match="no shards"):
        merge_shards(store, "test")
    write_shard(store, "test", (1, 3))
    write_shard(store, "test", (3, 3))
    with pytest.raises(MlvarError, match="incomplete: missing 2/3"):
        merge_shards(store, "test")
    write_shard(store, "test", (2, 3))
    write_shard(store, "test", (1, 2))
    with pytest.raises(MlvarError, match="overlap.*3 and 2|overlap.*2 and 3"):
        merge_shards(store, "test")
    assert not (store.root / "analysis" / "rank-test.parquet").exists()


def test_merge_refuses_runs_missing_from_a_run_shard(store) -> None:
    write_shard(store, "test", (1, 1), (1, 2))
    with pytest.raises(MlvarError, match="missing 1/1 runs 2/2"):
        merge_shards(store, "test")


def test_shards_over_different_runs_are_refused(store) -> None:
    write_shard(store, "test", (1, 2))
    logits = store.runs()[0].load_logits("test", mmap=False)
    store.write_run("run-0100", {"test": logits}, {"seed": 1, "config": {"synthetic": True}})
    write_shard(store, "test", (2, 2))
    with pytest.raises(MlvarError, match="different runs"):
        merge_shards(store, "test")


def test_shard_larger_than_data(store) -> None:
    with pytest.raises(MlvarError, match="into 8 run shards"):
        write_shard(store, "test", (1, 1), (1, 8))


def test_dynamics_shards(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, n_runs=4, n_samples=50, split="train", dynamics_epochs=3)
    whole = service.rank(store, "train", by="dm_confidence", write=False)
    for i in (1, 2):
        write_shard(store, "train", (i, 2))
    merged = merge_shards(store, "train", by="dm_confidence", write=False)
    pd.testing.assert_frame_equal(merged.ranking, whole.ranking, check_exact=True)
    for i in (1, 2):
        for j in (1, 2):
            write_shard(store, "train", (i, 2), (j, 2))
    # now both 1of1 and 1of2 run splits are present: overlapping
    with pytest.raises(MlvarError, match="overlap"):
        merge_shards(store, "train")
    for p in (store.root / "analysis" / "shards" / "train").glob("*-r1of1"):
        shutil.rmtree(p)
    merged = _by_id(merge_shards(store, "train", by="dm_confidence", write=False))
    for col in ALL_METRICS:
        np.testing.assert_allclose(merged[col], _by_id(whole)[col], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- CLI


def _env(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLVAR_CONFIG", raising=False)
    monkeypatch.setenv("MLVAR_RUNS_ROOT", str(root / "runs"))
    monkeypatch.setenv("MLVAR_DATA_ROOT", str(root / "data"))
    monkeypatch.setenv("MLVAR_REPORTS_ROOT", str(root / "reports"))


def test_cli_shard_then_merge(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(tmp_path, monkeypatch)
    for i in (1, 2):
        out = runner.invoke(app, ["analyze", "rank", "exp", "--shard", f"{i}/2", "--json"])
        assert out.exit_code == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["shard"] == f"{i}/2" and Path(info["path"]).is_dir()
    out = runner.invoke(app, ["analyze", "rank", "exp", "--merge", "--json"])
    assert out.exit_code == 0, out.stderr
    merged = json.loads(out.stdout)
    whole = service.rank(store, "test", write=False)
    assert merged["n_runs"] == 7
    assert [r["sample_id"] for r in merged["ranking"]] == whole.ranking["sample_id"].tolist()
    out = runner.invoke(app, ["analyze", "rank", "exp", "--merge"])
    assert out.exit_code == 0 and "detection of" in out.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--merge"], "no shards"),
        (["--shard", "3/2"], "--shard must be i/k"),
        (["--run-shard", "x"], "--run-shard must be i/k"),
        (["--merge", "--shard", "1/2"], "cannot be combined"),
        (["--compute-missing"], "--compute-missing applies only"),
    ],
)
def test_cli_shard_errors(
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], words: str
) -> None:
    _env(tmp_path, monkeypatch)
    before = sorted(p for p in tmp_path.rglob("*"))
    out = runner.invoke(app, ["analyze", "rank", "exp", *args])
    assert out.exit_code == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0]
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_cli_incomplete_merge_is_one_line(
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(tmp_path, monkeypatch)
    assert runner.invoke(app, ["analyze", "rank", "exp", "--shard", "2/3"]).exit_code == 0
    out = runner.invoke(app, ["analyze", "rank", "exp", "--merge"])
    assert out.exit_code == 2
    (line,) = out.stderr.strip().splitlines()
    assert "incomplete: missing 1/3, 3/3" in line and "--shard i/3" in line


def test_partial_arrays_are_the_registry_statistics(tmp_path: Path) -> None:
    from mlvar.analysis.metrics import STATISTICS
    from mlvar.analysis.partial import Partial

    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(3), size=(4, 20))
    labels = rng.integers(0, 3, 20)
    part = from_probs(probs, labels)
    assert list(part.arrays()) == [k for k, s in STATISTICS.items() if s.source == "probs"]
    assert part.dynamics is None and part.n == 20
    part.save(tmp_path, {})
    loaded = Partial.load(tmp_path, mmap=False)
    pd.testing.assert_frame_equal(finalize(loaded, labels), finalize(part, labels))
    (tmp_path / "m2_gap.npy").unlink()
    with pytest.raises(ValueError, match="lacks m2_gap"):
        Partial.load(tmp_path)
    dyn = {"dyn_dm_confidence": np.zeros(20)}  # only one of the dynamics statistics
    with pytest.raises(ValueError, match="lacks dyn_dm_variability"):
        from_probs(probs, labels, dyn)
