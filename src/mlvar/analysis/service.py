"""Analysis of a run store: accuracy across seeds, per-sample metrics, ranking, detection.

Reads stored predictions only (never models). Each chunk of samples is read from
memory-mapped logits (mapped for that chunk only, so the resident set never holds a
whole file), converted to probabilities and reduced to per-sample sufficient statistics
(:mod:`mlvar.analysis.partial`). Memory is bounded by one chunk (sized so that
``runs x chunk x classes`` float64 values take about :data:`CHUNK_BYTES`) plus the
``O(runs x samples + samples x classes)`` per-sample outputs; no ``runs x samples x
classes`` array is ever held.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlvar.analysis.accuracy import accuracy_summary
from mlvar.analysis.conventions import RANKS_MID, check_ranks
from mlvar.analysis.defaults import DEFAULT_RANK_BY
from mlvar.analysis.detection import detect, detect_baselines
from mlvar.analysis.metrics import (
    ALL_METRICS,
    DYNAMICS_METRICS,
    RUNS,
    STATISTICS,
    check_by,
    dynamics_sums,
    score_baselines,
)
from mlvar.analysis.partial import Partial, finalize, from_probs
from mlvar.errors import MlvarError
from mlvar.io import atomic_write_json
from mlvar.store import DYNAMICS_FILE, ExperimentStore, RunRecord

CHUNK = 8192  # legacy default chunk size; chunks are now sized by CHUNK_BYTES
CHUNK_BYTES = 32 * 2**20  # float64 bytes of one [runs, chunk, classes] block
MAX_CHUNK = 65536  # samples per chunk at most


def chunk_size(n_runs: int, n_classes: int, per_sample: int = 1) -> int:
    """Samples per chunk so that ``n_runs x chunk x n_classes x per_sample`` float64
    values take about :data:`CHUNK_BYTES`."""
    per = 8 * max(1, n_runs) * max(1, n_classes) * max(1, per_sample)
    return int(max(1, min(MAX_CHUNK, CHUNK_BYTES // per)))


def _softmax_inplace(x: np.ndarray) -> np.ndarray:
    """:func:`mlvar.analysis.metrics.softmax` over the last axis, in place on float64 ``x``
    (the same operations, so the same bits, without three temporaries)."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    x -= m
    np.exp(x, out=x)
    x /= np.sum(x, axis=-1, keepdims=True)
    return x


def _read_rows(path: Path, start: int, stop: int, out: np.ndarray, axis: int = 0) -> None:
    """Copy rows ``start:stop`` (along ``axis``) of the ``.npy`` at ``path`` into ``out``.

    The file is memory-mapped for this read only: once copied, the mapping is dropped, so
    pages of a large file do not accumulate in the resident set.
    """
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    index = (slice(None),) * axis + (slice(start, stop),)
    out[...] = array[index]
    del array


class _RowFile:
    """Rows of one ``.npy`` file read with plain reads, its header parsed once.

    A pass over many small chunks (100 runs x 100 classes make chunks of ~400 samples)
    spent more time opening a memory map per chunk than copying; a plain read costs an
    open and a seek, and like the per-read map it leaves nothing mapped. Files whose
    layout a plain read cannot follow (Fortran order, other header versions) are read
    through :func:`_read_rows`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset: int | None = None
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version in ((1, 0), (2, 0)):
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read(fh)
                if not fortran and not dtype.hasobject and len(shape) >= 1:
                    self.offset = fh.tell()
                    self.dtype = dtype
                    self.row_shape = tuple(shape[1:])
                    self.row_bytes = int(dtype.itemsize * np.prod(shape[1:], dtype=np.int64))
                    self.n_rows = int(shape[0])

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start:stop`` into ``out`` (converted to its dtype)."""
        if self.offset is None or stop > self.n_rows:
            _read_rows(self.path, start, stop, out)
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.row_bytes)
            data = fh.read((stop - start) * self.row_bytes)
        out[...] = np.frombuffer(data, self.dtype).reshape((stop - start, *self.row_shape))


