"""The ``loop`` and ``batched`` MLP engines: same per-run randomness, same results.

The engines are meant to be interchangeable: run ``r`` must start from the same weights,
see the same batches and dropout masks, and end with the same logits whichever engine
trains it and whichever other runs share its pack. On the CPU both engines run the same
kernels in the same order (single-threaded, see ``mlvar.train.mlp``), so the logits agree
bit for bit today; the engine comparisons still allow ``ENGINE_ATOL`` so that a BLAS that
blocks a batched matmul differently from a single one does not fail them, while a real
semantic difference (another batch, mask or init, a wrong gradient) moves logits by 1e-2
or more after two epochs.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from mlvar.config import TrainConfig
from mlvar.train import mlp
from mlvar.train.mlp import ENGINES, TrainData, fill_dropout_keep, train_batched, train_loop
from mlvar.train.seeding import RunGenerators

ALL = ["init", "order", "dropout"]
ENGINE_ATOL = 1e-5  # see the module docstring
# A run's logits must not depend on the other runs of its pack. They are bit-identical at
# the study's shapes (hidden 64); at other widths the CPU kernels round a few channels
# differently depending on where they fall in a SIMD vector (~3e-7 after two epochs).
PACK_ATOL = 1e-6


def synthetic(n: int = 203, features: int = 5, classes: int = 3) -> TrainData:
    """A small learnable problem; 203 rows make a last batch of 11 with batch size 32."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, classes, generator=gen)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=gen)).argmax(1)
    return TrainData(x, y, classes)


def config(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 32, "hidden": 16, "dropout": 0.2, "lr": 3e-3}
    return TrainConfig(**(base | kw))


def gens(runs, vary=ALL, base_seed: int = 7) -> list[RunGenerators]:
    return [RunGenerators(base_seed, r, list(vary)) for r in runs]


def eval_x(data: TrainData) -> dict[str, torch.Tensor]:
    return {"train": data.x, "probe": data.x[:17] * 2}


class Recorder:
    """A ``trace`` callback keeping each run's initial weights and batch indices."""

    def __init__(self) -> None:
        self.init: dict[int, list[torch.Tensor]] = {}
        self.batches: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        self.threads: set[int] = set()

    def __call__(self, event: str, pos: int, payload) -> None:
        self.threads.add(threading.get_ident())
        if event == "init":
            self.init[pos] = [t.clone() for t in payload]
        else:
            epoch, step, idx = payload
            self.batches.setdefault(pos, []).append((epoch, step, idx.clone()))


