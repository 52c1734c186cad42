"""Named router adapters, swapped in for one request at a time.

``--adapter NAME=PATH`` options are parsed and every folder read before the model loads (a bad one is
a one-line error before anything slow: a NaN or infinite value too), then checked against the loaded model
(its fingerprint, and tensors exactly the router tensors of the layers the adapter lists). A router
adapter is a few gate tensors, so the server keeps them all in memory and swaps per request:
``applied(name)`` installs the adapter's gates with ``set_router_weights`` and, however the request
ends (finished, failed, the client gone), puts the base gates back.

The base gates are read once and installed back once at start-up, so that the model every base
request sees is exactly the one a restore leaves (a backend may store installed gates in another
form, e.g. float32 instead of a quantized or bfloat16 gate on MLX: base requests never depend on
whether an adapter ran before them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..tuning.adapter import check_adapter, read_adapter


@dataclass(frozen=True)
class AdapterFolder:
    """One named adapter as read from disk: its gates (float32 numpy by checkpoint name) and config."""

    name: str
    path: Path
    weights: dict
    config: dict


def parse_adapter_options(values, base_name: str) -> dict[str, Path]:
    """``["NAME=PATH", ...]`` to ``{name: path}``; malformed, duplicate or base-shadowing names are refused."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"--adapter takes NAME=PATH (a name for clients, an adapter folder), got '{value}'")
        if name in out:
            raise UserError(f"--adapter name '{name}' is given twice")
        if name == base_name:
            raise UserError(f"--adapter name '{name}' is the base model's name; choose another")
        out[name] = Path(path)
    return out


def read_adapters(paths: dict[str, Path]) -> list[AdapterFolder]:
    """Every adapter folder read and checked for shape (before the model loads)."""
    folders = []
    for name, path in paths.items():
        weights, config = read_adapter(path)
        folders.append(AdapterFolder(name, path, weights, config))
    return folders


class RouterAdapters:
    """The served model's adapters by name, and the swap of their gates around one request."""

    def __init__(self, model, folders: list[AdapterFolder]):
        for folder in folders:  # made for this model, exactly its listed layers' router tensors
            check_adapter(folder.weights, folder.config, model.spec, folder.path)
        self.model = model
        self.weights = {folder.name: folder.weights for folder in folders}
        layers = sorted({i for folder in folders for i in folder.config["moe_local"]["layers"]})
        self.base = model.get_router_weights(layers) if layers else {}
        if self.base:
            model.set_router_weights(self.base)  # the form a restore leaves them in (see the module docstring)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.weights)

    @contextlib.contextmanager
    def applied(self, name: str | None):
        """The adapter ``name``'s gates on the model for the duration (None: the base, nothing to swap)."""
        if name is None:
            yield
            return
        weights = self.weights[name]
        try:
            self.model.set_router_weights(weights)
            yield
        finally:
            self.model.set_router_weights({key: self.base[key] for key in weights})
