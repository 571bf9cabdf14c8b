"""User tables (CSV, TSV, parquet): the ``table`` user kind (docs/datasets.md, "Your own
table").

``mlvar data fetch table --source FILE --name NAME --label COL [--features COLS] [--id COL]
[--test-fraction F] [--val-fraction F] [--split-seed S]`` reads the file with pyarrow,
checks everything below, and records it in ``<data_root>/user/<NAME>/`` as
``table.arrow`` (every column, types as read; an uncompressed Arrow IPC file, read
memory-mapped) beside ``source.json``
(:mod:`mlvar.data.user`). The label, features, id and split are the dataset's: recorded at
fetch, the same for every scenario of the name.

The rules (each scenario's manifest records them):

- Features: ``--features`` (comma-separated), default every column but the label and the
  id. Numeric columns (integers, floats, booleans) are standardised with the training
  split's mean and population standard deviation (a constant column keeps scale 1); a
  missing value is replaced by the training median first (no indicator column), and a
  feature with no training value is refused. Every other column is categorical: one-hot
  encoded in place, one column ``<name>=<value>`` per category, categories from the whole
  table sorted by code point, a missing value its own category ``<missing>``; a categorical
  column with more than :data:`MAX_CATEGORIES` distinct values cannot be encoded and is
  refused (a column mixing numbers and text reads as text, so it is one of those or a
  category).
- Label: any column without missing values and with at least two classes; the classes are
  its distinct values sorted (numbers by value, text by code point), class ``k`` the k-th.
- Id: ``--id`` names a column of unique integers without missing values; default the row
  number (0 for the first data row).
- Split: test ``--test-fraction`` (default 0.165) of all rows, then validation
  ``--val-fraction`` (default 0.125) of the rest, both ``train_test_split`` stratified by
  label with ``random_state=--split-seed`` (default 69); each class needs enough rows for
  both splits (refused naming the class otherwise).

Modes:

- ``original``: nothing changed.
- ``holdout --where EXPR [--ratio a]``: the subgroup is the rows for which the pandas
  expression ``EXPR`` (``DataFrame.eval`` over the table's columns) is true; the first
  ``floor(a * count)`` of its training rows and of its validation rows (each split in split
  order; default a = 1) are removed. Group: 1 for subgroup rows, 0 otherwise; affected: the
  subgroup's rows left (its test rows always). Split ``full_val`` is the validation split
  before the removal, its subgroup rows affected.
- ``artificial --ratio a`` (binary labels): COMPAS's shortcut feature
  (:mod:`mlvar.data.tabular`).
- ``cluster --cluster k|all``: COMPAS's decision-tree clusters on this table, with
  ``min_samples_leaf`` = COMPAS's share of rows (300 of 6,172) of this table's rows.

pandas, pyarrow and scikit-learn are imported where data is read.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlvar.data import params as p
from mlvar.data import tabular, user
from mlvar.data.modes import group_counts, n_affected, original_mode
from mlvar.data.scenario import SplitData
from mlvar.data.spec import BaseData, DatasetSpec, ModeResult, ModeSpec, Source, TrainDefaults
from mlvar.errors import MlvarError, closest
from mlvar.io import sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

KIND = "table"
#: File suffix -> format read.
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
STORED_FILE = "table.arrow"
#: A categorical column with more distinct values (missing counted as one) is refused.
MAX_CATEGORIES = 100
MISSING = "<missing>"
TEST_FRACTION = 0.165
VAL_FRACTION = 0.125
SPLIT_SEED = 69
#: ``cluster`` mode: COMPAS's tree leaves hold at least 300 of its 6,172 rows; a table's
#: tree keeps that share of its rows.
LEAF_SHARE = (300, 6172)


def _fetch_hint(name: str) -> str:
    return f"run 'mlvar data fetch table --source FILE --name {name} --label COL'"


# --------------------------------------------------------------------------- reading


def read_table(path: Path, fmt: str, label: str) -> pa.Table:
    """Read ``path`` in ``fmt`` (csv, tsv, parquet) with pyarrow; ``label`` names the file in
    messages. Raises :class:`MlvarError` for an empty file or one that does not parse."""
    import pyarrow as pa

    hint = f"pass a {fmt.upper()} file with a header row"
    if path.stat().st_size == 0:
        raise MlvarError(f"table file {label} is empty", hint)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            from pyarrow import csv

            table = csv.read_csv(
                path,
                parse_options=csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                # Empty cells and pyarrow's spellings of a missing value (NA, N/A, NaN,
                # null, ...) read as missing, in text columns too.
                convert_options=csv.ConvertOptions(strings_can_be_null=True),
            )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise MlvarError(f"table file {label} is not a valid {fmt.upper()}: {msg}", hint) from None
    if table.num_rows == 0:
        raise MlvarError(f"table file {label} has no data rows", hint)
    return table


def _is_numeric(dtype: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)
    )


def _column_error(kind: str, wanted: str, columns: list[str]) -> MlvarError:
    near = closest(wanted, columns)
    hint = f"did you mean '{near}'? " if near else ""
    shown = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")
    return MlvarError(f"{kind} column '{wanted}' is not in the table", f"{hint}columns: {shown}")


def _labels(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Every row's class index and the class names (the distinct values, sorted)."""
    import pyarrow as pa

    if _is_numeric(column.type):
        values = column.to_numpy()
    else:
        values = column.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
    classes, y = np.unique(values, return_inverse=True)
    names = [str(c.item() if hasattr(c, "item") else c) for c in classes]
    return y.astype(np.int64), names