def assert_same_init(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def assert_same_batches(a, b) -> None:
    assert [(e, s) for e, s, _ in a] == [(e, s) for e, s, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_engines_see_the_same_init_and_batches():
    data, cfg = synthetic(), config()
    rec = {name: Recorder() for name in ENGINES}
    for name, engine in ENGINES.items():
        engine(data, cfg, gens(range(3)), eval_x(data), trace=rec[name])
    loop, batched = rec["loop"], rec["batched"]
    assert sorted(loop.init) == sorted(batched.init) == [0, 1, 2]
    for r in range(3):
        assert_same_init(loop.init[r], batched.init[r])
        assert_same_batches(loop.batches[r], batched.batches[r])
        # 203 rows, batch 32: 7 steps a epoch, the last of 11 rows; every row once.
        sizes = [len(idx) for _, _, idx in batched.batches[r]]
        assert sizes == [32] * 6 + [11] + [32] * 6 + [11]
        first_epoch = torch.cat([idx for e, _, idx in batched.batches[r] if e == 0])
        assert torch.equal(first_epoch.sort().values, torch.arange(203))


def test_engines_agree_after_training():
    data, cfg = synthetic(), config(epochs=3)
    loop = train_loop(data, cfg, gens(range(3)), eval_x(data))
    batched = train_batched(data, cfg, gens(range(3)), eval_x(data))
    for a, b in zip(loop, batched, strict=True):
        assert a.keys() == b.keys() == {"train", "probe"}
        for k in a:
            assert a[k].shape == b[k].shape
            torch.testing.assert_close(b[k], a[k], atol=ENGINE_ATOL, rtol=0)


def test_engines_agree_on_compas(compas_root):
    from mlvar.data.compas import prepare_compas

    scenario = prepare_compas(compas_root, "original")
    train, test = scenario.load("train"), scenario.load("test")
    data = TrainData(
        torch.as_tensor(train.x, dtype=torch.float32).reshape(len(train), -1),
        torch.as_tensor(train.y),
        len(scenario.class_names),
    )
    ev = {"test": torch.as_tensor(test.x, dtype=torch.float32).reshape(len(test), -1)}
    cfg = TrainConfig(epochs=2)  # the study's batch 64, hidden 64, dropout 0.1
    loop = train_loop(data, cfg, gens(range(2), base_seed=0), ev)
    batched = train_batched(data, cfg, gens(range(2), base_seed=0), ev)
    alone = train_batched(data, cfg, gens([1], base_seed=0), ev)
    torch.testing.assert_close(alone[0]["test"], batched[1]["test"], atol=PACK_ATOL, rtol=0)
    for a, b in zip(loop, batched, strict=True):
        torch.testing.assert_close(b["test"], a["test"], atol=ENGINE_ATOL, rtol=0)
        accuracy = (b["test"].argmax(1) == torch.as_tensor(test.y)).float().mean().item()
        assert accuracy > 0.6  # it learnt something


def test_a_run_does_not_depend_on_its_pack():
    data, cfg = synthetic(), config()
    pack = train_batched(data, cfg, gens(range(5)), eval_x(data))
    alone = train_batched(data, cfg, gens([3]), eval_x(data))
    pair = train_batched(data, cfg, gens([3, 1]), eval_x(data))
    for k in ("train", "probe"):
        torch.testing.assert_close(alone[0][k], pack[3][k], atol=PACK_ATOL, rtol=0)
        torch.testing.assert_close(pair[0][k], pack[3][k], atol=PACK_ATOL, rtol=0)
        torch.testing.assert_close(pair[1][k], pack[1][k], atol=PACK_ATOL, rtol=0)


def test_pack_split_across_threads_changes_nothing(monkeypatch):
    data, cfg = synthetic(), config()
    one = train_batched(data, cfg, gens(range(5)), eval_x(data))
    monkeypatch.setattr(mlp, "_cpu_workers", lambda seeds: 3)  # slices of 2, 2 and 1 runs
    calls, rec = [], Recorder()
    threaded = train_batched(
        data,
        cfg,
        gens(range(5)),
        eval_x(data),
        progress=lambda done, total: calls.append((done, total, threading.get_ident())),
        trace=rec,
    )
    for a, b in zip(one, threaded, strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=PACK_ATOL, rtol=0)
    # The callbacks come from the calling thread; progress counts run-epochs up to the end.
    assert rec.threads == {threading.get_ident()}
    assert {t for _, _, t in calls} == {threading.get_ident()}
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == 10 and {t for _, t, _ in calls} == {10}
    assert sorted(rec.batches) == [0, 1, 2, 3, 4]


def test_threads_setting_is_restored():
    before = torch.get_num_threads()
    data = synthetic()
    train_batched(data, config(epochs=1), gens(range(2)), eval_x(data))
    train_loop(data, config(epochs=1), gens(range(1)), eval_x(data))
    assert torch.get_num_threads() == before


def test_seeds_differ_and_vary_controls_each_source():
    data, cfg = synthetic(), config()
    out = train_batched(data, cfg, gens(range(2)), eval_x(data))
    assert (out[0]["train"] - out[1]["train"]).abs().max() > 1e-3

    def record(vary) -> Recorder:
        rec = Recorder()
        train_batched(data, config(epochs=1), gens(range(3), vary), eval_x(data), trace=rec)
        return rec

    fixed_init = record(["order", "dropout"])
    for r in (1, 2):
        assert_same_init(fixed_init.init[0], fixed_init.init[r])
        assert not torch.equal(fixed_init.batches[0][0][2], fixed_init.batches[r][0][2])

    fixed_order = record(["init", "dropout"])
    for r in (1, 2):
        assert not torch.equal(fixed_order.init[0][0], fixed_order.init[r][0])
        assert_same_batches(fixed_order.batches[0], fixed_order.batches[r])

    # Nothing varies: every run is the same run.
    same = train_batched(data, cfg, gens(range(2), vary=[]), eval_x(data))
    assert torch.equal(same[0]["train"], same[1]["train"])


def test_dropout_mask_rate_is_p():
    p, n = 0.1, 300_000
    keep = torch.empty(n, dtype=torch.bool)
    fill_dropout_keep(torch.Generator().manual_seed(0), keep, p)
    drop_effective = round(p * 65536) / 65536  # masks come from 16-bit uniforms
    sd = math.sqrt(drop_effective * (1 - drop_effective) / n)
    assert abs((1 - keep.float().mean().item()) - drop_effective) < 5 * sd
    # Two epochs' masks differ; the shape (and any layout) of the mask is respected.
    other = torch.empty(600, 500, dtype=torch.bool)
    fill_dropout_keep(torch.Generator().manual_seed(0), other.t(), p)
    assert torch.equal(other.t().reshape(-1), keep)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_same_seed_twice_is_bit_identical(engine):
    data, cfg = synthetic(), config()
    first = ENGINES[engine](data, cfg, gens(range(2)), eval_x(data))
    second = ENGINES[engine](data, cfg, gens(range(2)), eval_x(data))
    for a, b in zip(first, second, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_no_dropout_and_a_single_run():
    data, cfg = synthetic(), config(dropout=0.0)
    loop = train_loop(data, cfg, gens([4]), eval_x(data))
    batched = train_batched(data, cfg, gens([4]), eval_x(data))
    torch.testing.assert_close(batched[0]["train"], loop[0]["train"], atol=ENGINE_ATOL, rtol=0)


@pytest.mark.parametrize("engine", ["batched", "loop"])
def test_recording_dynamics_changes_nothing_and_ends_at_the_final_logits(engine: str) -> None:
    data = synthetic(n=96, features=6, classes=3)
    inputs = eval_x(data)
    cfg = config(epochs=3)
    plain = ENGINES[engine](data, cfg, gens(range(2)), inputs)
    recorded = ENGINES[engine](data, cfg, gens(range(2)), inputs, dynamics=data.x)
    for a, b in zip(plain, recorded, strict=True):
        for split in inputs:
            assert torch.equal(a[split], b[split])
        dyn = b["dynamics"]
        assert dyn.shape == (3, 96, 3)
        # the last epoch's record is the final model evaluated on the same inputs
        assert torch.equal(dyn[-1], b["train"])
        assert not torch.equal(dyn[0], dyn[-1])


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_saved_weights_reproduce_the_logits_in_an_nn_module(engine):
    # Both engines return each run's weights as an MLP state_dict: loaded into the plain
    # nn.Module (what saliency uses), they give the run's eval logits. 17 seeds make two
    # slices of the batched pack where torch has 2+ threads: each slice's weights count.
    data, cfg = synthetic(), config(epochs=3)
    runs = range(3) if engine == "loop" else range(17)
    out = ENGINES[engine](data, cfg, gens(runs), eval_x(data), weights=True)
    steps = 3 * math.ceil(203 / 32)  # batch norm counts every training step
    for result in out:
        state = result["state_dict"]
        model = mlp.MLP(5, 16, 3)
        model.load_state_dict(state)  # strict: every key, every shape
        assert int(state["bn1.num_batches_tracked"]) == steps
        model.eval()
        with torch.no_grad():
            for split, x in eval_x(data).items():
                torch.testing.assert_close(model(x), result[split], atol=ENGINE_ATOL, rtol=0)


def test_engines_save_the_same_weights():
    data, cfg = synthetic(), config()
    loop = train_loop(data, cfg, gens(range(2)), eval_x(data), weights=True)
    batched = train_batched(data, cfg, gens(range(2)), eval_x(data), weights=True)
    for a, b in zip(loop, batched, strict=True):
        sa, sb = a["state_dict"], b["state_dict"]
        assert list(sa) == list(sb)  # same keys in the same order: same model.pt layout
        for key in sa:
            assert sa[key].shape == sb[key].shape, key
            torch.testing.assert_close(sa[key], sb[key], atol=ENGINE_ATOL, rtol=0)
    # Different seeds end with different weights (the check above is not vacuous).
    assert not torch.equal(loop[0]["state_dict"]["fc1.weight"], loop[1]["state_dict"]["fc1.weight"])
    assert "state_dict" not in train_batched(data, cfg, gens([0]), eval_x(data))[0]
