"""The loaded PyTorch model: ``moe_local.loaded``'s interfaces over a transformers causal LM with the
project's MoE blocks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from moe_local.checkpoint import check_router_weights
from moe_local.errors import UserError
from moe_local.families import config_for_writing, family, load_spec
from moe_local.loaded import LoadedModel, TuningOps

from ..shared import checked_batch
from . import fused
from .generation import TorchGeneration
from .model import DTYPES, carried_tensors, checkpoint_tensors, load_causal_lm, positions_from_mask
from .moe import MOE_IMPLS, execution
from .tuning import TorchTuning


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> torch.device:
    """The torch device, or a one-line error when it is unknown or not there."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown torch device '{device}'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this torch sees no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def default_impl(device: str) -> str:
    """Triton's fused op on CUDA when Triton is installed, the grouped path elsewhere."""
    return "triton" if str(device).startswith("cuda") and importlib.util.find_spec("triton") else "grouped"


def describe_execution(spec) -> str:
    """How ``spec``'s MoE layers would run with the defaults here (``moe-local info``)."""
    device = default_device()
    return execution(spec, default_impl(device), device)


def load(folder: Path, moe_impl=None, dtype=None, device=None) -> TorchModel:
    spec = load_spec(folder)
    device = device or default_device()
    check_device(device)
    has_triton = importlib.util.find_spec("triton") is not None
    if moe_impl is None:
        moe_impl = default_impl(device)
    if moe_impl not in MOE_IMPLS:
        raise UserError(f"moe_impl '{moe_impl}' is not one of the torch backend's: {', '.join(MOE_IMPLS)}")
    if moe_impl == "triton" and not has_triton:
        raise UserError("moe_impl 'triton' needs Triton: pip install triton (Linux)")
    dtype_name = dtype or spec.dtype
    if dtype_name not in DTYPES:
        raise UserError(f"dtype '{dtype_name}' is not supported (choose {', '.join(DTYPES)})")
    model = load_causal_lm(folder, spec, moe_impl, DTYPES[dtype_name], device)
    return TorchModel(model, spec, Path(folder), moe_impl, device)


class TorchModel(TorchGeneration, TorchTuning, LoadedModel, TuningOps):
    backend = "torch"

    def __init__(self, model, spec, folder: Path, moe_impl: str, device: str):
        self.model = model
        self.spec = spec
        self.folder = folder
        self.moe_impl = moe_impl
        self.device = torch.device(device)

    @property
    def execution(self) -> str:
        return execution(self.spec, self.moe_impl, self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    def moe_block(self, layer: int):
        return getattr(self.model.model.layers[layer], family(self.spec.family).torch.block)

    def as_batch(self, ids, attention_mask=None):
        ids, mask = checked_batch(ids, attention_mask, self.spec.vocab_size)
        ids = torch.as_tensor(ids, device=self.device)
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, device=self.device)
        return ids, mask

    @torch.no_grad()
    def logits(self, ids, attention_mask=None) -> np.ndarray:
        ids, mask = self.as_batch(ids, attention_mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
        return out.logits.float().cpu().numpy()

    def save(self, out: Path) -> Path:
        """Write the model (with its current gates) as an ordinary Hugging Face folder, both config spellings;
        MXFP4 experts as the folder stored them (its ``quantization_config`` kept)."""
        from moe_local.checkpoint import write_model

        dtype = str(self.dtype).replace("torch.", "")
        tensors = {**carried_tensors(self.folder, self.spec), **checkpoint_tensors(self.model, self.spec)}
        # MXFP4 experts (gpt-oss's release) go back as they were read, not dequantized: never tuned.
        mxfp4 = fused.mxfp4_tensors(self.folder, self.spec.names)
        tensors = {k: v for k, v in tensors.items() if f"{k}_blocks" not in mxfp4}
        return write_model(out, config_for_writing(self.spec, dtype), {**tensors, **mxfp4}, tokenizer_src=self.folder)

    def get_router_weights(self, layers=None) -> dict:
        """The routers' tuned tensors (weights, and biases where the rule has them), float32 copies."""
        layers = self.spec.moe_layers if layers is None else layers
        out = {}
        for i in layers:
            names = self.spec.router_tensors(i)  # a one-line error for a layer that is not MoE
            gate = self.moe_block(i).gate
            for name in names:
                tensor = gate.bias if name.endswith(".bias") else gate.weight
                out[name] = tensor.detach().float().cpu().numpy().copy()  # never aliases the parameter
        return out

    @torch.no_grad()
    def set_router_weights(self, weights: dict) -> None:
        for layer, parts in check_router_weights(self.spec, weights).items():
            gate = self.moe_block(layer).gate
            for part, array in parts.items():
                target = getattr(gate, part)
                target.copy_(torch.as_tensor(np.asarray(array, dtype=np.float32)).to(target.device, target.dtype))