@dataclass
class Predictions:
    """The runs of one split, ready to stream: records, sample table, class names."""

    store: ExperimentStore
    split: str
    runs: list[RunRecord]
    samples: pd.DataFrame
    skipped: list[str]  # runs left out (failed sha256)

    @property
    def labels(self) -> np.ndarray:
        return self.samples["label"].to_numpy()

    @property
    def affected(self) -> np.ndarray:
        return self.samples["affected"].to_numpy()

    @property
    def n_classes(self) -> int:
        return len(self.store.class_names)

    @property
    def has_dynamics(self) -> bool:
        """True on the train split when every run recorded per-epoch predictions."""
        return self.split == "train" and all(
            DYNAMICS_FILE in r.meta.get("arrays", {}) for r in self.runs
        )

    def chunks(
        self,
        size: int | None = None,
        runs: Sequence[RunRecord] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, probs [R, chunk, C])``, probabilities in float64.

        ``runs`` (default: all) selects runs, ``start:stop`` a range of samples; ``size``
        defaults to :func:`chunk_size`.
        """
        runs = self.runs if runs is None else list(runs)
        n = len(self.samples) if stop is None else stop
        size = size or chunk_size(len(runs), self.n_classes)
        files = [_RowFile(r.logits_path(self.split)) for r in runs]
        for a in range(start, n, size):
            b = min(a + size, n)
            block = np.empty((len(files), b - a, self.n_classes), dtype=np.float64)
            for i, rows in enumerate(files):
                rows.read(a, b, block[i])
            yield a, b, _softmax_inplace(block)

    def dynamics_sums(
        self, runs: Sequence[RunRecord], start: int, stop: int
    ) -> dict[str, np.ndarray]:
        """Sums over ``runs`` of the per-run training-dynamics values of samples
        ``start:stop`` (one run and a bounded block of epochs x samples at a time)."""
        labels = self.labels
        out: dict[str, np.ndarray] = {}
        epochs = max(int(r.meta.get("arrays", {})[DYNAMICS_FILE]["shape"][0]) for r in runs)
        step = chunk_size(1, self.n_classes, per_sample=epochs)
        for a in range(start, stop, step):
            b = min(a + step, stop)

            def per_run(a: int = a, b: int = b) -> Iterator[np.ndarray]:
                for run in runs:
                    shape = run.meta["arrays"][DYNAMICS_FILE]["shape"]
                    block = np.empty((shape[0], b - a, self.n_classes), dtype=np.float64)
                    _read_rows(run.path / DYNAMICS_FILE, a, b, block, axis=1)
                    yield _softmax_inplace(block)

            sums = dynamics_sums(per_run(), labels[a:b])
            for k, v in sums.items():
                out.setdefault(k, np.empty(stop - start))[a - start : b - start] = v
        return out

    def partials(
        self,
        runs: Sequence[RunRecord] | None = None,
        start: int = 0,
        stop: int | None = None,
        size: int | None = None,
        dynamics: bool | None = None,
    ) -> Iterator[tuple[int, int, Partial]]:
        """Yield ``(start, stop, Partial)`` chunk by chunk (see :mod:`.partial`)."""
        runs = self.runs if runs is None else list(runs)
        dynamics = self.has_dynamics if dynamics is None else dynamics
        labels = self.labels
        for a, b, probs in self.chunks(size, runs, start, stop):
            dyn = self.dynamics_sums(runs, a, b) if dynamics else None
            yield a, b, from_probs(probs, labels[a:b], dyn)


def _identity(run: RunRecord) -> str:
    cfg = dict(run.meta.get("config", {}))
    for key in ("engine", "device", "pack_size", "record_dynamics"):
        cfg.pop(key, None)
    return json.dumps(cfg, sort_keys=True)


def check_logits_shape(store: ExperimentStore, run: RunRecord, split: str, n: int) -> None:
    """Refuse a run whose ``split`` logits (as its ``run.json`` lists them) are not
    ``[n, C]`` for the experiment's ``C`` classes."""
    shape = run.meta.get("arrays", {}).get(f"{split}.logits.npy", {}).get("shape")
    expected = [n, len(store.class_names)]
    if shape != expected:
        raise MlvarError(
            f"run {run.run_id} of '{store.name}' has {split} logits of shape {shape}, "
            f"expected {expected}",
            "remove or retrain that run",
        )


