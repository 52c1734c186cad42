"""Tiny random checkpoints in real Hugging Face format, written by transformers itself.

Weights are redrawn with a larger spread than transformers' init (std 0.02 would make every
router nearly uniform, so routing bugs would hide); a real tokenizer is trained on a few lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
QWEN3 = dict(
    BASE,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    intermediate_size=96,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
OLMOE = dict(BASE, num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False)
OLMOE.pop("head_dim")

TEXT = [
    "What is 3 plus 4?",
    "Answer: A B C D",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system",
    "Which is larger, 7 or 9?",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[: vocab_size - 40],
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def spelled(config: dict, spelling: str) -> dict:
    """Rewrite a transformers-5 config.json in the transformers-4 spelling, or with both spellings."""
    c = dict(config)
    experts = c.get("num_local_experts", c.get("num_experts"))
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
    if spelling in ("v4", "both"):
        c["num_experts"] = experts
        c["rope_theta"] = theta
    if spelling == "v4":
        c.pop("num_local_experts", None)
        c.pop("rope_parameters", None)
    if spelling == "both":
        c["num_local_experts"] = experts
        c["rope_parameters"] = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": theta}
    return c


def _save(model, folder: Path, spelling: str, tokenizer: bool) -> Path:
    folder = Path(folder)
    model.save_pretrained(str(folder))
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(spelled(json.loads(config_path.read_text()), spelling), indent=2))
    if tokenizer:
        write_tokenizer(folder, model.config.vocab_size)
    return folder


def make_qwen3_moe(folder: Path, seed: int = 0, spelling: str = "v5", tokenizer: bool = True, **overrides) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**QWEN3, **overrides}))
    randomize(model, seed)
    return _save(model, folder, spelling, tokenizer)


def make_olmoe(folder: Path, seed: int = 0, spelling: str = "v5", tokenizer: bool = True, **overrides) -> Path:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    model = OlmoeForCausalLM(OlmoeConfig(**{**OLMOE, **overrides}))
    randomize(model, seed)
    return _save(model, folder, spelling, tokenizer)


def make_grove(
    folder: Path,
    seed: int = 0,
    adjugate_size: int = 16,
    write_grove_keys: bool = False,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """A GroveMoE-format folder as GroveMoE releases it: Qwen3-MoE weights plus
    ``mlp.chunk_experts.J.*`` (one per pair of experts) and an unused ``mlp.expert_bias``;
    config.json names ``GroveMoeForCausalLM`` and (by default) omits the grove_* keys."""
    from safetensors.torch import load_file, save_file

    folder = make_qwen3_moe(folder, seed=seed, spelling="v4", tokenizer=tokenizer, **overrides)
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    h, groups = config["hidden_size"], config["num_experts"] // 2
    for layer in range(config["num_hidden_layers"]):
        if f"model.layers.{layer}.mlp.gate.weight" not in state:
            continue
        for j in range(groups):
            prefix = f"model.layers.{layer}.mlp.chunk_experts.{j}"
            state[f"{prefix}.gate_proj.weight"] = 0.15 * torch.randn(adjugate_size, h, generator=g)
            state[f"{prefix}.up_proj.weight"] = 0.15 * torch.randn(adjugate_size, h, generator=g)
            state[f"{prefix}.down_proj.weight"] = 0.15 * torch.randn(h, adjugate_size, generator=g)
        state[f"model.layers.{layer}.mlp.expert_bias"] = torch.zeros(config["num_experts"])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config["architectures"] = ["GroveMoeForCausalLM"]
    config["model_type"] = "grove_moe"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_grove_moe.GroveMoeForCausalLM"}
    if write_grove_keys:
        config.update(grove_experts_per_group=2, grove_scale=0.05, grove_adjugate_intermediate_size=adjugate_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# -- the families added on the registry: made by transformers itself, except DeepSeekMoE ---------------

SMALL = dict(
    hidden_size=64, num_attention_heads=4, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False
)
MIXTRAL = dict(
    SMALL,
    num_hidden_layers=2,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    intermediate_size=32,
    rms_norm_eps=1e-5,
)
QWEN2 = dict(
    SMALL,
    num_hidden_layers=3,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    intermediate_size=96,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    rms_norm_eps=1e-6,
)
DEEPSEEK_V3 = dict(
    SMALL,
    num_hidden_layers=3,
    num_key_value_heads=4,
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
)
GLM4 = dict(
    SMALL,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    use_qk_norm=True,
    attention_bias=True,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rms_norm_eps=1e-5,
)
# A DeepSeekMoE-16B config.json (remote-code layout) at tiny sizes; the real values in comments.
DEEPSEEK = dict(
    SMALL,
    architectures=["DeepseekForCausalLM"],
    model_type="deepseek",
    num_hidden_layers=3,
    num_key_value_heads=4,  # 16 heads, 16 KV heads
    intermediate_size=96,  # 10944 (dense layers)
    moe_intermediate_size=32,  # 1408
    n_routed_experts=8,
    n_shared_experts=2,  # 64, 2
    num_experts_per_tok=2,  # 6
    first_k_dense_replace=1,
    moe_layer_freq=1,
    norm_topk_prob=False,
    scoring_func="softmax",
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    hidden_act="silu",
    attention_bias=False,
    bos_token_id=0,
    eos_token_id=1,
    torch_dtype="float32",
    auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
)


def randomize_selection_bias(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """``e_score_correction_bias`` large enough to change which experts sigmoid scores choose."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(std * torch.randn(b.shape, generator=g))


