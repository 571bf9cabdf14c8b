"""Users' own networks: ``--model package.module:factory`` (docs/training.md, "Your own model").

The factory is any callable ``factory(input_shape: tuple[int, ...], n_classes: int) ->
torch.nn.Module``; ``input_shape`` is ``(C, H, W)`` for images and ``(F,)`` for tables, and
the module maps a float32 batch ``[B, *input_shape]`` to logits ``[B, n_classes]``. The
module that defines it must be importable (installed, on ``PYTHONPATH``, or in the current
directory, which mlvar adds to ``sys.path``).

What a run records of it (:func:`describe`): the import path, and the sha256 of the bytes
of the factory's module file (``inspect.getsourcefile`` of the module): editing that file
makes another experiment, refused under the old name like any other change of identity.
Code the factory imports from other modules is not hashed.

Weights (:func:`build`): the factory is called with torch's default CPU generator seeded
from the run's ``init`` generator, inside ``torch.random.fork_rng`` (the generator's state
is restored afterwards), so the factory's own initialisation, whatever it is, follows the
run's init seed and nothing else. Randomness in the forward pass (dropout) draws from torch's
global generators, which mlvar does not seed for a custom model: keep the forward pass
deterministic, or its runs are not reproducible bit for bit.

Nothing here imports other ``mlvar.train`` modules: :mod:`mlvar.train.models` builds custom
networks through it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlvar.errors import MlvarError, closest
from mlvar.recipes import CUSTOM_SEPARATOR

#: How :func:`describe` hashes the factory's source (recorded beside the hash).
HASH_OF = "sha256 of the bytes of the factory's module file"
_HINT_IMPORT = (
    "make the module importable: install it, add its folder to PYTHONPATH, or run mlvar "
    "from its folder"
)
_HINT_SHAPE = (
    "the factory is called as factory(input_shape, n_classes), input_shape (C, H, W) for "
    "images and (F,) for tables, and must return an nn.Module mapping [B, *input_shape] "
    "to [B, n_classes]"
)


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def split_path(model: str) -> tuple[str, str]:
    """``("package.module", "factory")`` of ``package.module:factory``.

    Raises
    ------
    MlvarError
        Not of that form.
    """
    module, _, attr = str(model).partition(CUSTOM_SEPARATOR)
    if not module.strip() or not attr.strip() or CUSTOM_SEPARATOR in attr:
        raise MlvarError(
            f"--model '{model}' is not package.module:factory",
            "e.g. --model mymodels:small_cnn (a function of mymodels.py)",
        )
    return module.strip(), attr.strip()


def load_factory(model: str) -> tuple[Any, Any]:
    """The factory's module and the factory (a callable).

    Raises
    ------
    MlvarError
        The module does not import (missing, or failing: the error named) or has no such
        attribute, or the attribute is not callable.
    """
    module_name, attr = split_path(model)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # as `python -m` would: a module beside the user is found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise MlvarError(
                f"--model {model}: no module named '{module_name}'", _HINT_IMPORT
            ) from None
        raise MlvarError(
            f"--model {model}: importing module '{module_name}' failed: {_first_line(exc)}",
            "install what the module imports",
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything
        raise MlvarError(
            f"--model {model}: importing module '{module_name}' failed: {_first_line(exc)}",
            "fix the module (python -c 'import " + module_name + "' shows the traceback)",
        ) from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            near = closest(attr, names)
            raise MlvarError(
                f"--model {model}: module '{module_name}' has no attribute '{attr}'",
                f"did you mean '{module_name}:{near}'?" if near else "name a function of it",
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise MlvarError(
            f"--model {model}: '{attr}' is a {type(factory).__name__}, not a callable",
            "name a function factory(input_shape, n_classes) returning an nn.Module",
        )
    return module, factory


def source_sha256(module: Any) -> str:
    """sha256 of the bytes of ``module``'s source file (:data:`HASH_OF`)."""
    path = inspect.getsourcefile(module) or getattr(module, "__file__", None)
    if not path or not Path(path).is_file():
        raise MlvarError(
            f"module '{module.__name__}' has no source file to hash",
            "define the factory in a .py file",
        )
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def describe(model: str, input_kind: str) -> dict[str, Any]:
    """What runs record of the custom model ``model``: ``factory`` (the import path),
    ``source_sha256`` (:data:`HASH_OF`), ``hash_of`` and ``input_kind``."""
    module, _ = load_factory(model)
    return {
        "factory": model,
        "source_sha256": source_sha256(module),
        "hash_of": HASH_OF,
        "input_kind": input_kind,
    }


def init_seed(gen: torch.Generator) -> int:
    """The seed :func:`build` gives torch's generator, drawn from the run's init ``gen``."""
    return int(torch.randint(0, 2**62, (1,), generator=gen).item())


def build(model: str, input_shape: tuple[int, ...], n_classes: int, seed: int) -> nn.Module:
    """The network of the factory ``model``, its initialisation drawn with torch's
    default CPU generator seeded with ``seed`` (the generator's state restored after).

    Raises
    ------
    MlvarError
        The factory does not load, raises, or returns something that is not an nn.Module.
    """
    _, factory = load_factory(model)
    shape = tuple(int(n) for n in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        try:
            net = factory(shape, int(n_classes))
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
            raise MlvarError(
                f"--model {model}: factory{(shape, int(n_classes))} failed: {_first_line(exc)}",
                _HINT_SHAPE,
            ) from None
    if not isinstance(net, nn.Module):
        raise MlvarError(
            f"--model {model} returned a {type(net).__name__}, not a torch.nn.Module",
            "return the network (an nn.Module instance) from the factory",
        )
    return net


def check(model: str, input_shape: tuple[int, ...], n_classes: int, input_kind: str) -> dict:
    """Load, build and run the factory ``model`` once on a zero batch of two inputs of
    ``input_shape`` (eval mode, no gradients); return :func:`describe`'s record.

    Raises
    ------
    MlvarError
        It does not load or build (:func:`build`), the forward pass fails (the error
        named), or its output is not ``[2, n_classes]``.
    """
    net = build(model, input_shape, n_classes, 0)
    batch = (2, *(int(n) for n in input_shape))
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(batch))
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise MlvarError(
            f"--model {model} fails on a batch of shape {batch}: {_first_line(exc)}",
            _HINT_SHAPE,
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, int(n_classes)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MlvarError(
            f"--model {model} outputs {got} for a batch of shape {batch}, expected "
            f"(2, {n_classes})",
            "end the network with one logit per class",
        )
    return describe(model, input_kind)
