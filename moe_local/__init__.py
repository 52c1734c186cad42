"""moe-local: tune the routers of Mixture-of-Experts models on your own tasks, on your own machine.

Importing the package never imports torch or mlx; they load with the backend that needs them.
"""

from .errors import UserError

__version__ = "0.1.0"


def load(model="tiny", backend="auto", adapter_path=None, moe_impl=None, dtype=None, device=None):
    """Load a model folder (or a built-in name) on a backend, with a router adapter applied if given.

    Returns a ``moe_local.loaded.LoadedModel``; docs/architecture.md has the interface.
    """
    from .backends import load_model

    loaded = load_model(model, backend=backend, moe_impl=moe_impl, dtype=dtype, device=device)
    if adapter_path is not None:
        from .tuning.adapter import apply_adapter

        apply_adapter(loaded, adapter_path)
    return loaded


__all__ = ["load", "UserError", "__version__"]
