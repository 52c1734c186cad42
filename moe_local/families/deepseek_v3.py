"""DeepSeek-V3 / R1, Kimi-K2, Moonlight: sigmoid scores; ``e_score_correction_bias`` added for the
choice only; group-limited top-k (groups scored by the sum of their top two, ``topk_group`` of
``n_group`` kept); weights = the unbiased sigmoid scores, renormalised when ``norm_topk_prob``, times
``routed_scaling_factor``; router logits in float32; ``n_shared_experts`` ungated shared experts;
dense layers before ``first_k_dense_replace``; multi-head latent attention (MLA). transformers'
``DeepseekV3ForCausalLM``, mlx-lm's ``deepseek_v3`` (which also serves ``kimi_k2``)."""

from __future__ import annotations

from ..checkpoint.names import TensorNames
from ..errors import UserError
from ..spec import ModelSpec, RouterSpec
from . import deepseek
from .base import Family, LibraryModel
from .config import Config, common_config, common_fields

# What transformers' DeepseekV3Config assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096}
ROPE_TYPES = ("default", "yarn")


def sigmoid_router(c: Config, experts: int) -> RouterSpec:
    """DeepSeek-V3's rule (GLM-4.5 uses it too)."""
    if c.values.get("scoring_func", "sigmoid") != "sigmoid":
        raise UserError(f"{c.where}: 'scoring_func' {c.values['scoring_func']!r} is not supported (only 'sigmoid')")
    if c.values.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UserError(f"{c.where}: 'topk_method' {c.values['topk_method']!r} is not supported (only 'noaux_tc')")
    groups, kept = c.positive("n_group", 1), c.positive("topk_group", 1)
    if experts % groups or kept > groups or experts // groups < 2:
        raise UserError(
            f"{c.where}: {experts} experts, 'n_group' {groups} and 'topk_group' {kept} do not fit "
            "(groups must split the experts into groups of two or more, topk_group <= n_group)"
        )
    return RouterSpec(
        scoring="sigmoid",
        selection_bias=True,
        groups=groups,
        groups_kept=kept,
        renormalize=c.get("norm_topk_prob", bool, True),
        scaling=c.number("routed_scaling_factor", 1.0),
        float32_logits=True,
    )


def mla_parameters(c: Config, hidden: int, heads: int) -> tuple[int, int]:
    """(parameters of one MLA attention block, KV-cache values per token): transformers caches the
    compressed latent and the RoPE key."""
    q_lora = c.get("q_lora_rank", int, None)
    kv_lora, rope = c.positive("kv_lora_rank"), c.positive("qk_rope_head_dim")
    nope, v = c.positive("qk_nope_head_dim"), c.positive("v_head_dim")
    bias = bool(c.values.get("attention_bias", False))
    qk = heads * (nope + rope)
    q = hidden * qk if q_lora is None else hidden * q_lora + bias * q_lora + q_lora + q_lora * qk
    kv = hidden * (kv_lora + rope) + bias * (kv_lora + rope) + kv_lora + kv_lora * heads * (nope + v)
    return q + kv + heads * v * hidden + bias * hidden, kv_lora + rope


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    fields = common_fields(c, DEFAULTS, qk_norm=None, rope_types=ROPE_TYPES)
    fields["attention_parameters"], fields["kv_width"] = mla_parameters(c, fields["hidden_size"], fields["num_heads"])
    fields["head_dim"] = c.positive("qk_rope_head_dim")  # what transformers' config calls head_dim here
    dense, moe = deepseek.moe_blocks(
        c, fields["num_layers"], lambda experts, _: sigmoid_router(c, experts), frequency=False
    )
    return ModelSpec(family=FAMILY.name, dense_size=dense, moe=moe, names=FAMILY.names, **fields)


def write_config(spec: ModelSpec) -> dict:
    c = common_config(spec)
    first = spec.moe[0]
    rule = first.router
    c.update(
        n_routed_experts=first.num_experts,
        moe_intermediate_size=first.expert_size,
        n_shared_experts=first.shared.count if first.shared else 0,
        norm_topk_prob=rule.renormalize,
        n_group=rule.groups,
        topk_group=rule.groups_kept,
        routed_scaling_factor=rule.scaling,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        model_type="deepseek_v3",
    )
    if spec.dense_size is not None:
        c["intermediate_size"] = spec.dense_size
    return c


FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    architectures=("DeepseekV3ForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "DeepseekV3ForCausalLM", "DeepseekV3Config", "deepseek_v3"),
    mlx=LibraryModel("mlx_lm.models.deepseek_v3", "Model", "ModelArgs", "deepseek_v3"),
    names=TensorNames(shared="shared_experts"),
)