def load_predictions(store: ExperimentStore, split: str, allow_mixed: bool = False) -> Predictions:
    """The verified finished runs of ``split``.

    Raises :class:`MlvarError` when there is no finished run, or when runs were trained
    with different configurations (unless ``allow_mixed``).
    """
    samples = store.samples(split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = store.runs(verify=True)
    skipped = [str(w.message) for w in caught]
    for message in skipped:
        warnings.warn(message, stacklevel=2)
    if not runs:
        raise MlvarError(
            f"experiment '{store.name}' has no finished runs",
            f"train some with 'mlvar train {store.meta.get('dataset', 'DATASET')} --runs N'",
        )
    configs = {}
    for run in runs:
        configs.setdefault(_identity(run), []).append(run.run_id)
    if len(configs) > 1 and not allow_mixed:
        groups = "; ".join(f"{ids[0]}..({len(ids)} runs)" for ids in configs.values())
        raise MlvarError(
            f"experiment '{store.name}' mixes runs trained with {len(configs)} different "
            f"configurations ({groups})",
            "analyse them separately, or pass --allow-mixed",
        )
    n_classes = len(store.class_names)
    lacking = [r.run_id for r in runs if f"{split}.logits.npy" not in r.meta.get("arrays", {})]
    if lacking:  # runs trained after 'analyze predict' added the split
        shown = ", ".join(lacking[:5]) + (
            f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        )
        source = (store.meta.get("external_splits") or {}).get(split) or {}
        on = f"{source.get('scenario', 'SCENARIO')}:{source.get('split', split)}"
        raise MlvarError(
            f"runs {shown} of '{store.name}' have no {split} logits",
            f"add them with 'mlvar analyze predict {store.name} --on {on} --as {split}'",
        )
    for run in runs:
        check_logits_shape(store, run, split, len(samples))
        arrays = run.meta.get("arrays", {})
        if split == "train" and DYNAMICS_FILE in arrays:
            shape = arrays[DYNAMICS_FILE].get("shape")
            if not (
                isinstance(shape, list)
                and len(shape) == 3
                and shape[0] >= 1
                and shape[1:] == [len(samples), n_classes]
            ):
                raise MlvarError(
                    f"run {run.run_id} of '{store.name}' has training dynamics of shape "
                    f"{shape}, expected [epochs, {len(samples)}, {n_classes}]",
                    "remove or retrain that run",
                )
    return Predictions(store, split, runs, samples, skipped)


def analysis_dir(store: ExperimentStore) -> Path:
    """Where the analysis of ``store`` writes its files."""
    return store.root / "analysis"


_analysis_dir = analysis_dir


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """A binary file handle whose content appears at ``path`` atomically on success
    (temp file in the same folder, fsync, rename), streamed rather than built in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_table(df: pd.DataFrame, path_stem: Path) -> list[str]:
    """Write ``df`` as ``<stem>.parquet`` and ``<stem>.csv`` (atomically, streamed);
    return both paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = path_stem.with_name(path_stem.name + ".parquet")
    csv = path_stem.with_name(path_stem.name + ".csv")
    with _atomic_file(parquet) as fh:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), fh)
    with _atomic_file(csv) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        df.to_csv(text, index=False, chunksize=65536)
        text.flush()
        text.detach()
    return [str(parquet), str(csv)]


_write_table = write_table


@dataclass
class RankResult:
    """Per-sample metrics ranked, and how well each metric finds the affected samples."""

    experiment: str
    split: str
    n_runs: int
    by: str
    ranking: pd.DataFrame  # one row per sample, most suspicious first
    detection: pd.DataFrame | None  # one row per metric (None when nothing is affected)
    baselines: pd.DataFrame | None  # single-model baselines, min/median/max over runs
    files: list[str]
    skipped: list[str] = field(default_factory=list)  # warnings about runs left out
    dynamics: bool = False  # training-dynamics metrics included
    ranks: str = RANKS_MID  # convention of the detection's rank summaries

    @property
    def n_affected(self) -> int:
        """How many of the ranked samples the scenario marks affected."""
        return int(self.ranking["affected"].sum())

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        ranking = self.ranking if top is None else self.ranking.head(top)
        out = {
            "experiment": self.experiment,
            "split": self.split,
            "n_runs": self.n_runs,
            "by": self.by,
            "dynamics": self.dynamics,
            "ranking": json.loads(ranking.to_json(orient="records")),
            "detection": None
            if self.detection is None
            else json.loads(self.detection.to_json(orient="records")),
            "baselines": None
            if self.baselines is None
            else json.loads(self.baselines.to_json(orient="records")),
            "skipped": self.skipped,
            "files": self.files,
        }
        # a non-default convention is recorded (mlvar.analysis.conventions)
        return out | ({"ranks": self.ranks} if self.ranks != RANKS_MID else {})


def _check_by_available(by: str, preds: Predictions) -> None:
    if by in DYNAMICS_METRICS and not preds.has_dynamics:
        raise MlvarError(
            f"metric '{by}' needs training dynamics, which '{preds.store.name}' has not "
            f"recorded for every run on split '{preds.split}'",
            "training-dynamics metrics apply to the train split of runs that saved "
            f"per-epoch predictions ({DYNAMICS_FILE}); rank by another metric",
        )