def split_index(y: np.ndarray, split: dict[str, Any]) -> dict[str, np.ndarray]:
    """Train, validation and test positions (each in split order): stratified
    ``train_test_split``s of :data:`split` (``test_fraction``, ``val_fraction``, ``seed``).

    Raises :class:`MlvarError` naming a class with too few rows to stratify."""
    from sklearn.model_selection import train_test_split

    seed = split["seed"]
    try:
        rest, test = train_test_split(
            np.arange(len(y)), test_size=split["test_fraction"], random_state=seed, stratify=y
        )
        train, val = train_test_split(
            rest, test_size=split["val_fraction"], random_state=seed, stratify=y[rest]
        )
    except ValueError as exc:
        counts = np.bincount(y)
        raise MlvarError(
            f"the label's class {int(np.argmin(counts))} has {int(counts.min())} rows, too few "
            f"to stratify a {split['test_fraction']} test and {split['val_fraction']} "
            f"validation split ({' '.join(str(exc).split())[:120]})",
            "drop or merge rare classes, or change --test-fraction/--val-fraction",
        ) from None
    return {"train": np.asarray(train), "val": np.asarray(val), "test": np.asarray(test)}


# --------------------------------------------------------------------------- fetching


def _fraction(value: Any, default: float, option: str) -> float:
    value = default if value is None else value
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MlvarError(f"--{option} must be a number, got {value!r}", "e.g. 0.2")
    if not (math.isfinite(value) and 0 < value < 1):
        raise MlvarError(f"--{option} {value} is out of range", "use a fraction in (0, 1)")
    return float(value)


def _options(
    label: str | None,
    features: str | list[str] | None,
    id: str | None,
    test_fraction: float | None,
    val_fraction: float | None,
    split_seed: int | None,
) -> dict[str, Any]:
    """The fetch options checked as far as they can be without the table."""
    if not label:
        raise MlvarError("table needs --label COL", "e.g. --label target")
    if isinstance(features, str):
        features = [f.strip() for f in features.split(",")]
    if features is not None and (not features or not all(features)):
        raise MlvarError(f"--features {features!r} has an empty name", "e.g. --features a,b,c")
    seed = SPLIT_SEED if split_seed is None else split_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MlvarError(f"--split-seed must be a non-negative integer, got {seed!r}", "e.g. 69")
    return {
        "label": label,
        "features": None if features is None else list(features),
        "id": id,
        "split": {
            "test_fraction": _fraction(test_fraction, TEST_FRACTION, "test-fraction"),
            "val_fraction": _fraction(val_fraction, VAL_FRACTION, "val-fraction"),
            "seed": int(seed),
        },
    }


