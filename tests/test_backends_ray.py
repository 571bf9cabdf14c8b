"""The Ray backend against a real local Ray instance (2 CPUs): the same seeds and config
give runs equal to the local backend's, bit for bit."""

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


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


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
