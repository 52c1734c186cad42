"""MLX backend: mlx-lm's models with the project's MoE blocks; Apple silicon, and MLX's CPU build on Linux."""

try:
    import mlx_lm  # noqa: F401
except ImportError:  # mlx without mlx-lm: say what to install instead of a traceback
    from moe_local.errors import UserError

    raise UserError("the mlx backend needs mlx-lm: pip install 'moe-local[mlx]'") from None

from .loaded import MLXModel, describe_execution, load
from .moe import MOE_IMPLS

__all__ = ["MOE_IMPLS", "MLXModel", "describe_execution", "load"]
