"""The Ray backend against a real local Ray instance (2 CPUs): the same seeds and config
give runs equal to the local backend's, bit for bit; analysis shards computed by Ray
tasks merge to the local backend's ranking, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlvar.backends import service
from mlvar.config import Config, PathsConfig
from mlvar.data.registry import prepare
from mlvar.store import ExperimentStore

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_runs_equal_local_runs(ray_instance, tmp_path: Path) -> None:
    prepare(tmp_path / "data", "digits", mode="holdout", subclass=3)
    stores = {}
    for backend in ("ray", "local"):
        cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / backend, tmp_path / "rep"))
        res = service.submit(
            cfg, "digits", runs=4, backend=backend, overrides={"epochs": 3}, runs_per_job=2
        )
        assert res.submission.state == "complete", res.submission
        stores[backend] = ExperimentStore.open(tmp_path / backend, res.experiment)
    sub = json.loads(next((stores["ray"].root / "submissions").glob("*.json")).read_text())
    assert sub["backend"] == "ray" and [j["run_indices"] for j in sub["jobs"]] == [[0, 1], [2, 3]]
    assert stores["ray"].meta == stores["local"].meta
    runs = {b: s.runs(verify=True) for b, s in stores.items()}
    assert [r.run_id for r in runs["ray"]] == [f"run-{i:04d}" for i in range(4)]
    for a, b in zip(runs["ray"], runs["local"], strict=True):
        assert a.seed == b.seed and a.meta["config"] == b.meta["config"]
        for split in stores["ray"].splits:
            la, lb = a.load_logits(split), b.load_logits(split)
            assert np.array_equal(la.argmax(1), lb.argmax(1)), (a.run_id, split)
            assert np.array_equal(la, lb), (a.run_id, split)
    assert not (stores["ray"].root / "submissions" / sub["id"]).exists()  # work folder gone


@pytest.mark.slow
def test_ray_analysis_shards_equal_local_shards(
    ray_instance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlvar submit analyze --backend ray: each task gets only its run block's files and
    returns its shard as bytes; the merged ranking equals the local backend's bit for bit
    and the unsharded ranking to 1e-12; a failing shard is retried then reported."""
    import shutil

    import pandas as pd

    from mlvar.analysis import service as analysis
    from mlvar.analysis.metrics import METRICS
    from mlvar.train.service import train

    prepare(tmp_path / "data", "digits", mode="holdout", subclass=3)
    cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "ray", tmp_path / "rep"))
    exp = train(cfg, "digits", runs=4, overrides={"epochs": 2}).path.name
    shutil.copytree(tmp_path / "ray", tmp_path / "local")
    local_cfg = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "local", tmp_path / "r"))
    res = service.submit_analysis(cfg, exp, backend="ray", shards=3, run_shards=2)
    assert res.submission.state == "complete", res.submission
    assert all(j.ref and j.attempts == 1 for j in res.submission.jobs)
    local = service.submit_analysis(local_cfg, exp, backend="local", shards=3, run_shards=2)
    pd.testing.assert_frame_equal(res.merged.ranking, local.merged.ranking, check_exact=True)
    pd.testing.assert_frame_equal(res.merged.detection, local.merged.detection, check_exact=True)
    store = ExperimentStore.open(tmp_path / "ray", exp)
    whole = analysis.rank(store, "test", write=False).ranking.sort_values("sample_id")
    merged = res.merged.ranking.sort_values("sample_id")
    for col in METRICS:
        np.testing.assert_allclose(merged[col], whole[col], rtol=0, atol=1e-12)
    assert res.ranking == store.root / "analysis" / "rank-test.parquet"
    assert not (store.root / "submissions" / res.submission.id).exists()  # work folder gone
    # A shard failing in every attempt: retried, then reported with its log tail.
    shutil.rmtree(store.root / "analysis" / "shards" / "test" / "s3of3-r1of2")
    monkeypatch.setenv("MLVAR_WORKER_FAULT", "fail:4")  # sent to the tasks' runtime_env
    again = service.submit_analysis(cfg, exp, backend="ray", shards=3, run_shards=2, retries=1)
    (job,) = again.submission.jobs
    assert job.name == "s3of3-r1of2" and job.state == "failed" and job.attempts == 2
    assert "injected failure in shard s3of3-r1of2" in job.log_tail
    assert again.merged is None


@pytest.mark.slow
def test_ray_sweep_equals_train_with_shared_jobs(ray_instance, tmp_path: Path) -> None:
    from mlvar.backends.study import submit_study
    from mlvar.train.study import train_study

    data = tmp_path / "data"
    exps = [prepare(data, "digits", mode="holdout", subclass=k).name + "-mlp" for k in (3, 4)]
    roots = {"ray": tmp_path / "ray", "train": tmp_path / "train"}
    cfgs = {k: Config(paths=PathsConfig(data, v, tmp_path / "rep")) for k, v in roots.items()}
    train_study(cfgs["train"], "digits", runs=3, overrides={"epochs": 2})
    res = submit_study(
        cfgs["ray"], "digits", runs=3, backend="ray", overrides={"epochs": 2}, runs_per_job=4
    )
    assert res.submission.state == "complete" and not res.failed, res.submission
    # 3 runs each, 4 per job: one job reads both scenarios, and lands each run in its own.
    assert [
        [(p["experiment"], p["run_indices"]) for p in j.parts] for j in res.submission.jobs
    ] == [
        [(exps[0], [0, 1, 2]), (exps[1], [0])],
        [(exps[1], [1, 2])],
    ]
    for exp in exps:
        a, b = (ExperimentStore.open(roots[k], exp) for k in ("ray", "train"))
        assert a.meta == b.meta
        ra, rb = a.runs(verify=True), b.runs(verify=True)
        assert [r.run_id for r in ra] == [f"run-{i:04d}" for i in range(3)]
        for x, y in zip(ra, rb, strict=True):
            assert x.seed == y.seed
            for split in a.splits:
                assert np.array_equal(x.load_logits(split), y.load_logits(split)), (exp, x.run_id)
