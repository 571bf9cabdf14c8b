"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# The real ProPublica file lives in the shared folder beside the repository (DESIGN 4).
_SHARED_COMPAS = Path(__file__).resolve().parents[2] / "shared/data/compas-scores-two-years.csv"


@pytest.fixture(scope="session")
def compas_csv() -> Path:
    """Path of the real COMPAS CSV (shared copy, else ``$MLVAR_COMPAS_CSV``)."""
    if _SHARED_COMPAS.is_file():
        return _SHARED_COMPAS
    env = os.environ.get("MLVAR_COMPAS_CSV")
    if env and Path(env).is_file():
        return Path(env)
    raise FileNotFoundError(
        f"COMPAS CSV not found at {_SHARED_COMPAS}; set MLVAR_COMPAS_CSV to its path"
    )


@pytest.fixture
def compas_root(tmp_path: Path, compas_csv: Path) -> Path:
    """A fresh data root whose ``raw/`` holds a copy of the COMPAS CSV."""
    root = tmp_path / "data"
    (root / "raw").mkdir(parents=True)
    shutil.copyfile(compas_csv, root / "raw" / "compas-scores-two-years.csv")
    return root


@pytest.fixture(scope="session")
def tree_listing() -> Callable[[Path], list[tuple[str, int]]]:
    """Return a function listing every file and folder under a path (with sizes).

    Compare its result before and after a failing call to show nothing was written.
    """

    def listing(root: Path) -> list[tuple[str, int]]:
        root = Path(root)
        if not root.exists():
            return []
        return sorted(
            (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
            for p in root.rglob("*")
        )

    return listing


#: Environment variables that change what ``load_config`` returns.
MLVAR_CONFIG_VARS = ("MLVAR_CONFIG", "MLVAR_DATA_ROOT", "MLVAR_RUNS_ROOT", "MLVAR_REPORTS_ROOT")


@pytest.fixture
def no_mlvar_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Remove every ``MLVAR_*`` config variable and make ``tmp_path`` the current directory
    (so no stray ``./mlvar.toml`` is read); return ``tmp_path``."""
    for var in MLVAR_CONFIG_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path
