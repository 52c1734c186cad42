"""The one description of a model that every other part reads: ModelSpec, MoESpec, RouterSpec.

A spec is data: the family modules (moe_local/families/) build it from a config.json, the backends
build a model from it, the tuner and ``info`` read it. Every router rule of every family is a
combination of :class:`RouterSpec`'s fields, written once per backend (``backends/*/router.py``).
Pure Python: importing this module never imports torch or mlx.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .checkpoint.names import TensorNames
from .errors import UserError

SCORINGS = ("softmax", "sigmoid")
ORDERS = ("score-topk", "topk-score")
SELECTIONS = ("scores", "sigmoid")


@dataclass(frozen=True)
class RouterSpec:
    """How one token's router logits become its k experts and their weights.

    - logits = ``x @ Wᵀ`` (``+ b`` when ``bias``), in float32 when ``float32_logits``, else in the
      model's dtype.
    - scores = ``softmax(logits)`` or ``sigmoid(logits)`` over all experts (``scoring``), in float32.
    - ``order`` "score-topk": the k experts with the highest scores are chosen and their scores are
      the weights. Before choosing, ``selection_bias`` adds a per-expert bias (DeepSeek-V3's
      ``e_score_correction_bias``, a load-balancing device: it changes the choice, never the
      weights); ``groups`` > 1 splits the experts into that many groups of consecutive experts,
      scores each group by the sum of its two highest (biased) scores and lets only the best
      ``groups_kept`` groups be chosen from; ``selection`` "sigmoid" chooses by ``sigmoid(logits)``
      while the weights stay softmax scores (GroveMoE).
    - ``order`` "topk-score": the k highest logits are chosen and the weights are the softmax over
      those k (Mixtral in mlx-lm, gpt-oss).
    - ``renormalize`` divides the k weights by their sum; ``scaling`` multiplies them
      (``routed_scaling_factor``).

    RoMA's routing vector is the distribution the scores define over all experts: the softmax, or
    the sigmoid scores normalised to sum 1 (without the selection bias).
    """

    scoring: str = "softmax"
    order: str = "score-topk"
    renormalize: bool = False
    selection: str = "scores"
    selection_bias: bool = False
    groups: int = 1
    groups_kept: int = 1
    scaling: float = 1.0
    bias: bool = False
    float32_logits: bool = False

    def __post_init__(self):
        for name, allowed in (("scoring", SCORINGS), ("order", ORDERS), ("selection", SELECTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RouterSpec.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.order == "topk-score" and (
            self.scoring != "softmax" or self.selection != "scores" or self.selection_bias or self.groups > 1
        ):
            raise ValueError("a topk-score router takes a softmax over the k largest logits, nothing else")
        if not 1 <= self.groups_kept <= self.groups:
            raise ValueError(f"RouterSpec: groups_kept {self.groups_kept} must lie in 1..groups ({self.groups})")

    def describe(self) -> str:
        """One line for ``info``."""
        if self.order == "topk-score":
            text = "top-k of the logits, softmax over the k"
        else:
            chosen = "sigmoid(logits)" if self.selection == "sigmoid" else f"the {self.scoring} scores"
            text = f"{self.scoring} scores, top-k of {chosen}"
            if self.selection_bias:
                text += " plus a selection-only bias"
            if self.groups > 1:
                text += f", within the best {self.groups_kept} of {self.groups} groups"
        text += ", renormalised" if self.renormalize else ", not renormalised"
        if self.scaling != 1.0:
            text += f", scaled by {self.scaling:g}"
        if self.bias:
            text += "; the router has a bias"
        return text


@dataclass(frozen=True)
class SharedExperts:
    """Experts every token runs beside its routed ones, summed into the block's output.

    ``count`` experts of intermediate size ``size`` run as one SwiGLU of size ``count · size``
    (DeepSeek's ``n_shared_experts``); ``gated``: scaled by ``sigmoid(shared_expert_gate(x))``
    (Qwen2-MoE, Qwen3-Next).
    """

    count: int
    size: int
    gated: bool


@dataclass(frozen=True)
class GroveSpec:
    """Adjugate experts: one SwiGLU of ``adjugate_size`` per group of ``experts_per_group`` experts."""

    experts_per_group: int
    adjugate_size: int
    scale: float

    def num_groups(self, num_experts: int) -> int:
        return num_experts // self.experts_per_group


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation in place of SwiGLU's ``silu(gate) · up``: the gate clamped above at
    ``limit``, up clamped to ±``limit``, then ``(up + 1) · gate · sigmoid(alpha · gate)``."""

    alpha: float = 1.702
    limit: float = 7.0


@dataclass(frozen=True)
class MoESpec:
    """One sparse MoE layer.

    Its routed experts are SwiGLU MLPs, ``down(act(gate(x), up(x)))`` with ``act`` = ``silu(gate) · up``
    unless ``activation`` says otherwise (gpt-oss: :class:`ClampedSwiGLU`); ``expert_bias``: each
    projection adds a per-expert bias (gpt-oss).
    """

    layer: int
    num_experts: int
    top_k: int
    expert_size: int
    router: RouterSpec = RouterSpec()
    shared: SharedExperts | None = None
    grove: GroveSpec | None = None
    activation: ClampedSwiGLU | None = None  # None: SwiGLU
    expert_bias: bool = False

    def describe_experts(self) -> str:
        """How the routed experts compute, for ``info``."""
        if self.activation is None:
            text = "SwiGLU"
        else:
            a = self.activation
            text = f"clamped SwiGLU ((up + 1) · gate · sigmoid({a.alpha:g} · gate), |up| and gate <= {a.limit:g})"
        return text + (", projections with biases" if self.expert_bias else "")

    @property
    def num_groups(self) -> int:
        """Grove's adjugate groups (0 without adjugates)."""
        return self.grove.num_groups(self.num_experts) if self.grove else 0


@dataclass(frozen=True)
class ModelSpec:
    family: str  # the name of its module in moe_local/families/
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_size: int | None  # intermediate size of the dense MLP layers, if any
    moe: tuple[MoESpec, ...]  # one per MoE layer, in layer order
    attention_parameters: int  # per decoder layer: projections, their biases, q/k norms
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool
    dtype: str  # the checkpoint's dtype name: float32, bfloat16, float16
    rope: Mapping = field(default_factory=dict, compare=False, hash=False, repr=False)  # rope_parameters (v5 keys)
    kv_width: int | None = None  # values a KV cache keeps per token and layer (None: 2 · kv heads · head dim)
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention" (empty: all full)
    sliding_window: int | None = None  # how many tokens a sliding-attention layer sees
    names: TensorNames = field(default=TensorNames(), compare=False, repr=False)  # its checkpoint tensor names
    config: Mapping = field(default_factory=dict, compare=False, hash=False, repr=False)  # the config.json

    # -- layers -------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(m.layer for m in self.moe)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    def moe_at(self, layer: int) -> MoESpec | None:
        for m in self.moe:
            if m.layer == layer:
                return m
        return None

    def last_moe_layers(self, n: int) -> tuple[int, ...]:
        """The last ``n`` MoE layers (RoMA tunes these)."""
        if n < 1:
            raise UserError(f"the number of tuned layers must be at least 1, got {n}")
        if n > len(self.moe):
            raise UserError(f"the model has {len(self.moe)} MoE layers; cannot tune the last {n}")
        return self.moe_layers[-n:]

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "full_attention"

    # -- checkpoint tensors ---------------------------------------------------------------------
    def is_carried(self, name: str) -> bool:
        """A checkpoint tensor no model reads but a written folder keeps (TensorNames.is_carried)."""
        return self.names.is_carried(name, self.num_layers)

    def is_unused(self, name: str) -> bool:
        """A checkpoint tensor no model reads: carried, or a stale RoPE table."""
        return self.names.is_unused(name, self.num_layers)

    # -- identity -----------------------------------------------------------------------------
    def router_tensors(self, layer: int) -> tuple[str, ...]:
        """The checkpoint names of a layer's router tensors, the tuned ones: its weight, and its bias
        when the rule has one (gpt-oss)."""
        m = self.moe_at(layer)
        if m is None:
            raise UserError(f"layer {layer} is not an MoE layer of this model")
        weight = self.names.router_weight(layer)
        return (weight, self.names.router_bias(layer)) if m.router.bias else (weight,)

    def fingerprint(self, layers=None) -> dict:
        """What an adapter must match: independent of dtype, quantization and backend."""
        layers = self.moe_layers if layers is None else tuple(layers)
        gates = {}
        for layer in layers:
            m = self.moe_at(layer)
            if m is None:
                raise UserError(f"layer {layer} is not an MoE layer of this model")
            gates[str(layer)] = [m.num_experts, self.hidden_size]
        return {"family": self.family, "hidden_size": self.hidden_size, "num_layers": self.num_layers, "gates": gates}

    # -- size ---------------------------------------------------------------------------------
    def parameter_counts(self) -> dict:
        """Total and active parameter counts (embeddings and head included).

        Grove's active count is a range: a token's top-k experts touch between ceil(k / g) and
        min(k, groups) adjugates, depending on how many of them share a group.
        """
        h = self.hidden_size
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        per_layer_common = self.attention_parameters + 2 * h  # two RMSNorms
        total = active_min = active_max = embed + head + h + self.num_layers * per_layer_common
        dense = 3 * h * (self.dense_size or 0)
        total += dense * len(self.dense_layers)
        active_min += dense * len(self.dense_layers)
        active_max += dense * len(self.dense_layers)
        for m in self.moe:
            expert = 3 * h * m.expert_size + ((2 * m.expert_size + h) if m.expert_bias else 0)
            router = m.num_experts * h + (m.num_experts if m.router.bias else 0)
            shared = 0
            if m.shared:
                shared = 3 * h * m.shared.count * m.shared.size + (h if m.shared.gated else 0)
            total += router + m.num_experts * expert + shared
            active = router + m.top_k * expert + shared
            lo = hi = 0
            if m.grove:
                adjugate = 3 * h * m.grove.adjugate_size
                total += m.num_groups * adjugate
                lo = -(-m.top_k // m.grove.experts_per_group) * adjugate
                hi = min(m.top_k, m.num_groups) * adjugate
            active_min += active + lo
            active_max += active + hi
        return {"total": total, "active_min": active_min, "active_max": active_max}
