"""GroveMoE (GroveMoE-Base/Inst): Qwen3-MoE plus adjugate experts, one small SwiGLU per group of
``experts_per_group`` consecutive experts, added with scale λ:

    y = Σ_{i∈top-k} w_i E_i(x) + λ Σ_{groups j} (Σ_{i∈top-k, i in j} w_i) A_j(x)

Top-k of sigmoid(logits) selects, the softmax weights are always renormalised. GroveMoE's release
hard-codes 2 experts per group, λ = 0.05 and reads the adjugate size from the weights; folders this
package writes carry them as ``grove_*`` keys. Built on the Qwen3-MoE classes of each library (no
remote code); the checkpoint's ``expert_bias`` (load balancing in training) is carried, never read.
"""

from __future__ import annotations

from dataclasses import replace

from ..checkpoint.names import TensorNames
from ..errors import UserError
from ..spec import GroveSpec, ModelSpec, RouterSpec
from . import qwen3_moe
from .base import Family
from .config import Config

ARCHITECTURE = "GroveMoeForCausalLM"
DEFAULT_EXPERTS_PER_GROUP = 2
DEFAULT_SCALE = 0.05
# Top-k of sigmoid(logits) selects, the softmax weights are always renormalised.
ROUTER = RouterSpec(scoring="softmax", selection="sigmoid", renormalize=True)


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    experts = c.num_experts()
    per_group = c.positive("grove_experts_per_group", DEFAULT_EXPERTS_PER_GROUP)
    if experts % per_group:
        raise UserError(f"{c.where}: {experts} experts do not split into groups of {per_group}")
    scale = c.number("grove_scale", DEFAULT_SCALE)
    size = c.values.get("grove_adjugate_intermediate_size")
    if size is None:
        first = qwen3_moe.moe_layers(c, c.positive("num_hidden_layers"))[0]
        size = adjugate_size_from_tensors(tensor_shapes, first, c.where)
    elif not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"{c.where}: 'grove_adjugate_intermediate_size' must be a positive integer, got {size!r}")
    grove = GroveSpec(experts_per_group=per_group, adjugate_size=size, scale=scale)
    spec = qwen3_moe.spec_from_config(c, tensor_shapes, grove=grove, router=ROUTER)
    return replace(spec, family=FAMILY.name, names=FAMILY.names)


def adjugate_size_from_tensors(tensor_shapes, layer: int, where: str) -> int:
    if not tensor_shapes:
        raise UserError(f"{where} has no 'grove_adjugate_intermediate_size' and no checkpoint tensors to read it from")
    name = FAMILY.names.expert(layer, 0, 0, group=FAMILY.names.adjugates)
    if name in tensor_shapes:
        return int(tensor_shapes[name][0])
    fused = f"{FAMILY.names.block_prefix(layer)}.{FAMILY.names.adjugates}.gate_up_proj"  # [groups, 2I, H]
    if fused in tensor_shapes:
        return int(tensor_shapes[fused][1]) // 2
    raise UserError(f"the checkpoint has no adjugate experts for layer {layer} (expected '{name}')")


def write_config(spec: ModelSpec) -> dict:
    c = qwen3_moe.write_config(spec)
    c["norm_topk_prob"] = spec.config.get("norm_topk_prob", False)  # Grove renormalises either way
    g = spec.moe[0].grove
    c["model_type"] = "grove_moe"
    c["architectures"] = [ARCHITECTURE]
    c["grove_experts_per_group"] = g.experts_per_group
    c["grove_scale"] = g.scale
    c["grove_adjugate_intermediate_size"] = g.adjugate_size
    return c


FAMILY = Family(
    name="grove_moe",
    model_types=("grove_moe", "grovemoe"),
    architectures=(ARCHITECTURE,),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=qwen3_moe.FAMILY.torch,
    mlx=qwen3_moe.FAMILY.mlx,
    names=TensorNames(carried=("expert_bias",)),
    display_name="GroveMoE",
)
