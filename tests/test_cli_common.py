"""The CLI's shared helpers (mlvar.cli.common)."""

from __future__ import annotations

import warnings

import pytest

from mlvar.cli import common


def test_warnings_are_printed_once_and_other_categories_replayed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A DeprecationWarning used to be replayed inside the recording context, which
    # appended it to the list being read: the command never ended.
    with (
        pytest.warns(DeprecationWarning, match="old pandas keyword") as replayed,
        common.warnings_to_stderr(),
    ):
        warnings.warn("run-0003 skipped: sha256 mismatch", UserWarning, stacklevel=1)
        warnings.warn("run-0003 skipped: sha256 mismatch", UserWarning, stacklevel=1)
        warnings.warn("old pandas keyword", DeprecationWarning, stacklevel=1)
    assert [w.category for w in replayed] == [DeprecationWarning]  # replayed once
    assert capsys.readouterr().err.count("Warning: run-0003 skipped: sha256 mismatch") == 1


def test_warnings_are_printed_when_the_command_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), common.warnings_to_stderr():
        warnings.warn("partial result", UserWarning, stacklevel=1)
        raise RuntimeError("boom")
    assert "Warning: partial result" in capsys.readouterr().err
