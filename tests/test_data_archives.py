"""Archive safety: the restricted unpickler, tar member checks, crafted archives refused with
nothing written, checksums, and resumable downloads over file:// URLs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TinyCifar, build_cifar10, py2_pickle
from mlvar.data import archives, cifar, registry
from mlvar.errors import MlvarError

# ---------------------------------------------------------------- restricted unpickler


class _System:
    """Pickles as a call to os.system (what a malicious CIFAR batch would hold)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_unpickler_reads_numpy_arrays_in_every_protocol() -> None:
    x = np.arange(24, dtype=np.uint8).reshape(4, 6)
    obj = {b"data": x, b"labels": [1, 2, 3, 4], b"batch_label": b"b"}
    blobs = [py2_pickle({"data": x, "labels": [1, 2, 3, 4], "batch_label": "b"})]
    blobs += [pickle.dumps(obj, protocol=p) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)]
    for blob in blobs:
        got = archives.safe_unpickle(blob, "batch")
        np.testing.assert_array_equal(got[b"data"], x)
        assert got[b"labels"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "payload",
    [
        _System("true"),
        _Eval(),
        {b"data": _System("true")},
        np.array([object()], dtype=object),
    ],
    ids=["os.system", "eval", "nested", "object-array"],
)
def test_unpickler_refuses_other_globals(payload: object) -> None:
    blob = pickle.dumps(payload, protocol=2)
    with pytest.raises(MlvarError, match="refused|not a valid pickle"):
        archives.safe_unpickle(blob, "'data_batch_1'")


# ---------------------------------------------------------------- crafted archives


def _archive_with(tmp_path: Path, tiny: TinyCifar, extra: list[tarfile.TarInfo]) -> Path:
    """The tiny archive's members plus ``extra`` members (given with their content)."""
    path = tmp_path / "crafted.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (tiny.members or {}).items():
            info = tarfile.TarInfo(f"{tiny.folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "words"),
    [
        (_member("../evil.txt"), "points outside"),
        (_member("cifar-10-batches-py/../../evil.txt"), "points outside"),
        (_member("/tmp/mlvar-evil.txt"), "absolute path"),
        (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "../../x"), "link"),
        (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "special"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_member_is_refused(
    tmp_path: Path, tiny_cifar10: TinyCifar, tree_listing, member: tarfile.TarInfo, words: str
) -> None:
    (tmp_path / "in").mkdir()
    path = _archive_with(tmp_path / "in", tiny_cifar10, [member])
    root = tmp_path / "data"
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=words) as err:
        registry.fetch(root, "cifar10", source=path, verify=False)
    assert "refused" in str(err.value)
    assert tree_listing(tmp_path) == before
    assert not Path("/tmp/mlvar-evil.txt").exists()


def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, tiny_cifar10: TinyCifar, tree_listing
) -> None:
    marker = tmp_path / "pwned"
    members = dict(tiny_cifar10.members or {})
    members["data_batch_3"] = pickle.dumps(
        {b"data": _System(f"touch {marker}"), b"labels": []}, protocol=2
    )
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{tiny_cifar10.folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=r"data_batch_3.*refused.*posix\.system|os\.system"):
        registry.fetch(tmp_path / "data", "cifar10", source=path, verify=False)
    assert not marker.exists()
    assert tree_listing(tmp_path) == before


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"not a tar at all" * 100, "not a readable tar"), (b"", "not a readable tar")],
    ids=["text", "empty"],
)
def test_not_an_archive(tmp_path: Path, tree_listing, content: bytes, words: str) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(content)
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match=words):
        registry.fetch(tmp_path / "data", "cifar10", source=path, verify=False)
    assert tree_listing(tmp_path) == before


def test_wrong_dataset_archive_names_missing_files(
    tmp_path: Path, tiny_cifar10: TinyCifar, tree_listing
) -> None:
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match="not a CIFAR-100 copy.*cifar-100-python/train"):
        registry.fetch(tmp_path / "data", "cifar100", source=tiny_cifar10.archive, verify=False)
    assert tree_listing(tmp_path) == before


