"""Build a family's transformers causal-LM class with the project's MoE blocks and load a checkpoint into it.

Attention, norms, RoPE, caches and generation are transformers' own (the classes the family module
names, ``Family.torch``); every MoE layer's ``mlp`` is replaced by :class:`MoEBlock`. The model is
built on the meta device and the checkpoint tensors are assigned into it, so no memory is spent on a
random initialisation that would be thrown away.

Names: outside the MoE blocks a checkpoint's names are the model's. Inside, the checkpoint spells
them as the family's :class:`~moe_local.checkpoint.names.TensorNames` say (per expert), the model as
transformers 5 does (``mlp.gate``, experts fused into ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``); :func:`checkpoint_state` and :func:`checkpoint_tensors` translate both ways.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from safetensors import safe_open

from moe_local.checkpoint import TensorNames, carried_tensor_names, is_quantized, tensor_index
from moe_local.errors import UserError
from moe_local.families import config_for_writing, family
from moe_local.spec import ModelSpec

from . import fused
from .moe import MoEBlock, TupleMoEBlock

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROJECTIONS = ("gate", "up", "down")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def library_classes(spec: ModelSpec):
    """(causal-LM class, config class) the family names; the class is named for the family's own
    architecture when the library's differs (GroveMoE runs as ``GroveMoeForCausalLM``)."""
    f = family(spec.family)
    module = importlib.import_module(f.torch.module)
    model_cls, config_cls = getattr(module, f.torch.model), getattr(module, f.torch.config)
    if f.architectures and f.architectures[0] != model_cls.__name__:
        model_cls = type(f.architectures[0], (model_cls,), {"__doc__": f"{f.name} on {model_cls.__name__}."})
    return model_cls, config_cls


def hf_config(spec: ModelSpec, attn_implementation: str | None = None):
    """The transformers config object for a spec (the library's model type, e.g. Grove's Qwen3-MoE);
    the attention implementation is the family's (sdpa; eager for gpt-oss's sinks) unless given."""
    lib = family(spec.family).torch
    _, config_cls = library_classes(spec)
    values = config_for_writing(spec)
    values.pop("architectures", None)
    values.pop("auto_map", None)
    values.pop("quantization_config", None)  # MXFP4 experts are dequantized at load (fused.py)
    values["model_type"] = lib.model_type
    values["attn_implementation"] = attn_implementation or lib.attn_implementation
    return config_cls(**values)


def build(spec: ModelSpec, impl: str):
    """The causal LM on the meta device, MoE layers replaced by the project's blocks (returning the
    tuple the family's decoder layer unpacks, where it unpacks one)."""
    model_cls, _ = library_classes(spec)
    config = hf_config(spec)
    block_cls = TupleMoEBlock if family(spec.family).torch.block_returns_tuple else MoEBlock
    with torch.device("meta"):
        model = model_cls(config)
        for moe in spec.moe:
            block = block_cls(moe, spec.hidden_size, impl, spec.names)
            setattr(model.model.layers[moe.layer], _block(spec), block)
    return model


def _block(spec: ModelSpec) -> str:
    return family(spec.family).torch.block


def _model_name(spec: ModelSpec, name: str) -> str:
    """A checkpoint tensor of an MoE block under the model's name (the family's block and router
    attributes -> ``mlp`` and ``gate``); every other name is the same on both sides."""
    names, parts = spec.names, name.split(".", 3)
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or not spec.moe_at(int(parts[2])):
        return name
    if not parts[3].startswith(names.block + "."):
        return name
    rest = parts[3][len(names.block) + 1 :]
    if rest.startswith(names.router + "."):
        rest = "gate." + rest[len(names.router) + 1 :]
    return f"model.layers.{parts[2]}.{_block(spec)}.{rest}"


def _checkpoint_router_name(spec: ModelSpec, name: str) -> str:
    """The inverse of :func:`_model_name`."""
    names, parts = spec.names, name.split(".", 3)
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or not spec.moe_at(int(parts[2])):
        return name
    if not parts[3].startswith(_block(spec) + "."):
        return name
    rest = parts[3][len(_block(spec)) + 1 :]
    if rest.startswith("gate."):
        rest = f"{names.router}.{rest[len('gate.') :]}"
    return f"{names.block_prefix(int(parts[2]))}.{rest}"


# Kept in float32 whatever the model's dtype, as the libraries keep them: a selection bias of a few
# thousandths decides between experts whose scores differ by less than bfloat16 resolves.
FLOAT32_TENSORS = (".e_score_correction_bias",)


