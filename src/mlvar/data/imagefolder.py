"""Your own images: a folder of PNG/JPEG files by class (and optionally by group), the
``imagefolder`` kind of user dataset (docs/datasets.md, "Your own images").

Layout, decided for the whole folder: ``root/<class>/<file>`` or
``root/<class>/<group>/<file>`` (every class at the same depth). Classes are the sorted
folder names (class index = position), groups the sorted ``(class, group)`` pairs (group
ids are global over those pairs, numbered in that order), and sample ids the position of
each file in that sorted order (class, group, file name).

:func:`fetch_imagefolder` (``mlvar data fetch imagefolder --source DIR --name NAME``)
reads the folder safely (PIL's decompression-bomb limit with its warning an error,
``verify()`` then a full decode, every unreadable, corrupt or non-image file refused by
name, symlinks out of the folder refused), normalises every image to one size and colour,
and records the user dataset (:mod:`mlvar.data.user`) in ``<data_root>/user/<NAME>/``: the
decoded uint8 NHWC array ``images.npy``, ``files.json`` (each image's relative path, class
and group) and ``source.json``. :func:`user_spec` turns that record into the dataset's
:class:`~mlvar.data.spec.DatasetSpec`; preparing reads nothing but the data root (offline,
byte-identical), and the images array is hard-linked into the shared arrays that scenarios
read (:mod:`mlvar.data.arrays`), as CIFAR's fetched arrays are.

Modes: ``original``; ``holdout --group G [--ratio a]`` (the first ``floor(a * count)`` of
the group's train and validation samples removed, each split separately in split order;
affected: the group's test samples; ``full_val`` is the validation split before the removal,
its samples of the group affected); and the four class modes of :mod:`mlvar.data.modes`
with ``--cls`` (appearance change: 3-channel grayscale for RGB folders, inversion
``255 - x`` for gray ones).

Nothing heavy is imported at module level (PIL and scikit-learn load where images are read
or split), so the registry can import this module cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import io
import json
import os
import re
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlvar.data import params as p
from mlvar.data.arrays import file_sha256
from mlvar.data.cifar10 import GRAYSCALE
from mlvar.data.modes import (
    Appearance,
    class_modes,
    group_counts,
    inverter,
    n_affected,
    original_mode,
)
from mlvar.data.scenario import SplitData
from mlvar.data.spec import BaseData, DatasetSpec, ModeResult, ModeSpec, Source, TrainDefaults
from mlvar.errors import MlvarError
from mlvar.io import atomic_write_bytes, dumps_json, sha256_file

KIND = "imagefolder"
IMAGES_FILE = "images.npy"
INDEX_FILE = "files.json"
COLORS = ("rgb", "gray")
#: Image formats read (PIL's format names), decided by the file's content, not its name.
FORMATS = ("PNG", "JPEG")
#: The most pixels one image may have (PIL's own default ``Image.MAX_IMAGE_PIXELS``, above
#: which it warns of a decompression bomb); a larger image is refused by name.
MAX_PIXELS = 89_478_485
#: Resampling of ``--size`` (PIL's default for ``Image.resize``; antialiased when shrinking).
RESAMPLE = "bicubic"
#: Names skipped wherever they appear: anything starting with "." (.DS_Store, ._AppleDouble,
#: .ipynb_checkpoints, .git) and these operating-system files.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})
TEST_FRACTION = 0.3
VAL_FRACTION = 0.1
SPLIT_SEED = 69
MAX_VALUE = 255

Progress = Callable[[int, int | None], None]


def ignored(name: str) -> bool:
    """Whether a file or folder named ``name`` is skipped (the hidden-file rule)."""
    return name.startswith(".") or name in IGNORED_NAMES


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Listing:
    """The images of a folder in id order: relative paths, class and group of each, and the
    names of classes and groups (``groups``: ``(class index, group folder name)``)."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    group_ids: np.ndarray
    classes: list[str]
    groups: list[tuple[int, str]]

    @property
    def layout(self) -> str:
        return "class/group/file" if self.groups else "class/file"


