"""Backends of ``mlvar submit``: ``local``, ``ray`` and ``aml`` (see docs/clusters.md).

Every backend takes the same input (a list of packs of run specs, see
:mod:`mlvar.backends.spec`), runs :mod:`mlvar.backends.worker` somewhere, and lands the
finished runs in the run store through :func:`mlvar.backends.transfer.import_runs`.
``mlvar submit analyze`` gives them analysis shards instead (one spec per shard, see
:mod:`mlvar.backends.shard_jobs`), and ``mlvar submit saliency`` saliency shards (one
spec per block of runs, see :mod:`mlvar.backends.saliency_jobs`), both landed through
:func:`mlvar.backends.shard_jobs.land_shard`.
"""
