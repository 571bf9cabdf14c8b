"""COMPAS (ProPublica two-year recidivism): fetch, load, filter, and the dataset's spec.

Scenarios (docs/design.md section 4):

- ``original``: the filtered data, unchanged.
- ``artificial``: a binary feature equal to the label, flipped with probability ``ratio`` in
  train and validation and with probability 0.5 in test (a shortcut that carries no signal
  at test time). Affected: rows where the feature disagrees with the label.
- ``holdout``: clusters are the leaves of a depth-limited decision tree; the training rows
  of one cluster are removed. Affected: the validation and test rows of that cluster.

Under ``--protocol study`` (the original study's ``prepare_holdout_compas.py`` and
``main_*_compas.py``; docs/fidelity.md): every feature column is standardised with the
scenario's own training statistics; ``holdout`` orders the clusters by their train+val rows,
removes the cluster from train+val before validation is split off (so validation never
holds it) and flags its test rows; ``artificial`` and ``original`` are mlvar's construction,
standardised the study's way.

pandas and scikit-learn are imported where the data is read, so registering the dataset
(and checking a command's options) does not load them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlvar.data import params as p
from mlvar.data import tabular
from mlvar.data.modes import original_mode
from mlvar.data.scenario import Scenario, SplitData
from mlvar.data.spec import (
    BaseData,
    DatasetSpec,
    ModeResult,
    ModeSpec,
    Source,
    TrainDefaults,
)
from mlvar.errors import MlvarError
from mlvar.io import sha256_file

if TYPE_CHECKING:
    import pandas as pd

COMPAS_URL = (
    "https://raw.githubusercontent.com/propublica/compas-analysis/master/"
    "compas-scores-two-years.csv"
)
COMPAS_SHA256 = "c451db85908b2f7fef1d83203bedf6b71ecda0d5af468d82ae62178f91d0cc7d"
COMPAS_FILENAME = "compas-scores-two-years.csv"

CLASS_NAMES = ["no_recid", "recid"]
LABEL = "two_year_recid"
# Feature columns in the order they appear in the feature matrix; categoricals are expanded
# in place into one column per category.
FEATURES = (
    "sex",
    "age",
    "race",
    "juv_fel_count",
    "juv_misd_count",
    "juv_other_count",
    "priors_count",
    "c_charge_degree",
)
CATEGORICAL = ("sex", "race", "c_charge_degree")
NUMERIC = ("age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count")
REQUIRED_COLUMNS = (
    "id",
    "sex",
    "age",
    "race",
    "juv_fel_count",
    "juv_misd_count",
    "juv_other_count",
    "priors_count",
    "c_charge_degree",
    "days_b_screening_arrest",
    "is_recid",
    "score_text",
    "two_year_recid",
)
_NUMERIC_REQUIRED = (
    "id",
    *NUMERIC,
    "days_b_screening_arrest",
    "is_recid",
    "two_year_recid",
)

TEST_SIZE = 0.165
VAL_SIZE = 0.125
SPLIT_SEED = 69
TREE_MIN_SAMPLES_LEAF = 300
TREE_FIT_ON = "all filtered rows, unstandardised features, two_year_recid"
#: The flip probabilities the study swept when ``--ratio`` is not given.
STUDY_RATIOS = "0:0.5:0.1"

_FETCH_HINT = "run 'mlvar data fetch compas' (or --source PATH)"


def raw_path(data_root: str | os.PathLike) -> Path:
    """Path of the raw CSV inside a data root: ``<data_root>/raw/compas-scores-two-years.csv``."""
    return Path(data_root) / "raw" / COMPAS_FILENAME


# --------------------------------------------------------------------------- loading


def load_compas(path: str | os.PathLike) -> pd.DataFrame:
    """Read the COMPAS CSV and check that it has the columns mlvar needs.

    Raises
    ------
    MlvarError
        The file is missing, is not a CSV, or lacks required columns (all named).
    """
    return _read_compas(Path(path), str(path))


def _read_compas(path: Path, label: str) -> pd.DataFrame:
    """Read ``path``; ``label`` names the file in messages (a URL or the user's path)."""
    hint = "pass the ProPublica compas-scores-two-years.csv"
    if not path.is_file():
        raise MlvarError(f"COMPAS file {label} not found", _FETCH_HINT)
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        raise MlvarError(f"COMPAS file {label} is empty", hint)
    # A NUL byte never occurs in a text CSV; catching it here gives a clear message instead
    # of whatever the parser makes of binary data.
    if b"\x00" in head:
        raise MlvarError(f"COMPAS file {label} is not a CSV file (binary data)", hint)
    import pandas as pd

    try:
        # Default NA handling: 'N/A' and empty cells become NaN, as in ProPublica's analysis.
        df = pd.read_csv(path, low_memory=False, encoding="utf-8")
    except UnicodeDecodeError:
        raise MlvarError(f"COMPAS file {label} is not a CSV file (not UTF-8 text)", hint) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise MlvarError(f"COMPAS file {label} is not a valid CSV: {msg}", hint) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise MlvarError(f"COMPAS file {label} lacks required columns: {', '.join(missing)}", hint)
    bad = [c for c in _NUMERIC_REQUIRED if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise MlvarError(f"COMPAS file {label} has non-numeric columns: {', '.join(bad)}", hint)
    if len(df) == 0:
        raise MlvarError(f"COMPAS file {label} has no data rows", hint)
    return df


def filter_compas(df: pd.DataFrame) -> pd.DataFrame:
    """Apply ProPublica's standard filter (6,172 of 7,214 rows on the published file).

    Keeps ``days_b_screening_arrest`` in [-30, 30], ``is_recid != -1``,
    ``c_charge_degree != 'O'`` and ``score_text != 'N/A'``. Missing values fail every test,
    as in ProPublica's R code (where a comparison with NA drops the row); ``score_text`` read
    with pandas' default NA values turns 'N/A' into NaN, so both spellings are dropped.
    The result has a fresh 0..n-1 index in file order.
    """
    days = df["days_b_screening_arrest"]
    score = df["score_text"]
    keep = (
        days.between(-30, 30)
        & (df["is_recid"] != -1)
        & df["is_recid"].notna()
        & (df["c_charge_degree"] != "O")
        & df["c_charge_degree"].notna()
        & (score != "N/A")
        & score.notna()
    )
    return df.loc[keep].reset_index(drop=True)


def _feature_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One-hot encode the features of a filtered frame (unstandardised, float64).

    Categories are sorted, so the column order depends only on which values occur.
    """
    import pandas as pd

    gaps = [c for c in (*FEATURES, LABEL, "id") if df[c].isna().any()]
    if gaps:
        raise MlvarError(
            f"COMPAS file has missing values in columns: {', '.join(gaps)}",
            "pass the unmodified ProPublica compas-scores-two-years.csv",
        )
    columns: dict[str, np.ndarray] = {}
    for feature in FEATURES:
        if feature in CATEGORICAL:
            values = df[feature].astype(str)
            for category in sorted(values.unique()):
                columns[f"{feature}={category}"] = (values == category).to_numpy(np.float64)
        else:
            columns[feature] = df[feature].to_numpy(np.float64)
    frame = pd.DataFrame(columns)
    return frame, list(frame.columns)


# --------------------------------------------------------------------------- fetching


def fetch_compas(
    data_root: str | os.PathLike,
    source: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Download the COMPAS CSV (or copy ``source``) to :func:`raw_path`.

    The file is streamed to a temporary name, its sha256 is checked (unless ``verify`` is
    False), it is parsed as the COMPAS CSV, and only then renamed into place. On any failure
    nothing new is left in ``data_root``.

    Parameters
    ----------
    data_root
        Data root; the file goes to ``<data_root>/raw/``.
    source
        Local copy to use instead of downloading.
    verify
        Check the published sha256.
    progress
        Called as ``progress(done_bytes, total_bytes_or_None)`` while copying.

    Returns
    -------
    dict
        ``path``, ``sha256``, ``rows``, ``verified``, ``source`` (URL or path) and ``action``.
    """
    from mlvar.data import archives

    final = raw_path(data_root)
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_file():
            raise MlvarError(
                f"source file {source} not found", "pass the path of compas-scores-two-years.csv"
            )
        origin = str(source)
    else:
        origin = COMPAS_URL
    created = archives.missing_dirs(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        if source is not None:
            with os.fdopen(fd, "wb") as out:
                digest = archives.copy_file(source, out, progress)
                out.flush()
                os.fsync(out.fileno())
        else:
            os.close(fd)
            # The temporary file is removed on failure, so there is nothing to resume.
            _, digest = archives.download(
                COMPAS_URL,
                tmp,
                progress,
                hint="check the network, or download the file yourself and pass --source PATH",
            )
        # mkstemp creates 0600; the raw file is ordinary data other users may read.
        os.chmod(tmp, 0o644)
        # Parse first: "not a CSV" or "lacks columns" says more than a checksum mismatch.
        df = _read_compas(tmp, origin)
        if verify and digest != COMPAS_SHA256:
            raise MlvarError(
                f"checksum mismatch for {origin}: sha256 {digest}, expected {COMPAS_SHA256}",
                "use the unmodified ProPublica file, or skip the check with --no-verify",
            )
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Remove the folders this call created so a failure leaves the data root as it was.
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return {
        "dataset": "compas",
        "path": str(final),
        "sha256": digest,
        "rows": int(len(df)),
        "verified": bool(verify),
        "source": origin,
        "action": "copied" if source is not None else "downloaded",
    }


# --------------------------------------------------------------------------- the source


def _rest_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of train+val and of test (16.5%, not stratified, ``random_state=69``),
    in the split's order."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(np.arange(n), test_size=TEST_SIZE, random_state=SPLIT_SEED)
    return np.asarray(rest), np.asarray(test)


def _split_val(rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation (12.5%, ``random_state=69``) of train+val positions."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(rest, test_size=VAL_SIZE, random_state=SPLIT_SEED)
    return np.asarray(train), np.asarray(val)


def _split_indices(n: int) -> dict[str, np.ndarray]:
    """Row positions of train, val and test (not stratified, ``random_state=69``)."""
    rest, test = _rest_test(n)
    train, val = _split_val(rest)
    return {"train": train, "val": val, "test": test}


class CompasSource(Source):
    """The fetched CSV: filtered, one-hot encoded, split and standardised on first use."""

    def __init__(self, data_root: Path) -> None:
        super().__init__(data_root)
        self.path = raw_path(data_root)
        if not self.path.is_file():
            raise MlvarError(f"COMPAS file {self.path} not found", _FETCH_HINT)

    def load(self) -> BaseData:
        source_sha = sha256_file(self.path)
        df = filter_compas(load_compas(self.path))
        if len(df) < 10:
            raise MlvarError(
                f"only {len(df)} COMPAS rows pass the ProPublica filter", "use the published file"
            )
        raw, feature_names = _feature_frame(df)
        x_raw = raw.to_numpy(np.float64)
        y_all = df[LABEL].to_numpy(np.int64)
        if not np.isin(y_all, (0, 1)).all():
            raise MlvarError(
                f"column {LABEL} has values other than 0 and 1", "use the published file"
            )
        ids = df["id"].to_numpy(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise MlvarError("column id has duplicate values", "use the published file")
        index = _split_indices(len(df))
        # Standardise numeric columns with training statistics only (no test leakage).
        num_cols = [feature_names.index(c) for c in NUMERIC]
        train_num = x_raw[index["train"]][:, num_cols]
        mean = train_num.mean(axis=0)
        std = train_num.std(axis=0)
        std = np.where(std > 0, std, 1.0)  # a constant column stays constant rather than NaN
        x_std = x_raw.copy()
        x_std[:, num_cols] = (x_std[:, num_cols] - mean) / std
        manifest = {
            "source": {"file": COMPAS_FILENAME, "sha256": source_sha, "url": COMPAS_URL},
            "class_names": list(CLASS_NAMES),
            "label": LABEL,
            "feature_names": feature_names,
            "input": {"kind": "tabular", "n_features": len(feature_names)},
            "standardisation": {
                "columns": list(NUMERIC),
                "mean": [float(v) for v in mean],
                "std": [float(v) for v in std],
                "fit_on": "train",
            },
            "filter": {
                "rule": "days_b_screening_arrest in [-30, 30], is_recid != -1, "
                "c_charge_degree != 'O', score_text != 'N/A'",
                "rows": int(len(df)),
            },
            "split": {"test_size": TEST_SIZE, "val_size": VAL_SIZE, "random_state": SPLIT_SEED},
        }
        return BaseData(
            x=x_std.astype(np.float32),
            y=y_all,
            ids=ids,
            groups=np.full(len(df), -1, dtype=np.int64),
            index=index,
            class_names=list(CLASS_NAMES),
            manifest=manifest,
            extra={"x_raw": x_raw, "feature_names": feature_names},
        )

    @cached_property
    def leaves(self) -> np.ndarray:
        """Every row's leaf of the clustering tree (:func:`_leaves`), fitted once."""
        return _leaves(self.base)

    @cached_property
    def clusters(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's cluster and the clusters' leaf ids (:func:`_clusters`)."""
        return _clusters(self.base, self.leaves)

    @cached_property
    def study_clusters(self) -> tuple[np.ndarray, np.ndarray]:
        """The same, numbered the study's way (:func:`_study_clusters`)."""
        return _study_clusters(self.base, self.leaves)

    @property
    def n_clusters(self) -> int:
        return len(self.clusters[1])


# --------------------------------------------------------------------------- artificial


@dataclass(frozen=True)
class ArtificialParams(tabular.ArtificialParams):
    ratio: float = p.ratio(
        0.0,
        0.5,
        help="label-flip probability of the added feature, in [0, 0.5]",
        study=STUDY_RATIOS,
    )


def _artificial(source: CompasSource, params: ArtificialParams) -> ModeResult:
    base = source.base
    return tabular.artificial_result(
        base, params.ratio, params.seed, list(base.extra["feature_names"])
    )


# --------------------------------------------------------------------------- holdout


@dataclass(frozen=True)
class HoldoutParams(p.Params):
    cluster: int = p.integer(
        "cluster",
        "K",
        help="cluster index (0 = smallest)",
        tag="cluster",
        keywords={"all": lambda source, where: list(range(source.n_clusters))},
        study="all",
    )

    def resolve(self, source: CompasSource) -> HoldoutParams:
        """The cluster checked against the clusters of the data (fits the tree)."""
        n = source.n_clusters
        if not 0 <= self.cluster < n:
            raise MlvarError(
                f"cluster {self.cluster} is out of range 0..{n - 1}",
                f"COMPAS has {n} clusters; pick one in 0..{n - 1}",
            )
        return self


def _leaves(base: BaseData) -> np.ndarray:
    """Every row's leaf of the tree fitted on all rows (unstandardised features)."""
    return tabular.tree_leaves(base.extra["x_raw"], base.y, TREE_MIN_SAMPLES_LEAF)


def _clusters(base: BaseData, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row's cluster and the clusters' leaf ids, numbered by training rows ascending."""
    return tabular.number_leaves(leaves, np.unique(leaves), base.index["train"])


def _study_clusters(base: BaseData, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The study's clusters: the leaves holding train+val rows, numbered by their train+val
    rows ascending (a stable sort of the leaf ids, so ties by leaf id)."""
    rest, _ = _rest_test(len(leaves))
    return tabular.number_leaves(leaves, np.unique(leaves[rest]), rest)


def _holdout(source: CompasSource, params: HoldoutParams) -> ModeResult:
    return tabular.cluster_holdout(
        source.base, source.clusters, params.cluster, TREE_MIN_SAMPLES_LEAF, TREE_FIT_ON
    )


# --------------------------------------------------------------------------- study protocol

#: The study's scaler (``StandardScaler`` on every column) fitted on each split separately:
#: validation and test were scaled with their own statistics. The study protocol keeps its
#: design (every column standardised) with the training statistics only.
STUDY_SCALING_NOTE = (
    "the study fit a StandardScaler on each split separately (test statistics leak into the "
    "test inputs); here it is fitted on this scenario's train split and applied to every split"
)


def _study_splits(
    base: BaseData,
    index: dict[str, np.ndarray],
    columns: dict[str, np.ndarray],
    feature_names: list[str],
) -> tuple[dict[str, SplitData], dict[str, Any]]:
    """The splits of ``index`` with every feature column standardised with the training
    statistics, as the study's ``StandardScaler`` (population std, a constant column left
    at scale 1); ``columns`` maps each split to its unstandardised feature matrix."""
    train = columns["train"]
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    splits = {
        s: SplitData(
            x=((columns[s] - mean) / std).astype(np.float32),
            y=base.y[pos],
            id=base.ids[pos],
            affected=np.zeros(len(pos), bool),
            group=base.groups[pos],
        )
        for s, pos in index.items()
    }
    manifest = {
        "standardisation": {
            "columns": list(feature_names),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "fit_on": "train",
            "note": STUDY_SCALING_NOTE,
        }
    }
    return splits, manifest


def _raw_columns(base: BaseData, index: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {s: base.extra["x_raw"][pos] for s, pos in index.items()}


def _study_original(source: CompasSource, params: p.NoParams) -> ModeResult:
    base = source.base
    index = dict(base.index)
    splits, manifest = _study_splits(
        base, index, _raw_columns(base, index), list(base.extra["feature_names"])
    )
    description = (
        "Unchanged COMPAS data (ProPublica filter), every feature standardised with training "
        "statistics as the study's scaler; nothing injected."
    )
    return ModeResult(splits, description, manifest)


def _study_artificial(source: CompasSource, params: ArtificialParams) -> ModeResult:
    # The study drew the feature for train+val before splitting off validation, with the
    # same probability: each row flips independently, so mlvar's seeded draw (by split) is
    # the same design. Only the scaling differs: the study standardised the new column too.
    made = _artificial(source, params)
    base = source.base
    columns = {
        s: np.concatenate([base.extra["x_raw"][pos], made.splits[s].x[:, -1:]], axis=1)
        for s, pos in base.index.items()
    }
    feature_names = list(made.manifest["feature_names"])
    splits, manifest = _study_splits(base, dict(base.index), columns, feature_names)
    for s, data in splits.items():
        data.affected = made.splits[s].affected
    return ModeResult(splits, made.description, {**made.manifest, **manifest})


def _study_holdout(source: CompasSource, params: HoldoutParams) -> ModeResult:
    base = source.base
    k = params.cluster
    group_all, leaf_ids = source.study_clusters
    n_clusters = len(leaf_ids)
    if not 0 <= k < n_clusters:
        raise MlvarError(
            f"cluster {k} is out of range 0..{n_clusters - 1} of the study's clusters",
            f"pick one in 0..{n_clusters - 1}",
        )
    rest, test = _rest_test(len(base.y))
    # The cluster leaves train+val first (in the split's order); validation is split off
    # what remains, so it never holds the cluster.
    train, val = _split_val(rest[group_all[rest] != k])
    index = {"train": train, "val": val, "test": test}
    splits, manifest = _study_splits(
        base, index, _raw_columns(base, index), list(base.extra["feature_names"])
    )
    for s, pos in index.items():
        splits[s].group = group_all[pos]
    splits["test"].affected = splits["test"].group == k
    sizes = {
        s: [int((group_all[pos] == c).sum()) for c in range(n_clusters)]
        for s, pos in (("train+val", rest), ("test", test))
    }
    removed = sizes["train+val"][k]
    description = (
        f"Removed the {removed} train+val rows of decision-tree cluster {k} (of {n_clusters}, "
        f"the study's order) before splitting off validation; affected rows are its test rows."
    )
    manifest.update(
        clusters=tabular.clusters_manifest(
            leaf_ids,
            sizes,
            order="train+val rows ascending (the leaves holding train+val rows), ties by "
            "leaf node id",
            min_samples_leaf=TREE_MIN_SAMPLES_LEAF,
            fit_on=TREE_FIT_ON,
            removed_train_val_rows=int(removed),
        ),
        split={
            "test_size": TEST_SIZE,
            "val_size": VAL_SIZE,
            "random_state": SPLIT_SEED,
            "order": "test split off first; the cluster removed from train+val; validation "
            "split off what remains",
        },
    )
    return ModeResult(splits, description, manifest)


# --------------------------------------------------------------------------- the spec


SPEC = DatasetSpec(
    name="compas",
    description="ProPublica COMPAS two-year recidivism (tabular, 2 classes, 6,172 rows)",
    input_kind="tabular",
    mode_specs=(
        original_mode(
            "Unchanged COMPAS data (ProPublica filter); nothing injected.", study=_study_original
        ),
        ModeSpec(
            "artificial",
            ArtificialParams,
            _artificial,
            summary="adds a feature equal to the label, flipped with probability ratio",
            study=_study_artificial,
        ),
        ModeSpec(
            "holdout",
            HoldoutParams,
            _holdout,
            summary="removes the training rows of one decision-tree cluster",
            study=_study_holdout,
        ),
    ),
    open=CompasSource,
    fetch=fetch_compas,
    needs_fetch=True,
    train=TrainDefaults("mlp", {"epochs": 10, "lr": 1e-3, "batch_size": 64}),
    n_classes=len(CLASS_NAMES),
)
MODES = SPEC.modes


def prepare_compas(
    data_root: str | os.PathLike,
    mode: str,
    ratio: float | None = None,
    cluster: int | None = None,
    seed: int = 0,
    force: bool = False,
) -> Scenario:
    """Prepare a COMPAS scenario (``mlvar.data.registry.prepare`` for ``compas``)."""
    given = {"ratio": ratio, "cluster": cluster, "seed": seed}
    return SPEC.prepare(data_root, mode, p.given_options(given), force=force)
