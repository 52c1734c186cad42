"""PyTorch backend: transformers' models with the project's MoE blocks; CPU and CUDA (Triton)."""

from . import distributed
from .loaded import TorchModel, load
from .moe import MOE_IMPLS

__all__ = ["MOE_IMPLS", "TorchModel", "distributed", "load"]
