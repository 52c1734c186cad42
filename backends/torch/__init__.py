"""PyTorch backend: transformers' models with the project's MoE blocks; CPU and CUDA."""

from .moe import MOE_IMPLS
from .loaded import TorchModel, load

__all__ = ["MOE_IMPLS", "TorchModel", "load"]
