"""Golden-file comparison for generated job files (Azure ML YAML, Slurm sbatch scripts).

A missing golden file is written and the test skipped ("rerun to compare"): to accept an
intended change, delete the file(s) and run the tests once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"


def compare(folder: str, name: str, text: str) -> None:
    """Assert ``text`` equals ``tests/golden/<folder>/<name>`` (written when missing)."""
    golden = GOLDEN / folder / name
    if not golden.is_file():
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        pytest.skip(f"wrote the missing golden file {golden}; rerun to compare")
    assert text == golden.read_text(), f"{name} differs from {golden} (delete it to accept)"
