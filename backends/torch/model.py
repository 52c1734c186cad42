"""Build transformers' causal-LM classes with the project's MoE blocks and load a checkpoint into them.

Attention, norms, RoPE, caches and generation are transformers' own (``Qwen3MoeForCausalLM``,
``OlmoeForCausalLM``); every MoE layer's ``mlp`` is replaced by :class:`MoEBlock`. GroveMoE is
``GroveMoeForCausalLM``: transformers' Qwen3-MoE classes with Grove blocks, loaded from
GroveMoE-format weights without ``trust_remote_code``.

The model is built on the meta device and the checkpoint tensors are assigned into it, so no
memory is spent on a random initialisation that would be thrown away.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_local.checkpoint import UNUSED_TENSORS, carried_tensor_names, is_quantized, tensor_index
from moe_local.errors import UserError
from moe_local.spec import ModelSpec, config_for_writing

from .moe import MoEBlock

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.(?:experts|chunk_experts))\.(\d+)\.(gate|up|down)_proj\.weight$")



class GroveMoeForCausalLM(Qwen3MoeForCausalLM):
    """GroveMoE: transformers' Qwen3-MoE model whose MoE blocks run Grove's adjugate experts."""


def hf_config(spec: ModelSpec, attn_implementation: str = "sdpa"):
    """The transformers config object for a spec (Grove uses Qwen3-MoE's)."""
    values = config_for_writing(spec)
    values.pop("architectures", None)
    values.pop("auto_map", None)
    values["model_type"] = "olmoe" if spec.family == "olmoe" else "qwen3_moe"
    cls = OlmoeConfig if spec.family == "olmoe" else Qwen3MoeConfig
    values["attn_implementation"] = attn_implementation
    return cls(**values)


def build(spec: ModelSpec, impl: str):
    """The causal LM on the meta device, MoE layers replaced by the project's blocks."""
    config = hf_config(spec)
    cls = {"qwen3_moe": Qwen3MoeForCausalLM, "olmoe": OlmoeForCausalLM, "grove_moe": GroveMoeForCausalLM}[spec.family]
    with torch.device("meta"):
        model = cls(config)
        for moe in spec.moe:
            model.model.layers[moe.layer].mlp = MoEBlock(moe, spec.hidden_size, impl)
    return model


def checkpoint_state(folder: Path, spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the model's parameter names: per-expert weights stacked and fused."""
    index = tensor_index(folder)
    if is_quantized(index):
        raise UserError(f"{folder} holds an MLX-quantized model; load it with --backend mlx")
    by_file: dict[Path, list[str]] = {}
    for name, (path, _, _) in index.items():
        by_file.setdefault(path, []).append(name)
    state, experts = {}, {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if UNUSED_TENSORS.search(name):
                    continue
                m = _PER_EXPERT.match(name)
                if m:
                    experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = f.get_tensor(name)
                else:
                    state[name] = f.get_tensor(name).to(dtype)
    for prefix, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        try:
            gate_up = [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(count)]
            down = [parts[(e, "down")] for e in range(count)]
        except KeyError as e:
            raise UserError(f"{folder} lacks tensor {prefix}.{e.args[0][0]}.{e.args[0][1]}_proj.weight") from None
        except RuntimeError:
            raise UserError(f"{folder}: the gate and up projections of {prefix} differ in shape") from None
        try:
            state[f"{prefix}.gate_up_proj"] = torch.stack(gate_up).to(dtype)
            state[f"{prefix}.down_proj"] = torch.stack(down).to(dtype)
        except RuntimeError:
            raise UserError(f"{folder}: the experts of {prefix} differ in shape") from None
    return state


def load_weights(model, state: dict[str, torch.Tensor], spec: ModelSpec, folder: Path) -> None:
    """Assign checkpoint tensors into the meta model, with one-line errors for missing or mis-shaped ones."""
    expected = dict(model.state_dict())
    if spec.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in state]
    if missing:
        raise UserError(f"{folder} lacks tensor {_checkpoint_name(missing[0])}")
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        raise UserError(f"{folder} has tensor {unexpected[0]}, which a {spec.family} model with this config "
                        "does not have")
    for name, tensor in state.items():
        if name.endswith(("_proj", )) and tensor.shape[0] != expected[name].shape[0]:
            raise UserError(f"{folder} has {tensor.shape[0]} experts in {name.rsplit('.', 1)[0]}, "
                            f"the config says {expected[name].shape[0]}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{folder}: tensor {_checkpoint_name(name)} has shape {tuple(tensor.shape)}, "
                            f"expected {_checkpoint_shape(name, expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (the RoPE tables) are not in the checkpoint: rebuild them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)


def _checkpoint_name(name: str) -> str:
    """How a fused parameter is spelled in a checkpoint, for error messages."""
    if name.endswith(".gate_up_proj"):
        return name[: -len("gate_up_proj")] + "0.gate_proj.weight"
    if name.endswith(".down_proj"):
        return name[: -len("down_proj")] + "0.down_proj.weight"
    return name


def _checkpoint_shape(name: str, shape) -> tuple:
    if name.endswith(".gate_up_proj"):
        return (shape[1] // 2, shape[2])
    if name.endswith(".down_proj"):
        return tuple(shape[1:])
    return tuple(shape)


def load_causal_lm(folder: Path, spec: ModelSpec, impl: str, dtype: torch.dtype, device: str):
    model = build(spec, impl)
    load_weights(model, checkpoint_state(folder, spec, dtype), spec, folder)
    # Nothing here trains the base weights (the tuner keeps its own fp32 routers): frozen parameters
    # keep autograd from recording inference, and let the Triton path run outside no_grad too.
    return model.requires_grad_(False).to(device).eval()


def carried_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Checkpoint tensors the model does not load but a written folder keeps (GroveMoE's ``expert_bias``)."""
    out = {}
    for path, names in carried_tensor_names(folder).items():
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in names})
    return out


def checkpoint_tensors(model, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face checkpoint names (per-expert tensors, as transformers writes)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if spec.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith(".gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
        elif name.endswith(".down_proj"):
            prefix = name[: -len(".down_proj")]
            for e, down in enumerate(tensor):
                out[f"{prefix}.{e}.down_proj.weight"] = down.contiguous()
        else:
            out[name] = tensor
    return out
