"""``mlvar retrain`` end to end on digits (holdout of digit 3, 3 MLP runs of 2 epochs, the
pool their ``val`` split): the samples each set adds equal the top-k computed here from the
stored pool logits; budget 0 adds nothing; the summary's accuracies and gains equal those
recomputed from each continued run's stored test logits minus the same run's budget-0
ones; a second call skips everything and gives the same summary; ``analyze retrain``'s
statistics; and each bad input is one line, exit code 2, nothing written.

The continuation is the real :func:`mlvar.train.continuation.continue_runs` (1 epoch),
wrapped to record what each set was asked to add.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlvar.analysis.acquisition import budget_k, set_name
from mlvar.analysis.retrain import SUMMARY_COLUMNS, gain_stats, versus_random
from mlvar.config import Config
from mlvar.data.registry import prepare
from mlvar.retrain import plan_retrain, retrain
from mlvar.store import ExperimentStore
from mlvar.train import continuation
from mlvar.train.service import train
from test_acquisition import expected_orders
from test_cli_errors import fails_cleanly, ok, use_root

EXPERIMENT = "digits-holdout-sub3-r1.0-mlp"
POOL = "val"
STRATEGIES = "random,maxconf_std,neg_maxconf,std_avg_conf,gconf_mean"
BUDGETS = "0.2,1.0"


def config_for(root: Path) -> Config:
    cfg = Config()
    cfg.paths.data_root = root / "data"
    cfg.paths.runs_root = root / "runs"
    return cfg


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits holdout of digit 3 and 3 MLP runs of 2 epochs (never changed: copy it)."""
    root = tmp_path_factory.mktemp("retrain-trained")
    prepare(root / "data", "digits", mode="holdout", subclass=3)
    train(config_for(root), "digits", runs=3, overrides={"epochs": 2})
    return root


# ---------------------------------------------------------------- the continuation