@dataclass
class Computed:
    """Per-sample results of a scan over samples: what a ranking is assembled from."""

    metrics: pd.DataFrame  # metric columns, one row per sample
    votes: np.ndarray  # [n, C] runs predicting each class
    per_run: dict[str, np.ndarray]  # each "runs" statistic (the baselines' values): [R, n]

    @classmethod
    def collect(cls, parts: Iterator[tuple[int, int, Partial]], labels: np.ndarray) -> Computed:
        """Finalize chunk partials into preallocated per-sample arrays."""
        n = len(labels)
        columns: dict[str, np.ndarray] = {}
        votes = None
        per_run: dict[str, np.ndarray] = {}
        kept = [k for k, stat in STATISTICS.items() if stat.reduce == RUNS]
        for a, b, part in parts:
            df = finalize(part, labels[a:b])
            if votes is None:
                columns = {c: np.empty(n) for c in df.columns}
                votes = np.empty((n, part["votes"].shape[1]), dtype=np.int64)
                per_run = {k: np.empty((part.n_runs, n)) for k in kept}
            for c in df.columns:
                columns[c][a:b] = df[c].to_numpy()
            votes[a:b] = part["votes"]
            for k in kept:
                per_run[k][:, a:b] = part[k]
        if votes is None:
            raise MlvarError("no samples to analyse", "the split is empty")
        metrics = pd.DataFrame(columns, index=pd.RangeIndex(n), copy=False)
        return cls(metrics, votes, per_run)


def compute(
    preds: Predictions,
    runs: Sequence[RunRecord] | None = None,
    chunk: int | None = None,
    dynamics: bool | None = None,
) -> Computed:
    """Every metric of every sample of ``preds`` over ``runs`` (default: all), streamed."""
    return Computed.collect(preds.partials(runs, size=chunk, dynamics=dynamics), preds.labels)


def stored_ranks(store: ExperimentStore, split: str) -> str:
    """The rank convention of the stored detection results of ``split`` (from
    ``rank-<split>.json``; ``mid`` when it records none or there are none)."""
    info_file = analysis_dir(store) / f"rank-{split}.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return str(info.get("ranks", RANKS_MID))


def assemble(
    store: ExperimentStore,
    samples: pd.DataFrame,
    split: str,
    run_ids: list[str],
    by: str,
    computed: Computed,
    write: bool,
    skipped: list[str] | None = None,
    extra_meta: dict[str, Any] | None = None,
    ranks: str = RANKS_MID,
) -> RankResult:
    """Rank the samples by ``by``, score detection, and write ``analysis/rank-<split>.*``
    (plus ``detection-<split>.*``, ``baselines-<split>.*`` when samples are affected and
    ``rank-<split>.json`` describing the runs analysed). ``ranks``: the convention of
    the detection's rank summaries, recorded in ``rank-<split>.json`` when not ``mid``."""
    check_ranks(ranks)
    metrics = computed.metrics
    labels = samples["label"].to_numpy()
    class_names = store.class_names
    table = samples.copy()
    table.insert(2, "label_name", [class_names[i] for i in labels])
    majority = computed.votes.argmax(axis=1)
    table["majority_pred"] = majority
    table["majority_name"] = [class_names[i] for i in majority]
    table["votes"] = [" ".join(map(str, row)) for row in computed.votes.tolist()]
    table = pd.concat([table.reset_index(drop=True), metrics], axis=1)
    order = np.argsort(-ALL_METRICS[by].suspicion(metrics[by].to_numpy()), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))

    affected = samples["affected"].to_numpy()
    detection = baselines = None
    if affected.any() and not affected.all():
        detection = detect(metrics, labels, affected, ranks=ranks)
        # scored in place: the per-run arrays are not needed afterwards
        base = score_baselines(computed.per_run, in_place=True)
        baselines = detect_baselines(base, labels, affected, ranks=ranks)
    dynamics = any(m in metrics.columns for m in DYNAMICS_METRICS)
    files: list[str] = []
    if write:
        out = analysis_dir(store)
        files += write_table(table, out / f"rank-{split}")
        if detection is not None:
            files += write_table(detection, out / f"detection-{split}")
            files += write_table(baselines, out / f"baselines-{split}")
        info = {
            "experiment": store.name,
            "split": split,
            "n_runs": len(run_ids),
            "run_ids": run_ids,
            "by": by,
            "dynamics": dynamics,
            "n_samples": len(samples),
            "n_affected": int(affected.sum()),
        } | (extra_meta or {})
        if ranks != RANKS_MID:
            info["ranks"] = ranks
        atomic_write_json(out / f"rank-{split}.json", info)
        files.append(str(out / f"rank-{split}.json"))
    return RankResult(
        store.name,
        split,
        len(run_ids),
        by,
        table,
        detection,
        baselines,
        files,
        list(skipped or []),
        dynamics,
        ranks,
    )