# ---------------------------------------------------------------- checksums and downloads


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def official(monkeypatch: pytest.MonkeyPatch, tiny_cifar10: TinyCifar) -> TinyCifar:
    """Make the tiny archive the 'published' CIFAR-10 python archive (its md5 expected)."""
    spec = cifar.SOURCES["cifar10"]
    patched = dataclasses.replace(
        spec,
        archives={**spec.archives, "python": (spec.filename, _md5(tiny_cifar10.archive))},
    )
    monkeypatch.setitem(cifar.SOURCES, "cifar10", patched)
    return tiny_cifar10


def test_verified_source_archive(tmp_path: Path, official: TinyCifar) -> None:
    info = registry.fetch(tmp_path / "data", "cifar10", source=official.archive)
    assert info["verified"] is True and "warning" not in info
    assert info["md5"] == _md5(official.archive)
    assert info["sha256"] == hashlib.sha256(official.archive.read_bytes()).hexdigest()


def test_tampered_archive_fails_checksum_and_leaves_nothing(
    tmp_path: Path, official: TinyCifar, tree_listing
) -> None:
    data = bytearray(official.archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered = tmp_path / "cifar-10-python.tar.gz"
    tampered.write_bytes(bytes(data))
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError) as err:
        registry.fetch(tmp_path / "data", "cifar10", source=tampered)
    message = str(err.value)
    assert "checksum mismatch" in message and _md5(tampered) in message
    assert _md5(official.archive) in message and "--no-verify" in message
    assert tree_listing(tmp_path) == before


def test_download_file_url_and_resume(tmp_path: Path, official: TinyCifar) -> None:
    root = tmp_path / "data"
    url = official.archive.as_uri()
    raw = root / "raw"
    raw.mkdir(parents=True)
    blob = official.archive.read_bytes()
    half = len(blob) // 2
    (raw / "cifar-10-python.tar.gz.part").write_bytes(blob[:half])
    seen: list[tuple[int, int | None]] = []
    info = cifar.fetch_cifar(root, "cifar10", url=url, progress=lambda d, t: seen.append((d, t)))
    assert info["action"] == "resumed download" and info["verified"] is True
    assert seen[0] == (half, len(blob)) and seen[-1] == (len(blob), len(blob))
    assert (raw / "cifar-10-python.tar.gz").read_bytes() == blob
    assert not (raw / "cifar-10-python.tar.gz.part").exists()
    assert (raw / "cifar10" / "x_train.npy").is_file()
    # A second fetch reuses the downloaded archive.
    again = cifar.fetch_cifar(root, "cifar10", url="file:///nonexistent")
    assert again["action"] == "reused downloaded archive"


def test_download_of_tampered_file_leaves_nothing(
    tmp_path: Path, official: TinyCifar, tree_listing
) -> None:
    tampered = tmp_path / "served" / "cifar-10-python.tar.gz"
    tampered.parent.mkdir()
    tampered.write_bytes(official.archive.read_bytes()[:-10] + b"0123456789")
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match="checksum mismatch"):
        cifar.fetch_cifar(tmp_path / "data", "cifar10", url=tampered.as_uri())
    assert tree_listing(tmp_path) == before


def test_failed_download_says_how_to_resume_and_leaves_nothing(
    tmp_path: Path, tree_listing
) -> None:
    before = tree_listing(tmp_path)
    with pytest.raises(MlvarError, match="cannot download.*resume"):
        cifar.fetch_cifar(tmp_path / "data", "cifar10", url=(tmp_path / "gone.tgz").as_uri())
    assert tree_listing(tmp_path) == before  # nothing was received, so no .part file either


def test_binary_archive_gives_the_same_arrays(tmp_path: Path) -> None:
    py = build_cifar10(tmp_path / "cifar-10-python.tar.gz", fmt="python", seed=5)
    binary = build_cifar10(tmp_path / "cifar-10-binary.tar.gz", fmt="binary", seed=5)
    a = registry.fetch(tmp_path / "a", "cifar10", source=py.archive, verify=False)
    b = registry.fetch(tmp_path / "b", "cifar10", source=binary.archive, verify=False)
    assert (a["format"], b["format"]) == ("python", "binary")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(
            np.load(Path(a["path"]) / f"{name}.npy"), np.load(Path(b["path"]) / f"{name}.npy")
        )
