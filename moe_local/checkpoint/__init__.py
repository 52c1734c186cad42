"""Hugging Face model folders: reading them (folder.py), the names of MoE tensors in them (names.py),
writing them (write.py). Nothing here knows a model family or imports torch or mlx."""

from .folder import (
    ASSETS,
    BUILTIN_MODELS,
    INDEX_FILE,
    TOKENIZER_FILES,
    carried_tensor_names,
    check_model_files,
    has_weights,
    is_quantized,
    load_tokenizer,
    read_config,
    read_header,
    resolve_model,
    safetensors_files,
    tensor_index,
    weight_bytes,
)
from .names import TensorNames, check_router_weights
from .write import SHARD_BYTES, copy_tokenizer_files, write_model, write_weights

__all__ = [
    "ASSETS",
    "BUILTIN_MODELS",
    "INDEX_FILE",
    "SHARD_BYTES",
    "TOKENIZER_FILES",
    "TensorNames",
    "carried_tensor_names",
    "check_model_files",
    "check_router_weights",
    "copy_tokenizer_files",
    "has_weights",
    "is_quantized",
    "load_tokenizer",
    "read_config",
    "read_header",
    "resolve_model",
    "safetensors_files",
    "tensor_index",
    "weight_bytes",
    "write_model",
    "write_weights",
]