def rank(
    store: ExperimentStore,
    split: str = "test",
    by: str = DEFAULT_RANK_BY,
    allow_mixed: bool = False,
    chunk: int | None = None,
    write: bool = True,
    ranks: str = RANKS_MID,
) -> RankResult:
    """Compute every metric for every sample of ``split``, rank, and score detection.

    On the train split of runs that all recorded per-epoch predictions the
    training-dynamics metrics are included. The ranking sorts samples by ``by``'s
    suspicion (higher = more suspicious first), ties in sample order. Results are written
    to ``<experiment>/analysis/`` as parquet and CSV (``rank-<split>``,
    ``detection-<split>``, ``baselines-<split>``) with ``rank-<split>.json``. ``ranks``:
    the convention of the detection's rank summaries (``"mid"`` or ``"study"``,
    :mod:`mlvar.analysis.conventions`).
    """
    check_by(by)
    check_ranks(ranks)
    preds = load_predictions(store, split, allow_mixed)
    _check_by_available(by, preds)
    computed = compute(preds, chunk=chunk)
    run_ids = [r.run_id for r in preds.runs]
    return assemble(
        store, preds.samples, split, run_ids, by, computed, write, preds.skipped, ranks=ranks
    )


@dataclass
class AccuracyResult:
    """Accuracy of every run on one split and its spread across seeds."""

    experiment: str
    split: str
    n_runs: int
    per_run: pd.DataFrame  # one row per run: run_id, seed, accuracy, per class, groups
    summary: dict[str, dict[str, float]]  # column -> mean/std/min/max/ci_low/ci_high/n
    expected_seed_std: float
    observed_seed_std: float
    class_names: list[str]
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "split": self.split,
            "n_runs": self.n_runs,
            "per_run": json.loads(self.per_run.to_json(orient="records")),
            "summary": self.summary,
            "expected_seed_std": self.expected_seed_std,
            "observed_seed_std": self.observed_seed_std,
            "class_names": self.class_names,
            "files": self.files,
        }


def accuracy(
    store: ExperimentStore,
    split: str = "test",
    allow_mixed: bool = False,
    chunk: int | None = None,
    write: bool = True,
) -> AccuracyResult:
    """Accuracy per run, per class and per affected group, with its spread over seeds."""
    preds = load_predictions(store, split, allow_mixed)
    pred_parts = []
    for _start, _stop, probs in preds.chunks(chunk):
        pred_parts.append(probs.argmax(axis=2))
    return accuracy_of(preds, np.concatenate(pred_parts, axis=1), write)


def accuracy_of(preds: Predictions, pred: np.ndarray, write: bool = True) -> AccuracyResult:
    """:func:`accuracy` from the predicted classes ``pred`` (``[R, n]``, argmax of each
    run's probabilities) of the runs of ``preds``, for a scan that computed them."""
    store, split = preds.store, preds.split
    n_classes = len(store.class_names)
    out = accuracy_summary(pred, preds.labels, preds.affected, n_classes)
    per_run = out["per_run"].reset_index(drop=True)
    per_run.insert(0, "run_id", [r.run_id for r in preds.runs])
    per_run.insert(1, "seed", [r.seed for r in preds.runs])
    summary = {k: {kk: _clean(vv) for kk, vv in v.items()} for k, v in out["summary"].items()}
    files = []
    if write:
        base = _analysis_dir(store)
        _write_table(per_run, base / f"accuracy-{split}")
        atomic_write_json(
            base / f"accuracy-{split}.json",
            {
                "summary": summary,
                "expected_seed_std": _clean(out["expected_seed_std"]),
                "observed_seed_std": _clean(out["observed_seed_std"]),
            },
        )
        files = [str(base / f"accuracy-{split}.{e}") for e in ("parquet", "csv", "json")]
    return AccuracyResult(
        store.name,
        split,
        len(preds.runs),
        per_run,
        summary,
        _clean(out["expected_seed_std"]),
        _clean(out["observed_seed_std"]),
        store.class_names,
        files,
    )


def _clean(value: Any) -> Any:
    """NaN becomes None so that JSON output stays valid."""
    if isinstance(value, float | np.floating) and np.isnan(value):
        return None
    if isinstance(value, np.floating | np.integer):
        return value.item()
    return value
