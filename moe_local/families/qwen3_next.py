"""Qwen3-Next (Qwen3-Next-80B-A3B): the router and shared expert of Qwen2-MoE (softmax over all experts,
top-k, renormalised when ``norm_topk_prob``; one shared expert scaled by ``sigmoid(shared_expert_gate(x))``),
dense layers as Qwen3-MoE (``decoder_sparse_step``, ``mlp_only_layers``), and hybrid layers: gated
DeltaNet linear attention (``linear_attn``, a recurrent state instead of a KV cache) in three of every
four layers, gated full attention (q, k norms, partial RoPE) in the fourth (``layer_types``, or
``full_attention_interval`` as transformers 4 wrote it). Norms are zero-centred (``x̂ · (1 + w)``).
The multi-token-prediction head (``mtp.*``) is carried, never run. transformers' ``Qwen3NextForCausalLM``,
mlx-lm's ``qwen3_next`` (which builds the layer pattern from ``full_attention_interval`` and needs
``rope_theta`` and ``partial_rotary_factor`` at the top level)."""

from __future__ import annotations

from ..checkpoint.names import TensorNames
from ..errors import UserError
from ..spec import ModelSpec, RouterSpec
from . import qwen2_moe, qwen3_moe
from .base import Family, LibraryModel
from .config import Config, attention_parameters, common_config, common_fields

# What transformers' Qwen3NextConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
CONFIG_DEFAULTS = {
    "head_dim": 256,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
}
PARTIAL_ROTARY_FACTOR = 0.25
LAYER_TYPES = ("linear_attention", "full_attention")


def layer_types(c: Config, num_layers: int) -> tuple[str, ...]:
    """Linear and full layers, a full one every ``full_attention_interval`` layers (mlx-lm builds the
    pattern from that interval alone, so ``layer_types`` must follow one)."""
    types = c.get("layer_types", list, None)
    if types is None:
        interval = c.positive("full_attention_interval", 4)
        types = [LAYER_TYPES[(i + 1) % interval == 0] for i in range(num_layers)]
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise UserError(f"{c.where}: 'layer_types' must name {num_layers} layers, each one of {', '.join(LAYER_TYPES)}")
    if "full_attention" not in types:
        raise UserError(f"{c.where}: 'layer_types' must hold a full-attention layer, as Qwen3-Next does")
    interval = types.index("full_attention") + 1
    if any((t == "full_attention") != ((i + 1) % interval == 0) for i, t in enumerate(types)):
        raise UserError(f"{c.where}: 'layer_types' must put a full-attention layer every {interval} layers")
    return tuple(types)


def linear_attention_parameters(c: Config, hidden: int) -> int:
    """One gated DeltaNet: q, k, v, z and b, a projections, the depthwise convolution over q, k, v,
    ``dt_bias``, ``A_log``, the gated norm and the output projection."""
    k_heads, v_heads = c.positive("linear_num_key_heads"), c.positive("linear_num_value_heads")
    key_dim = k_heads * c.positive("linear_key_head_dim")
    value_dim = v_heads * c.positive("linear_value_head_dim")
    if v_heads % k_heads:
        raise UserError(
            f"{c.where}: 'linear_num_value_heads' ({v_heads}) is not a multiple of 'linear_num_key_heads' ({k_heads})"
        )
    projections = hidden * (2 * key_dim + 2 * value_dim) + hidden * 2 * v_heads + value_dim * hidden
    conv = (2 * key_dim + value_dim) * c.positive("linear_conv_kernel_dim")
    return projections + conv + 2 * v_heads + c.positive("linear_value_head_dim")


def hybrid_fields(c: Config, defaults: dict) -> dict:
    """The ModelSpec fields of a Qwen3-Next-style text model (Qwen3.5's too): gated attention with partial
    RoPE, and gated DeltaNet layers (``layer_types``, ``linear_attention_parameters``)."""
    for key, value in CONFIG_DEFAULTS.items():
        c.values.setdefault(key, value)
    fields = common_fields(c, defaults)
    partial = (c.values.get("rope_parameters") or {}).get("partial_rotary_factor")
    partial = partial if partial is not None else c.number("partial_rotary_factor", PARTIAL_ROTARY_FACTOR)
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise UserError(f"{c.where}: 'partial_rotary_factor' must be a number in (0, 1], got {partial!r}")
    fields["rope"] = {**fields["rope"], "partial_rotary_factor": float(partial)}
    shape = {k: fields[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim")}
    bias = fields["attention_bias"]
    q = shape["num_heads"] * shape["head_dim"]  # q_proj also makes the output gate: twice q wide
    fields["attention_parameters"] = attention_parameters(shape, bias, "head") + shape["hidden_size"] * q + bias * q
    fields["layer_types"] = layer_types(c, fields["num_layers"])
    fields["linear_attention_parameters"] = linear_attention_parameters(c, fields["hidden_size"])
    return fields


def hybrid_config(spec: ModelSpec, c: dict) -> dict:
    """The keys :func:`hybrid_fields` reads, over ``c`` (the text model's common config), in the spellings
    transformers and mlx-lm read."""
    c.update(
        head_dim=spec.head_dim,
        layer_types=list(spec.layer_types),
        full_attention_interval=spec.layer_types.index("full_attention") + 1,  # mlx-lm's spelling
        partial_rotary_factor=spec.rope["partial_rotary_factor"],  # mlx-lm's Qwen3-Next reads it at the top level
    )
    return c


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    fields = hybrid_fields(c, DEFAULTS)
    router = RouterSpec(scoring="softmax", renormalize=c.get("norm_topk_prob", bool, True))
    layers = qwen3_moe.moe_layers(c, fields["num_layers"])
    dense = c.positive("intermediate_size") if len(layers) < fields["num_layers"] else c.values.get("intermediate_size")
    moe = qwen2_moe.gated_shared_moe(c, layers, router)
    return ModelSpec(family=FAMILY.name, dense_size=dense, moe=moe, names=FAMILY.names, **fields)


def write_config(spec: ModelSpec) -> dict:
    c = hybrid_config(spec, common_config(spec))
    first = spec.moe[0]
    c.update(
        norm_topk_prob=first.router.renormalize,
        moe_intermediate_size=first.expert_size,
        shared_expert_intermediate_size=first.shared.size,
        intermediate_size=spec.dense_size if spec.dense_size is not None else c.get("intermediate_size", 0),
        mlp_only_layers=list(c.get("mlp_only_layers") or []),
        model_type="qwen3_next",
    )
    c.setdefault("decoder_sparse_step", 1)
    return c


FAMILY = Family(
    name="qwen3_next",
    model_types=("qwen3_next",),
    architectures=("Qwen3NextForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "Qwen3NextForCausalLM", "Qwen3NextConfig", "qwen3_next"),
    mlx=LibraryModel("mlx_lm.models.qwen3_next", "Model", "ModelArgs", "qwen3_next"),
    names=TensorNames(carried_prefixes=("mtp.",)),
    display_name="qwen3_next (Qwen3-Next)",
)
