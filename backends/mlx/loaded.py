"""The loaded MLX model: ``moe_local.loaded``'s interface over an mlx-lm model with the project's MoE blocks.

Left padding: each row's real tokens must get the logits they get alone, so they need positions
0, 1, ... from their first real token (the torch backend derives the same position ids from the
mask) and must not attend to padding. mlx-lm's attention takes its RoPE offset and its mask from
the KV cache, and mlx-lm's own batched generation handles left padding with ``BatchKVCache``:
per-row offsets ``-padding`` (so the first real token sits at position 0) and a causal mask that
hides each row's padding. ``logits`` runs the model with such caches whenever a row is padded,
i.e. through mlx-lm's own mechanism instead of a patched attention. Padding positions themselves
get garbage (finite) logits, as on the torch backend.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, RotatingKVCache, make_prompt_cache

from moe_local.checkpoint import check_router_weights
from moe_local.errors import UserError
from moe_local.families import family, load_spec
from moe_local.loaded import LoadedModel, TuningOps

from ..shared import checked_batch
from .generation import MLXGeneration
from .model import DTYPES, load_mlx_model
from .moe import MOE_IMPLS, execution
from .tuning import MLXTuning

DEVICES = ("cpu", "gpu")


def default_device() -> str:
    return "gpu" if mx.metal.is_available() else "cpu"


def describe_execution(spec) -> str:
    """How ``spec``'s MoE layers would run with the defaults here (``moe-local info``)."""
    return execution(spec, "grouped", default_device())


def load(folder: Path, moe_impl=None, dtype=None, device=None) -> MLXModel:
    """Load a folder (float or mlx-lm-quantized). ``device`` ('cpu' or 'gpu', default: the GPU where
    Metal is available) becomes MLX's default device, as MLX programs select devices."""
    spec = load_spec(folder)
    device = device or default_device()
    if device not in DEVICES:
        raise UserError(f"unknown MLX device '{device}' (choose {', '.join(DEVICES)})")
    if device == "gpu" and not mx.metal.is_available():
        raise UserError("MLX has no GPU here (Metal is only on Apple silicon); use device 'cpu'")
    moe_impl = moe_impl or "grouped"
    if moe_impl not in MOE_IMPLS:
        raise UserError(f"moe_impl '{moe_impl}' is not one of the mlx backend's: {', '.join(MOE_IMPLS)}")
    # MLX's CPU gather_mm runs float32 only, so a CPU model is float32 whatever the checkpoint.
    dtype_name = dtype or (spec.dtype if device == "gpu" else "float32")
    if dtype_name not in DTYPES:
        raise UserError(f"dtype '{dtype_name}' is not supported (choose {', '.join(DTYPES)})")
    if device == "cpu" and dtype_name != "float32":
        raise UserError(f"MLX on the CPU runs float32 only (its gather_mm); dtype '{dtype_name}' needs a Mac GPU")
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    model = load_mlx_model(folder, spec, moe_impl, DTYPES[dtype_name])
    return MLXModel(model, spec, Path(folder), moe_impl, device)


class MLXModel(MLXGeneration, MLXTuning, LoadedModel, TuningOps):
    backend = "mlx"

    def __init__(self, model, spec, folder: Path, moe_impl: str, device: str):
        self.model = model
        self.spec = spec
        self.folder = folder
        self.moe_impl = moe_impl
        self.device = device

    @property
    def execution(self) -> str:
        return execution(self.spec, self.moe_impl, self.device)

    @property
    def dtype(self):
        return self.model.model.norm.weight.dtype

    def moe_block(self, layer: int):
        return getattr(self.model.model.layers[layer], family(self.spec.family).mlx.block)

    def as_batch(self, ids, attention_mask=None):
        """(ids [B, L] int32 mx array, BatchKVCache list or None) after checking ids and mask."""
        ids, mask = checked_batch(ids, attention_mask, self.spec.vocab_size)
        caches = None
        if mask is not None:
            padding = (mask == 0).sum(axis=-1)
            if padding.any():
                caches = self.batch_caches(padding.tolist())
        return mx.array(ids.astype(np.int32)), caches

    def batch_caches(self, padding: list[int]) -> list:
        """One mlx-lm batch cache per layer, of the kind its own cache is (``BatchRotatingKVCache`` for a
        sliding-window layer, ``BatchKVCache`` otherwise): per-row RoPE offsets and masks for left padding."""
        return [
            BatchRotatingKVCache(c.max_size, padding) if isinstance(c, RotatingKVCache) else BatchKVCache(padding)
            for c in make_prompt_cache(self.model)
        ]

    def logits(self, ids, attention_mask=None) -> np.ndarray:
        ids, caches = self.as_batch(ids, attention_mask)
        out = self.model(ids, cache=caches)
        return np.array(out.astype(mx.float32))

    def save(self, out: Path) -> Path:
        """Write the model with its current gates: a Hugging Face folder (float models) or mlx-lm's
        quantized format with float gates (quantized models); see save.py."""
        from .save import save_model

        return save_model(self, Path(out))

    def get_router_weights(self, layers=None) -> dict:
        """The routers' tuned tensors (weights, and biases where the rule has them), float32."""
        layers = self.spec.moe_layers if layers is None else layers
        out = {}
        for i in layers:
            names = self.spec.router_tensors(i)  # a one-line error for a layer that is not MoE
            gate = self.moe_block(i).gate
            for name in names:
                value = gate.bias if name.endswith(".bias") else float_gate(gate)
                out[name] = np.array(value.astype(mx.float32))
        return out

    def set_router_weights(self, weights: dict) -> None:
        """Install float32 gates; a quantized gate is replaced by a float ``nn.Linear`` (its bias kept).

        float32 whatever the model dtype, as mlx-lm's ``--adapter-path`` leaves an adapter's gates.
        """
        for layer, parts in check_router_weights(self.spec, weights).items():
            block = self.moe_block(layer)
            if isinstance(block.gate, nn.QuantizedLinear):
                old = block.gate
                block.gate = nn.Linear(self.spec.hidden_size, block.spec.num_experts, bias=block.spec.router.bias)
                block.gate.weight = float_gate(old)
                if block.spec.router.bias:
                    block.gate.bias = old.bias
            for part, array in parts.items():
                setattr(block.gate, part, mx.array(np.asarray(array, dtype=np.float32)))
        mx.eval([self.moe_block(i).gate.parameters() for i in self.spec.moe_layers])


def float_gate(gate) -> mx.array:
    """The gate's weight as a float array, dequantized when the gate is quantized."""
    if isinstance(gate, nn.QuantizedLinear):
        return mx.dequantize(
            gate.weight, gate.scales, gate.get("biases"), group_size=gate.group_size, bits=gate.bits, mode=gate.mode
        )
    return gate.weight
