"""gpt-oss (gpt-oss-20b, gpt-oss-120b): every layer is MoE; the router ``mlp.router`` has a bias, takes
the top-k of its logits and a softmax over those k; the experts have biases and a clamped SwiGLU
(gate clamped above at ``swiglu_limit``, up to ±limit, ``(up + 1) · gate · sigmoid(1.702 · gate)``);
attention with per-head sinks, q/k/v/o biases, sliding-window layers (``layer_types``,
``sliding_window``) and YaRN RoPE. Checkpoints keep the experts stacked and fused
(``mlp.experts.gate_up_proj [E, H, 2I]``, gate and up interleaved, ``down_proj [E, I, H]``, with
``_bias``), in bf16 or, as released, MXFP4 (``_blocks``/``_scales``, ``quantization_config``
``mxfp4``). transformers' ``GptOssForCausalLM`` (eager attention: its only one with sinks on a CPU),
mlx-lm's ``gpt_oss``."""

from __future__ import annotations

from ..checkpoint.names import FusedExperts, TensorNames
from ..errors import UserError
from ..spec import ClampedSwiGLU, ModelSpec, MoESpec, RouterSpec
from .base import Family, LibraryModel
from .config import Config, attention_parameters, common_config, common_fields

# What transformers' GptOssConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 150_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
CONFIG_DEFAULTS = {"head_dim": 64, "attention_bias": True}
YARN = {  # GptOssConfig's RoPE when the config names none
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
LAYER_TYPES = ("sliding_attention", "full_attention")
ROUTER = RouterSpec(order="topk-score", bias=True)


def layer_types(c: Config, num_layers: int) -> tuple[str, ...]:
    """Sliding and full layers (GptOssConfig's default: sliding on even layers); mlx-lm's model needs both."""
    types = c.get("layer_types", list, None)
    if types is None:
        return tuple(LAYER_TYPES[i % 2] for i in range(num_layers))
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise UserError(f"{c.where}: 'layer_types' must name {num_layers} layers, each one of {', '.join(LAYER_TYPES)}")
    if len(set(types)) < 2:
        raise UserError(f"{c.where}: 'layer_types' must hold both sliding and full attention layers, as gpt-oss does")
    return tuple(types)


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    for key, value in CONFIG_DEFAULTS.items():
        c.values.setdefault(key, value)
    if not c.has("rope_parameters") and not c.has("rope_scaling"):
        c.values["rope_scaling"] = dict(YARN)
    if not c.has("dtype") and not c.has("torch_dtype"):
        c.values["torch_dtype"] = "bfloat16"  # the release names none; its tensors are bfloat16
    if c.get("attention_bias", bool) is not True:
        raise UserError(f"{c.where}: 'attention_bias' must be true (gpt-oss's attention has biases)")
    fields = common_fields(c, DEFAULTS, qk_norm=None, rope_types=("default", "yarn"))
    shape = {k: fields[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim")}
    fields["attention_parameters"] = attention_parameters(shape, True, None) + fields["num_heads"]  # + sinks
    fields["layer_types"] = layer_types(c, fields["num_layers"])
    fields["sliding_window"] = c.positive("sliding_window", 128)
    experts = c.num_experts()
    activation = ClampedSwiGLU(alpha=c.number("swiglu_alpha", 1.702), limit=c.number("swiglu_limit", 7.0))
    moe = tuple(
        MoESpec(
            layer=i,
            num_experts=experts,
            top_k=c.top_k(experts),
            expert_size=c.positive("intermediate_size"),
            router=ROUTER,
            activation=activation,
            expert_bias=True,
        )
        for i in range(fields["num_layers"])
    )
    return ModelSpec(family=FAMILY.name, dense_size=None, moe=moe, names=FAMILY.names, **fields)


def write_config(spec: ModelSpec) -> dict:
    c = common_config(spec)
    first = spec.moe[0]
    c.update(
        intermediate_size=first.expert_size,
        swiglu_alpha=first.activation.alpha,
        swiglu_limit=first.activation.limit,
        layer_types=list(spec.layer_types),
        sliding_window=spec.sliding_window,
        head_dim=spec.head_dim,
        attention_bias=True,
        model_type="gpt_oss",
    )
    return c


FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    architectures=("GptOssForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel(
        "transformers",
        "GptOssForCausalLM",
        "GptOssConfig",
        "gpt_oss",
        attn_implementation="eager",
        block_returns_tuple=True,
    ),
    mlx=LibraryModel("mlx_lm.models.gpt_oss", "Model", "ModelArgs", "gpt_oss", router="router", experts="experts"),
    names=TensorNames(router="router", fused=FusedExperts(in_out=True, interleaved=True)),
    display_name="gpt_oss (gpt-oss)",
)