def _check_table(table: pa.Table, options: dict[str, Any], origin: str) -> dict[str, Any]:
    """Check ``table`` against the fetch options: what ``source.json`` records about it
    (columns, features, categorical ones, classes). Raises :class:`MlvarError`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = list(table.column_names)
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise MlvarError(f"table file {origin} has two columns named '{dup}'", "rename one")
    label, id_col = options["label"], options["id"]
    for kind, name in (("label", label), ("id", id_col)):
        if name is not None and name not in columns:
            raise _column_error(f"--{kind}", name, columns)
    if id_col == label:
        raise MlvarError(f"--id and --label both name '{label}'", "name two different columns")
    features = options["features"]
    if features is None:
        features = [c for c in columns if c not in (label, id_col)]
    for name in features:
        if name not in columns:
            raise _column_error("--features", name, columns)
        if name in (label, id_col):
            raise MlvarError(
                f"--features lists '{name}', the {'label' if name == label else 'id'} column",
                "leave it out of --features",
            )
    if not features:
        raise MlvarError("the table has no feature column", "name them with --features")
    if len(set(features)) != len(features):
        raise MlvarError("--features lists a column twice", "give each column once")
    if table.column(label).null_count:
        raise MlvarError(
            f"label column '{label}' has {table.column(label).null_count} missing values",
            "drop those rows, or fill them in",
        )
    if id_col is not None:
        ids = table.column(id_col)
        if not pa.types.is_integer(ids.type) or ids.null_count:
            raise MlvarError(
                f"id column '{id_col}' is not integers without missing values",
                "name a column of unique integers, or leave --id out (ids: row numbers)",
            )
        if pc.count_distinct(ids).as_py() != len(ids):
            raise MlvarError(f"id column '{id_col}' has duplicate values", "ids must be unique")
    categorical = []
    for name in features:
        column = table.column(name)
        if _is_numeric(column.type):
            continue
        n = pc.count_distinct(column, mode="all").as_py()
        if n > MAX_CATEGORIES:
            raise MlvarError(
                f"feature column '{name}' is not numeric and has {n} distinct values (more "
                f"than {MAX_CATEGORIES}): it cannot be one-hot encoded",
                "leave it out with --features, or make it numeric",
            )
        categorical.append(name)
    y, classes = _labels(table.column(label))
    if len(classes) < 2:
        raise MlvarError(f"label column '{label}' has one class only", "a label needs 2 classes")
    split_index(y, options["split"])  # refuses a class too small to stratify
    return {
        "columns": [{"name": c, "dtype": str(table.schema.field(c).type)} for c in columns],
        "features": list(features),
        "categorical": categorical,
        "classes": classes,
    }


def fetch_table(
    data_root: str | os.PathLike,
    source: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Any = None,
    *,
    name: str,
    force: bool = False,
    label: str | None = None,
    features: str | list[str] | None = None,
    id: str | None = None,
    test_fraction: float | None = None,
    val_fraction: float | None = None,
    split_seed: int | None = None,
) -> dict[str, Any]:
    """Record the table ``source`` as user dataset ``name`` (see the module docstring).

    ``verify`` and ``progress`` are taken for the common fetch signature: a user's file
    has no published checksum, and it is read in one go.

    Returns
    -------
    dict
        ``dataset``, ``kind``, ``path`` (the folder), ``sha256``, ``rows``, ``features``,
        ``classes`` and ``action`` (``recorded``, ``replaced``, or ``unchanged`` when the
        same bytes were fetched with the same options before).

    Raises
    ------
    MlvarError
        A missing or unreadable file, an unknown format, bad options or columns, a name
        holding other bytes without ``force``. Nothing is written in that case.
    """
    if source is None:
        raise MlvarError("table needs --source FILE", "the CSV, TSV or parquet file to use")
    path = Path(source).expanduser()
    if not path.is_file():
        raise MlvarError(f"source file {path} not found", "pass the path of a CSV, TSV or parquet")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MlvarError(
            f"source file {path} is not a known table format ({path.suffix or 'no suffix'})",
            "name it .csv, .tsv or .parquet",
        )
    options = _options(label, features, id, test_fraction, val_fraction, split_seed)
    digest = sha256_file(path)
    folder = user.user_dir(data_root, name)
    existed = folder.exists()
    info = user.same_fetch(data_root, name, digest, options, STORED_FILE)
    action = "unchanged"
    if info is None:
        table = read_table(path, fmt, str(path))
        checked = _check_table(table, options, str(path))
        user.refuse_replacing(data_root, name, digest, options, force)
        info = {
            "kind": KIND,
            "name": name,
            "file": path.name,
            "sha256": digest,
            "format": fmt,
            "rows": int(table.num_rows),
            "stored": STORED_FILE,
            "options": options,
            **checked,
        }
        import pyarrow as pa

        with user.recording(data_root, name) as tmp:
            with (
                pa.OSFile(str(tmp / STORED_FILE), "wb") as sink,
                pa.ipc.new_file(sink, table.schema) as writer,
            ):
                writer.write_table(table)
            user.write_info(tmp, info)
        action = "replaced" if existed else "recorded"
    return {
        "dataset": name,
        "kind": KIND,
        "path": str(folder),
        "source": str(path),
        "sha256": digest,
        "rows": info["rows"],
        "features": len(info["features"]),
        "classes": ", ".join(info["classes"]),
        "action": action,
    }


# --------------------------------------------------------------------------- the source


class TableSource(Source):
    """A fetched table: encoded, split and standardised on first use."""

    def __init__(self, data_root: Path, name: str, info: dict[str, Any]) -> None:
        super().__init__(data_root)
        self.name = name
        self.info = info
        self.path = user.user_dir(data_root, name) / STORED_FILE
        if "sha256" not in info or not self.path.is_file():
            raise MlvarError(f"table '{name}' is not fetched in {data_root}", _fetch_hint(name))

    def _read(self, columns: list[str]) -> pa.Table:
        import pyarrow as pa

        return pa.ipc.open_file(pa.memory_map(str(self.path))).read_all().select(columns)

    def load(self) -> BaseData:
        info = self.info
        options = info["options"]
        label, id_col, features = options["label"], options["id"], info["features"]
        table = self._read([*features, label, *([id_col] if id_col else [])])
        y, class_names = _labels(table.column(label))
        n = len(y)
        ids = (
            table.column(id_col).to_numpy().astype(np.int64)
            if id_col
            else np.arange(n, dtype=np.int64)
        )
        index = split_index(y, options["split"])
        x, feature_names, manifest = _encode(
            table, features, set(info["categorical"]), index["train"]
        )
        manifest = {
            "source": {
                "kind": KIND,
                "name": self.name,
                "file": info["file"],
                "sha256": info["sha256"],
                "format": info["format"],
            },
            "class_names": class_names,
            "label": label,
            "id_column": id_col,
            "feature_names": feature_names,
            "input": {"kind": "tabular", "n_features": len(feature_names)},
            **manifest,
            "split": {
                **options["split"],
                "stratified": True,
                "order": "test split off first, then validation from the rest; both in "
                "train_test_split's order",
            },
        }
        return BaseData(
            x=x,
            y=y,
            ids=ids,
            groups=np.full(n, -1, dtype=np.int64),
            index=index,
            class_names=class_names,
            manifest=manifest,
            extra={"feature_names": feature_names},
        )

    def subgroup(self, where: str) -> np.ndarray:
        """Every row's membership of the subgroup ``where`` selects (cached per text)."""
        cache = self.__dict__.setdefault("_subgroups", {})
        if where not in cache:
            cache[where] = _evaluate_where(self, where)
        return cache[where]

    @cached_property
    def x_raw(self) -> np.ndarray:
        """The features unstandardised (missing numbers imputed): what the clustering tree
        is fitted on, encoded again when asked for (only ``cluster`` needs it)."""
        info = self.info
        table = self._read(info["features"])
        x, _, _ = _encode(
            table, info["features"], set(info["categorical"]), self.base.index["train"], False
        )
        return x

    @cached_property
    def min_samples_leaf(self) -> int:
        share, of = LEAF_SHARE
        return max(1, round(len(self.base.y) * share / of))

    @cached_property
    def clusters(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's cluster and the clusters' leaf ids (numbered as COMPAS's)."""
        base = self.base
        leaves = tabular.tree_leaves(self.x_raw, base.y, self.min_samples_leaf)
        return tabular.number_leaves(leaves, np.unique(leaves), base.index["train"])

    @property
    def n_clusters(self) -> int:
        return len(self.clusters[1])


def _encode(
    table: pa.Table,
    features: list[str],
    categorical: set[str],
    train: np.ndarray,
    standardise: bool = True,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """The features as a float32 matrix (one-hot categories in place, missing numbers
    imputed, numbers standardised unless ``standardise`` is False), their names and the
    manifest's rules and statistics."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    plans: list[tuple[np.ndarray, int] | None] = []
    names: list[str] = []
    for name in features:
        column = table.column(name)
        if name in categorical:
            text = pc.fill_null(column.cast(pa.string()), MISSING).combine_chunks()
            encoded = pc.dictionary_encode(text)
            dictionary = encoded.dictionary.to_numpy(zero_copy_only=False).astype(str)
            order = np.argsort(dictionary, kind="stable")
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            plans.append((rank[encoded.indices.to_numpy(zero_copy_only=False)], len(order)))
            names += [f"{name}={dictionary[k]}" for k in order]
        else:
            plans.append(None)
            names.append(name)
    # Filled column by column: in column-major order each column is one contiguous write;
    # the rows are made contiguous once at the end (what scenarios store and index).
    x = np.empty((n, len(names)), dtype=np.float32, order="F")
    stats: dict[str, list] = {"columns": [], "mean": [], "std": []}
    imputed: dict[str, dict[str, Any]] = {}
    at = 0
    for name, plan in zip(features, plans, strict=True):
        if plan is not None:
            codes, width = plan
            for k in range(width):
                x[:, at + k] = codes == k
            at += width
            continue
        values = pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)
        gaps = np.isnan(values)
        if gaps.any():
            train_values = values[train][~gaps[train]]
            if not len(train_values):
                raise MlvarError(
                    f"feature column '{name}' has no value in the training split",
                    "leave it out with --features",
                )
            median = float(np.median(train_values))
            values = np.where(gaps, median, values)
            imputed[name] = {"missing": int(gaps.sum()), "median": median}
        train_values = values[train]
        mean = float(train_values.mean())
        std = float(train_values.std())
        std = std if std > 0 else 1.0  # a constant column stays constant rather than NaN
        x[:, at] = (values - mean) / std if standardise else values
        stats["columns"].append(name)
        stats["mean"].append(mean)
        stats["std"].append(std)
        at += 1
    manifest = {
        "standardisation": {**stats, "fit_on": "train"},
        "encoding": {
            "categorical": [f for f in features if f in categorical],
            "rule": "one column <name>=<value> per category, categories of the whole table "
            f"sorted by code point, a missing value the category '{MISSING}'",
        },
        "missing": {
            "rule": "a missing number is replaced by the training split's median (no "
            "indicator column), before standardising",
            "imputed": imputed,
        },
    }
    return np.ascontiguousarray(x), names, manifest


def _evaluate_where(source: TableSource, where: str) -> np.ndarray:
    """The rows ``where`` selects, checked: it parses, is a condition, and selects some
    rows but not all, some of them in test."""
    import pandas as pd

    hint = 'a pandas expression over the table\'s columns, e.g. --where "age > 60"'
    columns = [c["name"] for c in source.info["columns"]]
    # Only the columns the expression can name are read (its text mentions them).
    used = [c for c in columns if c in where]
    frame = (
        source._read(used).to_pandas() if used else pd.DataFrame(index=range(source.info["rows"]))
    )
    try:
        result = frame.eval(where)
    except Exception as exc:  # noqa: BLE001 - pandas raises many kinds for a bad expression
        msg = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise MlvarError(f"--where {where!r} does not parse: {msg}", hint) from None
    if not isinstance(result, pd.Series) or len(result) != len(frame):
        raise MlvarError(f"--where {where!r} is not a condition on each row", hint)
    if not (pd.api.types.is_bool_dtype(result.dtype)):
        raise MlvarError(f"--where {where!r} is not true or false on each row", hint)
    mask = result.fillna(False).to_numpy(dtype=bool)
    count = int(mask.sum())
    if count == 0:
        raise MlvarError(f"--where {where!r} selects no row", "check the column names and values")
    if count == len(mask):
        raise MlvarError(f"--where {where!r} selects every row", "a subgroup must leave other rows")
    if not mask[source.base.index["test"]].any():
        raise MlvarError(
            f"--where {where!r} selects {count} rows, none of them in the test split",
            "select a larger subgroup",
        )
    return mask


# --------------------------------------------------------------------------- modes


def where_tag(where: str) -> str:
    """How a subgroup appears in scenario names: the first 8 hex digits of the sha256 of
    the expression's text."""
    return hashlib.sha256(where.encode()).hexdigest()[:8]


def _check_where(value: Any, where: p.Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MlvarError("--where needs an expression", 'e.g. --where "age > 60"')
    return value.strip()


@dataclass(frozen=True)
class HoldoutParams(p.Params):
    where: str = p.option(
        metavar="EXPR",
        check=_check_where,
        help="the subgroup: a pandas expression over the table's columns (DataFrame.eval)",
        required=True,
        missing_hint='e.g. --where "age > 60"',
        tag="w",
        fmt=where_tag,
        lists=False,
    )
    ratio: float = p.ratio(
        help="fraction of the subgroup's train and validation rows removed, in [0, 1] (default 1)",
        default=1.0,
    )

    def resolve(self, source: TableSource) -> HoldoutParams:
        """The subgroup checked on the data."""
        source.subgroup(self.where)
        return self


def _holdout(source: TableSource, params: HoldoutParams) -> ModeResult:
    base = source.base
    mask = source.subgroup(params.where)
    index = dict(base.index)
    removed = {}
    for s in ("train", "val"):
        pos = index[s]
        members = np.flatnonzero(mask[pos])
        k = n_affected(params.ratio, len(members))
        removed[s] = int(k)
        index[s] = np.delete(pos, members[:k])
    index["full_val"] = base.index["val"]
    group = mask.astype(np.int64)
    splits = {
        s: SplitData(
            x=base.x[pos], y=base.y[pos], id=base.ids[pos], affected=mask[pos], group=group[pos]
        )
        for s, pos in index.items()
    }
    description = (
        f"Removed the first {params.ratio:.0%} of the subgroup {params.where!r} from train "
        f"and validation; affected rows are its rows left there and its test rows "
        f"(full_val: validation before the removal)."
    )
    manifest = {
        "holdout": {
            "where": params.where,
            "subgroup_rows": int(mask.sum()),
            "removed": removed,
            "rule": "first floor(ratio * count) subgroup rows of train and of validation "
            "separately, in split order",
        },
        "group_counts": group_counts(splits, [0, 1], {0: "others", 1: "subgroup"}),
    }
    return ModeResult(splits, description, manifest)


@dataclass(frozen=True)
class ArtificialParams(tabular.ArtificialParams):
    def resolve(self, source: TableSource) -> ArtificialParams:
        """Refuses a label with more than two classes."""
        names = source.base.class_names
        if len(names) != 2:
            raise MlvarError(
                f"table mode 'artificial' needs a binary label; '{source.name}' has "
                f"{len(names)} classes",
                "use --mode holdout or cluster",
            )
        return self


def _artificial(source: TableSource, params: ArtificialParams) -> ModeResult:
    base = source.base
    return tabular.artificial_result(
        base, params.ratio, params.seed, list(base.extra["feature_names"])
    )


@dataclass(frozen=True)
class ClusterParams(p.Params):
    cluster: int = p.integer(
        "cluster",
        "K",
        help="decision-tree cluster index (0 = fewest training rows)",
        tag="cluster",
        keywords={"all": lambda source, where: list(range(source.n_clusters))},
    )

    def resolve(self, source: TableSource) -> ClusterParams:
        """The cluster checked against the clusters of the data (fits the tree)."""
        n = source.n_clusters
        if not 0 <= self.cluster < n:
            raise MlvarError(
                f"cluster {self.cluster} is out of range 0..{n - 1}",
                f"'{source.name}' has {n} clusters; pick one in 0..{n - 1}",
            )
        return self


def _cluster(source: TableSource, params: ClusterParams) -> ModeResult:
    fit_on = "all rows, unstandardised features (missing numbers imputed), the label"
    return tabular.cluster_holdout(
        source.base, source.clusters, params.cluster, source.min_samples_leaf, fit_on
    )


#: The modes of every table, in the order the CLI lists them (a mode written for every
#: dataset is added here).
MODE_SPECS: tuple[ModeSpec, ...] = (
    original_mode("The table unchanged; nothing injected."),
    ModeSpec(
        "holdout",
        HoldoutParams,
        _holdout,
        summary="removes a subgroup's training and validation rows",
        example='--where "age > 60"',
    ),
    ModeSpec(
        "artificial",
        ArtificialParams,
        _artificial,
        summary="adds a feature equal to the label, flipped with probability ratio",
        example="--ratio 0.3",
    ),
    ModeSpec(
        "cluster",
        ClusterParams,
        _cluster,
        summary="removes the training rows of one decision-tree cluster",
        example="--cluster 0",
    ),
)


def user_spec(name: str, info: dict[str, Any], folder: Path) -> DatasetSpec:
    """The spec of user table ``name`` (``info``: its ``source.json``; only ``kind`` and
    ``name`` while it is being fetched)."""
    classes = info.get("classes")
    rows = info.get("rows")
    about = f"{info['file']}, {rows:,} rows" if "file" in info else "not fetched yet"
    return DatasetSpec(
        name=name,
        description=f"your table {name} ({about})",
        input_kind="tabular",
        mode_specs=MODE_SPECS,
        open=lambda data_root: TableSource(Path(data_root), name, info),
        fetch=functools.partial(fetch_table, name=name),
        needs_fetch=True,
        train=TrainDefaults("mlp", {"epochs": 10, "lr": 1e-3, "batch_size": 64}),
        n_classes=len(classes) if classes else None,
    )
