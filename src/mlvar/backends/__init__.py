"""Backends of ``mlvar submit``: ``local``, ``ray`` and ``aml`` (see docs/clusters.md).

Every backend takes the same input (a list of packs of run specs, see
:mod:`mlvar.backends.spec`), runs :mod:`mlvar.backends.worker` somewhere, and lands the
finished runs in the run store through :func:`mlvar.backends.transfer.import_runs`.
"""