def checkpoint_state(folder: Path, spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the model's parameter names: per-expert weights stacked and fused."""
    index = tensor_index(folder)
    if is_quantized(index):
        raise UserError(f"{folder} holds an MLX-quantized model; load it with --backend mlx")
    by_file: dict[Path, list[str]] = {}
    for name, (path, _, _) in index.items():
        by_file.setdefault(path, []).append(name)
    per_expert = spec.names.per_expert()
    stacked = fused.pattern(spec.names) if spec.names.fused else None
    state, experts, fused_parts = {}, {}, {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if spec.is_unused(name):
                    continue
                m = per_expert.match(name)
                s = stacked.match(name) if stacked else None
                if m:
                    part = PROJECTIONS[spec.names.projections.index(m.group(3))]
                    experts.setdefault(m.group(1), {})[(int(m.group(2)), part)] = f.get_tensor(name)
                elif s:
                    fused_parts.setdefault(f"{s.group(1)}.{s.group(2)}", {})[s.group(3) or ""] = f.get_tensor(name)
                else:
                    keep = torch.float32 if name.endswith(FLOAT32_TENSORS) else dtype
                    state[_model_name(spec, name)] = f.get_tensor(name).to(keep)
    for prefix, parts in experts.items():
        state.update(_fused_experts(folder, spec, prefix, parts, dtype))
    for name, pieces in fused_parts.items():
        moe = spec.moe_at(int(name.split(".")[2]))
        tensors = fused.to_model(folder, name, pieces, moe, spec.hidden_size, spec.names.fused, dtype)
        state.update({_model_name(spec, k): v for k, v in tensors.items()})
    return state


def _fused_experts(folder, spec, prefix: str, parts: dict, dtype) -> dict[str, torch.Tensor]:
    """One group of per-expert tensors (checkpoint ``prefix``) as the model's fused pair."""
    count = 1 + max(e for e, _ in parts)
    try:
        gate_up = [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(count)]
        down = [parts[(e, "down")] for e in range(count)]
    except KeyError as e:
        e_index, part = e.args[0]
        raise UserError(f"{folder} lacks tensor {prefix}.{e_index}.{_projection(spec, part)}.weight") from None
    except RuntimeError:
        raise UserError(f"{folder}: the gate and up projections of {prefix} differ in shape") from None
    model_prefix = _model_prefix(spec, prefix)
    try:
        return {
            f"{model_prefix}.gate_up_proj": torch.stack(gate_up).to(dtype),
            f"{model_prefix}.down_proj": torch.stack(down).to(dtype),
        }
    except RuntimeError:
        raise UserError(f"{folder}: the experts of {prefix} differ in shape") from None


def _projection(spec: ModelSpec, part: str) -> str:
    return spec.names.projections[PROJECTIONS.index(part)]


def _model_prefix(spec: ModelSpec, checkpoint_prefix: str) -> str:
    """``model.layers.L.<block>.<experts|adjugates>`` -> ``model.layers.L.mlp.<experts|chunk_experts>``."""
    layer, group = checkpoint_prefix.split(".")[2], checkpoint_prefix.rsplit(".", 1)[1]
    return f"model.layers.{layer}.{_block(spec)}.{'experts' if group == spec.names.experts else 'chunk_experts'}"


def _checkpoint_prefix(spec: ModelSpec, model_prefix: str) -> str:
    layer, group = model_prefix.split(".")[2], model_prefix.rsplit(".", 1)[1]
    return f"{spec.names.block_prefix(int(layer))}.{spec.names.experts if group == 'experts' else spec.names.adjugates}"


def load_weights(model, state: dict[str, torch.Tensor], spec: ModelSpec, folder: Path) -> None:
    """Assign checkpoint tensors into the meta model, with one-line errors for missing or mis-shaped ones."""
    expected = dict(model.state_dict())
    if spec.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in state]
    if missing:
        raise UserError(f"{folder} lacks tensor {_checkpoint_name(spec, missing[0])}")
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        raise UserError(
            f"{folder} has tensor {unexpected[0]}, which a {spec.family} model with this config does not have"
        )
    for name, tensor in state.items():
        if name.endswith("_proj") and tensor.shape[0] != expected[name].shape[0]:
            raise UserError(
                f"{folder} has {tensor.shape[0]} experts in {_checkpoint_prefix(spec, name.rsplit('.', 1)[0])}, "
                f"the config says {expected[name].shape[0]}"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{folder}: tensor {_checkpoint_name(spec, name)} has shape {tuple(tensor.shape)}, "
                f"expected {_checkpoint_shape(name, expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (the RoPE tables) are not in the checkpoint: rebuild them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)


def _checkpoint_name(spec: ModelSpec, name: str) -> str:
    """How a model parameter is spelled in a checkpoint, for error messages (expert 0 for fused ones)."""
    if name.endswith((".gate_up_proj", ".down_proj")) and not spec.names.fused:
        prefix, fused = name.rsplit(".", 1)
        part = 0 if fused == "gate_up_proj" else 2
        return f"{_checkpoint_prefix(spec, prefix)}.0.{spec.names.projections[part]}.weight"
    return _checkpoint_router_name(spec, name)


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


def carried_tensors(folder: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Checkpoint tensors the model does not load but a written folder keeps (GroveMoE's ``expert_bias``)."""
    out = {}
    for path, names in carried_tensor_names(folder, spec.is_carried).items():
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in names})
    return out


def checkpoint_tensors(model, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The model's weights under the family's checkpoint names (per-expert tensors, as transformers writes)."""
    out = {}
    stacked = fused.pattern(TensorNames(block=_block(spec))) if spec.names.fused else None
    for name, tensor in model.state_dict().items():
        if spec.tie_word_embeddings and name == "lm_head.weight":
            continue
        if stacked and stacked.match(name):
            out[_checkpoint_router_name(spec, name)] = fused.to_checkpoint(name, tensor, spec.names.fused)
        elif name.endswith((".gate_up_proj", ".down_proj")):
            prefix, part = name.rsplit(".", 1)
            prefix = _checkpoint_prefix(spec, prefix)
            for e, weight in enumerate(tensor):
                if part == "gate_up_proj":
                    gate, up = weight.chunk(2, dim=0)
                    out[f"{prefix}.{e}.{spec.names.projections[0]}.weight"] = gate.contiguous()
                    out[f"{prefix}.{e}.{spec.names.projections[1]}.weight"] = up.contiguous()
                else:
                    out[f"{prefix}.{e}.{spec.names.projections[2]}.weight"] = weight.contiguous()
        else:
            out[_checkpoint_router_name(spec, name)] = tensor
    return out
