"""The backend registry: which backends there are, which one ``auto`` picks, and loading through one.

A backend turns a model folder into a loaded model implementing ``moe_local.loaded.LoadedModel`` and
``TuningOps``; each is a package here (``torch``, ``mlx``) with a ``load(folder, moe_impl, dtype,
device)``. Importing this module imports neither torch nor mlx; a backend's package is imported when
it is asked for. The rest of the package reaches a backend only through this module.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

from ..checkpoint import resolve_model
from ..errors import UserError

BACKENDS = ("torch", "mlx")


def on_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def auto_backend() -> str:
    """MLX on Apple silicon (when installed), torch everywhere else."""
    if on_apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "torch"


def resolve_backend(backend: str) -> str:
    if backend in (None, "auto"):
        return auto_backend()
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (choose auto, {', '.join(BACKENDS)})")
    return backend


def backend_module(name: str):
    """The backend's package; a missing engine is a user error naming the extra to install."""
    engine = {"torch": "torch", "mlx": "mlx"}[name]
    if importlib.util.find_spec(engine) is None:
        raise UserError(f"the {name} backend needs {engine}: pip install 'moe-local[{name}]'")
    return importlib.import_module(f"{__name__}.{name}")


def load_model(model, backend="auto", moe_impl=None, dtype=None, device=None):
    """A model folder (or a built-in name) loaded on a backend."""
    folder = resolve_model(model)
    return backend_module(resolve_backend(backend)).load(folder, moe_impl=moe_impl, dtype=dtype, device=device)


__all__ = ["BACKENDS", "auto_backend", "backend_module", "load_model", "on_apple_silicon", "resolve_backend"]
