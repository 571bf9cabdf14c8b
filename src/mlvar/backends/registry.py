"""The registry of backends: ``--backend NAME`` picks a class from :data:`BACKENDS`.

A new backend is a :class:`mlvar.backends.backend.Backend` subclass in a module of its
own, its ``[backend.<name>]`` table in :mod:`mlvar.config`, and one entry here; the CLI's
``--backend`` help and the unknown-backend error are built from this table.

Importing it loads neither pandas nor the analysis: the backend modules import the job
kinds (:mod:`mlvar.backends.kinds`, which import the analysis) inside the methods that
run or land jobs, so the CLI's help lists the backends cheaply.
"""

from __future__ import annotations

from mlvar.backends.aml import AmlBackend
from mlvar.backends.backend import Backend
from mlvar.backends.local import LocalBackend
from mlvar.backends.ray_backend import RayBackend
from mlvar.backends.slurm import SlurmBackend
from mlvar.config import Config
from mlvar.errors import unknown_choice

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (LocalBackend, RayBackend, AmlBackend, SlurmBackend)
}


def backend_class(name: str) -> type[Backend]:
    """The backend called ``name``; raises :class:`MlvarError` naming the valid ones."""
    if name not in BACKENDS:
        raise unknown_choice("backend", name, BACKENDS)
    return BACKENDS[name]


def get_backend(name: str, config: Config) -> Backend:
    return backend_class(name)(config)


def backends_help() -> str:
    """One line listing the backends, for ``--backend``'s help."""
    names = [cls.summary or name for name, cls in BACKENDS.items()]
    return ", ".join(names[:-1]) + " or " + names[-1] + "."
