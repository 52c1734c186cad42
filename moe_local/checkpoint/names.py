"""Where a family's MoE tensors sit in its Hugging Face checkpoints, both ways.

Every name outside the MoE blocks (attention, norms, embeddings, dense MLPs) is the library's own and
passes through unchanged; inside a block, names follow :class:`TensorNames`::

    model.layers.{L}.{block}.{router}.weight                       the router (and .bias when it has one)
    model.layers.{L}.{block}.{experts}.{E}.{projection}.weight     expert E's gate, up and down projections
    model.layers.{L}.{block}.{adjugates}.{J}.{projection}.weight   GroveMoE's adjugate J (a group of experts)
    model.layers.{L}.{block}.{shared}.{projection}.weight          shared experts (one SwiGLU), and
    model.layers.{L}.{block}.{shared_gate}.weight                  their gate when they are gated

Router adapters hold the router tensors under exactly these names, so mlx-lm loads them as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

# Tensors some checkpoints hold and no model reads: stale RoPE tables.
STALE_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class TensorNames:
    """A family's checkpoint names for the parts of an MoE block (Qwen3-MoE's by default)."""

    block: str = "mlp"  # the MoE block's attribute in a decoder layer
    router: str = "gate"
    experts: str = "experts"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # an expert's gate, up, down
    adjugates: str = "chunk_experts"  # GroveMoE's adjugate experts, one per group
    shared: str = "shared_expert"  # Qwen2-MoE's name; DeepSeek's is "shared_experts"
    shared_gate: str = "shared_expert_gate"
    carried: tuple[str, ...] = ()  # block tensors no model reads but written folders keep (Grove's expert_bias)

    def block_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}"

    def router_weight(self, layer: int) -> str:
        """The tuned tensor: the router's weight ``[experts, hidden]``."""
        return f"{self.block_prefix(layer)}.{self.router}.weight"

    def expert(self, layer: int, e: int, part: int, group: str | None = None) -> str:
        """Expert ``e``'s projection ``part`` (0 gate, 1 up, 2 down); ``group`` = the adjugates' name."""
        return f"{self.block_prefix(layer)}.{group or self.experts}.{e}.{self.projections[part]}.weight"

    def layer_of_router(self, name: str) -> int:
        """The layer of a router weight name; anything else is a one-line error."""
        m = re.fullmatch(rf"model\.layers\.(\d+)\.{re.escape(self.block)}\.{re.escape(self.router)}\.weight", name)
        if m is None:
            raise UserError(f"'{name}' is not a router weight name ({self.router_weight(0).replace('.0.', '.N.')})")
        return int(m.group(1))

    def per_expert(self) -> re.Pattern:
        """Matches per-expert projections (experts and adjugates): groups prefix, index, projection."""
        groups = "|".join(re.escape(g) for g in (self.experts, self.adjugates))
        parts = "|".join(re.escape(p) for p in self.projections)
        return re.compile(rf"^(model\.layers\.\d+\.{re.escape(self.block)}\.(?:{groups}))\.(\d+)\.({parts})\.weight$")

    def is_carried(self, name: str, num_layers: int) -> bool:
        """A tensor no model reads that written folders keep as it is: the family's carried block
        tensors, and the layers past ``num_layers`` (DeepSeek-V3's and GLM-4.5's multi-token-prediction
        layers are stored as extra decoder layers)."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= num_layers:
            return True
        return any(
            re.fullmatch(rf"model\.layers\.\d+\.{re.escape(self.block)}\.{re.escape(c)}", name) for c in self.carried
        )

    def is_unused(self, name: str, num_layers: int) -> bool:
        """Checkpoint tensors no model reads: the carried ones and stale RoPE tables."""
        return self.is_carried(name, num_layers) or STALE_TENSORS.search(name) is not None


def check_router_weights(spec, weights: dict) -> dict[int, object]:
    """layer -> array, after checking names and shapes against the spec."""
    out = {}
    for name, array in weights.items():
        layer = spec.names.layer_of_router(name)
        m = spec.moe_at(layer)
        if m is None:
            raise UserError(f"layer {layer} is not an MoE layer of this model ({name})")
        if tuple(array.shape) != (m.num_experts, spec.hidden_size):
            raise UserError(
                f"{name} has shape {tuple(array.shape)}; the model's gate is {(m.num_experts, spec.hidden_size)}"
            )
        out[layer] = array
    return out