def _make(config_cls, model_cls, values, folder, seed, tokenizer):
    model = model_cls(config_cls(**values))
    randomize(model, seed)
    randomize_selection_bias(model, seed)
    return _save(model, folder, "v5", tokenizer)


def make_mixtral(folder: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    return _make(MixtralConfig, MixtralForCausalLM, {**MIXTRAL, **overrides}, folder, seed, tokenizer)


def make_qwen2_moe(folder: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return _make(Qwen2MoeConfig, Qwen2MoeForCausalLM, {**QWEN2, **overrides}, folder, seed, tokenizer)


def make_deepseek_v3(folder: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return _make(DeepseekV3Config, DeepseekV3ForCausalLM, {**DEEPSEEK_V3, **overrides}, folder, seed, tokenizer)


def make_glm4_moe(folder: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    return _make(Glm4MoeConfig, Glm4MoeForCausalLM, {**GLM4, **overrides}, folder, seed, tokenizer)


def make_deepseek(folder: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """DeepSeekMoE as its release stores it (no transformers class exists): transformers' Llama
    decoder for attention, norms and embeddings, the MoE layers' tensors under the released names
    (``mlp.gate.weight``, ``mlp.experts.E.*``, ``mlp.shared_experts.*``), a DeepSeek config.json."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    values = {**DEEPSEEK, **overrides}
    model = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in values.items() if k not in ("architectures", "model_type", "auto_map")})
    )
    randomize(model, seed)
    state = {k: v for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 3)
    h, size, experts = values["hidden_size"], values["moe_intermediate_size"], values["n_routed_experts"]
    shared = size * values["n_shared_experts"]
    for layer in range(values["num_hidden_layers"]):
        if layer < values["first_k_dense_replace"] or layer % values["moe_layer_freq"]:
            continue
        prefix = f"model.layers.{layer}.mlp"
        for part in ("gate_proj", "up_proj", "down_proj"):
            del state[f"{prefix}.{part}.weight"]
        state[f"{prefix}.gate.weight"] = 0.15 * torch.randn(experts, h, generator=g)
        for e in range(experts):
            state[f"{prefix}.experts.{e}.gate_proj.weight"] = 0.15 * torch.randn(size, h, generator=g)
            state[f"{prefix}.experts.{e}.up_proj.weight"] = 0.15 * torch.randn(size, h, generator=g)
            state[f"{prefix}.experts.{e}.down_proj.weight"] = 0.15 * torch.randn(h, size, generator=g)
        state[f"{prefix}.shared_experts.gate_proj.weight"] = 0.15 * torch.randn(shared, h, generator=g)
        state[f"{prefix}.shared_experts.up_proj.weight"] = 0.15 * torch.randn(shared, h, generator=g)
        state[f"{prefix}.shared_experts.down_proj.weight"] = 0.15 * torch.randn(h, shared, generator=g)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    if tokenizer:
        write_tokenizer(folder, values["vocab_size"])
    return folder


# gpt-oss at tiny sizes: every layer MoE, sliding (window 4) and full layers, YaRN as released.
GPT_OSS = dict(
    SMALL,
    num_hidden_layers=2,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=32,
    sliding_window=4,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)


def make_gpt_oss(folder: Path, seed: int = 0, tokenizer: bool = True, dtype=torch.float32, **overrides) -> Path:
    """gpt-oss as transformers writes it (the bf16 release layout: ``mlp.experts.gate_up_proj [E, H, 2I]``
    interleaved, ``down_proj [E, I, H]``, their biases, ``mlp.router.weight``/``.bias``, attention sinks),
    every tensor (biases and sinks too) redrawn, stored in ``dtype``."""
    from transformers import GptOssConfig, GptOssForCausalLM

    model = GptOssForCausalLM(GptOssConfig(**{**GPT_OSS, **overrides}))
    randomize(model, seed)
    return _save(model.to(dtype), folder, "v5", tokenizer)


def mxfp4_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., in]`` floats -> (blocks ``[..., in/32, 16]``, scales ``[..., in/32]``) uint8, as gpt-oss's
    release stores its experts: per 32 values a power-of-two scale that brings the largest into E2M1's
    range, each value rounded to the nearest E2M1 number, two codes a byte, the low nibble first."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    w = weight.float().reshape(*weight.shape[:-1], -1, 32)
    amax = w.abs().amax(-1).clamp(min=2.0**-100)
    exponent = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)  # 6 = 1.5 · 2²: E2M1's largest
    scaled = (w / torch.pow(2.0, exponent).unsqueeze(-1)).clamp(-6, 6)
    code = (scaled.abs().unsqueeze(-1) - values).abs().argmin(-1) | ((scaled < 0).long() << 3)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def make_gpt_oss_mxfp4(folder: Path, source: Path) -> Path:
    """An MXFP4 copy of a gpt-oss folder, as the release ships: each ``experts.*_proj`` as ``_blocks`` and
    ``_scales`` in ``[E, out, ...]`` (transposed from transformers' bf16 layout) and
    ``quantization_config`` ``mxfp4``; everything else as in ``source``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    state = load_file(str(folder / "model.safetensors"))
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4_encode(state.pop(name).transpose(1, 2))
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks.contiguous(), scales.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


FAMILY_MAKERS = {
    "mixtral": make_mixtral,
    "qwen2_moe": make_qwen2_moe,
    "deepseek": make_deepseek,
    "deepseek_v3": make_deepseek_v3,
    "glm4_moe": make_glm4_moe,
    "gpt_oss": make_gpt_oss,
}