def _entries(folder: Path, root: Path) -> list[Path]:
    """The entries of ``folder`` not ignored, sorted by name; a symlink that points out of
    ``root`` (or nowhere) is refused."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise MlvarError(
            f"cannot list {folder}: {exc.strerror or exc}", "check its permissions"
        ) from None
    out = []
    for name in names:
        if ignored(name):
            continue
        path = folder / name
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise MlvarError(
                f"{ascii(str(path))} has a name that is not UTF-8", "rename it"
            ) from None
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise MlvarError(
                    f"{_rel(path, root)} is a symlink to {target}, outside the image folder {root}",
                    "copy the file into the folder, or point the link inside it",
                )
            if not target.exists():
                raise MlvarError(f"{_rel(path, root)} is a broken symlink", "remove or fix it")
        out.append(path)
    return out


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        return False


def list_folder(source: str | os.PathLike) -> Listing:
    """The images of an image folder in id order (nothing is read but the folder names).

    Raises
    ------
    MlvarError
        Not a folder; a file beside the class folders; classes at different depths (naming
        the odd one); a folder inside a group; an empty class or group; fewer than two
        classes; a symlink out of the folder.
    """
    given = Path(source).expanduser()
    if not given.exists():
        raise MlvarError(f"image folder {given} does not exist", "give the folder's path")
    if not given.is_dir():
        raise MlvarError(f"{given} is not a folder", "give a folder laid out root/<class>/<file>")
    root = given.resolve()
    classes = _entries(root, root)
    for path in classes:
        if not _is_dir(path):
            raise MlvarError(
                f"{_rel(path, root)} is a file beside the class folders of {root}",
                "an image folder holds one folder per class; move the file away",
            )
    if len(classes) < 2:
        found = f"only class '{classes[0].name}'" if classes else "no class folder"
        raise MlvarError(
            f"image folder {root} has {found}", "it needs a folder per class, at least two"
        )
    depth: dict[str, int] = {}
    content: dict[str, list[Path]] = {}
    for cls in classes:
        entries = _entries(cls, root)
        if not entries:
            raise MlvarError(f"class folder {_rel(cls, root)} holds no image", "remove it")
        dirs = [e for e in entries if _is_dir(e)]
        if dirs and len(dirs) != len(entries):
            odd = next(e for e in entries if not _is_dir(e))
            raise MlvarError(
                f"{_rel(odd, root)} is a file beside group folders in class {cls.name}",
                "a class holds either images or group folders of images, not both",
            )
        depth[cls.name] = 2 if dirs else 1
        content[cls.name] = entries
    if len(set(depth.values())) > 1:
        # The odd one out: the class whose depth fewer classes share.
        counts = {d: list(depth.values()).count(d) for d in set(depth.values())}
        rare = min(counts, key=lambda d: (counts[d], d))
        odd = next(c for c, d in depth.items() if d == rare)
        kind = "group folders" if rare == 2 else "images directly"
        raise MlvarError(
            f"class folder {odd} holds {kind}, unlike the other classes of {root}",
            "lay out every class as <class>/<file>, or every class as <class>/<group>/<file>",
        )
    paths: list[str] = []
    labels: list[int] = []
    group_ids: list[int] = []
    groups: list[tuple[int, str]] = []
    for c, cls in enumerate(classes):
        if depth[cls.name] == 1:
            files = content[cls.name]
            paths += [_rel(f, root) for f in files]
            labels += [c] * len(files)
            group_ids += [-1] * len(files)
            continue
        for group in content[cls.name]:
            files = _entries(group, root)
            for f in files:
                if _is_dir(f):
                    raise MlvarError(
                        f"{_rel(f, root)} is a folder inside group {_rel(group, root)}",
                        "groups hold images only (root/<class>/<group>/<file>)",
                    )
            if not files:
                raise MlvarError(f"group folder {_rel(group, root)} holds no image", "remove it")
            paths += [_rel(f, root) for f in files]
            labels += [c] * len(files)
            group_ids += [len(groups)] * len(files)
            groups.append((c, group.name))
    return Listing(
        root=root,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        group_ids=np.asarray(group_ids, dtype=np.int64),
        classes=[c.name for c in classes],
        groups=groups,
    )


def read_image(data: bytes, name: str, color: str, size: int | None) -> np.ndarray:
    """Decode one image file's bytes safely into uint8 ``[H, W, C]`` (C 3 for ``rgb``, 1 for
    ``gray``), resized to ``size`` x ``size`` when given.

    The decompression-bomb checks are errors (the pixel count against :data:`MAX_PIXELS`
    before decoding, PIL's warning raised); ``verify()`` checks the file's structure, then it
    is decoded in full (a truncated file fails); EXIF orientation is applied; alpha is
    dropped; 16-bit and float images are refused.

    Raises
    ------
    MlvarError
        Naming ``name``: not an image, not PNG/JPEG, too large, corrupt or truncated.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    hint = "fix or remove the file (nothing was written)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                width, height = probe.size
                if fmt not in FORMATS:
                    raise MlvarError(
                        f"{name} is a {fmt} image; image folders are read as PNG or JPEG",
                        "convert it to PNG, or remove it",
                    )
                if width * height > MAX_PIXELS:
                    raise MlvarError(
                        f"{name} has {width}x{height} pixels, over the limit of {MAX_PIXELS:,} "
                        "(a decompression bomb?)",
                        "shrink the image, or remove it",
                    )
                probe.verify()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode in ("I", "F") or img.mode.startswith("I;"):
                    raise MlvarError(
                        f"{name} is a {img.mode} image (16-bit or float pixels)",
                        "save it with 8 bits per channel",
                    )
                img = ImageOps.exif_transpose(img)
                img = img.convert("RGB" if color == "rgb" else "L")
                if size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BICUBIC)
                array = np.asarray(img, dtype=np.uint8)
    except MlvarError:
        raise
    except UnidentifiedImageError:
        raise MlvarError(f"{name} is not an image PIL can read", hint) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MlvarError(f"{name} is refused as a decompression bomb: {exc}", hint) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MlvarError(f"{name} is corrupt or truncated: {exc}", hint) from None
    return array if array.ndim == 3 else array[..., None]