def install_continuation(mp: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every continue_runs call (set, identity, added) and pass it on."""
    calls: list[dict[str, Any]] = []
    target = continuation.continue_runs

    def spy(source, target_root, set_meta, scenario, pool, added, run_ids, **kw):
        calls.append({"set": Path(target_root).name, "meta": set_meta, "added": dict(added)})
        return target(source, target_root, set_meta, scenario, pool, added, run_ids, **kw)

    mp.setattr(continuation, "continue_runs", spy)
    return calls


@pytest.fixture(scope="module")
def retrained(trained_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One retraining of a copy of the trained root; a second identical call after it."""
    root = tmp_path_factory.mktemp("retrained") / "w"
    shutil.copytree(trained_root, root)
    cfg = config_for(root)
    with pytest.MonkeyPatch.context() as mp:
        calls = install_continuation(mp)
        first = retrain(
            EXPERIMENT, cfg, pool=POOL, strategies=STRATEGIES, budgets=BUDGETS, epochs=1
        )
        n_calls = len(calls)
        again = retrain(
            EXPERIMENT, cfg, pool=POOL, strategies=STRATEGIES, budgets=BUDGETS, epochs=1
        )
        yield {
            "root": root,
            "cfg": cfg,
            "first": first,
            "again": again,
            "calls": calls[:n_calls],
            "store": ExperimentStore.open(cfg.paths.runs_root, EXPERIMENT),
        }


# ---------------------------------------------------------------- selection


def stored_pool(store: ExperimentStore) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    runs = store.runs()
    logits = np.stack([np.asarray(r.load_logits(POOL)) for r in runs])
    labels = store.samples(POOL)["label"].to_numpy()
    return logits, labels, [r.run_id for r in runs], [r.seed for r in runs]


def test_selected_are_the_top_k_of_the_stored_pool(retrained: dict) -> None:
    store = retrained["store"]
    logits, labels, run_ids, seeds = stored_pool(store)
    ids = store.samples(POOL)["sample_id"].to_numpy()
    want = expected_orders(logits, labels)
    selected = pd.read_parquet(store.root / "retrain" / "selected.parquet")
    assert list(selected.columns) == ["strategy", "budget", "run_id", "sample_id", "position"]
    assert sorted(selected["budget"].unique()) == [0.2, 1.0]  # budget 0 adds nothing
    n = len(ids)
    for strategy in STRATEGIES.split(","):
        for budget in (0.2, 1.0):
            k = budget_k(budget, n)
            for r, run_id in enumerate(run_ids):
                rows = selected[
                    (selected["strategy"] == strategy)
                    & (selected["budget"] == budget)
                    & (selected["run_id"] == run_id)
                ]
                if strategy == "random":
                    from mlvar.analysis.acquisition import RANDOM_TAG

                    rng = np.random.default_rng(np.random.SeedSequence([RANDOM_TAG, seeds[r]]))
                    order = rng.permutation(n)
                else:
                    order = want[strategy][r]
                assert rows["sample_id"].tolist() == ids[order[:k]].tolist(), (strategy, budget)
    # what each continuation was asked to add is that selection; b0 adds nothing
    for call in retrained["calls"]:
        if call["set"] == "b0":
            assert all(len(v) == 0 for v in call["added"].values())
            assert call["meta"]["budget"] == 0.0
            continue
        meta = call["meta"]
        for run_id, positions in call["added"].items():
            rows = selected[
                (selected["strategy"] == meta["strategy"])
                & (selected["budget"] == meta["budget"])
                & (selected["run_id"] == run_id)
            ]
            assert positions.tolist() == rows["position"].tolist()
    assert [c["set"] for c in retrained["calls"]][0] == "b0"
    assert len(retrained["calls"]) == 1 + 5 * 2


def test_random_differs_across_runs_and_oracle_flagged(retrained: dict) -> None:
    selected = pd.read_parquet(retrained["store"].root / "retrain" / "selected.parquet")
    rnd = selected[(selected["strategy"] == "random") & (selected["budget"] == 0.2)]
    sets = {tuple(sorted(g["sample_id"])) for _, g in rnd.groupby("run_id")}
    assert len(sets) == 3
    summary = retrained["first"].summary
    assert summary[summary["strategy"] == "gconf_mean"]["oracle"].all()
    assert not summary[summary["strategy"] != "gconf_mean"]["oracle"].any()


# ---------------------------------------------------------------- summary


def test_gains_equal_accuracy_minus_budget_zero_from_stored_logits(retrained: dict) -> None:
    store = retrained["store"]
    folder = store.root / "retrain"
    summary = pd.read_parquet(folder / "summary.parquet")
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    pd.testing.assert_frame_equal(
        pd.read_csv(folder / "summary.csv"), summary, check_dtype=False, check_exact=False
    )
    test = store.samples("test")
    labels, affected = test["label"].to_numpy(), test["affected"].to_numpy()
    assert affected.any() and (~affected).any()

    def accs(set_: str, run_id: str) -> np.ndarray:
        logits = np.load(folder / set_ / "runs" / run_id / "test.logits.npy")
        ok_ = logits.argmax(axis=1) == labels
        return np.array([ok_.mean(), ok_[affected].mean(), ok_[~affected].mean()])

    n_pool = store.n_samples(POOL)
    strategies = STRATEGIES.split(",")
    assert len(summary) == len(strategies) * 3 * 3  # strategies x budgets (0 too) x runs
    for row in summary.to_dict(orient="records"):
        acc = accs(set_name(row["strategy"], row["budget"]), row["run_id"])
        base = accs("b0", row["run_id"])
        got = [row["acc"], row["acc_affected"], row["acc_unaffected"]]
        np.testing.assert_allclose(got, acc, rtol=0, atol=1e-12)
        gains = [row["gain"], row["gain_affected"], row["gain_unaffected"]]
        np.testing.assert_allclose(gains, acc - base, rtol=0, atol=1e-12)
        assert row["n_added"] == budget_k(row["budget"], n_pool)
        assert row["pool"] == POOL
        assert row["seed"] == int(row["run_id"][-4:])  # run r has seed 0 + r
        if row["budget"] == 0:
            assert gains == [0.0, 0.0, 0.0]


def test_second_call_skips_everything_and_gives_the_same_summary(retrained: dict) -> None:
    first, again = retrained["first"], retrained["again"]
    assert all(s["skipped"] == first.runs and not s["trained"] for s in again.sets)
    assert all(sorted(s["trained"]) == first.runs for s in first.sets)
    pd.testing.assert_frame_equal(first.summary, again.summary)


def test_analyze_retrain_statistics(
    retrained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "w"
    shutil.copytree(retrained["root"], root)
    use_root(root, monkeypatch)
    stats = json.loads(ok("analyze", "retrain", EXPERIMENT, "--json").stdout)
    summary = retrained["first"].summary
    gains = {(g["strategy"], g["budget"]): g for g in stats["gains"]}
    assert len(gains) == 5 * 3
    for (strategy, budget), group in summary.groupby(["strategy", "budget"]):
        g = gains[(strategy, budget)]
        for col in ("gain", "gain_affected", "gain_unaffected"):
            v = group[col].to_numpy()
            assert g[f"{col}_mean"] == pytest.approx(v.mean(), abs=1e-12)
            assert g[f"{col}_std"] == pytest.approx(v.std(ddof=1), abs=1e-12)
            assert g[f"{col}_median"] == pytest.approx(np.median(v), abs=1e-12)
            assert (g[f"{col}_min"], g[f"{col}_max"]) == (v.min(), v.max())
    versus = {(v["strategy"], v["budget"]): v for v in stats["versus_random"]}
    assert set(versus) == {(s, b) for s in STRATEGIES.split(",")[1:] for b in (0.2, 1.0)}
    rnd = summary[summary["strategy"] == "random"].set_index(["budget", "run_id"])
    for (strategy, budget), v in versus.items():
        mine = summary[(summary["strategy"] == strategy) & (summary["budget"] == budget)]
        diff = mine.set_index(["budget", "run_id"])["gain"] - rnd["gain"].loc[[budget]]
        assert v["n_runs"] == 3
        assert v["gain_diff"] == pytest.approx(diff.mean(), abs=1e-12)
        assert v["gain_ci_low"] <= v["gain_diff"] <= v["gain_ci_high"]
    assert stats == json.loads(ok("analyze", "retrain", EXPERIMENT, "--json").stdout)
    assert gain_stats(summary).shape[0] == 15 and versus_random(summary).shape[0] == 8
    table = ok("analyze", "retrain", EXPERIMENT).stdout
    assert "against random" in table and "gconf_mean (oracle)" in table


def test_cli_retrain_skips_finished_sets(
    retrained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "w"
    shutil.copytree(retrained["root"], root)
    use_root(root, monkeypatch)
    args = ("retrain", EXPERIMENT, "--pool", POOL, "--by", "std_conf,random", "--budget", "0.2")
    out = json.loads(ok(*args, "--epochs", "1", "--json").stdout)
    assert out["strategies"] == ["maxconf_std", "random"]  # the alias as what it stands for
    assert out["budgets"] == [0.0, 0.2]
    assert [s["set"] for s in out["sets"]] == ["b0", "maxconf_std-b0.2", "random-b0.2"]
    assert all(not s["trained"] for s in out["sets"])
    # the gains of the strategies asked for first, in that order; earlier sets after them
    order = [g["strategy"] for g in out["gains"]]
    assert order[:6] == ["maxconf_std"] * 3 + ["random"] * 3
    assert sorted(set(order[6:])) == ["gconf_mean", "neg_maxconf", "std_avg_conf"]
    text = ok(*args, "--epochs", "1").stdout
    assert "maxconf_std" in text and "gain" in text


# ---------------------------------------------------------------- bad input


@pytest.fixture
def work(trained_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "w"
    shutil.copytree(trained_root, root)
    return use_root(root, monkeypatch)


def _retrain(*extra: str) -> tuple[str, ...]:
    return ("retrain", EXPERIMENT, "--pool", POOL, "--epochs", "1", *extra)


def test_bad_pool_budget_strategy(work: Path, tree_listing) -> None:
    line = fails_cleanly(
        work, tree_listing, "retrain", EXPERIMENT, "--pool", "nosuch", words=("'nosuch'",)
    )
    assert "train, val, test" in line and "analyze predict" in line
    fails_cleanly(work, tree_listing, *_retrain("--budget", "0.1,1.5"), words=("outside [0, 1]",))
    fails_cleanly(
        work,
        tree_listing,
        *_retrain("--by", "random,maxconf_sdt"),
        words=("unknown strategy 'maxconf_sdt'", "did you mean 'maxconf_std'"),
    )
    fails_cleanly(work, tree_listing, *_retrain("--runs", "run-0009"), words=("run-0009",))
    fails_cleanly(work, tree_listing, "analyze", "retrain", EXPERIMENT, words=("no retraining",))


def test_label_aware_strategy_on_unlabelled_pool(work: Path, tree_listing) -> None:
    file = work / "runs" / EXPERIMENT / "samples" / f"{POOL}.parquet"
    table = pq.read_table(file).to_pandas()
    table["label"] = -1
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), file)
    fails_cleanly(
        work,
        tree_listing,
        *_retrain("--by", "random,gconf_mean"),
        words=("missing labels", "gconf_mean", "label-free"),
    )


def test_experiment_without_saved_weights(work: Path, tree_listing) -> None:
    for run in (work / "runs" / EXPERIMENT / "runs").iterdir():
        meta = json.loads((run / "run.json").read_text())
        del meta["arrays"]["model.pt"]
        (run / "run.json").write_text(json.dumps(meta))
        (run / "model.pt").unlink()
    fails_cleanly(
        work, tree_listing, *_retrain(), words=("without saved weights", "run-0000", "model.pt")
    )


def test_plan_checks_an_existing_set_of_another_identity(retrained: dict, tmp_path: Path) -> None:
    root = tmp_path / "w"
    shutil.copytree(retrained["root"], root)
    from mlvar.errors import MlvarError

    with pytest.raises(MlvarError, match="made with another epochs .epochs 1, asked 3.") as err:
        plan_retrain(EXPERIMENT, config_for(root), POOL, "random", "0.2", epochs=3)
    assert "remove" in err.value.hint
    plan = plan_retrain(EXPERIMENT, config_for(root), POOL, "random", "0.2", epochs=1)
    assert [s.name for s in plan.sets] == ["b0", "random-b0.2"]
    # no --epochs: the recipe's length (a third of 2 epochs, rounded: 1), the same sets
    plan = plan_retrain(EXPERIMENT, config_for(root), POOL, "random", "0.2")
    assert plan.epochs == 1 and plan.sets[1].meta["epochs"] == 1
    # --runs N: the first N runs continue; shared orders still read every run's logits
    plan = plan_retrain(EXPERIMENT, config_for(root), POOL, "maxconf_std", "0.2", 1, runs=2)
    assert [r.run_id for r in plan.runs] == ["run-0000", "run-0001"]
    assert len(plan.all_runs) == 3 and sorted(plan.sets[0].added) == ["run-0000", "run-0001"]
    full = plan_retrain(EXPERIMENT, config_for(root), POOL, "maxconf_std", "0.2", 1)
    assert plan.sets[1].meta == full.sets[1].meta  # the same selection, the same set


def test_interrupted_retraining_rerun_ends_identical(retrained: dict, tmp_path: Path) -> None:
    """What a kill leaves (a set never started, a set with a run missing, no summary) is
    completed by running it again, to the same summary and the same stored logits."""
    root = tmp_path / "w"
    shutil.copytree(retrained["root"], root)
    folder = root / "runs" / EXPERIMENT / "retrain"
    shutil.rmtree(folder / "random-b1.0")
    shutil.rmtree(folder / "maxconf_std-b0.2" / "runs" / "run-0001")
    for name in ("summary.parquet", "summary.csv"):
        (folder / name).unlink()
    cfg = config_for(root)
    result = retrain(EXPERIMENT, cfg, pool=POOL, strategies=STRATEGIES, budgets=BUDGETS, epochs=1)
    trained = {s["set"]: s["trained"] for s in result.sets if s["trained"]}
    assert trained == {"maxconf_std-b0.2": ["run-0001"], "random-b1.0": retrained["first"].runs}
    pd.testing.assert_frame_equal(result.summary, retrained["first"].summary)
    before = retrained["root"] / "runs" / EXPERIMENT / "retrain"
    for set_, run_id in (("random-b1.0", "run-0002"), ("maxconf_std-b0.2", "run-0001")):
        rel = Path(set_) / "runs" / run_id / "test.logits.npy"
        np.testing.assert_array_equal(np.load(folder / rel), np.load(before / rel))
