"""Experiment identity: one definition in the store, used by training and by downloads."""

from __future__ import annotations

from mlvar.store import IDENTITY_KEYS, identity_diffs

META = {
    "name": "exp",
    "dataset": "digits",
    "scenario": {"name": "s", "manifest_sha256": "aa", "description": "x"},
    "model": "mlp",
    "train": {"epochs": 10, "lr": 0.1},
    "class_names": ["a", "b"],
}


def test_identity_keys() -> None:
    assert IDENTITY_KEYS == ("dataset", "scenario.manifest_sha256", "model", "train")


def test_same_identity_whatever_else_differs() -> None:
    other = dict(META, name="other", class_names=["x"], created_by="mlvar 9")
    other["scenario"] = dict(META["scenario"], description="changed")
    assert identity_diffs(META, other) == []


def test_diffs_name_keys_and_sub_keys_in_order() -> None:
    new = dict(META, model="cnn", train={"epochs": 3, "lr": 0.1, "vary": "init"})
    new["scenario"] = dict(META["scenario"], manifest_sha256="bb")
    assert identity_diffs(META, new) == [
        ("scenario.manifest_sha256", "aa", "bb"),
        ("model", "mlp", "cnn"),
        ("train.epochs", 10, 3),
        ("train.vary", None, "init"),
    ]


def test_missing_keys_read_as_none() -> None:
    bare = {"dataset": "digits", "train": {}}
    assert identity_diffs(bare, META) == [
        ("scenario.manifest_sha256", None, "aa"),
        ("model", None, "mlp"),
        ("train.epochs", None, 10),
        ("train.lr", None, 0.1),
    ]
    assert identity_diffs({}, {}) == []
    assert identity_diffs({"train": None}, {"train": {"epochs": 1}}) == [
        ("train", None, {"epochs": 1})
    ]