def _read_file(root: Path, rel: str) -> bytes:
    path = root / rel
    try:
        if not path.is_file():
            raise MlvarError(f"{rel} is not a regular file", "remove it from the image folder")
        return path.read_bytes()
    except OSError as exc:
        raise MlvarError(
            f"cannot read {rel}: {exc.strerror or exc}", "check its permissions"
        ) from None


def folder_digest(listing: Listing) -> str:
    """The sha256 of an image folder: over its files in id order, for each its relative
    path (UTF-8), a NUL byte, its length as 8 bytes big-endian, then its bytes."""
    digest = hashlib.sha256()
    for rel in listing.paths:
        data = _read_file(listing.root, rel)
        digest.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def read_images(
    listing: Listing,
    color: str,
    size: int | None,
    out: Path,
    progress: Progress | None = None,
) -> np.ndarray:
    """Decode every image of ``listing`` into the ``.npy`` file ``out`` (uint8
    ``[n, H, W, C]``, memory-mapped as it is written) and return it.

    Raises
    ------
    MlvarError
        A file that cannot be read (named); without ``size``, two files of different sizes
        (both named).
    """
    n = len(listing.paths)
    x: np.ndarray | None = None
    first = ""
    for i, rel in enumerate(listing.paths):
        image = read_image(_read_file(listing.root, rel), rel, color, size)
        if x is None:
            x = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n, *image.shape))
            first = rel
        elif image.shape != x.shape[1:]:
            raise MlvarError(
                f"{first} is {_wh(x.shape[1:])} but {rel} is {_wh(image.shape)}",
                "pass --size N to resize every image to N x N",
            )
        x[i] = image
        if progress is not None:
            progress(i + 1, n)
    assert x is not None  # a listing holds at least two classes of at least one image
    x.flush()
    return x


