"""moe-local: tune the routers of Mixture-of-Experts models on your own tasks, on your own machine.

Importing the package never imports torch or mlx; they load with the backend that needs them.
"""

from .errors import UserError

__version__ = "0.1.0"


def load(model="tiny", backend="auto", adapter_path=None, moe_impl=None, dtype=None, device=None):
    """Load a model folder (or a built-in name) on a backend; see DESIGN §9 for the interface."""
    from .backends import load_model

    return load_model(model, backend=backend, adapter_path=adapter_path, moe_impl=moe_impl,
                      dtype=dtype, device=device)


__all__ = ["load", "UserError", "__version__"]
