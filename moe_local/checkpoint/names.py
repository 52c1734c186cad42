"""Where a family's MoE tensors sit in its Hugging Face checkpoints, both ways.

Every name outside the MoE blocks (attention, norms, embeddings, dense MLPs) is the library's own and
passes through unchanged; inside a block, names follow :class:`TensorNames`::

    model.layers.{L}.{block}.{router}.weight                       the router (and .bias when it has one)
    model.layers.{L}.{block}.{experts}.{E}.{projection}.weight     expert E's gate, up and down projections
    model.layers.{L}.{block}.{experts}.gate_up_proj, .down_proj    or all experts stacked, gate and up fused
        (+ _bias; MXFP4: _blocks and _scales)                      (:class:`FusedExperts`: gpt-oss)
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
class FusedExperts:
    """Experts stored stacked and fused, as transformers 5 keeps them in memory and gpt-oss releases them:
    ``experts.gate_up_proj`` (gate and up of every expert), ``experts.down_proj``, each with a ``_bias``
    when the experts have biases.

    - ``in_out``: the float tensors are ``[E, in, out]`` (gpt-oss: ``gate_up_proj [E, H, 2I]``,
      ``down_proj [E, I, H]``); otherwise ``[E, out, in]``.
    - ``interleaved``: gate and up alternate along the output axis (gate = even rows, up = odd ones);
      otherwise the gate half comes first.
    - MXFP4 (gpt-oss's release): ``<name>_blocks [E, out, in / 32, 16]`` uint8, two 4-bit E2M1 values
      a byte (the low nibble first), and ``<name>_scales [E, out, in / 32]`` uint8, a power of two
      ``2^(s - 127)`` per 32 values; always ``[E, out, ...]``, interleaved as the float tensors are.
    """

    in_out: bool = False
    interleaved: bool = False

    PARTS = ("gate_up_proj", "down_proj")  # the stacked tensors' names (not fields)
    SUFFIXES = ("", "_bias", "_blocks", "_scales")  # float weight, bias, MXFP4 codes and scales


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
    fused: FusedExperts | None = None  # the experts stacked and fused (gpt-oss) instead of one tensor per expert

    def block_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}"

    def router_weight(self, layer: int) -> str:
        """The tuned tensor: the router's weight ``[experts, hidden]``."""
        return f"{self.block_prefix(layer)}.{self.router}.weight"

    def router_bias(self, layer: int) -> str:
        """The router's bias ``[experts]``, tuned with the weight where the rule has one (gpt-oss)."""
        return f"{self.block_prefix(layer)}.{self.router}.bias"

    def fused_expert(self, layer: int, part: str, suffix: str = "") -> str:
        """A stacked tensor: ``part`` "gate_up_proj" or "down_proj", ``suffix`` "", "_bias", "_blocks", "_scales"."""
        return f"{self.block_prefix(layer)}.{self.experts}.{part}{suffix}"

    def expert(self, layer: int, e: int, part: int, group: str | None = None) -> str:
        """Expert ``e``'s projection ``part`` (0 gate, 1 up, 2 down); ``group`` = the adjugates' name."""
        return f"{self.block_prefix(layer)}.{group or self.experts}.{e}.{self.projections[part]}.weight"

    def router_tensor(self, name: str) -> tuple[int, str]:
        """(layer, "weight" or "bias") of a router tensor's name; anything else is a one-line error."""
        block, router = re.escape(self.block), re.escape(self.router)
        m = re.fullmatch(rf"model\.layers\.(\d+)\.{block}\.{router}\.(weight|bias)", name)
        if m is None:
            raise UserError(f"'{name}' is not a router weight name ({self.router_weight(0).replace('.0.', '.N.')})")
        return int(m.group(1)), m.group(2)

    def layer_of_router(self, name: str) -> int:
        """The layer of a router tensor name (its weight or bias); anything else is a one-line error."""
        return self.router_tensor(name)[0]

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


def check_router_weights(spec, weights: dict) -> dict[int, dict[str, object]]:
    """layer -> {"weight": array, "bias": array} (the parts given), after checking names and shapes
    against the spec: a bias only where the router has one."""
    out: dict[int, dict] = {}
    for name, array in weights.items():
        layer, part = spec.names.router_tensor(name)
        m = spec.moe_at(layer)
        if m is None:
            raise UserError(f"layer {layer} is not an MoE layer of this model ({name})")
        if part == "bias" and not m.router.bias:
            raise UserError(f"{name}: the model's router has no bias")
        shape = (m.num_experts, spec.hidden_size) if part == "weight" else (m.num_experts,)
        if tuple(array.shape) != shape:
            raise UserError(f"{name} has shape {tuple(array.shape)}; the model's gate {part} is {shape}")
        out.setdefault(layer, {})[part] = array
    return out