def _wh(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


# --------------------------------------------------------------------------- fetching


def fetch_options(
    size: int | None = None,
    color: str | None = None,
    test_fraction: float | None = None,
    val_fraction: float | None = None,
    split_seed: int | None = None,
) -> dict[str, Any]:
    """The fetch options, checked and with their defaults: what ``source.json`` records as
    ``options`` (fetching with the same bytes and options again is a no-op)."""
    color = "rgb" if color is None else color
    if color not in COLORS:
        raise MlvarError(f"unknown --color '{color}'", "use --color rgb or --color gray")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise MlvarError(f"--size {size!r} is not a positive number of pixels", "e.g. --size 32")
    split = {"test_fraction": TEST_FRACTION, "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED}
    for key, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            option = key.replace("_", "-")
            raise MlvarError(f"--{option} {value!r} is not a fraction in (0, 1)", "e.g. 0.2")
        split[key] = float(value)
    if split_seed is not None:
        if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
            raise MlvarError(
                f"--split-seed must be a non-negative integer, got {split_seed!r}", "e.g. 69"
            )
        split["seed"] = int(split_seed)
    return {"size": size, "color": color, "split": split}


def fetch_imagefolder(
    source: str | os.PathLike,
    name: str,
    data_root: str | os.PathLike,
    size: int | None = None,
    color: str | None = None,
    *,
    test_fraction: float | None = None,
    val_fraction: float | None = None,
    split_seed: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Read the image folder ``source`` and record it as user dataset ``name`` in
    ``<data_root>/user/<name>/`` (:mod:`mlvar.data.user`): ``images.npy`` (the decoded
    uint8 ``[n, H, W, C]`` images in id order), ``files.json`` (each image's relative path,
    class and group) and ``source.json``.

    Returns what ``source.json`` records, with ``action``: ``recorded``, ``replaced``, or
    ``unchanged`` when the same files were fetched with the same options before (nothing
    is decoded then).

    Raises
    ------
    MlvarError
        A bad layout, option or file (see :func:`list_folder`, :func:`read_image`,
        :func:`read_images`), a class too small to split, or a name already holding other
        files or options without ``force``. Nothing is written in that case.
    """
    from mlvar.data import table, user

    options = fetch_options(size, color, test_fraction, val_fraction, split_seed)
    listing = list_folder(source)
    digest = folder_digest(listing)
    same = user.same_fetch(data_root, name, digest, options, IMAGES_FILE)
    if same is not None:
        return {**same, "action": "unchanged"}
    user.refuse_replacing(data_root, name, digest, options, force)
    table.split_index(listing.labels, options["split"])  # a class too small is refused now
    existed = user.user_dir(data_root, name).exists()
    with user.recording(data_root, name) as tmp:
        x = read_images(listing, options["color"], options["size"], tmp / IMAGES_FILE, progress)
        index = {
            "paths": listing.paths,
            "labels": listing.labels.tolist(),
            "groups": listing.group_ids.tolist(),
        }
        atomic_write_bytes(tmp / INDEX_FILE, dumps_json(index).encode())
        info = {
            "kind": KIND,
            "name": name,
            "file": listing.root.name,
            "path": str(listing.root),
            "sha256": digest,
            "format": "/".join(FORMATS),
            "rows": len(listing.paths),
            "layout": listing.layout,
            "classes": listing.classes,
            "groups": [[c, g] for c, g in listing.groups],
            "shape": list(x.shape[1:]),
            "resample": RESAMPLE if options["size"] is not None else None,
            "stored": IMAGES_FILE,
            "checksums": {
                IMAGES_FILE: sha256_file(tmp / IMAGES_FILE),
                INDEX_FILE: sha256_file(tmp / INDEX_FILE),
            },
            "options": options,
        }
        del x  # the memory map is closed before the folder is renamed
        user.write_info(tmp, info)
    return {**info, "action": "replaced" if existed else "recorded"}


def _fetch(
    data_root: str | os.PathLike,
    source: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Progress | None = None,
    *,
    name: str,
    force: bool = False,
    size: int | None = None,
    color: str | None = None,
    test_fraction: float | None = None,
    val_fraction: float | None = None,
    split_seed: int | None = None,
) -> dict[str, Any]:
    """The spec's fetch (``mlvar data fetch imagefolder --source DIR --name NAME``):
    :func:`fetch_imagefolder`, summarised for the CLI's table. ``verify`` is taken for the
    common fetch signature: a user's folder has no published checksum."""
    if source is None:
        raise MlvarError(f"{KIND} needs --source DIR", "the folder of your images by class")
    info = fetch_imagefolder(
        source,
        name,
        data_root,
        size,
        color,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        split_seed=split_seed,
        force=force,
        progress=progress,
    )
    from mlvar.data import user

    h, w, c = info["shape"]
    return {
        "dataset": name,
        "kind": KIND,
        "path": str(user.user_dir(data_root, name)),
        "source": info["path"],
        "sha256": info["sha256"],
        "rows": info["rows"],
        "layout": info["layout"],
        "classes": ", ".join(info["classes"]),
        "groups": len(info["groups"]),
        "shape": f"{h}x{w}x{c}",
        "action": info["action"],
    }


# --------------------------------------------------------------------------- the source


class ImageFolderSource(Source):
    """A fetched image folder: its record at once, its files (checked against their
    sha256, the images memory-mapped) on first use."""

    def __init__(self, data_root: Path, name: str, info: dict[str, Any]) -> None:
        from mlvar.data import user

        super().__init__(data_root)
        self.name = name
        self.info = info
        self.folder = user.user_dir(data_root, name)
        self.classes: list[str] = list(info["classes"])
        self.groups: list[tuple[int, str]] = [(int(c), str(g)) for c, g in info["groups"]]
        self.group_names = group_names(self.classes, self.groups)

    def _file(self, file: str) -> Path:
        path = self.folder / file
        if not path.is_file() or file_sha256(path) != self.info["checksums"][file]:
            state = "is missing" if not path.is_file() else "is not the file fetched"
            raise MlvarError(
                f"{path} of user dataset '{self.name}' {state}",
                f"fetch it again: mlvar data fetch {KIND} --source {self.info['path']} "
                f"--name {self.name} --force",
            )
        return path

    def load(self) -> BaseData:
        from mlvar.data import table

        x = np.load(self._file(IMAGES_FILE), mmap_mode="r", allow_pickle=False)
        index = json.loads(self._file(INDEX_FILE).read_text(encoding="utf-8"))
        y = np.asarray(index["labels"], dtype=np.int64)
        groups = np.asarray(index["groups"], dtype=np.int64)
        split = self.info["options"]["split"]
        options = self.info["options"]
        manifest = {
            "source": {
                "name": self.name,
                "kind": KIND,
                "path": self.info["path"],
                "sha256": self.info["sha256"],
                "layout": self.info["layout"],
                "color": options["color"],
                "size": options["size"],
                "resample": self.info["resample"],
            },
            "class_names": self.classes,
            "group_names": self.group_names,
            "input": {"kind": "image", "shape": list(self.info["shape"]), "max_value": MAX_VALUE},
            "group": "group folder (index into group_names)" if self.groups else None,
            "split": {**split, "stratify": "class", "ids": "position in sorted file order"},
        }
        return BaseData(
            x=x,
            y=y,
            ids=np.arange(len(y), dtype=np.int64),
            groups=groups,
            index=table.split_index(y, split),
            class_names=self.classes,
            manifest=manifest,
        )

    def find_group(self, value: str) -> int:
        """The group id ``value`` names: a group folder's name when no other class has one of
        that name, or ``class/group``.

        Raises
        ------
        MlvarError
            Unknown (the nearest names listed) or ambiguous (the qualified names listed).
        """
        if not self.groups:
            raise MlvarError(
                f"user dataset '{self.name}' has no groups (laid out {self.info['layout']})",
                "hold out a class with --cls C, or lay the folder out <class>/<group>/<file>",
            )
        qualified = [f"{self.classes[c]}/{g}" for c, g in self.groups]
        if value in qualified:
            return qualified.index(value)
        matches = [i for i, (_, g) in enumerate(self.groups) if g == value]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise MlvarError(
                f"group '{value}' is in several classes of '{self.name}'",
                "name one: " + ", ".join(qualified[i] for i in matches),
            )
        close = difflib.get_close_matches(value, self.group_names, n=5, cutoff=0.5)
        hint = ("close names: " if close else "valid names: ") + ", ".join(
            close or self.group_names
        )
        raise MlvarError(f"unknown group '{value}' of user dataset '{self.name}'", hint)


def group_names(classes: list[str], groups: list[tuple[int, str]]) -> list[str]:
    """Each group's name as ``--group`` takes it: the folder name, or ``class/group`` where
    groups of several classes share that folder name."""
    seen: dict[str, int] = {}
    for _, g in groups:
        seen[g] = seen.get(g, 0) + 1
    return [g if seen[g] == 1 else f"{classes[c]}/{g}" for c, g in groups]


def name_slug(value: str) -> str:
    """A group name as it appears in scenario names: characters other than letters,
    digits, ``.``, ``_``, ``+`` and ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value)


# --------------------------------------------------------------------------- group holdout


def _check_group(value: Any, where: p.Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MlvarError(
            f"{where.dataset} group {value!r} is not a group name", "e.g. --group <folder name>"
        )
    return value.strip()


def _all_groups(source: ImageFolderSource, where: p.Where) -> list[str]:
    return list(source.group_names)


@dataclass(frozen=True)
class GroupParams(p.Params):
    """``holdout --group G [--ratio a]``."""

    group: str = p.option(
        metavar="G",
        check=_check_group,
        help="the group folder to hold out (its name, or class/group)",
        required=True,
        missing_hint="e.g. --group <group folder name>",
        tag="g",
        fmt=name_slug,
        keywords={"all": _all_groups},
    )
    ratio: float = p.ratio(
        help="fraction of the group's train and validation samples held out, in [0, 1] (default 1)",
        default=1.0,
    )

    def resolve(self, source: ImageFolderSource) -> GroupParams:
        """The group checked against the folder's groups, spelled as ``--group`` lists it;
        two groups that would give one scenario name are refused."""
        g = source.find_group(self.group)
        name = source.group_names[g]
        twins = [n for n in source.group_names if n != name and name_slug(n) == name_slug(name)]
        if twins:
            raise MlvarError(
                f"groups '{name}' and '{twins[0]}' give one scenario name (-g{name_slug(name)})",
                "rename one of the group folders and fetch again",
            )
        return dataclasses.replace(self, group=name)


def _group_holdout(source: ImageFolderSource, params: GroupParams) -> ModeResult:
    base = source.base
    g = source.group_names.index(params.group)
    groups = base.groups
    index = dict(base.index)
    removed: dict[str, int] = {}
    for s in ("train", "val"):
        pos = index[s]
        members = np.flatnonzero(groups[pos] == g)
        k = n_affected(params.ratio, len(members))
        removed[s] = int(k)
        index[s] = np.delete(pos, members[:k])
    index["full_val"] = base.index["val"]
    splits = {
        s: SplitData(
            x=base.x[pos],
            y=base.y[pos],
            id=base.ids[pos],
            affected=(groups[pos] == g) if s in ("test", "full_val") else np.zeros(len(pos), bool),
            group=groups[pos],
        )
        for s, pos in index.items()
    }
    cls = source.classes[source.groups[g][0]]
    manifest = {
        "group_counts": group_counts(splits, [g], {g: params.group}),
        "holdout": {
            "group": params.group,
            "group_id": g,
            "class": cls,
            "removed": removed,
            "rule": "first floor(ratio * count) samples of the group in split order, from "
            "train and from validation separately",
        },
        "full_val": "the validation split before the holdout; affected: the group's samples",
    }
    description = (
        f"Removed the first {params.ratio:.0%} of group {params.group}'s (class {cls}) train "
        f"and validation samples; affected rows are its test samples (and its samples in "
        f"full_val, the validation split before the removal)."
    )
    return ModeResult(splits, description, manifest)


# --------------------------------------------------------------------------- the spec

INVERSION = Appearance(
    change=inverter(MAX_VALUE),
    name="colour inversion 255 - x (the folder was fetched gray)",
    adjective="colour-inverted",
    test_gray="the test split colour-inverted (255 - x); named test_gray like CIFAR's "
    "grayscale copy",
)


def user_spec(name: str, info: dict[str, Any], folder: Path) -> DatasetSpec:
    """The :class:`DatasetSpec` of the fetched image folder ``name`` from its ``source.json``
    record ``info`` (:func:`fetch_imagefolder`; only ``kind`` and ``name`` while it is being
    fetched, or for help texts). ``folder`` is its ``<data_root>/user/<name>/``."""
    classes = info.get("classes")
    fetched = classes is not None
    has_groups = bool(info.get("groups")) or not fetched
    color = (info.get("options") or {}).get("color", "rgb")
    modes: list[ModeSpec] = [original_mode(f"Your images of {name}, unchanged; nothing injected.")]
    if has_groups:
        modes.append(
            ModeSpec(
                "holdout",
                GroupParams,
                _group_holdout,
                summary="holds out a group folder of its class",
                example="--group <group folder name>",
                key="group",
            )
        )
    modes += class_modes(GRAYSCALE if color == "rgb" else INVERSION)
    if fetched:
        h, w, _ = info["shape"]
        groups = f", {len(info['groups'])} groups" if info["groups"] else ""
        about = f"{info['rows']:,} {w}x{h} {color} images, {len(classes)} classes{groups}"
    else:
        about = "not fetched yet"
    return DatasetSpec(
        name=name,
        description=f"your image folder {name} ({about})",
        input_kind="image",
        mode_specs=tuple(modes),
        open=lambda data_root: ImageFolderSource(Path(data_root), name, info),
        fetch=functools.partial(_fetch, name=name),
        needs_fetch=True,
        train=TrainDefaults("cnn"),
        n_classes=len(classes) if fetched else None,
        implied_modes={"group": "holdout"} if has_groups else {},
    )
