"""Backends of ``mlvar submit``: ``local``, ``ray``, ``aml`` and ``slurm`` (docs/clusters.md).

Two extension points, each a registry:

- a *backend* (:class:`mlvar.backends.backend.Backend`, one class per module:
  :mod:`~mlvar.backends.local`, :mod:`~mlvar.backends.ray_backend`,
  :mod:`~mlvar.backends.aml`, :mod:`~mlvar.backends.slurm`; registered in
  :mod:`mlvar.backends.registry`) runs or submits a batch of jobs, follows and downloads
  them;
- a *job kind* (:class:`mlvar.backends.kind.JobKind`: training packs
  :mod:`~mlvar.backends.train_jobs`, analysis shards :mod:`~mlvar.backends.shard_jobs`,
  saliency shards :mod:`~mlvar.backends.saliency_jobs`; registered in
  :mod:`mlvar.backends.kinds`) says what a job reads, how the worker runs it, how its
  output lands (complete, sha256-verified, atomic) and whether it is done.

Every kind runs on every backend; every attempt of every job ends in
:func:`mlvar.backends.backend.finish_attempt`. :mod:`mlvar.backends.service` is what the
CLI calls; :mod:`mlvar.backends.spec` holds the submission record,
:mod:`mlvar.backends.transfer` the landing of runs, :mod:`mlvar.backends.faults` the
tests' fault injection.
"""
