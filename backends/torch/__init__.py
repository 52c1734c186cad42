"""PyTorch backend: transformers' models with the project's MoE blocks; CPU and CUDA (Triton)."""

from . import distributed
from .loaded import TorchModel, describe_execution, load
from .moe import MOE_IMPLS

__all__ = ["MOE_IMPLS", "TorchModel", "describe_execution", "distributed", "load"]
